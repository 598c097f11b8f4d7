"""DPO throughput and memory with a precomputed vs a live reference (tiny or small preset, CPU,
one process each, the real `train/dpo.py`).

    python bench/dpo_reference_memory.py [--model small] [--steps 10]

Prints pairs/s (from step 2 on) and the process's peak RSS for `dpo.reference=precomputed` (the
reference pass happens once before training and is cached) and `dpo.reference=live` (a second
frozen model beside the policy, one extra forward per micro-batch). Last line:
    dpo live/precomputed peak RSS: X.XX
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RSS_WRAPPER = ("import atexit, resource, runpy, sys; atexit.register(lambda: print('PEAK_RSS_MB', "
               "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def run(mode: str, a, tmp: Path) -> dict:
    out = tmp / mode
    cmd = [sys.executable, "-c", RSS_WRAPPER, str(REPO / "train" / "dpo.py"), "recipe=tiny/dpo", f"model={a.model}",
           f"output_dir={out}", f"max_steps={a.steps}", f"dpo.reference={mode}", "export=false", "deepspeed=zero0",
           "global_batch_size=8", "micro_batch_size=4", "data.synthetic_samples=200"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(29700 + len(mode))})
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][1:]
    rss = float(next(l.split()[1] for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_MB")))
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
