"""LoRA (peft) wiring for Mixtral.

Adapters go on the attention projections (`lora.target_modules`) and, with `lora.experts=true`,
on the fused expert weights through peft's `target_parameters` (transformers 5 stores the
experts as 3-D parameters `mlp.experts.gate_up_proj` (E, 2·ffn, hidden) and `down_proj`, so
there are no per-expert Linear modules to target). The router stays frozen unless
`lora.train_router=true` (a drifting router silently undoes the base model's load balance).

What combines with what (checked in train.config.validate):
  * ZeRO 0-3 with attention adapters. Under ZeRO-3 the frozen base is sharded (8x7B bf16:
    93 GB / 8 GPUs ≈ 12 GB each) and the export gathers each weight and merges W + B·A·α/r itself.
  * Expert adapters (`lora.experts=true`) need ZeRO 0-2 and no expert parallelism: peft merges them
    (`merge_and_unload`), and AutoEP replaces the fused expert weights they wrap. Over 4-bit experts
    (`model.quantize=nf4`) peft cannot wrap the weights: `ExpertLoRA` (model/quantize.py) holds the same
    per-expert adapters in peft's layout, `save_adapter` writes them under peft's keys, the export merges them.
  * Attention adapters (and a trained router) with expert parallelism under ZeRO-0/1: each rank holds its
    own experts, frozen. AutoEP finds the MoE blocks under peft's `base_model.model.` prefix
    (model/distributed.py), ZeRO-1 trains the adapters as a dense model's (`frozen_experts_dense`), and a
    trained router, which AutoEP rebuilds inside its own module, is written into the adapter folder under
    peft's name for it (`save_adapter`). Tested equal to one rank, and resumed exactly
    (tests/distributed/test_layouts.py). Not under ZeRO-3 (DeepSpeed refuses to checkpoint frozen AutoEP
    experts) nor ZeRO-2 (its resume did not continue exactly).

Outputs: `<output_dir>/adapter/` in PEFT format (adapter_config.json + adapter_model.safetensors,
loadable with `PeftModel.from_pretrained`), and the merged HF export in `<output_dir>/hf/`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def apply_lora(model, lora_cfg, dtype=None):
    """Wrap `model` with peft adapters; returns the PeftModel (base weights frozen). The adapters are made in
    `dtype` (the run's): peft creates them in torch's default dtype, and ZeRO-3 partitions them as they are,
    so a bf16 run trained fp32 adapters there (ZeRO 0-2 cast the module) and its merged bf16 export differed
    from the live model."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
        target_modules=list(lora_cfg.target_modules),
        target_parameters=["experts.gate_up_proj", "experts.down_proj"] if lora_cfg.experts else None,
        # a trained router is a peft "module to save": its weights then travel in the adapter folder
        modules_to_save=["mlp.gate"] if lora_cfg.train_router else None,
        bias="none", task_type="CAUSAL_LM",
    )
    quantized = _quantized_experts(model) if lora_cfg.experts else []
    if quantized:  # 4-bit experts: peft cannot wrap them; per-expert adapters in its layout (model/quantize.py)
        config.target_parameters = None
    model = get_peft_model(model, config)
    if quantized:
        from torch import nn

        from model.quantize import ExpertLoRA

        for experts in quantized:
            experts.adapters = nn.ModuleDict({
                name: ExpertLoRA(w.shape[0], w.shape[2], w.shape[1], lora_cfg.r, lora_scaling(lora_cfg), dtype)
                for name, w in ((n, getattr(experts, n)) for n in EXPERT_WEIGHTS)})
    if dtype is not None:
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point() and not hasattr(p, "ds_id"):
                p.data = p.data.to(dtype)
    return model


EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
# where peft's `target_parameters` puts the adapter of each fused expert weight (it wraps the experts module
# once per parameter, the first one innermost): the adapter folder's keys, for PEFT to load onto the 16-bit base
PEFT_EXPERT_KEYS = {"gate_up_proj": "experts.base_layer.lora_{}.weight", "down_proj": "experts.lora_{}.weight"}


