"""Build a Hugging Face `MixtralForCausalLM` from a preset, or load one from an HF folder.

The model is transformers' own Mixtral (not a re-implementation), so checkpoints stay
HF-native. Preset values use HF's config names (`num_local_experts`, `num_experts_per_tok`,
...), see `configs/model/*.yaml`; everything in a preset except the keys in `BUILD_KEYS`
goes straight into `MixtralConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import Enum
from pathlib import Path

import torch
from transformers import MixtralConfig, MixtralForCausalLM

from model.router import fp32_router_logits
from model.load import Placement, load_checkpoint, skeleton, stream_init
from model.weights import Checkpoint
from model.tiled_moe import tile_moe_blocks
from model import attention, experts  # register the "packed_sdpa" attention and "sorted_grouped_mm" expert kernels

# Preset keys that are about how to build, not part of MixtralConfig.
BUILD_KEYS = ("name", "attn_implementation", "experts_implementation", "gradient_checkpointing",
              "rope_theta_override", "max_position_embeddings_override", "tiled_mlp_tokens", "quantize", "tokenizer")

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def resolve_dtype(precision: str) -> torch.dtype:
    """"auto" → bf16 on CUDA with bf16 support, else fp32 (CPU)."""
    if precision == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if precision not in DTYPES:
        raise ValueError(f"precision={precision!r}: expected auto, fp32, bf16 or fp16")
    return DTYPES[precision]


def plain(preset: Mapping) -> dict:
    """`preset` as a dict of plain values: a choice key's value (an `Enum` that is a `str`, train/config.py
    `Choice`) as its string."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in dict(preset).items()}


def mixtral_config(preset: Mapping) -> MixtralConfig:
    """`MixtralConfig` from a preset mapping (HF key names)."""
    values = {k: v for k, v in plain(preset).items() if k not in BUILD_KEYS}
    return MixtralConfig(**values)


def model_folder(model_path: str | Path) -> Path:
    """A local HF folder for `model_path`: the folder itself, or the hub snapshot (config, safetensors and
    tokenizer files only; downloaded once into the Hugging Face cache)."""
    if Path(model_path).expanduser().is_dir():
        return Path(model_path).expanduser()
    from data.hub import model_snapshot

    return model_snapshot(str(model_path), ["*.json", "*.safetensors", "tokenizer.model"])


def model_config(preset: Mapping, model_path: str | Path | None = None) -> MixtralConfig:
    """The architecture: `model_path`'s config.json when given (read as a Mixtral config, never as
    remote code; for a hub name only config.json is fetched), else the preset."""
    if model_path is None:
        return _extended(mixtral_config(preset), preset)
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        path = folder / "config.json"
    else:
        from data.hub import model_file

        path = model_file(str(model_path), "config.json")
    import json

    model_type = json.loads(path.read_text()).get("model_type")
    if model_type != "mixtral":
        raise ValueError(f"model_path={model_path}: model_type is {model_type!r}, expected 'mixtral'")
    return _extended(MixtralConfig.from_json_file(str(path)), preset)


def _extended(config: MixtralConfig, preset: Mapping) -> MixtralConfig:
    """Context extension: the preset's `rope_theta_override` / `max_position_embeddings_override` replace
    the architecture's (a `model_path`'s config.json included; the export then carries the new values)."""
    theta, positions = preset.get("rope_theta_override"), preset.get("max_position_embeddings_override")
    if theta is not None:
        config.rope_parameters = {**(config.rope_parameters or {"rope_type": "default"}), "rope_theta": float(theta)}
    if positions is not None:
        config.max_position_embeddings = int(positions)
    return config


def build_model(
    preset: Mapping,
    model_path: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
    gradient_checkpointing: bool | None = None,
    seed: int | None = None,
    placement: Placement | None = None,
) -> MixtralForCausalLM:
    """A Mixtral model: freshly initialised from `preset`, or loaded from `model_path`.

    Args:
        preset: model preset (HF config keys + build keys). Ignored for the architecture
            when `model_path` is given (the folder's config.json wins).
        model_path: an HF folder (config.json + safetensors, hub or fused key layout: model/weights.py)
            or hub name; weights are read from safetensors only and no remote code is ever run.
        dtype: parameter dtype.
        attn_implementation: "packed_sdpa" (default, model/attention.py: per-document attention for packed
            training rows on CPU, else transformers' "sdpa"), "sdpa", "eager" or "flash_attention_2".
        The preset's `experts_implementation` picks the expert kernel: "sorted_grouped_mm" (default,
        model/experts.py: one grouped GEMM per projection over the tokens sorted by expert — transformers'
        "grouped_mm" without its expert-parallel sentinel masking, 1.2× faster per MoE block), "grouped_mm"
        (1.4× faster than "eager" per CPU training step of the small preset), "batched_mm" or "eager"
        (HF's Python loop over experts with index_add).
        gradient_checkpointing: recompute activations in backward.
        seed: the fresh initialisation's seed (None: 0). The weights equal
            `torch.manual_seed(seed); MixtralForCausalLM(config)` in every layout (model/load.py).
        placement: what this rank keeps (model/load.py): ZeRO-3 partitions, or dense weights and one
            block of experts under expert parallelism. None: everything (a single process).
        The preset's `quantize` ("none" | "nf4") stores the attention and expert weights in 4 bits as they
        are read (model/quantize.py; QLoRA).
    """
    preset = plain(preset)
    placement = dataclasses.replace(placement or Placement(), quantize=preset.get("quantize") or "none")
    attn = attn_implementation or preset.get("attn_implementation", attention.NAME)
    config = model_config(preset, model_path)
    config._attn_implementation = attn
    model = skeleton(config, dtype, placement)
    if model_path is not None:
        load_checkpoint(model, Checkpoint(model_folder(model_path)), dtype, placement)
    else:
        stream_init(model, 0 if seed is None else seed, dtype, placement)
    model.config._experts_implementation = preset.get("experts_implementation", experts.NAME)
    if preset.get("tiled_mlp_tokens"):  # the experts in sequence tiles (model/tiled_moe.py)
        tile_moe_blocks(model, int(preset["tiled_mlp_tokens"]))
    if gradient_checkpointing if gradient_checkpointing is not None else preset.get("gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    fp32_router_logits(model)  # bf16 weights, fp32 routing decisions (model/router.py)
    return model


def count_parameters(config: MixtralConfig) -> dict:
    """Total and active (per token) parameter counts of a Mixtral config, from its shapes."""
    h, f, v, n_layers = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attn = h * head_dim * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    expert = 3 * h * f
    router = h * config.num_local_experts
    norms = 2 * h
    per_layer_total = attn + config.num_local_experts * expert + router + norms
    per_layer_active = attn + config.num_experts_per_tok * expert + router + norms
    embed = v * h * (1 if config.tie_word_embeddings else 2)
    return {
        "total": n_layers * per_layer_total + embed + h,
        "active": n_layers * per_layer_active + embed + h,
    }
