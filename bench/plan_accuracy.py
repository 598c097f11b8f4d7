"""The planner (train/plan.py) against measured peak memory: per rank, above a baseline.

    python bench/plan_accuracy.py                  # every case below (~6 min on 2 cores)
    python bench/plan_accuracy.py --only "small SFT ZeRO-0"        # one case

Each case runs 3 optimizer steps of a stage from scratch (`torchrun`, OMP_NUM_THREADS=1 per rank). Every
stage records, per rank and phase, its peak RSS and the RSS the phase started from (memory.json). Then

    measured = max over ranks of ( max(peak RSS of the engine, first-step and later-steps phases)
                                   − RSS when loading began )
    planned  = the planner's per-rank total for that stage, preset, layout, micro-batch and sequence length:
               weights + gradients + optimizer + ZeRO-1/2 step buffer + ZeRO-3 gathers + activations
               (with or without gradient checkpointing, as configured) + AutoEP all-to-all
               (train/plan.py `row`, formulas in model/memory.py)

and the table shows planned / measured. The planner counts bytes allocated (on a GPU,
`torch.cuda.max_memory_allocated`); on CPU glibc keeps freed heap pages resident, so with the stages'
training setting (allocations below 4-32 MiB from the heap) a first step's RSS peak is up to 2× what it
allocated. The cases run with `MIXTRAL_TUNE_MMAP_THRESHOLD=131072` (train/memory_log.py): every allocation
of 128 KiB or more is its own mapping, returned on free, so RSS follows the allocations. The baseline (Python, torch, DeepSpeed, the data) is what a
process holds before the first weight is built; the planner does not count it. Goal: every case within
±20%. The last line is the largest |planned / measured − 1|.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import REPO  # noqa: E402

COMMON = ["data.synthetic_samples=64", "max_steps=3", "export=false", "logging=none", "optim.name=adamw",
          "optim.warmup_steps=0", "router.aux_loss_coef=0.01"]
SFT = ["recipe=tiny/sft", "max_seq_len=256", "micro_batch_size=4"]
DPO = ["recipe=tiny/dpo", "allow_random_init=true", "max_seq_len=128", "micro_batch_size=2"]

CASES = {  # name: (stage, ranks, overrides)
    "small SFT ZeRO-0": ("sft", 1, [*SFT, "model=small", "deepspeed=zero0"]),
    "small SFT ZeRO-1": ("sft", 2, [*SFT, "model=small", "deepspeed=zero1"]),
    "small SFT ZeRO-2": ("sft", 2, [*SFT, "model=small", "deepspeed=zero2"]),
    "small SFT ZeRO-3": ("sft", 2, [*SFT, "model=small", "deepspeed=zero3"]),
    "small SFT ZeRO-2 + EP 2": ("sft", 2, [*SFT, "model=small", "deepspeed=zero2", "expert_parallel_size=2"]),
    "small SFT ZeRO-3, checkpointing": ("sft", 2, [*SFT, "model=small", "deepspeed=zero3",
                                                   "model.gradient_checkpointing=true"]),
    "small SFT ZeRO-3 + EP 2": ("sft", 2, [*SFT, "model=small", "deepspeed=zero3", "expert_parallel_size=2"]),
    "small SFT LoRA ZeRO-0": ("sft", 1, [*SFT, "model=small", "deepspeed=zero0", "lora.enabled=true"]),
    "small SFT LoRA ZeRO-3": ("sft", 2, [*SFT, "model=small", "deepspeed=zero3", "lora.enabled=true"]),
    "small SFT LoRA ZeRO-3, checkpointing": ("sft", 2, [*SFT, "model=small", "deepspeed=zero3", "lora.enabled=true",
                                                        "model.gradient_checkpointing=true"]),
    "small DPO ZeRO-2": ("dpo", 2, [*DPO, "model=small", "deepspeed=zero2"]),
    "small DPO LoRA ZeRO-3": ("dpo", 2, [*DPO, "model=small", "deepspeed=zero3", "lora.enabled=true"]),
    "tiny SFT ZeRO-0": ("sft", 1, [*SFT, "model=tiny", "deepspeed=zero0"]),
    "tiny DPO ZeRO-3 + EP 2": ("dpo", 2, [*DPO, "model=tiny", "deepspeed=zero3", "expert_parallel_size=2"]),
}


def planned_bytes(stage: str, ranks: int, overrides: list[str]) -> float:
    import torch

    from train.config import compose
    from train.plan import model_config, row
    from train.preflight import layout_of, tokens_per_micro_batch

    cfg = compose(stage, [*COMMON, *overrides])
    config, _ = model_config(cfg)
    return row(config, layout_of(cfg, ranks, torch.float32), tokens_per_micro_batch(cfg),
               bool(cfg.model.gradient_checkpointing))["gpu"]


def measured_bytes(stage: str, ranks: int, overrides: list[str], out: Path) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(REPO / "train" / f"{stage}.py"), f"output_dir={out}", "overwrite=true", *COMMON, *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MIXTRAL_TUNE_MMAP_THRESHOLD": "131072"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    phases = json.loads((out / "memory.json").read_text())
    base = phases["load"]["start_rss_bytes"]
    return max(max(phases[p]["peak_rss_bytes"][r] for p in ("engine", "first_step", "later_steps")) - base[r]
               for r in range(ranks))


def measure(names: list[str]) -> list[tuple[str, float, float]]:
    """(case, planned bytes, measured bytes) for each named case."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            stage, ranks, overrides = CASES[name]
            rows.append((name, planned_bytes(stage, ranks, overrides),
                         measured_bytes(stage, ranks, overrides, Path(tmp) / "run")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    a = ap.parse_args()
    names = a.only or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {list(CASES)}")
    rows = measure(names)
    print(f"{'case':28s} {'planned MB':>11s} {'measured MB':>12s} {'planned/measured':>17s}  within ±20%")
    for name, p, m in rows:
        print(f"{name:28s} {p / 2**20:11.1f} {m / 2**20:12.1f} {p / m:17.2f}  {'yes' if abs(p / m - 1) <= 0.2 else 'NO'}")
    print(f"largest |planned / measured - 1|: {max(abs(p / m - 1) for _, p, m in rows):.2f}")


if __name__ == "__main__":
    main()
