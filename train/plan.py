"""Memory planner: what one rank holds under a recipe's layout and its alternatives, and what fits.

    python train/plan.py recipe=mixtral_8x7b/sft                              # 8 GPUs × 80 GB by default
    python train/plan.py recipe=mixtral_8x7b/sft gpus=16 gpu_memory_gb=80 host_memory_gb=1024 nodes=2
    python train/plan.py recipe=tiny/sft key=value ...                        # any stage key overrides the recipe

Per rank, in GB: weights, gradients, optimizer states (with the fp32 master), the ZeRO-1/2 step's flat
gradient, ZeRO-3 gathered parameters (model/memory.py `per_rank_bytes`), AutoEP's all-to-all buffers and
activations at the recipe's micro-batch and sequence length with and without gradient checkpointing
(`activation_bytes`, `alltoall_bytes`), and the GPU total with the recipe's checkpointing setting. Rows: the
recipe's layout, then ZeRO-2/3 × every expert-parallel size that divides the experts and the GPUs, with and
without optimizer offload, on `gpus` and on twice as many. "fits" = GPU total ≤ 90% of `gpu_memory_gb`
and offloaded optimizer states ≤ 90% of the host memory a node gives its ranks. Reads the model's
config.json (`model_path`: a local folder or the Hugging Face cache) or the preset; loads no weights.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from model.memory import (Layout, activation_bytes, alltoall_bytes, parameter_counts, peak_bytes,  # noqa: E402
                          per_rank_bytes)
from train.config import ConfigError  # noqa: E402
from train.preflight import layout_of, tokens_per_micro_batch  # noqa: E402

DTYPES = {2: torch.bfloat16, 4: torch.float32}

GB = 1e9
HARDWARE = {"gpus": 8, "gpu_memory_gb": 80.0, "host_memory_gb": 1024.0, "nodes": None}


def model_config(cfg):
    """config.json of `model_path` when it can be read without a download, else the preset (with a note)."""
    from omegaconf import OmegaConf

    from model.build import mixtral_config, model_config as read

    preset = OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True)
    if cfg.model_path:
        try:
            return read(preset, cfg.model_path), f"{cfg.model_path}/config.json"
        except Exception:  # noqa: BLE001 - not cached here: the preset of the same name stands in
            pass
    return mixtral_config(preset), f"preset {cfg.model.name}" + (f" (for {cfg.model_path}, not in the cache)"
                                                                  if cfg.model_path else "")


def row(config, layout: Layout, tokens: int, checkpointing: bool, dpo: bool = False) -> dict:
    b = per_rank_bytes(config, layout, checkpointing)
    act = {c: activation_bytes(config, tokens, layout.dtype_bytes, c, dpo) for c in (True, False)}
    a2a = alltoall_bytes(config, tokens, layout.dtype_bytes, layout.ep_size)
    gpu = peak_bytes(b, a2a + act[checkpointing])
    return {**b, "a2a": a2a, "act_ckpt": act[True], "act_full": act[False], "gpu": gpu}


def plan(cfg, gpus: int, gpu_memory_gb: float, host_memory_gb: float, nodes: int | None, dtype_bytes: int = 2) -> str:
    config, source = model_config(cfg)
    counts = parameter_counts(config)
    nodes = nodes or max(1, -(-gpus // 8))
    per_node = max(1, gpus // nodes)
    tokens = tokens_per_micro_batch(cfg)
    ckpt = bool(cfg.model.gradient_checkpointing)
    quantized = cfg.model.quantize == "nf4"
    base = dict(dtype_bytes=dtype_bytes, optimizer=cfg.optim.name, lora=bool(cfg.lora.enabled), quantized=quantized)
    layouts = [("recipe", layout_of(cfg, gpus, DTYPES[dtype_bytes]))]
    for world in (gpus, 2 * gpus):
        for stage in ((0, 2) if quantized else (2, 3)):  # a 4-bit base: ZeRO 0-2 (train/checks.py)
            # (expert parallelism with LoRA under ZeRO-2/3, or with sequence parallelism, is refused: train/checks.py)
            for ep in [e for e in (1, 2, 4, 8, 16) if config.num_local_experts % e == 0 and world % e == 0
                       and (e == 1 or (cfg.sequence_parallel_size == 1 and (not cfg.lora.enabled or stage <= 1)))]:
                for offload in (False, True) if stage else (False,):  # offload needs ZeRO >= 1
                    layouts.append(("", Layout(world=world, zero_stage=stage, ep_size=ep, offload_optimizer=offload, **base)))
    size = (lambda n: f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M")
    lines = [f"model: {source}: {size(counts['total'])} parameters ({size(counts['experts'])} in experts); "
             f"{'LoRA' if cfg.lora.enabled else 'full fine-tuning'}, {cfg.optim.name}, {8 * dtype_bytes}-bit weights"
             f"{' (attention and experts in 4-bit NF4)' if quantized else ''}; "
             f"micro-batch {cfg.micro_batch_size} × {cfg.max_seq_len} tokens{' × 2 (chosen, rejected)' if cfg.stage == 'dpo' else ''}"
             + (f" shared by {cfg.sequence_parallel_size} sequence-parallel ranks ({tokens} tokens per rank)"
                if cfg.sequence_parallel_size > 1 else "") + ", "
             f"gradient checkpointing {'on' if ckpt else 'off'}",
             f"hardware: {gpus} GPUs × {gpu_memory_gb:g} GB on {nodes} node(s), {host_memory_gb:g} GB host memory per node",
             "per rank, GB:",
             f"{'layout':<34}{'weights':>8}{'grads':>7}{'optim':>7}{'step':>6}{'gather':>7}{'a2a':>6}"
             f"{'act ckpt':>9}{'act full':>9}{'GPU':>8}{'host':>7}  fits"]
    seen, fitting, recipe_fits = set(), [], None
    for tag, lay in layouts:
        key = (lay.world, lay.zero_stage, lay.ep_size, lay.offload_optimizer)
        if key in seen:
            continue
        seen.add(key)
        r = row(config, lay, tokens, ckpt, cfg.stage == "dpo")
        host_ok = r["host"] <= 0.9 * host_memory_gb * GB / per_node * (lay.world // gpus if lay.world > gpus else 1)
        fits = r["gpu"] <= 0.9 * gpu_memory_gb * GB and host_ok
        name = (f"{lay.world} GPUs ZeRO-{lay.zero_stage}" + (f" + EP {lay.ep_size}" if lay.ep_size > 1 else "")
                + (" + offload" if lay.offload_optimizer else "") + (" (recipe)" if tag else ""))
        lines.append(f"{name:<34}{r['weights'] / GB:>8.1f}{r['gradients'] / GB:>7.1f}{r['optimizer'] / GB:>7.1f}"
                     f"{r['step'] / GB:>6.1f}{r['gathered'] / GB:>7.1f}{r['a2a'] / GB:>6.1f}{r['act_ckpt'] / GB:>9.1f}"
                     f"{r['act_full'] / GB:>9.1f}{r['gpu'] / GB:>8.1f}{r['host'] / GB:>7.1f}  {'yes' if fits else 'no'}")
        if tag:
            recipe_fits = fits
        elif fits:
            fitting.append(name)
    lines.append(f"the recipe's layout {'fits' if recipe_fits else 'does NOT fit'} {gpus} × {gpu_memory_gb:g} GB; "
                 f"layouts that fit: {', '.join(fitting) if fitting else 'none'}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # config.json from the cache, never a download (before any hub import)
    from train.cli import compose_strict, fail, recipe_stage, recipes
    from train.config import DPOStageConfig, PretrainConfig, SFTConfig

    hardware = dict(HARDWARE)
    overrides = []
    for a in argv:
        key, _, value = a.partition("=")
        if key in hardware:
            try:
                hardware[key] = int(value) if key in ("gpus", "nodes") else float(value)
            except ValueError:
                fail(f"{key}={value!r}: expected a number")
        else:
            overrides.append(a)
    recipe = next((o.split("=", 1)[1] for o in overrides if o.startswith("recipe=")), None)
    if recipe is None:
        fail(f"recipe= is required (one of {', '.join(recipes())})")
    stage = recipe_stage(recipe)
    schema = {"pretrain": PretrainConfig, "sft": SFTConfig, "dpo": DPOStageConfig}.get(stage, SFTConfig)
    try:
        cfg = compose_strict(stage if stage in ("pretrain", "sft", "dpo") else "sft", overrides, schema)
    except ConfigError as e:
        fail(str(e))
    dtype_bytes = 4 if cfg.precision == "fp32" else 2
    print(plan(cfg, hardware["gpus"], hardware["gpu_memory_gb"], hardware["host_memory_gb"], hardware["nodes"], dtype_bytes))


if __name__ == "__main__":
    main(sys.argv[1:])


def recipe_line(recipe: str, gpus: int, nodes: int, gpu_memory_gb: float = 80.0) -> str:
    """The planner's line a recipe header quotes (tests/unit/test_plan.py keeps the headers in sync)."""
    from train.cli import recipe_stage
    from train.config import compose

    stage = recipe_stage(recipe)
    cfg = compose(stage, [f"recipe={recipe}", "model_path=null"])
    config, _ = model_config(cfg)
    r = row(config, layout_of(cfg, gpus, DTYPES[2]), tokens_per_micro_batch(cfg), bool(cfg.model.gradient_checkpointing),
            cfg.stage == "dpo")
    fits = r["gpu"] <= 0.9 * gpu_memory_gb * GB
    memory = "" if gpu_memory_gb == 80.0 else f" gpu_memory_gb={gpu_memory_gb:g}"
    return (f"plan (python train/plan.py recipe={recipe} gpus={gpus} nodes={nodes}{memory}): {r['gpu'] / GB:.1f} GB per GPU "
            f"(weights {r['weights'] / GB:.1f}, gradients {r['gradients'] / GB:.1f}, optimizer {r['optimizer'] / GB:.1f}, "
            f"gathered {r['gathered'] / GB:.1f}, activations {r['act_ckpt' if cfg.model.gradient_checkpointing else 'act_full'] / GB:.1f}, "
            f"all-to-all {r['a2a'] / GB:.1f}): {'fits' if fits else 'does NOT fit'} {gpu_memory_gb:g} GB")
