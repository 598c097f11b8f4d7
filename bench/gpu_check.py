"""One-command check of the GPU path: every stage in bf16 on one CUDA GPU, against the same steps in fp32 on the CPU.

    python bench/gpu_check.py [--wheels DIR] [--steps 6] [--model small]

1. Installs what the GPU machine lacks (deepspeed, mistral-common, ... at the versions pyproject.toml pins) from
   `--wheels DIR` (built elsewhere and carried) or, without it, from the package index.
2. Runs, on the `small` preset in bf16, one process on GPU 0 with the kernels a GPU user gets by default:
   pretrain ZeRO-0, SFT ZeRO-0 and ZeRO-3, SFT LoRA ZeRO-3, DPO ZeRO-0 (from the SFT export) and DPO LoRA
   ZeRO-3 (adapters-off reference). Each ends with its export and the export check (model/export.py).
3. Runs the first two steps of each in fp32 on the CPU and compares the first-step losses (≤ 1% relative).
4. Reloads each export with transformers on the GPU and generates a few tokens.
5. Prints one table: tokens/s, MFU against the GPU's bf16 matmul peak measured in this run, peak device memory
   against train/plan.py's figure for that layout.

Where no CUDA GPU is present it says so in one line and exits 2. Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NEEDS = ("deepspeed", "transformers", "peft", "mistral_common", "hydra", "sentencepiece", "safetensors", "datasets",
         "fastapi", "matplotlib", "tqdm")
CASES = [  # name, stage, overrides
    ("pretrain zero0", "pretrain", ["deepspeed=zero0"]),
    ("sft zero0", "sft", ["deepspeed=zero0"]),
    ("sft zero3", "sft", ["deepspeed=zero3"]),
    ("sft lora zero3", "sft", ["deepspeed=zero3", "lora.enabled=true"]),
    ("dpo zero0", "dpo", ["deepspeed=zero0", "model_path={sft}"]),
    ("dpo lora zero3", "dpo", ["deepspeed=zero3", "lora.enabled=true", "dpo.reference=adapters_off", "model_path={sft}"]),
]


def install(wheels: str | None) -> None:
    missing = [m for m in NEEDS if _absent(m)]
    if not missing:
        return
    print(f"installing what is missing ({', '.join(missing)}) ...", flush=True)
    source = ["--no-index", "--find-links", wheels] if wheels else []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *source, "--no-deps", "-e", str(REPO)], check=True)
    pins = re.findall(r'"([a-zA-Z_\-]+[=<>~!][^"]*)"', (REPO / "pyproject.toml").read_text().split("dependencies = [")[1]
                      .split("]")[0])
    wanted = [p for p in pins if not p.startswith("torch")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *source, *wanted], check=True)


def _absent(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is None


def bf16_peak() -> float:
    import torch

    best = 0.0
    for n in (4096, 8192):
        a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
        torch.mm(a, b)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            torch.mm(a, b)
        torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * 20 / (time.perf_counter() - t0))
    return best


def run(stage: str, overrides: list[str], out: Path, cpu: bool) -> tuple[list[dict], dict, str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [sys.executable, str(REPO / "train" / f"{stage}.py"), f"output_dir={out}", "overwrite=true", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    metrics = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    memory = json.loads((out / "memory.json").read_text())
    return metrics, memory, proc.stdout


def planned_gb(stage: str, overrides: list[str], model: str) -> float | None:
    zero = next((o.split("=")[1] for o in overrides if o.startswith("deepspeed=")), "zero2")
    cmd = [sys.executable, str(REPO / "train" / "plan.py"), f"recipe=tiny/{stage}", f"model={model}", "gpus=1",
           *[o for o in overrides if o.startswith(("deepspeed=", "lora."))]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout.splitlines():
        if line.startswith(f"1 GPUs ZeRO-{zero[-1]}") and "offload" not in line:
            return float(line.split()[-3])
    return None


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--wheels", help="a folder of wheels to install missing packages from (no index)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--model", default="small")
    a = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing to check", file=sys.stderr)
        return 2
    install(a.wheels)
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO / "bench"))
    from bf16_vs_fp32 import flops_per_token

    name = torch.cuda.get_device_name(0)
    peak = bf16_peak()
    print(f"{name}: bf16 matmul peak {peak / 1e12:.0f} TFLOP/s (torch.mm, measured now)", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    rows, failures = [], []
    for case, stage, overrides in CASES:
        sft = tmp / "sft zero0" / "gpu" / "hf"
        over = [o.format(sft=sft) for o in overrides]
        common = [f"recipe=tiny/{stage}", f"model={a.model}", "logging=none"]
        try:
            gpu_m, gpu_mem, _ = run(stage, [*common, *over, "precision=bf16", f"max_steps={a.steps}"], tmp / case / "gpu", False)
            cpu_m, _, _ = run(stage, [*common, *over, "precision=fp32", "max_steps=2", "export=false"], tmp / case / "cpu", True)
        except RuntimeError as e:
            failures.append(f"{case}: {e}")
            print(f"{case}: FAILED", flush=True)
            continue
        first = abs(gpu_m[0]["loss"] - cpu_m[0]["loss"]) / abs(cpu_m[0]["loss"])
        if first > 0.01:
            failures.append(f"{case}: first-step loss bf16 GPU {gpu_m[0]['loss']:.5f} vs fp32 CPU {cpu_m[0]['loss']:.5f}")
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp / case / "gpu" / "hf").cuda().eval()
        ids = torch.tensor([[1, 1183, 6333, 302, 4843, 349]], device="cuda")
        generated = model.generate(ids, max_new_tokens=4, do_sample=False)
        del model
        torch.cuda.empty_cache()
        seq = OmegaConf.select(OmegaConf.load(tmp / case / "gpu" / "config.yaml"), "max_seq_len")
        tok_s = statistics.median(r["tokens"] / r["step_time_s"] for r in gpu_m[1:])
        device_gb = max(max(p["peak_device_bytes"]) for p in gpu_mem.values()) / 1e9
        rows.append((case, gpu_m[0]["loss"], cpu_m[0]["loss"], first, tok_s, tok_s * flops_per_token(a.model, seq) / peak,
                     device_gb, planned_gb(stage, over, a.model), generated.shape[1] == ids.shape[1] + 4))
    print(f"\n{name}, {time.strftime('%Y-%m-%d')}, model={a.model}, {a.steps} steps, bf16")
    print("| case | first loss bf16 GPU / fp32 CPU (rel) | tokens/s | MFU (bf16 peak) | peak GPU memory GB | planner GB | export reloads |")
    print("|---|---|---|---|---|---|---|")
    for case, g, c, rel, tok_s, mfu, dev, plan, ok in rows:
        print(f"| {case} | {g:.4f} / {c:.4f} ({rel:.1e}) | {tok_s:.0f} | {mfu:.3f} | {dev:.2f} | "
              f"{'-' if plan is None else f'{plan:.1f}'} | {'yes' if ok else 'NO'} |")
    for f in failures:
        print(f"FAILED {f[:3000]}")
    return 1 if failures or not all(r[-1] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
