"""The planner (train/plan.py) against measured peak memory: per rank, above a baseline.

    python bench/plan_accuracy.py                  # every case below (~15 min on 2 cores)
    python bench/plan_accuracy.py --only "small SFT ZeRO-0"        # one case
    python bench/plan_accuracy.py --bytes-allocated                # RSS following the bytes allocated

Each case runs 3 optimizer steps of a stage from scratch on the `small` preset (`torchrun`,
OMP_NUM_THREADS=1 per rank), and the same command on the `tiny` preset as its baseline. Every stage
records, per rank and phase, its peak RSS and the RSS the phase started from (memory.json), so

    peak(run)  = max over ranks of ( max(peak RSS of the engine, first-step and later-steps phases)
                                     − RSS when loading began )
    measured   = peak(small) − peak(tiny)
    planned    = plan(small) − plan(tiny), plan = the planner's per-rank total for that stage, preset,
                 layout, micro-batch and sequence length: weights + gradients + optimizer + ZeRO-1/2 step
                 buffer + ZeRO-3 gathers + activations (with or without gradient checkpointing, as
                 configured) + the loss head's workspace + AutoEP all-to-all (train/plan.py `row`,
                 formulas in model/memory.py)

The tiny run carries what a layout costs whatever the model (DeepSpeed's engine and its threads, the
data, first-step workspaces: 45-100 MB here), which the planner does not count; the difference checks the
part that grows with the model. The table shows both. The planner counts bytes allocated (on a GPU,
`torch.cuda.max_memory_allocated`); on CPU glibc keeps freed heap pages resident, so with the stages'
training setting (allocations below 4-32 MiB from the heap, train/memory_log.py `set_mmap_threshold`), which
these runs use as every user does, RSS holds the allocator's slack on top of what was allocated. With
`--bytes-allocated` the runs set `malloc_mmap_threshold=131072` instead: every allocation of 128 KiB or more
is its own mapping, returned on free, so RSS follows the bytes allocated, which is what the planner counts
(tests/bench/test_plan_accuracy.py checks its formulas so). Goal: every case's planned / measured within ±20%;
the last line is the largest |planned / measured − 1|.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import peak_above_load  # noqa: E402

COMMON = ["data.synthetic_samples=64", "max_steps=3", "export=false", "logging=none", "optim.name=adamw",
          "optim.warmup_steps=0", "router.aux_loss_coef=0.01"]
SFT = ["recipe=tiny/sft", "max_seq_len=256", "micro_batch_size=4"]
DPO = ["recipe=tiny/dpo", "allow_random_init=true", "max_seq_len=128", "micro_batch_size=2"]  # (pairs)

CASES = {  # name: (stage, ranks, overrides); each runs on `small` and, as its baseline, on `tiny`
    "small SFT ZeRO-0": ("sft", 1, [*SFT, "deepspeed=zero0"]),
    "small SFT ZeRO-1": ("sft", 2, [*SFT, "deepspeed=zero1"]),
    "small SFT ZeRO-2": ("sft", 2, [*SFT, "deepspeed=zero2"]),
    "small SFT ZeRO-3": ("sft", 2, [*SFT, "deepspeed=zero3"]),
    "small SFT ZeRO-3, checkpointing": ("sft", 2, [*SFT, "deepspeed=zero3", "model.gradient_checkpointing=true"]),
    "small SFT ZeRO-2 + EP 2": ("sft", 2, [*SFT, "deepspeed=zero2", "expert_parallel_size=2"]),
    "small SFT ZeRO-3 + EP 2": ("sft", 2, [*SFT, "deepspeed=zero3", "expert_parallel_size=2"]),
    "small SFT LoRA ZeRO-0": ("sft", 1, [*SFT, "deepspeed=zero0", "lora.enabled=true"]),
    "small SFT LoRA ZeRO-3": ("sft", 2, [*SFT, "deepspeed=zero3", "lora.enabled=true"]),
    "small SFT LoRA ZeRO-3, checkpointing": ("sft", 2, [*SFT, "deepspeed=zero3", "lora.enabled=true",
                                                        "model.gradient_checkpointing=true"]),
    "small DPO ZeRO-2": ("dpo", 2, [*DPO, "deepspeed=zero2"]),
    "small DPO LoRA ZeRO-3": ("dpo", 2, [*DPO, "deepspeed=zero3", "lora.enabled=true"]),
    "small pretrain ZeRO-1": ("pretrain", 2, ["recipe=tiny/pretrain", "max_seq_len=256", "micro_batch_size=4",
                                              "deepspeed=zero1"]),
}


def planned_bytes(stage: str, ranks: int, overrides: list[str]) -> float:
    import torch

    from train.config import compose
    from train.plan import model_config, row
    from train.preflight import layout_of, tokens_per_micro_batch

    cfg = compose(stage, [*COMMON, *overrides])
    config, _ = model_config(cfg)
    return row(config, layout_of(cfg, ranks, torch.float32), tokens_per_micro_batch(cfg),
               bool(cfg.model.gradient_checkpointing), stage == "dpo")["gpu"]


def measured_bytes(stage: str, ranks: int, overrides: list[str], out: Path, bytes_allocated: bool = False) -> float:
    exact = ["malloc_mmap_threshold=131072"] if bytes_allocated else []
    return peak_above_load(stage, ranks, [*COMMON, *overrides, *exact], out, ("engine", "first_step", "later_steps"))


def measure(names: list[str], bytes_allocated: bool = False) -> list[dict]:
    """Per named case: planned and measured bytes on `small` and on `tiny` (the baseline); `bytes_allocated`:
    measured with RSS following the allocations (module docstring)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            stage, ranks, overrides = CASES[name]
            row = {"case": name}
            for preset in ("small", "tiny"):
                o = [*overrides, f"model={preset}"]
                row[preset] = (planned_bytes(stage, ranks, o), measured_bytes(stage, ranks, o, Path(tmp) / "run", bytes_allocated))
            (ps, ms), (pt, mt) = row["small"], row["tiny"]
            row["ratio"] = (ps - pt) / (ms - mt)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    ap.add_argument("--bytes-allocated", action="store_true",
                    help="malloc_mmap_threshold=131072: RSS follows the bytes allocated (default: the stages' settings)")
    a = ap.parse_args()
    names = a.only or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; cases: {list(CASES)}")
    rows = measure(names, a.bytes_allocated)
    mb = 2**20
    print(f"{'case':38s} {'small planned/measured':>23s} {'tiny (baseline)':>16s} {'difference':>12s} {'ratio':>6s}  ±20%")
    for r in rows:
        (ps, ms), (pt, mt) = r["small"], r["tiny"]
        print(f"{r['case']:38s} {ps / mb:11.0f} / {ms / mb:<9.0f} {pt / mb:6.0f} / {mt / mb:<7.0f} "
              f"{(ps - pt) / mb:5.0f} / {(ms - mt) / mb:<5.0f} {r['ratio']:6.2f}  {'yes' if abs(r['ratio'] - 1) <= 0.2 else 'NO'}")
    print(f"largest |planned / measured - 1|: {max(abs(r['ratio'] - 1) for r in rows):.2f}")


if __name__ == "__main__":
    main()
