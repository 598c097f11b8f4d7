"""bf16 against fp32, each stage run as the README and docs/ give it (`python train/<stage>.py recipe=... precision=X`,
one process, the recipe's defaults otherwise), side by side in one run.

    python bench/bf16_vs_fp32.py [--model tiny] [--steps 100] [--stages sft pretrain dpo] [--threads 2]

For each stage and precision: the loss at steps 1, 10, 50 and the last; tokens/s (median step from step 2 on);
model FLOPs utilisation against the measured matmul peak of *that* precision and against the bf16 peak; the
peak RSS of the training steps (memory.json's later_steps phase). Ratios bf16 / fp32 are printed last. DPO
starts from the fp32 SFT run's export in both precisions (cast to bf16 when loaded in bf16), or from the
preset's random weights when SFT is not among the stages. The table goes to BENCHMARKS.md with the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from train.config import compose

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_stage_measured  # noqa: E402
from mfu import matmul_peak  # noqa: E402


def flops_per_token(model: str, seq: int) -> float:
    """6 · N_active (the embedding lookup excluded) + 12 · layers · hidden · context (bench/mfu.py)."""
    from omegaconf import OmegaConf

    from model.build import count_parameters, mixtral_config
    from train.config import compose

    cfg = mixtral_config(OmegaConf.to_container(compose("sft", [f"model={model}"]).model))
    n_active = count_parameters(cfg)["active"] - cfg.vocab_size * cfg.hidden_size
    return 6 * n_active + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--stages", nargs="+", default=["sft", "pretrain", "dpo"])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.environ["OMP_NUM_THREADS"] = str(a.threads)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"matmul peak ({a.threads} threads): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    tmp = Path(tempfile.mkdtemp(prefix="bench_bf16_"))
    rows, results = [], {}
    for stage in a.stages:
        for precision in ("fp32", "bf16"):
            overrides = [f"recipe=tiny/{stage}", f"model={a.model}", f"max_steps={a.steps}", f"precision={precision}",
                         "logging=none"]
            if stage == "dpo":  # both precisions start from the same weights: the fp32 SFT run's export
                sft = tmp / "sft_fp32" / "hf"
                overrides.append(f"model_path={sft}" if sft.is_dir() else "allow_random_init=true")
            m, rss_mb, _ = run_stage_measured(stage, overrides, tmp / f"{stage}_{precision}")
            memory = json.loads((tmp / f"{stage}_{precision}" / "memory.json").read_text())
            later = max(memory.get("later_steps", memory["first_step"])["peak_rss_bytes"]) / 2**30
            tok_s = statistics.median(r["tokens"] / r["step_time_s"] for r in m[1:]) if len(m) > 1 else float("nan")
            seq = compose(stage, overrides[:2]).max_seq_len
            fpt = flops_per_token(a.model, seq)
            at = {s: m[min(s, len(m)) - 1]["loss"] for s in (1, 10, 50, len(m))}
            results[stage, precision] = {"tok_s": tok_s, "rss": later, "losses": at}
            rows.append((stage, precision, at, tok_s, tok_s * fpt / peak[precision], tok_s * fpt / peak["bf16"], later))
    print(f"\n| stage | precision | loss step 1 / 10 / 50 / {a.steps} | tokens/s | MFU (own peak) | MFU (bf16 peak) "
          f"| peak RSS, training steps (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for stage, precision, at, tok_s, mfu_own, mfu16, rss in rows:
        losses = " / ".join(f"{v:.4f}" for v in at.values())
        print(f"| {stage} | {precision} | {losses} | {tok_s:.0f} | {mfu_own:.3f} | {mfu16:.3f} | {rss:.2f} |")
    print()
    for stage in a.stages:
        f, b = results[stage, "fp32"], results[stage, "bf16"]
        first = abs(b["losses"][1] - f["losses"][1]) / f["losses"][1]
        last = max(f["losses"])
        print(f"{stage}: bf16/fp32 tokens/s {b['tok_s'] / f['tok_s']:.2f}×, peak RSS {b['rss'] / f['rss']:.2f}×, "
              f"first-step loss {first:.1e} relative, step {last} loss {b['losses'][last]:.4f} vs {f['losses'][last]:.4f}")
    stage = a.stages[0]
    print(f"bf16 / fp32 {stage} tokens/s: {results[stage, 'bf16']['tok_s'] / results[stage, 'fp32']['tok_s']:.2f}")


if __name__ == "__main__":
    main()
