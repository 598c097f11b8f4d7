"""Evaluation: generation, passkey protocol and grid, the OpenAI-compatible server (real HTTP, the
official openai client), MT-Bench end to end with a tiny judge, routing analysis."""

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from data.tokenizer import default_tokenizer_path
from eval import mt_bench, passkey
from eval.config import MTBenchConfig, PasskeyConfig, ServeConfig
from eval.generate import generate, load
from model.build import build_model
from train.config import compose


def _save_tiny(path, seed=0, **overrides):
    preset = OmegaConf.to_container(compose("sft").model)
    preset.update(overrides)
    build_model(preset, seed=seed).save_pretrained(path)
    shutil.copy(default_tokenizer_path(), path / "tokenizer.model")
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load(_save_tiny(tmp_path_factory.mktemp("tiny")))


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tok = tiny
    prompts = [[tok.bos_id] + tok.encode(t) for t in ["Hello there", "A much longer prompt with many more words in it", "x"]]
    batched = generate(model, tok, prompts, max_new_tokens=8, batch_size=3, progress=False)
    single = [generate(model, tok, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in prompts]
    assert batched == single
    assert all(len(o) <= 8 for o in batched)


def test_passkey_prompt_follows_protocol(tokenizer):
    for depth in (0.0, 0.5, 1.0):
        text = passkey.passkey_text(10, depth, 12345)
        lines = text.split("\n")
        assert lines[0] == passkey.TASK and lines[-1] == passkey.QUESTION
        assert text.count("12345") == 2 and text.count("The pass key is 12345.") == 1  # the needle, once
        needle_at = text.index("The pass key is 12345.")
        before = text[:needle_at].count(passkey.FILLER)
        assert before == round(10 * depth)
        assert text.count(passkey.FILLER) == 10
    assert passkey.passkey_text(4, 0.5, 7, mode="chat").endswith(passkey.CHAT_QUESTION)
    for length in (128, 512, 1000):
        n = passkey.filler_for_length(length, tokenizer, "completion")
        assert len(passkey.prompt_ids(passkey.passkey_text(n, 0.5, 99999), tokenizer, "completion")) <= length
        assert len(passkey.prompt_ids(passkey.passkey_text(n + 1, 0.5, 99999), tokenizer, "completion")) > length
    assert passkey.first_number(" 12345. Remember") == "12345" and passkey.first_number(" no digits") is None


def test_passkey_grid_writes_files(tiny, tmp_path):
    model, tok = tiny
    cfg = OmegaConf.merge(OmegaConf.structured(PasskeyConfig), {"model_path": "tiny", "lengths": [128, 256],
                                                                 "depths": [0.0, 0.5, 1.0], "trials": 2})
    result = passkey.evaluate(model, tok, cfg, tmp_path, progress=False)
    assert len(result["cells"]) == 6 and all(c["trials"] == 2 for c in result["cells"])
    assert all(c["prompt_tokens"] <= c["length"] for c in result["cells"])
    for name in ("passkey.json", "passkey.png", "passkey.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "passkey.json").read_text())["settings"]["depths"] == [0.0, 0.5, 1.0]
    # scoring is exact: an untrained model does not guess 5-digit keys
    assert result["accuracy"] == sum(c["correct"] for c in result["cells"]) / 12


def test_passkey_at_the_model_length_never_holds_a_prompts_logits(tiny, tmp_path):
    """A passkey cell at the model's max_position_embeddings (2048 for tiny): generation computes the LM head
    for the last position of each prompt only (transformers' logits_to_keep), never (B, L, V) logits."""
    model, tok = tiny
    shapes = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        L = model.config.max_position_embeddings
        cfg = OmegaConf.merge(OmegaConf.structured(PasskeyConfig), {"model_path": "tiny", "lengths": [L],
                                                                     "depths": [0.5], "trials": 2, "max_new_tokens": 3})
        result = passkey.evaluate(model, tok, cfg, tmp_path, progress=False)
    finally:
        hook.remove()
    assert result["cells"][0]["prompt_tokens"] > L - 40
    assert shapes and all(s[1] == 1 for s in shapes), shapes[:3]
    with pytest.raises(ValueError, match="max_position_embeddings"):
        passkey.evaluate(model, tok, OmegaConf.merge(cfg, {"lengths": [2 * L]}), tmp_path, progress=False)


def test_rating_parse():
    assert mt_bench.parse_rating("Rating: [[7]]") == 7.0
    assert mt_bench.parse_rating("I give it [8.5] overall") == 8.5
    assert mt_bench.parse_rating("[[3]] then [9]") == 3.0
    assert mt_bench.parse_rating("no rating here") == -1.0


def test_serve_defaults_to_loopback():
    assert ServeConfig.host == "127.0.0.1"


@pytest.fixture(scope="module")
def judge_server(tmp_path_factory):
    from eval.serve import start_server

    # a judge model with room for MT-Bench's longest judge prompts (reference answers, two turns)
    model, tok = load(_save_tiny(tmp_path_factory.mktemp("judge"), seed=1, max_position_embeddings=8192))
    httpd = start_server(model, tok, "tiny-judge", "127.0.0.1", 0, max_new_tokens=16)
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()


def test_openai_client_talks_to_server(judge_server):
    from openai import OpenAI

    client = OpenAI(base_url=judge_server, api_key="unused")
    assert [m.id for m in client.models.list().data] == ["tiny-judge"]
    r = client.chat.completions.create(model="tiny-judge", messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 5
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny-judge", messages=[{"role": "user", "content": "Hi"}], max_tokens=5, stream=True))
    assert text == r.choices[0].message.content  # greedy: the stream spells the same answer
    with pytest.raises(Exception, match="400|expected role"):
        client.chat.completions.create(model="tiny-judge", messages=[{"role": "assistant", "content": "x"}], max_tokens=2)


def test_mt_bench_end_to_end_with_served_judge(tiny, judge_server, shared_data, tmp_path, monkeypatch):
    model, tok = tiny
    secret = "sk-test-not-a-real-key-8f3a"
    monkeypatch.setenv("OPENAI_API_KEY", secret)  # the judge reads it from the environment only
    cfg = OmegaConf.merge(OmegaConf.structured(MTBenchConfig), {
        "model_path": "tiny", "model_id": "tiny-model", "output_dir": str(tmp_path),
        "questions": str(shared_data / "mt_bench" / "question.jsonl"), "max_new_tokens": 4, "batch_size": 16,
        "judge": {"base_url": judge_server, "model": "tiny-judge", "max_tokens": 8, "concurrency": 2}})
    summary = mt_bench.run(cfg, model, tok, progress=False)
    answers = mt_bench.read_jsonl(tmp_path / "model_answer" / "tiny-model.jsonl")
    assert len(answers) == 80 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)
    assert set(answers[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    judgments = mt_bench.read_jsonl(tmp_path / "model_judgment" / "tiny-judge_single.jsonl")
    assert len(judgments) == 160
    assert set(judgments[0]) == {"question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"}
    names = {tuple(j["judge"]) for j in judgments}
    assert names == {("tiny-judge", n) for n in ("single-v1", "single-v1-multi-turn", "single-math-v1",
                                                 "single-math-v1-multi-turn")}
    math_prompt = next(j for j in judgments if j["judge"][1] == "single-math-v1")["user_prompt"]
    assert "[The Start of Reference Answer]" in math_prompt
    unparsable = sum(j["score"] == -1 for j in judgments)
    assert summary["unparsable"] == unparsable and summary["judged"] == 160
    assert (tmp_path / "scores.md").is_file() and (tmp_path / "mt_bench.png").is_file()
    # the key is sent to the endpoint but written nowhere
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    # resumable: a rerun answers and judges nothing new
    mt_bench.run(cfg, model, tok, progress=False)
    assert len(mt_bench.read_jsonl(tmp_path / "model_judgment" / "tiny-judge_single.jsonl")) == 160
    assert len(mt_bench.read_jsonl(tmp_path / "model_answer" / "tiny-model.jsonl")) == 80


def test_scores_follow_show_result():
    qs = [{"question_id": 1, "category": "math", "turns": ["a", "b"]}, {"question_id": 2, "category": "writing", "turns": ["a", "b"]}]
    js = [{"question_id": 1, "turn": 1, "score": 4.0}, {"question_id": 1, "turn": 2, "score": -1.0},
          {"question_id": 2, "turn": 1, "score": 8.0}, {"question_id": 2, "turn": 2, "score": 6.0}]
    s = mt_bench.scores(js, qs)
    assert (s["turn_1"], s["turn_2"], s["overall"], s["unparsable"]) == (6.0, 6.0, 6.0, 1)
    assert s["categories"] == {"math": 4.0, "writing": 7.0}


def test_routing_analysis(tiny):
    from eval.routing import analyse, subset_texts

    model, tok = tiny
    texts = subset_texts({})
    r = analyse(model, tok, texts["arithmetic"], max_tokens=300, seq_len=128)
    assert r["tokens"] == 300
    assert all(abs(sum(row) - 1) < 1e-6 for row in r["load"])
    assert all(0 <= x <= 1 for x in r["same_expert_first"] + r["same_expert_topk"])
    assert all(a <= b for a, b in zip(r["same_expert_first"], r["same_expert_topk"]))


def test_a_bf16_export_serves_every_eval_command(tmp_path):
    """A bf16 folder (what a bf16 run exports) loads in bf16 with fp32 routers, computes the logits a float32
    load of the same weights does (to bf16's rounding), generates, and runs the passkey grid and the routing
    analysis."""
    from eval.routing import analyse, subset_texts

    preset = OmegaConf.to_container(compose("sft").model)
    build_model(preset, dtype=torch.bfloat16, seed=0).save_pretrained(tmp_path / "bf16")
    shutil.copy(default_tokenizer_path(), tmp_path / "bf16" / "tokenizer.model")
    model, tok = load(tmp_path / "bf16", dtype="bf16")
    wide, _ = load(tmp_path / "bf16", dtype="fp32")
    assert model.dtype == torch.bfloat16 and type(model.model.layers[0].mlp.gate).__name__ == "_Fp32TopKRouter"
    prompts = [[tok.bos_id] + tok.encode(t) for t in ["The capital of France is", "1 + 1 ="]]
    with torch.no_grad():
        ids = torch.tensor([prompts[0]])
        narrow, exact = model(ids).logits.float(), wide(ids).logits
    assert (narrow - exact).abs().max() <= 4 * 2**-7 * max(1.0, exact.abs().max().item())
    assert all(len(o) <= 6 for o in generate(model, tok, prompts, max_new_tokens=6, progress=False))
    cfg = OmegaConf.merge(OmegaConf.structured(PasskeyConfig), {"model_path": "bf16", "lengths": [128],
                                                                 "depths": [0.5], "trials": 1})
    assert len(passkey.evaluate(model, tok, cfg, tmp_path / "passkey", progress=False)["cells"]) == 1
    assert analyse(model, tok, subset_texts({})["arithmetic"], max_tokens=100, seq_len=64)["tokens"] == 100


def test_load_names_a_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_run/hf: no such folder"):
        load(tmp_path / "no_such_run" / "hf")


def test_preference_eval_scores_each_answer_on_its_own(tiny, tmp_path):
    """Reward margins from the packed [prompt chosen][prompt rejected] rows equal those of separate
    forwards of prompt+chosen and prompt+rejected — also for a model whose config asks for a KV cache, as
    every export's config.json does (with a cache, transformers ignores the restarting position ids and
    the rejected answer attended to the chosen one)."""
    from data import synthetic
    from data.chat import encode_prompt
    from eval.curriculum import preference_eval

    ref, tok = tiny
    policy, _ = load(_save_tiny(tmp_path / "policy", seed=1))
    for m in (ref, policy):
        m.config.use_cache = True
    pairs = synthetic.preference_pairs(6, seed=0, split="heldout")

    def logp(model, pair, answer):
        prompt = encode_prompt(pair["prompt"], tok)
        ids = prompt + tok.encode(answer) + [tok.eos_id]
        with torch.no_grad():
            lp = model(torch.tensor([ids]), use_cache=False).logits[0, :-1].log_softmax(-1)
        return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][len(prompt) - 1:].sum().item()

    beta = 0.5
    want = [beta * ((logp(policy, p, p["chosen"]) - logp(ref, p, p["chosen"]))
                    - (logp(policy, p, p["rejected"]) - logp(ref, p, p["rejected"]))) for p in pairs]
    got = preference_eval(policy, ref, tok, pairs, beta, batch_size=4)
    assert got["reward_margin"] == pytest.approx(sum(want) / len(want), abs=1e-4)
    assert got["reward_accuracy"] == sum(w > 0 for w in want) / len(want)


def test_the_judge_fits_the_projects_server_with_default_settings(tiny, shared_data, tmp_path, capsys):
    """judge.max_tokens at its default (2048) against a served model whose whole context is 1024 tokens: the judge
    reads the context from GET /models and asks for what leaves the prompt room, and every judgment is made."""
    from eval.serve import start_server

    model, tok = tiny
    judge, judge_tok = load(_save_tiny(tmp_path / "judge", seed=2, max_position_embeddings=1024))
    httpd = start_server(judge, judge_tok, "small-judge", "127.0.0.1", 0)
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(MTBenchConfig), {
            "model_path": "tiny", "model_id": "tiny-model", "output_dir": str(tmp_path / "out"), "limit": 2,
            "questions": str(shared_data / "mt_bench" / "question.jsonl"), "max_new_tokens": 4,
            "judge": {"base_url": f"http://127.0.0.1:{httpd.server_address[1]}/v1", "model": "small-judge"}})
        assert cfg.judge.max_tokens == 2048  # the default
        summary = mt_bench.run(cfg, model, tok, progress=False)
    finally:
        httpd.shutdown()
    assert summary["judged"] == 4
    assert "small-judge has a context of 1024 tokens: asking for at most 256 tokens" in capsys.readouterr().out


def test_an_unreachable_judge_is_one_line_and_the_answers_are_kept(tmp_path, shared_data):
    import os
    import subprocess
    import sys

    from helpers import REPO

    folder = _save_tiny(tmp_path / "model")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "eval/mt_bench.py", f"model_path={folder}", "model_id=m", f"output_dir={out}",
                           f"questions={shared_data / 'mt_bench' / 'question.jsonl'}", "limit=1", "max_new_tokens=2",
                           "judge.base_url=http://127.0.0.1:9/v1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "judge endpoint http://127.0.0.1:9/v1 cannot be reached" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and len(mt_bench.read_jsonl(out / "model_answer" / "m.jsonl")) == 1
