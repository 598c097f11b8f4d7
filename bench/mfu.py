"""Model-FLOPs utilisation of the training step against the machine's measured matmul peak (CPU).

    python bench/mfu.py [--model small] [--steps 8] [--threads 2]

1. Peak: the best FLOP/s of square torch.mm (2·n³ FLOPs) over a few sizes, fp32 and bf16.
2. Achieved: `train/sft.py` (one process, ZeRO-0, fp32) on the chosen preset; from its
   metrics.jsonl, tokens/s of all real tokens × FLOPs per token, where
       FLOPs/token = 6 · N_active + 12 · layers · hidden · context   (PaLM appendix B: weights and attention,
                                                                    forward + backward)
   N_active counts the top-k experts, the router, attention, and the LM head (not the embedding lookup).
Last line:
    mfu: X.XX
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def matmul_peak(dtype, sizes=(512, 1024, 2048), reps=5) -> float:
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    print(f"matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.1f} GFLOP/s ({a.threads} threads)")

    from omegaconf import OmegaConf

    from model.build import count_parameters, mixtral_config
    from train.config import compose

    cfg = mixtral_config(OmegaConf.to_container(compose("sft", [f"model={a.model}"]).model))
    counts = count_parameters(cfg)
    n_active = counts["active"] - cfg.vocab_size * cfg.hidden_size  # the embedding is a lookup, not a matmul
    tmp = Path(tempfile.mkdtemp(prefix="bench_mfu_"))
    cmd = [sys.executable, str(REPO / "train" / "pretrain.py"), "recipe=tiny/pretrain", f"model={a.model}",
           f"max_steps={a.steps}", f"max_seq_len={a.seq}", "global_batch_size=4", "micro_batch_size=4",
           "deepspeed=zero0", "export=false", "precision=fp32", f"output_dir={tmp}", "data.synthetic_samples=2000"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-3000:])
    m = [json.loads(l) for l in (tmp / "metrics.jsonl").read_text().splitlines()][1:]
    tokens_per_s = sum(r["tokens"] for r in m) / sum(r["step_time_s"] for r in m)
    per_token = 6 * n_active + 12 * cfg.num_hidden_layers * cfg.hidden_size * a.seq
    achieved = tokens_per_s * per_token
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"model {a.model}: {counts['total'] / 1e6:.1f}M parameters, {n_active / 1e6:.1f}M active in matmuls; "
          f"{per_token / 1e6:.1f} MFLOP/token; {tokens_per_s:.0f} tokens/s → {achieved / 1e9:.1f} GFLOP/s")
    print(f"mfu: {achieved / peak32:.2f}")


if __name__ == "__main__":
    main()
