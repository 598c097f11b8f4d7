"""DPO throughput and memory with a precomputed vs a live reference (tiny or small preset, CPU,
one process each, the real `train/dpo.py`).

    python bench/dpo_reference_memory.py [--model small] [--steps 10]

Prints pairs/s (from step 2 on) and the process's peak RSS for `dpo.reference=precomputed` (the
reference pass happens once before training and is cached) and `dpo.reference=live` (a second
frozen model beside the policy, one extra forward per micro-batch). Last line:
    dpo live/precomputed peak RSS: X.XX
"""

import argparse
import shutil
import tempfile
from pathlib import Path

from _common import run_stage_measured


def run(mode: str, a, tmp: Path) -> dict:
    m, rss, _ = run_stage_measured("dpo", [
        "recipe=tiny/dpo", f"model={a.model}", "allow_random_init=true", f"max_steps={a.steps}", f"dpo.reference={mode}", "export=false",
        "deepspeed=zero0", "global_batch_size=8", "micro_batch_size=4", "data.synthetic_samples=200"], tmp / mode)
    m = m[1:]
    return {"pairs_per_s": sum(r["pairs"] for r in m) / sum(r["step_time_s"] for r in m), "peak_rss_mb": rss}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    res = {mode: run(mode, a, tmp) for mode in ("precomputed", "live")}
    for mode, r in res.items():
        print(f"{mode:12s} {r['pairs_per_s']:6.2f} pairs/s  peak RSS {r['peak_rss_mb']:7.0f} MB")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"dpo live/precomputed peak RSS: {res['live']['peak_rss_mb'] / res['precomputed']['peak_rss_mb']:.2f}")


if __name__ == "__main__":
    main()