def _quantized_experts(model) -> list:
    """The MoE experts modules of `model` whose fused weights are 4-bit (`NF4Experts`)."""
    from model.quantize import NF4Experts

    return [m for m in model.modules() if isinstance(getattr(m, "gate_up_proj", None), NF4Experts)]


def expert_adapters(peft_model):
    """(qualified name of an experts module, weight name, its `ExpertLoRA`) for every per-expert adapter over a
    4-bit weight."""
    for name, module in peft_model.named_modules():
        adapters = module._modules.get("adapters") if name.endswith(".experts") else None
        if adapters is not None:
            for weight, lora in adapters.items():
                yield name, weight, lora


@contextlib.contextmanager
def adapters_off(peft_model):
    """peft's `disable_adapter()`, the per-expert adapters over 4-bit weights included (peft does not know them):
    the base model, for DPO's adapters-off reference."""
    loras = [lora for _, _, lora in expert_adapters(peft_model)]
    with peft_model.disable_adapter():
        for lora in loras:
            lora.enabled = False
        try:
            yield
        finally:
            for lora in loras:
                lora.enabled = True


def lora_scaling(lora_cfg) -> float:
    return lora_cfg.alpha / lora_cfg.r


def save_adapter(peft_model, out_dir: str | Path, write: bool, base_model: str | None = None) -> None:
    """PEFT-format adapter folder. All ranks call (under ZeRO-3 the adapters are gathered); `write` on rank 0.
    `base_model` (the stage's `model_path`: a hub id or a folder) goes into adapter_config.json's
    `base_model_name_or_path`, so `PeftModel.from_pretrained` users know what to load the adapter onto."""
    from model.export import _gather_full

    state, extra = {}, {}  # extra: keys peft's save does not see, added to its file after
    for module_name, weight, lora in expert_adapters(peft_model):  # under peft's keys for a 16-bit base's adapter
        for half, p in (("A", lora.lora_A), ("B", lora.lora_B)):
            full = _gather_full(p)
            if write:
                extra[f"{module_name.rsplit('.experts', 1)[0]}.{PEFT_EXPERT_KEYS[weight].format(half)}"] = full
    for name, p in peft_model.named_parameters():
        if ".experts.adapters." in name:
            continue
        if p.requires_grad and ".mlp.router.gate." in name:
            # lora.train_router under expert parallelism: AutoEP replaced peft's router wrapper by its own router,
            # which peft's save no longer sees; written under the key peft gives a saved router module
            full = _gather_full(p)
            if write:
                extra[name.replace(".mlp.router.gate.", ".mlp.gate.")] = full
        elif "lora_" in name or ".modules_to_save." in name:
            full = _gather_full(p)
            if write:
                state[name] = full
    if write:  # save_pretrained selects and renames the adapter's entries (get_peft_model_state_dict) itself
        for config in peft_model.peft_config.values():
            config.base_model_name_or_path = base_model
        peft_model.save_pretrained(str(out_dir), state_dict=state)
        if any(".experts." in k for k in extra):  # PEFT loads them onto the 16-bit base as target_parameters
            import json

            file = Path(out_dir) / "adapter_config.json"
            config = json.loads(file.read_text())
            config["target_parameters"] = [f"experts.{w}" for w in sorted(EXPERT_WEIGHTS)]
            file.write_text(json.dumps(config, indent=2, sort_keys=True))
        if extra:
            from safetensors.torch import load_file, save_file

            file = Path(out_dir) / "adapter_model.safetensors"
            save_file({**load_file(str(file)), **{k: v.contiguous() for k, v in extra.items()}}, str(file),
                      metadata={"format": "pt"})


def merged_for_export(peft_model):
    """The plain HF model with adapters merged in (W + B·A·α/r), via peft itself."""
    return peft_model.merge_and_unload()
