"""Per-rank memory of model + gradients + optimizer state under ZeRO 0/1/2/3 and expert parallelism,
2 CPU ranks (gloo), the `small` preset (hidden 256, 4 layers, 8 experts top-2, vocabulary 32000), AdamW,
bf16 weights with fp32 master weights and moments (the GPU default; `--precision fp32` for the CPU one).

    python bench/zero_memory.py [--model small] [--precision bf16|fp32]

Each setting runs `torchrun --nproc_per_node 2 bench/_zero_memory_worker.py` (our engine, two
optimizer steps) and sums the storage of every live CPU tensor on each rank, minus what was alive
before the model was built — weights, gradients, Adam moments, DeepSpeed's fp32 partitions and
communication buckets — at its peak (after a backward, when the gradients exist; activations freed). Peak RSS is printed beside it (it also
holds the Python heap, libraries and the transient activations). Last line:
    zero-3 / zero-0 per-rank state: X.XX
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from _common import REPO

SETTINGS = {
    "ZeRO-0": ["deepspeed=zero0"],
    "ZeRO-1": ["deepspeed=zero1"],
    "ZeRO-2": ["deepspeed=zero2"],
    "ZeRO-3": ["deepspeed=zero3"],
    "ZeRO-2 + EP 2": ["deepspeed=zero2", "expert_parallel_size=2"],
    "ZeRO-3 + EP 2": ["deepspeed=zero3", "expert_parallel_size=2"],
}


def measure(overrides: list[str]) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "bench" / "_zero_memory_worker.py"), *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{' '.join(overrides)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="small")
    p.add_argument("--only", nargs="*", help="a subset of the settings (by name)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    a = p.parse_args()
    res = {}
    for name, overrides in SETTINGS.items():
        if a.only and name not in a.only:
            continue
        res[name] = measure([f"model={a.model}", f"precision={a.precision}", *overrides])
        per_rank = ", ".join(f"rank {r['rank']} {r['state_mb']:7.1f} MB state / {r['peak_rss_mb']:6.0f} MB peak RSS"
                             for r in res[name])
        print(f"{name:14s} {per_rank}", flush=True)
    base = max(r["state_mb"] for r in res["ZeRO-0"]) if "ZeRO-0" in res else None
    print(f"model: {a.model} preset, {res[next(iter(res))][0]['params_m']:.1f} M parameters, {a.precision}, AdamW, 2 ranks")
    z3 = "ZeRO-3" if "ZeRO-3" in res else next((k for k in res if k.startswith("ZeRO-3")), None)
    if base and z3:
        for name, rows in res.items():
            print(f"{name:14s} max per-rank state / ZeRO-0: {max(r['state_mb'] for r in rows) / base:.2f}")
        print(f"zero-3 / zero-0 per-rank state: {max(r['state_mb'] for r in res[z3]) / base:.2f}")


if __name__ == "__main__":
    main()
