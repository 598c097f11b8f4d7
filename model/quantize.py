"""4-bit NF4 base weights for QLoRA (`model.quantize=nf4`): bitsandbytes' NormalFloat4 with double quantization.

What is stored in 4 bits: the attention projections (q, k, v, o) and every expert's weights (the fused
`gate_up_proj` (E, 2F, H) and `down_proj` (E, H, F) of each MoE layer). What stays in the run's dtype: the
embeddings, the LM head, the norms and the routers (a quantized router would flip top-2 choices).

NF4 (QLoRA, Dettmers et al. 2023): each block of 64 consecutive weights w is stored as 4-bit indices into 16
normal-distribution quantiles q_i ∈ [-1, 1] and one absmax a = max|w|: ŵ = q_i · a. Double quantization stores
the absmaxes in 8 bits too (blocks of 256, an fp32 offset and scale each): 4 + 8/64 + 32/(64·256) ≈ 4.127 bits
per weight. Quantization and dequantization are bitsandbytes' own (`quantize_4bit` / `dequantize_4bit`).

Where the weights live:
  * attention: `bitsandbytes.nn.Linear4bit` modules (peft puts its LoRA wrapper for 4-bit layers on them);
  * experts: an `NF4Experts` module in place of each fused parameter, every expert quantized on its own (its
    4-bit data and scales depend on no other expert, so a rank holding a block of experts under expert
    parallelism holds exactly the values one rank holds for them). The expert kernel (model/experts.py, and
    `QuantizedGroupedExperts` inside DeepSpeed's AutoEP layers) dequantizes one expert's weight at a time, in
    the forward and again in the backward (`_FrozenGroupedLinear`): the 16-bit copy of one expert's
    projection is the most that ever exists.

Quantization happens while the weights are read (model/load.py `_Filler`): each tensor is quantized as soon as
it is filled, so a rank never holds more than one 16-bit tensor of the base at a time; under expert parallelism
a rank reads and quantizes only its own block of experts (`store_expert_block`), and AutoEP's layer receives
them (model/distributed.py `quantized_expert_parallel`).

The oracle (tests/unit/test_quantize.py, tests/distributed/test_qlora.py): a QLoRA run equals LoRA on the same
model whose weights were replaced by their dequantized values — quantization changes storage, nothing else.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

BLOCKSIZE = 64
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
EXPERTS = ("gate_up_proj", "down_proj")  # a MoE layer's fused expert weights (transformers 5)


def quantized_name(name: str) -> bool:
    """Whether the checkpoint tensor `name` (the model's own names, e.g. `model.layers.0.self_attn.q_proj.weight`,
    `model.layers.0.mlp.experts.gate_up_proj`) is stored in 4 bits."""
    parts = name.split(".")
    if parts[-1] in EXPERTS and len(parts) > 1 and parts[-2] == "experts":
        return True
    return parts[-1] == "weight" and len(parts) > 1 and parts[-2] in ATTENTION


def _quantize(weight: torch.Tensor):
    import bitsandbytes.functional as F

    return F.quantize_4bit(weight, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4")


class NF4Tensor(nn.Module):
    """A frozen weight of any shape in NF4 with double quantization; `dequantize()` gives it back in the dtype
    it was quantized from. Its buffers follow the module to another device, and keep their dtypes when the
    module is cast (DeepSpeed casts a bf16 run's module with `.bfloat16()`: the fp32 scales would lose bits)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        packed, state = _quantize(weight.detach())
        self.shape, self.dtype = tuple(weight.shape), weight.dtype
        self.blocksize, self.blocksize2 = state.blocksize, state.state2.blocksize
        # Not in the state dict: checkpoints hold what trains (the base is read again from model_path on resume),
        # and under expert parallelism each rank's buffers are other experts (model/distributed.py)
        for name, value in (("packed", packed), ("absmax", state.absmax),  # uint8: the block scales, quantized
                            ("code", state.code), ("offset", state.offset),  # the 16 NF4 levels, the scales' mean
                            ("absmax2", state.state2.absmax), ("code2", state.state2.code)):  # fp32 scales of the scales
            self.register_buffer(name, value, persistent=False)

    def dequantize(self) -> torch.Tensor:
        from bitsandbytes.functional import QuantState, dequantize_4bit

        inner = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        state = QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=self.code, blocksize=self.blocksize,
                           quant_type="nf4", dtype=self.dtype, offset=self.offset, state2=inner)
        return dequantize_4bit(self.packed, state)

    def _apply(self, fn, recurse=True):
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = fn(buf).to(buf.dtype)
        return self

    def extra_repr(self) -> str:
        return f"shape={self.shape}, dtype={self.dtype}, nf4 blocksize={self.blocksize}"


