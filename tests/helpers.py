"""Run the stage scripts the way a user does (`torchrun ... train/<stage>.py key=value`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_cmd(stage: str, out: Path, overrides: list[str], nproc: int = 2) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train" / f"{stage}.py"), f"output_dir={out}", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return cmd, env


def run_stage(stage: str, out: Path, overrides: list[str], nproc: int = 2, timeout: int = 600, check: bool = True,
              env: dict | None = None):
    cmd, base_env = stage_cmd(stage, out, overrides, nproc)
    proc = subprocess.run(cmd, cwd=REPO, env={**base_env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl rows; a last line still being written (or cut by a kill) is left out."""
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def losses(out: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in metrics(out)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_hf_repository(hf: Path, stdout: str, stage: str) -> None:
    """An export is a complete Hugging Face repository: hub-layout weights that transformers loads with the
    live model's logits (the stage logs their sum on the probe batch), the project's tokenizer and chat
    template through AutoTokenizer, generation_config.json, training_config.yaml and a model card."""
    import re

    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from data.chat import encode_prompt
    from data.tokenizer import load_tokenizer
    from model.card import front_matter
    from model.export import probe_ids
    from model.stream import streamed_logits

    keys = set()
    for f in hf.glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(f, "pt") as s:
            keys |= set(s.keys())
    assert keys and not any("gate_up_proj" in k or "down_proj" in k or ".mlp." in k for k in keys), sorted(keys)[:5]
    assert any(".block_sparse_moe.experts.0.w1.weight" in k for k in keys), sorted(keys)[:5]
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    line = next(l for l in stdout.splitlines() if "export check:" in l)
    live_sum = float(re.search(r"live logits sum (\S+);", line).group(1))
    diff, tol, scale = map(float, re.search(r"= (\S+) \(tolerance (\S+) × (\S+)\)", line).groups())
    assert diff <= tol * scale, line
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids).logits.double()
    assert abs(logits.sum().item() - live_sum) <= 1e-5 * logits.abs().sum().item(), (logits.sum().item(), live_sum)
    torch.testing.assert_close(logits.float(), streamed_logits(hf, ids, torch.float32), atol=1e-4, rtol=1e-4)
    # tokenizer: the project's tokens for text and chats
    hf_tok, ours = AutoTokenizer.from_pretrained(hf), load_tokenizer(hf)
    for text in ("The capital of France", "  two spaces\nand a line", "数字 123 🤖"):
        assert hf_tok(text).input_ids == [ours.bos_id] + ours.encode(text), text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = hf_tok.apply_chat_template(chat, tokenize=True)
    assert list(out["input_ids"] if hasattr(out, "keys") else out) == encode_prompt(chat, ours)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (hf / name).is_file(), name
    gen = GenerationConfig.from_pretrained(hf)
    assert (gen.bos_token_id, gen.eos_token_id, gen.pad_token_id, gen.do_sample) == (1, 2, 2, False)
    resolved = OmegaConf.load(hf / "training_config.yaml")  # the stage's resolved config travels along
    assert resolved.stage == stage and resolved.recipe_name == f"tiny/{stage}"  # which recipe ran is recorded
    card = (hf / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "apache-2.0" and meta["mixtral_tune_stages"][-1]["stage"] == stage, meta
    assert meta["mixtral_tune_stages"][-1]["steps"] == resolved.max_steps
    assert "```python" in card and not (hf.parent / "export_check.pt").exists()
    # the tools users go to next: transformers' pipeline on chat messages answers as eval/generate.py does,
    # and the card's usage snippet runs on the export as written
    from transformers import pipeline

    from eval.generate import chat_reply

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    piped = pipeline("text-generation", model=str(hf))(messages, max_new_tokens=12)[0]["generated_text"][-1]
    assert piped["role"] == "assistant" and piped["content"] == chat_reply(model, ours, messages, 12)
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

