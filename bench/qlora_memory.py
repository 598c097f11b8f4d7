"""QLoRA memory and speed: our 4-bit base against our 16-bit LoRA and against TRL + PEFT + bitsandbytes.

    python bench/qlora_memory.py                      # a 1.76 GB (fp32) hub-layout Mixtral, 6 steps (~3 min)
    python bench/qlora_memory.py --hidden 128 --ffn 256 --layers 2 --steps 2          # smoke

A Mixtral of `--hidden`/`--ffn`/`--layers` (default 1024/1792/8: 439 M parameters, 352 M of them in experts)
is saved in the hub key layout; the project's synthetic chats are encoded once with our [INST] encoder and
every side trains on the same token ids, one process each, bf16 compute, micro-batch 2 × accumulation 2,
gradient checkpointing on, LoRA r 16 on the attention projections:

    ours QLoRA   python train/sft.py recipe=tiny/sft model_path=<folder> model.quantize=nf4 lora.enabled=true ...
    ours LoRA    the same without model.quantize (the base in bf16)
    TRL QLoRA    SFTTrainer + peft LoraConfig + BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization,
                 bf16 compute): what a TRL user writes (bench/_trl_qlora_worker.py)

Memory: each process's peak RSS (ours: the stage's memory.json, from loading on; TRL: VmHWM at its end) minus
the same side's run on the `tiny` preset (Python, torch and the libraries), as a ratio of the model's fp32
bytes. Speed: label tokens/s from step 2 on. Goals: our QLoRA
≤ 0.35× the model's fp32 bytes; ≤ 0.5× TRL's; tokens/s ≥ TRL's. The "4-bit share" column says how much of
the model each side stores in 4 bits (transformers 5 keeps Mixtral's experts as fused 3-D parameters, which
bitsandbytes' `load_in_4bit` does not quantize). Last line:
    qlora peak RSS ratio vs TRL: X.XX
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import run_stage_measured, run_worker, save_model  # noqa: E402
from bench.load_memory import save_big_model  # noqa: E402


def chats_jsonl(path: Path, max_len: int) -> Path:
    from data.chat import encode_chat
    from data.synthetic import sft_chats
    from data.tokenizer import load_tokenizer

    tok = load_tokenizer()
    with open(path, "w") as f:
        for c in sft_chats(400, seed=0):
            ids, labels = encode_chat(c["messages"], tok)
            if len(ids) <= max_len:
                f.write(json.dumps({"messages": c["messages"], "input_ids": ids, "labels": labels}) + "\n")
    return path


def ours(model_dir: Path, jsonl: Path, out: Path, a, quantize: bool) -> dict:
    m, _, _ = run_stage_measured("sft", [
        "recipe=tiny/sft", f"model_path={model_dir}", f"data.path={jsonl}", "data.format=messages", "data.dedup=false",
        f"max_seq_len={a.max_len}", "global_batch_size=4", "micro_batch_size=2", f"max_steps={a.steps}",
        "optim.lr=1e-4", "optim.schedule=constant", "optim.warmup_steps=0", "precision=bf16", "export=false",
        "logging=none", "lora.enabled=true", "lora.r=16", "lora.alpha=32", "lora.dropout=0",
        "model.gradient_checkpointing=true", *(["model.quantize=nf4"] if quantize else [])], out)
    timed = m[1:]
    # the stage's own per-phase peaks (memory.json: VmHWM from loading on); not getrusage's ru_maxrss, which Linux
    # carries over from this parent process (it held the model while saving it) into the child
    phases = json.loads((out / "memory.json").read_text())
    return {"tokens_per_s": sum(r["label_tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
            "peak_rss_mb": max(max(p["peak_rss_bytes"]) for p in phases.values()) / 2**20, "losses": [r["ce"] for r in m],
            "phases_mb": {k: max(p["peak_rss_bytes"]) / 2**20 for k, p in phases.items()}}


def trl(model_dir: Path, jsonl: Path, out: Path, a) -> dict:
    from data.tokenizer import default_tokenizer_path

    return run_worker("_trl_qlora_worker.py", {
        "data": str(jsonl), "tokenizer": str(default_tokenizer_path()), "model": str(model_dir), "out": str(out),
        "micro": 2, "gas": 2, "steps": a.steps, "lr": 1e-4, "max_len": a.max_len})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=1792)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--max-len", type=int, default=256)
    a = ap.parse_args()

    from model.memory import parameter_counts

    work = Path(tempfile.mkdtemp(prefix="qlora_memory_"))
    try:
        config = save_big_model(work / "model", a.hidden, a.ffn, a.layers)
        tiny = save_model(work / "tiny", "tiny")
        counts = parameter_counts(config)
        model_bytes = 4 * counts["total"]
        four_bit_ours = (counts["experts"] + counts["attention"]) / counts["total"]
        jsonl = chats_jsonl(work / "chats.jsonl", a.max_len)
        runs = {
            "ours QLoRA": (ours(work / "model", jsonl, work / "q", a, True), ours(tiny, jsonl, work / "qt", a, True),
                           four_bit_ours),
            "ours LoRA (bf16 base)": (ours(work / "model", jsonl, work / "l", a, False),
                                      ours(tiny, jsonl, work / "lt", a, False), 0.0),
        }
        theirs, theirs_tiny = trl(work / "model", jsonl, work / "t", a), trl(tiny, jsonl, work / "tt", a)
        runs["TRL QLoRA (bitsandbytes load_in_4bit)"] = (theirs, theirs_tiny, theirs["four_bit_share"])
        print(f"model: {counts['total'] / 1e6:.0f} M parameters ({counts['experts'] / 1e6:.0f} M in experts), "
              f"{model_bytes / 2**30:.2f} GiB in fp32, hub layout; {a.steps} steps of 2 × 2 rows ≤ {a.max_len} tokens, bf16")
        print(f"{'run':<40}{'peak RSS MB':>12}{'above tiny / model':>20}{'4-bit share':>13}{'tokens/s':>10}")
        above = {}
        for name, (big, small, share) in runs.items():
            above[name] = (big["peak_rss_mb"] - small["peak_rss_mb"]) * 2**20 / model_bytes
            print(f"{name:<40}{big['peak_rss_mb']:>12.0f}{above[name]:>20.2f}{share:>13.2f}{big['tokens_per_s']:>10.0f}")
        for name in ("ours QLoRA", "ours LoRA (bf16 base)"):
            big, small, _ = runs[name]
            print(f"{name}, peak RSS above tiny per phase, MB: " + ", ".join(
                f"{k} {v - small['phases_mb'].get(k, 0):.0f}" for k, v in big["phases_mb"].items()))
        q, t = runs["ours QLoRA"][0], theirs
        ratio = above["ours QLoRA"] / above["TRL QLoRA (bitsandbytes load_in_4bit)"]
        print(f"goals: ours QLoRA ≤ 0.35× model: {above['ours QLoRA']:.2f} "
              f"({'met' if above['ours QLoRA'] <= 0.35 else 'NOT met'}); ≤ 0.5× TRL: {ratio:.2f} "
              f"({'met' if ratio <= 0.5 else 'NOT met'}); tokens/s ≥ TRL: {q['tokens_per_s'] / t['tokens_per_s']:.2f}× "
              f"({'met' if q['tokens_per_s'] >= t['tokens_per_s'] else 'NOT met'})")
        print(f"qlora peak RSS ratio vs TRL: {ratio:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