class NF4Experts(nn.ModuleList):
    """A fused (E, ·, ·) expert weight in NF4, one `NF4Tensor` per expert; `dequantize()` gives the (E, ·, ·)
    tensor back, `self[e].dequantize()` one expert's. `first`: the index of its first expert in the layer (a
    block of experts under expert parallelism)."""

    def __init__(self, experts: Iterable[torch.Tensor], first: int = 0):
        """`experts`: the (E, ·, ·) tensor, or its experts one at a time (a generator reading each from disk: then
        one expert's 16-bit weight is the most that exists while the module is made)."""
        super().__init__(NF4Tensor(w) for w in experts)
        self.shape, self.dtype, self.first = (len(self), *self[0].shape), self[0].dtype, first

    def dequantize(self) -> torch.Tensor:
        return torch.stack([t.dequantize() for t in self])

    def extra_repr(self) -> str:
        return f"experts {self.first}..{self.first + self.shape[0] - 1} of shape {self.shape[1:]}, {self.dtype}, nf4"


def roundtrip(name: str, weight: torch.Tensor) -> torch.Tensor:
    """The value a run computes with for checkpoint tensor `name` (`quantized_name(name)` holds) read as
    `weight`: its NF4 quantization, dequantized (per expert for fused experts, whole for attention, as
    bitsandbytes' `Linear4bit` quantizes). bitsandbytes' quantization is deterministic."""
    if name.rsplit(".", 1)[-1] in EXPERTS:
        return NF4Experts(weight).dequantize()
    return NF4Tensor(weight).dequantize()


def linear4bit(weight: torch.Tensor, compute_dtype: torch.dtype) -> nn.Module:
    """A bias-free `bitsandbytes.nn.Linear4bit` holding `weight` (out, in) in NF4, computing in `compute_dtype`."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=compute_dtype,
                              compress_statistics=True, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(weight.detach().to(compute_dtype), requires_grad=False, blocksize=BLOCKSIZE,
                                     compress_statistics=True, quant_type="nf4")._quantize(weight.device)
    # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at the first eval-mode forward for a
    # kernel that computes in bf16 (logits off by ~1e-3 in an fp32 run, and the repacked data no longer
    # dequantizes: an export after an eval forward wrote noise). Kept off: the 4-bit layer computes exactly
    # x · dequantize(W)ᵀ in the compute dtype, in training and evaluation alike.
    layer.support_avx512bf16_for_cpu = False
    return layer


def store(model: nn.Module, name: str, value: torch.Tensor | NF4Experts, compute_dtype: torch.dtype) -> None:
    """Put checkpoint tensor `name` into `model` in 4 bits (`quantized_name(name)` must hold): an attention
    weight (out, in), or a fused expert weight already quantized (`NF4Experts`)."""
    owner_path, attr = name.rsplit(".", 1)
    if attr in EXPERTS:
        experts = model.get_submodule(owner_path)
        experts._parameters.pop(attr, None)
        experts.add_module(attr, value if isinstance(value, NF4Experts) else NF4Experts(value.to(compute_dtype)))
    else:  # `…self_attn.q_proj.weight`: the Linear itself is replaced
        parent_path, child = owner_path.rsplit(".", 1)
        model.get_submodule(parent_path).add_module(child, linear4bit(value, compute_dtype))


def store_expert_block(model: nn.Module, name: str, block: NF4Experts) -> None:
    """Expert parallelism: keep `block` (experts [block.first, block.first + len(block)) of fused expert tensor
    `name`) for AutoEP's layer to take (`take_expert_blocks`), and leave a meta tensor of the full shape in the
    model's place (AutoEP slices it: nothing is allocated for it)."""
    owner_path, attr = name.rsplit(".", 1)
    experts = model.get_submodule(owner_path)
    shape = experts._parameters[attr].shape
    experts._parameters[attr] = nn.Parameter(torch.empty(shape, dtype=block.dtype, device="meta"), requires_grad=False)
    experts.__dict__.setdefault("nf4_blocks", {})[attr] = block


