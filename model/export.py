"""Export a training engine's model as a Hugging Face repository folder (weights, config, tokenizer, card).

The weights are written in the hub key layout that mistralai publishes and vLLM, TGI, llama.cpp's
converter, mergekit and transformers (4 and 5) read: `model.layers.N.block_sparse_moe.gate.weight`,
`model.layers.N.block_sparse_moe.experts.E.w1|w2|w3.weight` (model/weights.py: `to_hub`).

Handles every layout the stages train in, gathering in process (all ranks must call):
  * ZeRO-3 partitions: each parameter is gathered with `deepspeed.zero.GatheredParameters`
    (inside its own process group, so expert weights gather inside their expert-data-parallel group);
  * DeepSpeed AutoEP: expert weights live as `mlp.experts.w1/w2/w3` of shape (E/ep, ffn, hidden)
    holding this rank's contiguous block of experts; they are all-gathered across the EP group
    (group rank r holds experts [r·E/ep, (r+1)·E/ep)) and named as in HF's fused layout (then written per expert):
        gate_up_proj (E, 2·ffn, hidden) = cat(w1 = gate, w3 = up, dim=1)
        down_proj    (E, hidden, ffn)   = w2
        mlp.router.gate.weight → mlp.gate.weight
  * LoRA (peft): adapters are merged into the base weights (W + B·A·α/r) before saving.

Parameters are written shard by shard (`max_shard_bytes`) so rank 0 never holds the whole model,
into `<out>.tmp` renamed to `<out>` only when complete.

Over 250 lines because the gathering of each layout and the writing of the repository's files are one
transaction (nothing lands unless every part is written); the card's text is model/card.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from model import sequence_parallel
from model.quantize import NF4Experts, dequantized, is_quantized
from model.weights import Checkpoint, to_hub

_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(w1|w2|w3)$")
_LORA = re.compile(r"^(.*)\.lora_(A|B)\.default\.weight$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _is_autoep_expert(p) -> bool:
    return getattr(p, "allreduce", True) is False and hasattr(p, "group_name")


def _gather_full(p: torch.Tensor) -> torch.Tensor:
    """The full tensor of one parameter on every rank (ZeRO-3 and AutoEP aware), detached, on CPU."""
    if hasattr(p, "ds_id"):  # ZeRO-3 partitioned
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            full = p.data.detach().clone()
    else:
        full = p.data.detach().clone()
    if _is_autoep_expert(p):
        from deepspeed.utils import groups

        group = groups._get_expert_parallel_group(p.group_name)
        size = dist.get_world_size(group)
        if size > 1:
            parts = [torch.empty_like(full) for _ in range(size)]
            dist.all_gather(parts, full.contiguous(), group=group)
            full = torch.cat(parts, dim=0)
    return full.cpu()


def _hf_name(name: str) -> str:
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.replace(".base_layer.", ".").replace(".mlp.router.gate.", ".mlp.gate.").replace(".modules_to_save.default.", ".")
    return name


class _ShardWriter:
    def __init__(self, out: Path, max_shard_bytes: int):
        self.out, self.max = out, max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.size = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Add one parameter under its fused-layout name; it is written in the hub layout."""
        for key, t in to_hub(name, tensor):
            self._add(key, t)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.size + nbytes > self.max:
            self.flush()
        self.current[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        if not self.current:
            return
        tmp_name = f"shard-{len(self.files):05d}.safetensors"
        save_file(self.current, str(self.out / tmp_name), metadata={"format": "pt"})
        self.files.append((tmp_name, list(self.current)))
        self.current, self.size = {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.files)
        if n == 1:
            os.replace(self.out / self.files[0][0], self.out / "model.safetensors")
            return
        weight_map = {}
        for i, (tmp_name, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / tmp_name, self.out / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def export_hf(module: torch.nn.Module, hf_config, out_dir: str | Path, tokenizer_file: str | Path | None = None,
              dtype: torch.dtype | None = None, max_shard_bytes: int = 4 * 2**30, lora_scaling: float | None = None,
              training_config: str | None = None, card: str | None = None, base: Checkpoint | None = None) -> None:
    """Write `module` (an HF Mixtral, possibly under ZeRO-3 / AutoEP / peft) as an HF folder: config.json,
    hub-layout safetensors, generation_config.json (the defaults eval/generate.py uses: greedy, stop at </s>,
    pad with </s>), tokenizer.model with tokenizer.json, tokenizer_config.json (chat template) and
    special_tokens_map.json (data/hf_tokenizer.py) and, when given, `training_config` as training_config.yaml
    (the stage's fully resolved config) and `card` as README.md (the model card).

    All ranks must call this; rank 0 writes. `lora_scaling` (α/r) is needed to merge peft adapters.
    `base`: the 16-bit folder a QLoRA run (model.quantize=nf4) quantized its base from: each 4-bit weight is
    written from there, as it was before quantization (plus its merged adapter), not as its dequantized value.
    """
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    rank = _rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    writer = _ShardWriter(tmp, max_shard_bytes) if rank == 0 else None

    # 4-bit base weights (model.quantize=nf4): the original 16-bit weights from `base`, else their dequantized values
    params = list(module.named_parameters()) + [(n, m) for n, m in module.named_modules() if isinstance(m, NF4Experts)]
    names = {n for n, _ in params}
    pending_experts: dict[str, dict[str, torch.Tensor]] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, torch.Tensor] = {}
    for name, p in params:
        if ".experts.adapters." in name:  # per-expert adapters over 4-bit weights: merged into them below
            continue
        if is_quantized(p):  # every rank holds the whole 4-bit base (no ZeRO-3, no EP): rank 0 reads it alone
            if rank != 0:
                continue
            full = base.full(_hf_name(name)) if base is not None else dequantized(p).cpu()
            adapters = module.get_submodule(name.rsplit(".", 1)[0])._modules.get("adapters") if "." in name else None
            if adapters is not None and name.rsplit(".", 1)[1] in adapters:  # W + s·B_e·A_e (model/quantize.py)
                full = (full.float() + adapters[name.rsplit(".", 1)[1]].delta_weight().detach().cpu()).to(full.dtype)
        else:
            full = _gather_full(p)  # collective: every rank, same order
        if rank != 0:
            continue
        if dtype is not None and full.is_floating_point():
            full = full.to(dtype)
        if ".original_module." in name:  # peft keeps the untrained copy of a module to save
            continue
        m = _LORA.match(name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = full
            _maybe_merge(m.group(1), lora, base_weights, writer, lora_scaling)
            continue
        if name.endswith(".base_layer.weight") or (name.endswith(".weight") and f"{name[:-7]}.lora_A.default.weight" in names):
            base_weights[name.removesuffix(".weight").removesuffix(".base_layer")] = full
            _maybe_merge(name.removesuffix(".weight").removesuffix(".base_layer"), lora, base_weights, writer, lora_scaling)
            continue
        m = _EXPERT.match(name)
        if m:
            block = pending_experts.setdefault(m.group(1), {})
            block[m.group(2)] = full
            if len(block) == 3:
                prefix = _hf_name(m.group(1))
                writer.add(f"{prefix}.gate_up_proj", torch.cat([block["w1"], block["w3"]], dim=1))
                writer.add(f"{prefix}.down_proj", block["w2"])
                del pending_experts[m.group(1)]
            continue
        hf = _hf_name(name)
        if hf == "lm_head.weight" and getattr(hf_config, "tie_word_embeddings", False):
            continue
        writer.add(hf, full)

    if rank == 0:
        if pending_experts or lora or base_weights:
            raise RuntimeError(f"export: unmatched pieces {list(pending_experts)[:3]} {list(lora)[:3]} {list(base_weights)[:3]}")
        writer.finish()
        config = hf_config.__class__.from_dict(hf_config.to_dict())
        config.architectures = ["MixtralForCausalLM"]
        config.use_cache = True
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(tmp)
        from transformers import GenerationConfig

        GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                         pad_token_id=config.eos_token_id, do_sample=False, max_new_tokens=256).save_pretrained(tmp)
        if training_config is not None:
            (tmp / "training_config.yaml").write_text(training_config)
        if tokenizer_file is not None:  # sentencepiece, plus the fast tokenizer and chat template for HF tools
            from data.hf_tokenizer import write_hf_tokenizer

            shutil.copy(tokenizer_file, tmp / "tokenizer.model")
            write_hf_tokenizer(tokenizer_file, tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()


def _maybe_merge(key, lora, base_weights, writer, scaling) -> None:
    """Write W + scaling · B @ A once the base weight and both adapter halves are present."""
    if key in base_weights and key in lora and len(lora[key]) == 2:
        if scaling is None:
            raise ValueError("export: peft adapters found but no lora_scaling given")
        w = base_weights.pop(key)
        ab = lora.pop(key)
        merged = (w.float() + scaling * (ab["B"].float() @ ab["A"].float())).to(w.dtype)
        writer.add(_hf_name(key) + ".weight", merged)


def probe_ids(vocab_size: int, seq_len: int = 32) -> torch.Tensor:
    """The export check's fixed probe batch: (2, seq_len) ids drawn uniformly from [3, vocab_size), seed 1234."""
    return torch.randint(3, vocab_size, (2, seq_len), generator=torch.Generator().manual_seed(1234))


def live_probe(engine, sp: sequence_parallel.SequenceParallel | None = None,
               seq_len: int = 32) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
    """(input_ids (2, seq_len), live logits (2, seq_len, V) fp32 on CPU, routing) of a fixed probe batch, where
    routing is the live model's top-k expert choices, one (2·seq_len, K) tensor per layer (under sequence
    parallelism, `sp`, gathered from the group's shards). All ranks run the forward (ZeRO-3/AutoEP need them)."""
    from model.router import RouterLogitsRecorder

    ids = probe_ids(engine.module.config.vocab_size, seq_len)
    was_training = engine.module.training
    engine.eval()
    recorder = RouterLogitsRecorder(engine.module)
    with torch.no_grad():
        if sp is None:
            with recorder:
                live = engine(input_ids=ids.to(engine.device), use_cache=False).logits
            router_logits = recorder.logits
        else:  # each rank holds a shard of every row: the group's logits and routing gathered in row order
            live, router_logits = sequence_parallel.whole_row_logits(engine, ids.to(engine.device), sp, recorder)
    recorder.remove()
    k = engine.module.config.num_experts_per_tok
    routing = [torch.topk(l.float(), k, dim=-1).indices.cpu() for l in router_logits]
    live = live.float().cpu()
    engine.train(was_training)
    release_zero3_params(engine)
    return ids, live, routing


def release_zero3_params(engine) -> None:
    """Under ZeRO-3, release every gathered or prefetched parameter: a parameter left in flight by the last
    forward (an eval forward has no backward to release it) makes the next `GatheredParameters` fail with
    "Cannot partition a param in flight"."""
    if engine.zero_optimization_stage() == 3:
        engine.empty_partition_cache()


def export_tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance of the export check: |logits(export) − logits(live)| ≤ tol · max(1, max |live logit|).

    The two forwards run in the same dtype on the same weights and the same expert choices, so they differ
    only where their kernels round differently: AutoEP's grouped GEMM against transformers' expert loop,
    peft's W·x + s·B(A·x) against the merged bf16(W + s·BA), a sharded attention. Each such difference is a
    few units in the last place of the largest logit; tol = 4 · eps(dtype) with fp32's floor of 1e-4:
    fp32 1e-4, bf16 4 · 2⁻⁷ = 0.031, fp16 4 · 2⁻¹⁰ = 0.0039. Measured (tiny preset, 3 steps, bf16): 0 without
    EP or LoRA (same kernels), ≤ 3 last-place units of the largest logit with ZeRO-3 + EP 2 and with merged
    expert adapters. Two experts' up projections swapped in the export: 6× the tolerance after 3 steps from
    the initialisation, 30× with the experts' weights scaled up 4× (tests/unit/test_precision.py)."""
    return max(1e-4, 4 * torch.finfo(dtype).eps)


def requantized(base: Checkpoint, dtype: torch.dtype):
    """The export check's view of a QLoRA export written from its 16-bit `base` (`export_hf(base=...)`): each
    weight the run stored in 4 bits becomes W − W₀ + NF4(W₀), W₀ the base weight in the run's dtype and NF4(W₀)
    the value the run computed with (bitsandbytes' quantization is deterministic). What is left is the merged
    adapter on exactly the live base, so the check stays as tight as for any export, and catches an export that
    wrote the dequantized base (its W − W₀ is the quantization error, not the adapter)."""
    from model.quantize import quantized_name, roundtrip

    def substitute(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if not quantized_name(name):
            return tensor
        w0 = base.full(name).to(dtype)
        return (tensor.float() - w0.float() + roundtrip(name, w0).float()).to(dtype)

    return substitute


def verify_export(engine, out_dir: str | Path, probe=None, dtype: torch.dtype = torch.float32,
                  base: Checkpoint | None = None) -> dict:
    """Compare the live model's logits with the exported folder's on the fixed probe batch (`probe_ids`).

    Like with like: the export's logits are computed in the run's `dtype` (what it was exported in), with the
    live model's expert choices (`live_probe`'s routing) and fp32 routers as in training; the tolerance is
    `export_tolerance(dtype)` relative to the largest live logit. `probe` is `live_probe(engine)` taken
    earlier (before peft merged adapters in place, so the check covers the merge too); None takes it now.
    Rank 0 runs the export layer by layer (`model.stream.streamed_logits`: one decoder layer's weights in
    memory at a time, whatever the model's size). Returns the evidence the stage logs, the same on every
    rank: {max_abs_diff, scale (max |live logit|, at least 1), live_sum (Σ live logits, to compare another
    tool's logits with), tol, passed}. `base`: a QLoRA export's 16-bit base (`requantized`).
    """
    from model.stream import streamed_logits

    ids, live, routing = probe if probe is not None else live_probe(engine)
    tol = export_tolerance(dtype)
    values = torch.zeros(3, dtype=torch.float64)
    if _rank() == 0:
        ref = streamed_logits(out_dir, ids, dtype, routing, requantized(base, dtype) if base is not None else None).float()
        values = torch.tensor([(live - ref).abs().max().item(), max(1.0, live.abs().max().item()),
                               live.double().sum().item()], dtype=torch.float64)
    if dist.is_initialized():  # every rank learns the verdict, so that every rank ends the same way
        from model.distributed import collective_device

        values = values.to(collective_device())
        dist.broadcast(values, 0)
        values = values.cpu()
    diff, scale, live_sum = values.tolist()
    return {"max_abs_diff": diff, "scale": scale, "live_sum": live_sum, "tol": tol, "passed": diff <= tol * scale}

