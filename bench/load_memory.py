"""Peak host memory per rank while loading and training a large `model_path`, per layout.

    python bench/load_memory.py                 # a 1.76 GB (fp32) Mixtral on 4 ranks, five layouts (~12 min)
    python bench/load_memory.py --hidden 128 --layers 2 --ranks 2 --only "ZeRO-3 + EP 2, SGD"   # smoke

A Mixtral of `--hidden`/`--ffn`/`--layers` (default 1024/1792/8: 439 M parameters, 1.76 GB in fp32) is
saved in the hub key layout (`block_sparse_moe.experts.E.w1`, what mistralai publishes), then one SFT step
runs from it as `model_path` under each layout on `--ranks` ranks (OMP_NUM_THREADS=1 each; gradient
checkpointing on, as in every 8x7B recipe: without it ZeRO-3 keeps each layer's gathered expert weights
alive until the backward, because autograd saves views of them). Every stage
records each rank's peak RSS per phase (load, engine, first step) in memory.json; the same run on the tiny
preset gives the baseline (Python, torch, DeepSpeed, data). The table shows, per layout,

    measured = max over ranks and phases of (peak RSS − baseline peak RSS)
    expected = weights + gradients + optimizer + step + ZeRO-3 gather (model/memory.py: per_rank_bytes),
               with P_d dense and P_e expert parameters, N ranks, EP size ep, 4 bytes each (fp32):
        weights    (P_d + P_e/ep) · 4,   ZeRO-3: (P_d + P_e)/N · 4
        gradients  (P_d + P_e/ep) · 4,   ZeRO-2/3: (P_d + P_e)/N · 4 + the LM head's (V·hidden·4), which
                   the fused loss computes whole in the forward                      (LoRA: ~0)
        optimizer  SGD 0, AdamW 8 bytes per trainable parameter / N under ZeRO ≥ 1, plus the fp32 master
                   copy under ZeRO-1/2 (4 · (P_d + P_e)/N; under ZeRO-3 an fp32 model's partitions are
                   the master weights: model/distributed.py fp32_master_shared)
        step       ZeRO-1/2: the largest group's gradient partition again, max(P_d, P_e)/N · 4 under EP
                   (DeepSpeed's step flattens it into a new buffer while the gradient buffer lives)
        gathered   ZeRO-3: two decoder layers (current + prefetched: stage3_max_live_parameters), each
                   with its E/ep experts; under EP at least one layer's experts whole (AutoEP's conversion)

both as a ratio of the model's bytes, and the goals (ZeRO-2 without EP is not run: every rank holds the whole
model and its gradients by design, and four of them exceed this 24 GiB machine): LoRA under ZeRO-3 ≤ 0.6×, full fine-tuning under
ZeRO-3 + EP 2 with SGD ≤ 1.0×, and every measured figure within 20% of its expected one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import REPO  # noqa: E402

LAYOUTS = {  # name: (overrides, goal as a ratio of the model's bytes, or None)
    "LoRA, ZeRO-3": (["deepspeed=zero3", "lora.enabled=true"], 0.6),
    "ZeRO-3 + EP 2, SGD": (["deepspeed=zero3", "expert_parallel_size=2", "optim.name=sgd"], 1.0),
    "ZeRO-3, SGD": (["deepspeed=zero3", "optim.name=sgd"], None),
    "ZeRO-2 + EP 2, SGD": (["deepspeed=zero2", "expert_parallel_size=2", "optim.name=sgd"], None),
    "ZeRO-2 + EP 4, SGD": (["deepspeed=zero2", "expert_parallel_size=4", "optim.name=sgd"], None),
}
COMMON = ["recipe=tiny/sft", "max_steps=1", "model.gradient_checkpointing=true", "micro_batch_size=1", "max_seq_len=64", "data.synthetic_samples=32",
          "export=false", "router.aux_loss_coef=0", "logging=none", "plan.enforce=false"]


def save_big_model(folder: Path, hidden: int, ffn: int, layers: int):
    """The model in the hub layout (transformers 5's `save_pretrained` default) + tokenizer; returns its config."""
    from omegaconf import OmegaConf

    from data.tokenizer import default_tokenizer_path
    from model.build import build_model
    from train.config import compose

    preset = {**OmegaConf.to_container(compose("sft", ["model=tiny"]).model), "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": None}
    model = build_model(preset, seed=0)
    model.save_pretrained(folder)
    shutil.copy(default_tokenizer_path(), folder / "tokenizer.model")
    return model.config


def run(out: Path, ranks: int, overrides: list[str]) -> list[int]:
    """One training step on `ranks` ranks; each rank's peak RSS (max over the recorded phases)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(REPO / "train" / "sft.py"), f"output_dir={out}", f"global_batch_size={ranks}", *COMMON, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    phases = json.loads((out / "memory.json").read_text())
    return [max(p["peak_rss_bytes"][r] for p in phases.values()) for r in range(ranks)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=1792)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=None, help="layout names to run (default: all)")
    a = ap.parse_args()

    from model.memory import Layout, parameter_counts, per_rank_bytes

    layouts = {k: v for k, v in LAYOUTS.items() if a.only is None or k in a.only}
    work = Path(tempfile.mkdtemp(prefix="load_memory_"))
    try:
        config = save_big_model(work / "model", a.hidden, a.ffn, a.layers)
        counts = parameter_counts(config)
        model_bytes = 4 * counts["total"]
        print(f"model: {counts['total'] / 1e6:.0f} M parameters ({counts['experts'] / 1e6:.0f} M in experts), "
              f"{model_bytes / 2**30:.2f} GiB in fp32, hub layout; {a.ranks} ranks")
        print(f"{'layout':<22} {'measured / model':>17} {'expected / model':>17} {'measured / expected':>20}  goal")
        worst = 0.0
        for name, (overrides, goal) in layouts.items():
            if any(o.startswith("expert_parallel_size=") and a.ranks % int(o.split("=")[1]) for o in overrides):
                continue
            base = run(work / "base", a.ranks, overrides)
            big = run(work / "big", a.ranks, [f"model_path={work / 'model'}", *overrides])
            measured = max(b - t for b, t in zip(big, base))
            ep = next((int(o.split("=")[1]) for o in overrides if o.startswith("expert_parallel_size=")), 1)
            zero = 3 if "deepspeed=zero3" in overrides else 2
            layout = Layout(world=a.ranks, zero_stage=zero, ep_size=ep, dtype_bytes=4,
                            optimizer="sgd" if "optim.name=sgd" in overrides else "adamw",
                            lora="lora.enabled=true" in overrides)
            expected = per_rank_bytes(config, layout)["total"]
            ratio = measured / expected
            worst = max(worst, abs(ratio - 1))
            met = (goal is None or measured / model_bytes <= goal) and abs(ratio - 1) <= 0.2
            goal_text = f"≤ {goal:.1f}× model, " if goal else ""
            print(f"{name:<22} {measured / model_bytes:>17.2f} {expected / model_bytes:>17.2f} {ratio:>20.2f}  "
                  f"{goal_text}within 20% of expected: {'met' if met else 'NOT met'}", flush=True)
        print(f"largest |measured / expected - 1|: {worst:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