def take_expert_blocks(experts: nn.Module) -> dict[str, NF4Experts] | None:
    """The 4-bit expert blocks `store_expert_block` kept on an HF experts module (removed from it), or None."""
    return experts.__dict__.pop("nf4_blocks", None)


def is_quantized(weight) -> bool:
    """Whether a weight is stored in 4 bits (`NF4Experts`, `NF4Tensor`, or bitsandbytes' `Params4bit`)."""
    return isinstance(weight, (NF4Tensor, NF4Experts)) or getattr(weight, "quant_state", None) is not None


def dequantized(weight) -> torch.Tensor:
    """The full-precision value of a weight, quantized or not (a Parameter, `Params4bit`, `NF4Experts`)."""
    if isinstance(weight, (NF4Tensor, NF4Experts)):
        return weight.dequantize()
    if is_quantized(weight):
        import bitsandbytes.functional as F

        return F.dequantize_4bit(weight.data, weight.quant_state)
    return weight.data


def dequantize_model(model: nn.Module) -> None:
    """Replace every 4-bit weight of `model` by a plain frozen tensor of its dequantized value (in place): the
    oracle's model, and what an export of the trained base starts from."""
    for path, module in list(model.named_modules()):
        if isinstance(module, NF4Experts):
            continue
        for name, child in list(module.named_children()):
            if isinstance(child, (NF4Tensor, NF4Experts)):
                delattr(module, name)
                module.register_parameter(name, nn.Parameter(child.dequantize(), requires_grad=False))
            elif type(child).__name__ == "Linear4bit":
                linear = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                linear.weight = nn.Parameter(dequantized(child.weight).to(child.compute_dtype), requires_grad=False)
                setattr(module, name, linear)


def expert_rows(offsets: torch.Tensor):
    """(e, start, stop) for each expert e with rows: the rows [offsets[e−1], offsets[e]) of a batch sorted by
    expert (transformers' grouped-GEMM layout; rows past the last offset belong to no expert)."""
    start = 0
    for e, stop in enumerate(offsets.tolist()):
        if stop > start:
            yield e, start, stop
        start = stop


