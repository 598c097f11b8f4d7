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


def with_faults(folder: Path, *faults: str) -> dict:
    """Environment entries that install test faults (train/faults.py `install`, e.g. "nan_loss@3") in every Python
    process of a run started with them, the launcher's workers included: a `sitecustomize` module in `folder`,
    put first on PYTHONPATH, which Python imports at start-up."""
    site = Path(folder) / "fault_site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(f"from train import faults\n\nfaults.install(*{list(faults)!r})\n")
    return {"PYTHONPATH": os.pathsep.join(p for p in (str(site), str(REPO), os.environ.get("PYTHONPATH")) if p)}


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
    # transformers reads the export as the export check's own reader does (in fp32, so that the two agree to
    # 1e-4 whatever the export's dtype); the stage's check compared that reader, in the run's dtype and with the
    # live expert choices, against the live model (model/export.py `verify_export`)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    exported = json.loads((hf / "config.json").read_text()).get("dtype", "float32")
    line = next(l for l in stdout.splitlines() if "export check:" in l)
    assert f"tokens, {exported};" in line, line
    live_sum = float(re.search(r"live logits sum (\S+);", line).group(1))
    diff, tol, scale = map(float, re.search(r"= (\S+) \(tolerance (\S+) × (\S+)\)", line).groups())
    assert diff <= tol * scale, line
    ids = probe_ids(model.config.vocab_size)
    with torch.no_grad():
        logits = model(ids).logits.double()
    # an fp32 run's live logits are the export's to 1e-5 of their sum; a bf16 run's are bf16 values
    rel = 1e-5 if exported == "float32" else tol
    assert abs(logits.sum().item() - live_sum) <= rel * logits.abs().sum().item(), (logits.sum().item(), live_sum)
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
    piped = pipeline("text-generation", model=str(hf), dtype=torch.float32)(messages, max_new_tokens=12)[0]["generated_text"][-1]
    assert piped["role"] == "assistant" and piped["content"] == chat_reply(model, ours, messages, 12)
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    run = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]



ELASTIC = ["optim.name=adamw", "optim.weight_decay=0.1", "data.synthetic_samples=64", "max_seq_len=64",
           "global_batch_size=8", "micro_batch_size=2", "router.aux_loss_coef=0", "export=false",
           "optim.warmup_steps=0", "optim.schedule=constant", "checkpoint_every=1", "keep_checkpoints=4"]


def check_resume_elsewhere(stage: str, overrides: list[str], before: tuple[int, list[str]],
                           after: tuple[int, list[str]], tmp: Path, env: dict | None = None) -> None:
    """Resume on another layout, checked against both uninterrupted runs (4 steps each):

    - the old layout runs 4 steps, keeping every checkpoint; a copy of its folder loses steps 3-4 and
      resumes from step 2 on the new layout (`(nproc, overrides)` each);
    - step 3's loss equals the old layout's (1e-6 relative): the weights and the data position came
      across (the forward pass now runs on the new layout);
    - every step's loss is as close to the new layout's uninterrupted run as the old layout's own run is
      (+ 1e-5 relative): the AdamW moments and step counts came across too (losing them moves step 4 by
      ~1e-3); layouts with expert parallelism on one side only sum in another order, ~4e-5 apart by step 4;
    - the sample ids of every step equal both runs'.
    In bf16 (`precision=bf16` among the overrides) "equal" means within bf16's noise: a layout's kernels round
    differently (measured ≤ 4e-5 relative over 4 steps), so 2e-4 relative stands for 1e-6 and 1e-5, and the
    two uninterrupted layouts must agree to it as well (an optimizer that steps wrongly on one side, as
    ZeRO-0 bf16's Adam once did, moves step 2 by 2e-3)."""
    import shutil

    import pytest

    old, resumed, new = tmp / "old", tmp / "resumed", tmp / "new"
    run_stage(stage, old, [*overrides, "max_steps=4", *before[1]], nproc=before[0], env=env)
    shutil.copytree(old, resumed)
    for step in (3, 4):
        shutil.rmtree(resumed / "checkpoints" / f"step_{step}")
    proc = run_stage(stage, resumed, [*overrides, "max_steps=4", *after[1], "resume=true"], nproc=after[0], env=env)
    assert "converted to a portable checkpoint" in proc.stdout, proc.stdout[-3000:]
    run_stage(stage, new, [*overrides, "max_steps=4", *after[1]], nproc=after[0], env=env)
    o, r, n = metrics(old), metrics(resumed), metrics(new)
    assert [m["step"] for m in r] == [1, 2, 3, 4]
    assert [m["rows"] for m in r] == [m["rows"] for m in n] == [m["rows"] for m in o]
    bf16 = "precision=bf16" in [*overrides, *before[1], *after[1]]
    same, near = (2e-4, 2e-4) if bf16 else (1e-6, 1e-5)
    assert r[2]["loss"] == pytest.approx(o[2]["loss"], rel=same)
    if bf16:
        assert [m["loss"] for m in o] == pytest.approx([m["loss"] for m in n], rel=near)
    for step in range(4):
        gap = abs(o[step]["loss"] - n[step]["loss"]) + near * abs(n[step]["loss"])
        assert abs(r[step]["loss"] - n[step]["loss"]) <= gap, (step, r[step]["loss"], n[step]["loss"], o[step]["loss"])
    assert abs(n[3]["loss"] - n[2]["loss"]) > 1e-3  # the model really moves after the resume

