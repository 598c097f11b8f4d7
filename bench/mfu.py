"""Model-FLOPs utilisation of the training step against the machine's measured matmul peak (CPU).

    python bench/mfu.py [--model small] [--steps 8] [--threads 2]

1. Peak: the best FLOP/s of square torch.mm (2·n³ FLOPs) over a few sizes, fp32 and bf16. A shared
   2-core VM's speed drifts by ±15% within seconds, so the fp32 peak is the *median* of `--peak-samples`
   measurements taken before and after the training run, and the step's rate is the median step.
2. Achieved: `train/pretrain.py` (one process, ZeRO-0, fp32) on the chosen preset; from its
   metrics.jsonl, the median step's tokens/s of all real tokens × FLOPs per token, where
       FLOPs/token = 6 · N_active + 12 · layers · hidden · context   (PaLM appendix B: weights and attention,
                                                                    forward + backward)
   N_active counts the top-k experts, the router, attention, and the LM head (not the embedding lookup).
3. Ceiling: torch.mm's FLOP/s at the model's own GEMM shapes (small K and per-expert row counts run
   well below the square-matrix peak), printed beside the MFU.
Last line:
    mfu: X.XX
"""

import argparse
import json
import statistics
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def matmul_peak(dtype, sizes=(512, 1024, 2048), reps=5, budget_s=2.0) -> float:
    """The best FLOP/s of `torch.mm` on square matrices of `sizes`, `reps` timed products each. A size whose warm-up
    product takes over `budget_s / reps` is timed once and ends the measurement: a CPU without native bf16
    (no AVX512-BF16 or AMX) multiplies bf16 matrices 30-80× slower than fp32, and 5 products of 2048² would take
    minutes there."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t0 = time.perf_counter()
        torch.mm(a, b)
        slow = time.perf_counter() - t0 > budget_s / reps
        count = 1 if slow else reps
        t0 = time.perf_counter()
        for _ in range(count):
            torch.mm(a, b)
        best = max(best, 2 * n ** 3 * count / (time.perf_counter() - t0))
        if slow:
            break
    return best


def model_gemm_rate(cfg, tokens: int, reps: int = 3) -> float:
    """FLOP/s of torch.mm at this model's own GEMM shapes for one step of `tokens` tokens (forward
    X·W, backward dY·Wᵀ and Xᵀ·dY of every linear; experts see tokens·top_k/experts rows each) —
    the ceiling a step could reach if it did nothing but its matmuls."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    per_expert = tokens * cfg.num_experts_per_tok // cfg.num_local_experts
    layer = [(tokens, h, cfg.num_attention_heads * hd), (tokens, h, 2 * cfg.num_key_value_heads * hd),
             (tokens, cfg.num_attention_heads * hd, h), (tokens, h, cfg.num_local_experts)]
    layer += [(per_expert, h, 2 * f), (per_expert, f, h)] * cfg.num_local_experts
    shapes = layer * cfg.num_hidden_layers + [(tokens, h, v)]
    flops = seconds = 0.0
    for m, k, n in shapes:
        for a_shape, b_shape in (((m, k), (k, n)), ((m, n), (n, k)), ((k, m), (m, n))):
            a, b = torch.randn(*a_shape), torch.randn(*b_shape)
            torch.mm(a, b)
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            seconds += (time.perf_counter() - t0) / reps
            flops += 2 * m * k * n
    return flops / seconds


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--peak-samples", type=int, default=10, help="fp32 peak measurements, half before, half after")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    peaks = [matmul_peak(torch.float32) for _ in range((a.peak_samples + 1) // 2)]
    peak16 = matmul_peak(torch.bfloat16)

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
    tokens_per_s = statistics.median(r["tokens"] / r["step_time_s"] for r in m)
    peaks += [matmul_peak(torch.float32) for _ in range(a.peak_samples // 2)]
    peak32 = statistics.median(peaks)
    print(f"matmul peak: fp32 {peak32 / 1e9:.1f} GFLOP/s (median of {len(peaks)}: {min(peaks) / 1e9:.0f}-"
          f"{max(peaks) / 1e9:.0f}), bf16 {peak16 / 1e9:.1f} GFLOP/s ({a.threads} threads)")
    per_token = 6 * n_active + 12 * cfg.num_hidden_layers * cfg.hidden_size * a.seq
    achieved = tokens_per_s * per_token
    shutil.rmtree(tmp, ignore_errors=True)
    ceiling = model_gemm_rate(cfg, 4 * a.seq)
    print(f"model {a.model}: {counts['total'] / 1e6:.1f}M parameters, {n_active / 1e6:.1f}M active in matmuls; "
          f"{per_token / 1e6:.1f} MFLOP/token; {tokens_per_s:.0f} tokens/s (median step of {len(m)}) → "
          f"{achieved / 1e9:.1f} GFLOP/s")
    print(f"torch.mm at this model's own GEMM shapes: {ceiling / 1e9:.1f} GFLOP/s = {ceiling / peak32:.2f} of the square "
          f"peak (the ceiling without custom kernels); the step reaches {achieved / ceiling:.2f} of it")
    dense = tokens_per_s * 6 * n_active
    print(f"without the attention term (12·layers·hidden·context, credited in full although packed documents only "
          f"attend within themselves): {dense / 1e9:.1f} GFLOP/s = {dense / peak32:.2f} of the peak")
    print(f"mfu: {achieved / peak32:.2f}")


if __name__ == "__main__":
    main()
