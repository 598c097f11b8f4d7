"""A Mixtral-8x22B-style (v3 tokenizer) model through the whole toolkit on CPU: SFT on tool-call chats → DPO on
prompts that hold tool calls and results → the export's tokenizer files → passkey, MT-Bench answers and the
OpenAI server answering with `tool_calls` (streamed too), then a follow-up turn with the tool's result."""

import json

import pytest
from omegaconf import OmegaConf

from helpers import losses, run_stage

CITIES = ["Paris", "Oslo", "Lima", "Rome", "Cairo", "Tokyo", "Quito", "Dakar"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TINY = ["model=tiny_v3", "max_seq_len=256", "data.dedup=false"]


def _chat(i: int, city: str, rep: int) -> list[dict]:
    cid = f"wx{i:04d}{rep:03d}"
    return [{"role": "user", "content": f"What is the weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": cid, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]},
            {"role": "tool", "tool_call_id": cid, "content": json.dumps({"temp": 10 + i})},
            {"role": "assistant", "content": f"It is {10 + i} degrees in {city}."}]


@pytest.fixture(scope="module")
def v3_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("v3")
    sft_data, dpo_data = root / "tools.jsonl", root / "pairs.jsonl"
    sft_data.write_text("".join(json.dumps({"messages": _chat(i, c, r), "tools": TOOLS}) + "\n"
                                for r in range(6) for i, c in enumerate(CITIES)))
    dpo_data.write_text("".join(json.dumps({"prompt": _chat(i, c, 0)[:3], "chosen": _chat(i, c, 0)[3]["content"],
                                            "rejected": "I cannot tell.", "tools": TOOLS}) + "\n"
                                for i, c in enumerate(CITIES)))
    sft = run_stage("sft", root / "sft", [*TINY, f"data.path={sft_data}", "max_steps=80", "global_batch_size=8",
                                          "micro_batch_size=8", "optim.lr=5e-3", "optim.warmup_steps=3",
                                          "optim.schedule=constant"], nproc=1)
    dpo = run_stage("dpo", root / "dpo", [*TINY, f"model_path={root / 'sft' / 'hf'}", f"data.path={dpo_data}",
                                          "max_steps=4", "global_batch_size=4", "micro_batch_size=4", "optim.lr=1e-4",
                                          "optim.schedule=wsd", "optim.warmup_steps=1", "optim.decay_fraction=0.5"],
                    nproc=1)
    return root, sft.stdout, dpo.stdout


def test_v3_stages_record_the_tokenizer_and_learn(v3_runs):
    root, sft_out, dpo_out = v3_runs
    for stage, out in (("sft", sft_out), ("dpo", dpo_out)):
        assert f"[{stage}] tokenizer: v3, 32768 pieces" in out
        used = OmegaConf.load(root / stage / "config.yaml").tokenizer_used
        assert (used.version, used.vocab_size) == ("v3", 32768)
        assert "export check" in out
    ls = losses(root / "sft")
    assert ls[0] == pytest.approx(10.4, abs=0.3) and ls[-1] < 1.0  # ≈ ln(32768) from scratch; it learns the chats
    # the rate each step applied: warmup 1, stable, then linear down to the floor at the last step (never below)
    from train.model_setup import lr_lambda

    cfg = OmegaConf.load(root / "dpo" / "config.yaml")
    assert losses(root / "dpo", "lr") == pytest.approx([1e-4 * lr_lambda(cfg)(k) for k in range(4)])
    assert losses(root / "dpo", "lr") == pytest.approx([1e-4, 1e-4, 0.55e-4, 0.1e-4])


def test_v3_export_tokenizer_and_template_equal_mistral_common(v3_runs):
    import random

    from transformers import AutoTokenizer

    from chat_cases import PLAIN_TEXTS, chat, reference
    from data.tokenizer import load_tokenizer, v3_tokenizer_path

    hf = v3_runs[0] / "dpo" / "hf"
    fast, tok = AutoTokenizer.from_pretrained(hf), load_tokenizer(hf)
    assert tok.version == "v3" and fast.convert_tokens_to_ids(["[INST]", "[/INST]", "[TOOL_CALLS]"]) == [3, 4, 5]
    assert json.loads((hf / "config.json").read_text())["vocab_size"] == 32768
    assert "Mistral's v3 format" in (hf / "README.md").read_text()  # the model card names the prompt format
    rng = random.Random(3)
    chats = [(_chat(i, c, 0), TOOLS) for i, c in enumerate(CITIES)]
    chats += [chat(rng, tools=True, canonical=True, texts=PLAIN_TEXTS) for _ in range(40)]
    for messages, tools in chats:
        out = fast.apply_chat_template(messages, tools=tools, tokenize=True)
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        assert ids == reference(messages, v3_tokenizer_path(), for_training=True, tools=tools)[0], messages


def test_v3_model_evaluates_and_serves_tool_calls(v3_runs, shared_data, tmp_path):
    from openai import OpenAI

    from eval import mt_bench, passkey
    from eval.config import PasskeyConfig
    from eval.generate import load
    from eval.serve import start_server

    model, tok = load(v3_runs[0] / "dpo" / "hf")
    cfg = OmegaConf.merge(OmegaConf.structured(PasskeyConfig), {"model_path": "v3", "lengths": [128], "depths": [0.5],
                                                                 "trials": 1, "mode": "chat"})
    assert len(passkey.evaluate(model, tok, cfg, tmp_path / "passkey", progress=False)["cells"]) == 1
    questions = mt_bench.load_questions(shared_data / "mt_bench" / "question.jsonl", limit=2)
    answers = mt_bench.generate_answers(model, tok, questions, "v3", tmp_path / "answers.jsonl", max_new_tokens=4,
                                        progress=False)
    assert len(answers) == 2 and all(len(a["choices"][0]["turns"]) == 2 for a in answers)

    httpd = start_server(model, tok, "v3", "127.0.0.1", 0, max_new_tokens=48)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{httpd.server_address[1]}/v1", api_key="unused")
        ask = [{"role": "user", "content": "What is the weather in Paris?"}]
        r = client.chat.completions.create(model="v3", messages=ask, tools=TOOLS, max_tokens=48)
        (call,) = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}
        assert len(call.id) == 9 and call.id.isalnum()
        chunks = list(client.chat.completions.create(model="v3", messages=ask, tools=TOOLS, max_tokens=48, stream=True))
        streamed = [t for c in chunks for t in (c.choices[0].delta.tool_calls or [])]
        assert [(t.id, t.function.name, t.function.arguments) for t in streamed] == \
            [(call.id, call.function.name, call.function.arguments)]
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        # the tool's result goes back as a tool message: the model answers in text
        follow = ask + [r.choices[0].message.model_dump(exclude_none=True),
                        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 10})}]
        r2 = client.chat.completions.create(model="v3", messages=follow, tools=TOOLS, max_tokens=24)
        assert r2.choices[0].finish_reason == "stop" and "degrees" in r2.choices[0].message.content
        # without tools (or tool_choice="none") the same question is answered as text
        r3 = client.chat.completions.create(model="v3", messages=ask, tools=TOOLS, tool_choice="none", max_tokens=8)
        assert r3.choices[0].message.tool_calls is None
    finally:
        httpd.shutdown()