def _per_expert(x: torch.Tensor, experts: NF4Experts, offsets: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows [offsets[e−1], offsets[e]) of x times expert e's weight W_e (transposed: x · W_e, else x · W_eᵀ),
    each W_e dequantized just before its product and dropped after it. Rows past the last offset stay 0.
    Bit for bit what transformers' `_grouped_linear` gives on the dequantized (E, ·, ·) tensor (tested)."""
    out = x.new_zeros(x.shape[0], experts.shape[2] if transposed else experts.shape[1])
    for e, start, stop in expert_rows(offsets):
        w = experts[e].dequantize()
        out[start:stop] = x[start:stop] @ (w if transposed else w.T)
    return out


class _FrozenGroupedLinear(torch.autograd.Function):
    """y = x_S · W_eᵀ per expert block (transformers' `_grouped_linear`) over a 4-bit (E, ·, ·) weight whose
    experts are dequantized one at a time in the forward and again in the backward, never saved:
    dx = dy_S · W_e, and no gradient for the frozen W."""

    @staticmethod
    def forward(ctx, x, experts: NF4Experts, offsets, is_transposed: bool):
        ctx.experts, ctx.is_transposed = experts, is_transposed
        ctx.save_for_backward(offsets)
        return _per_expert(x, experts, offsets, is_transposed)

    @staticmethod
    def backward(ctx, grad_out):
        (offsets,) = ctx.saved_tensors
        return _per_expert(grad_out.contiguous(), ctx.experts, offsets, not ctx.is_transposed), None, None, None


class ExpertLoRA(nn.Module):
    """Per-expert LoRA on a 4-bit fused expert weight W (E, out, in) (`lora.experts=true` with
    `model.quantize=nf4`): W_e + s · B_e A_e, A_e (r, in) and B_e (out, r) for each expert e, s = α / r.

    Stored exactly as peft's `target_parameters` adapter of the same 16-bit weight, so the adapter folder loads
    with PEFT onto the 16-bit base: lora_A (r·E, in) with A_e = lora_A.view(E, r, in)[e], and lora_B (out, r·E)
    with B_e = lora_B.view(out, r, E)[:, :, e] (peft's `ParamWrapper.get_delta_weight`). Initialised as peft's
    (A Kaiming-uniform, B zero). Computed beside the frozen product, y_S = x_S W_eᵀ + s (x_S A_eᵀ) B_eᵀ, never as
    W + ΔW (which would bring the 16-bit experts back); peft's ParamWrapper applies no dropout, nor does this."""

    def __init__(self, experts: int, in_features: int, out_features: int, r: int, scaling: float, dtype=None):
        import math

        super().__init__()
        self.experts, self.r, self.scaling, self.enabled = experts, r, scaling, True
        self.lora_A = nn.Parameter(torch.empty(r * experts, in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r * experts, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (E, r, in), B (E, out, r))."""
        return (self.lora_A.view(self.experts, self.r, -1),
                self.lora_B.view(self.lora_B.shape[0], self.r, self.experts).permute(2, 0, 1))

    def delta_weight(self) -> torch.Tensor:
        """s · B_e A_e for every expert: (E, out, in), what a merge adds to W."""
        a, b = self.factors()
        return torch.bmm(b.float(), a.float()) * self.scaling

    def forward(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """s (x_S A_eᵀ) B_eᵀ for the rows of each expert (offsets as for `grouped_linear`; later rows get 0)."""
        a, b = self.factors()
        out = x.new_zeros(x.shape[0], b.shape[1])
        for e, start, stop in expert_rows(offsets):
            out[start:stop] = (x[start:stop] @ a[e].T) @ b[e].T
        return out * self.scaling


def grouped_linear(x: torch.Tensor, weight, offsets: torch.Tensor, is_transposed: bool,
                   lora: ExpertLoRA | None = None) -> torch.Tensor:
    """The expert kernel's projection: a 4-bit weight through `_FrozenGroupedLinear` (plus its per-expert
    adapter, when `lora` is given and enabled), a plain one as before."""
    if isinstance(weight, NF4Experts):
        y = _FrozenGroupedLinear.apply(x, weight, offsets, is_transposed)
        if lora is not None and lora.enabled:
            assert not is_transposed, "expert adapters over 4-bit weights take the (E, out, in) layout"
            y = y + lora(x, offsets)
        return y
    from transformers.integrations.moe import _grouped_linear

    return _grouped_linear(x, weight, offsets, is_transposed=is_transposed)


class QuantizedGroupedExperts(nn.Module):
    """The experts of a DeepSpeed AutoEP layer over this rank's 4-bit expert blocks, in place of its
    `GroupedExperts` (same call: tokens sorted by local expert (T, H) and the per-expert counts (E_local,)):
    out = down_e(silu(gate_e(x)) ⊙ up_e(x)) with gate_up_proj (E_local, 2F, H) (gate rows first) and
    down_proj (E_local, H, F), each expert dequantized as it computes."""

    def __init__(self, gate_up_proj: NF4Experts, down_proj: NF4Experts):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.num_experts = gate_up_proj.shape[0]

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offsets = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        gate, up = grouped_linear(x, self.gate_up_proj, offsets, False).chunk(2, dim=-1)
        return grouped_linear(torch.nn.functional.silu(gate) * up, self.down_proj, offsets, False)
