"""Build a Mixtral so that no rank ever holds more of it than its layout needs.

A rank's share of the weights depends on the layout (`Placement`):

  ZeRO-3            each parameter is created partitioned (`deepspeed.zero.Init`): a rank holds
                    1/N of every tensor (N = the parameter's partition group), and fills exactly that
                    flat range from the checkpoint (`Checkpoint.flat`) or the initialiser.
  ZeRO-0/1/2 + EP   the model is built on the meta device; dense weights are materialised whole, the
                    expert tensors (E, ·, ·) are allocated untouched (`torch.empty`: pages are only
                    mapped, never resident, until written) and only this rank's block of experts
                    [r·E/ep, (r+1)·E/ep) is written; AutoEP then copies exactly that block into its
                    own expert layer (`check_expert_placement` verifies it after `deepspeed.initialize`).
  ZeRO-0/1/2        dense and all experts, read tensor by tensor.

Fresh weights (no `model_path`) come from `stream_init`, which replays the random-number stream
that `torch.manual_seed(seed); MixtralForCausalLM(config)` consumes, one module at a time:
every layout and world size therefore starts from exactly the weights a single process builds
with the same seed (tests compare them bit for bit), while at most one module's tensors (one
layer's experts) exist whole at any moment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from model import quantize
from model.weights import Checkpoint



@dataclass
class Placement:
    """What this rank keeps of each weight. `ds_config` is the DeepSpeed config the engine gets (needed
    to create ZeRO-3 partitions); `ep_size`/`ep_rank` the expert-parallel block for ZeRO ≤ 2."""
    zero_stage: int = 0
    ep_size: int = 1
    ep_rank: int = 0
    ds_config: dict = field(default_factory=dict)
    quantize: str = "none"  # "nf4": the attention and expert weights are stored in 4 bits as they are read

    @property
    def partitioned(self) -> bool:
        return self.zero_stage == 3


def expert_parallel_rank(rank: int, ep_size: int) -> int:
    """The expert-parallel rank DeepSpeed gives global `rank`: EP groups are consecutive ranks
    ([0..ep-1], [ep..2ep-1], ...), so the block index is rank mod ep."""
    return rank % ep_size


def placement(ds: dict, rank: int) -> Placement:
    """What `rank` keeps of the weights under the DeepSpeed config `ds` (model/distributed.py `deepspeed_config`)."""
    ep = int(ds.get("expert_parallel", {}).get("autoep_size", 1))
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    return Placement(zero_stage=stage, ep_size=ep, ep_rank=expert_parallel_rank(rank, ep), ds_config=ds)


def skeleton(config, dtype: torch.dtype, placement: Placement) -> nn.Module:
    """A `MixtralForCausalLM` whose parameters hold no weights yet: meta tensors, or (ZeRO-3) empty
    partitions created under `deepspeed.zero.Init` (whose `torch.empty` pages are never touched)."""
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    if placement.partitioned:
        import deepspeed

        # The partitions' dtype comes from the config's bf16/fp16 sections: zero.Init's own `dtype` argument
        # is ignored on accelerators without fp16 (deepspeed 0.19.8 `_set_dtype`: `dtype or fp16 if ... else bf16`
        # makes every CPU partition bf16).
        ds = {**placement.ds_config, "bf16": {"enabled": dtype == torch.bfloat16},
              "fp16": {"enabled": dtype == torch.float16}}
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds):
            model = MixtralForCausalLM(config)
        return model
    with torch.device("meta"):
        model = MixtralForCausalLM(config)
    return model


# ---------------------------------------------------------------------------------------------
# filling parameters

def _owners(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(parameter) → every (module, attribute, qualified name) holding it (tied weights share one)."""
    owners: dict[int, list] = {}
    for mod_name, mod in model.named_modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, pname, f"{mod_name}.{pname}" if mod_name else pname))
    return owners


class _Filler:
    """Writes this rank's share of each parameter, given a reader of the full tensor's pieces."""

    def __init__(self, model: nn.Module, dtype: torch.dtype, placement: Placement):
        self.model, self.dtype, self.placement = model, dtype, placement
        self.owners = _owners(model)
        self.done: set[int] = set()

    def fill(self, p: nn.Parameter, name: str, full: Callable[[], torch.Tensor] | None = None,
             rows: Callable[[int, int], torch.Tensor] | None = None,
             flat: Callable[[int, int], torch.Tensor] | None = None) -> None:
        if id(p) in self.done:
            return
        self.done.add(id(p))
        pl = self.placement
        with torch.no_grad():
            if hasattr(p, "ds_id"):  # ZeRO-3 partition: elements [r·n, (r+1)·n) of the flat tensor
                n = p.ds_tensor.ds_numel
                start = n * dist.get_rank(group=p.ds_process_group)
                stop = min(start + n, p.ds_numel)
                p.ds_tensor.zero_()
                if start < stop:
                    p.ds_tensor[:stop - start].copy_(flat(start, stop).to(p.ds_tensor.dtype))
                return
            shape = p.shape
            experts = name.rsplit(".", 1)[-1] in quantize.EXPERTS
            if experts and pl.quantize == "nf4":  # read and quantized one expert at a time (this rank's, under EP)
                per = shape[0] // pl.ep_size
                a = pl.ep_rank * per
                block = quantize.NF4Experts((rows(e, e + 1)[0].to(self.dtype) for e in range(a, a + per)), first=a)
                if pl.ep_size > 1:
                    quantize.store_expert_block(self.model, name, block)  # for AutoEP's layer
                else:
                    quantize.store(self.model, name, block, self.dtype)
                return
            if experts and pl.ep_size > 1:
                per = shape[0] // pl.ep_size
                a, b = pl.ep_rank * per, (pl.ep_rank + 1) * per
                data = torch.empty(shape, dtype=self.dtype)  # other experts' pages stay untouched
                data[a:b].copy_(rows(a, b))
            else:  # a fresh, aligned allocation: CPU kernels round differently on unaligned memory
                data = torch.empty(shape, dtype=self.dtype)
                data.copy_(full())
            if pl.quantize == "nf4" and quantize.quantized_name(name):  # stored in 4 bits at once (model/quantize.py)
                quantize.store(self.model, name, data, self.dtype)
                return
            new = nn.Parameter(data, requires_grad=p.requires_grad)
            for mod, attr, _ in self.owners[id(p)]:
                mod._parameters[attr] = new

    def materialise_buffers(self, model: nn.Module) -> None:
        """Meta buffers (rotary inv_freq) are recomputed by the model's own initialiser."""
        for mod in model.modules():
            metas = {n: b for n, b in mod._buffers.items() if b is not None and b.is_meta}
            if metas:
                for n, b in metas.items():
                    mod._buffers[n] = torch.empty(b.shape, dtype=b.dtype)
                with torch.no_grad():
                    model._init_weights(mod)


def load_checkpoint(model: nn.Module, ckpt: Checkpoint, dtype: torch.dtype, placement: Placement) -> None:
    """Fill `model` (a `skeleton`) from `ckpt`, reading only this rank's share of each tensor."""
    filler = _Filler(model, dtype, placement)
    provided = set(ckpt.names())
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for pid, owners in filler.owners.items():
        names = [q for _, _, q in owners]
        name = next((q for q in names if q in provided), None)
        if name is None:
            if tied and any(q == "lm_head.weight" for q in names):
                continue
            raise KeyError(f"{ckpt.folder}: no weights for {names[0]} (layout {ckpt.layout})")
        p = getattr(owners[0][0], owners[0][1])
        expected = list(getattr(p, "ds_shape", p.shape))
        if ckpt.shape(name) != expected:
            raise ValueError(f"{ckpt.folder}: {name} has shape {ckpt.shape(name)}, the model expects {expected} "
                             f"(config.json and the weights disagree)")
        filler.fill(p, name, full=lambda n=name: ckpt.full(n), rows=lambda a, b, n=name: ckpt.rows(n, a, b),
                    flat=lambda a, b, n=name: ckpt.flat(n, a, b))
    filler.materialise_buffers(model)
    if tied:
        model.tie_weights()


# ---------------------------------------------------------------------------------------------
# fresh weights, as a single process would draw them

def _module_with(mod: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A stand-in for `mod` (same class and attributes, no children) holding real full tensors."""
    tmp = object.__new__(type(mod))
    tmp.__dict__.update(mod.__dict__)
    tmp._parameters = {n: (nn.Parameter(params[n]) if n in params else None) for n in mod._parameters}
    tmp._buffers = {n: (torch.empty(b.shape, dtype=b.dtype) if b is not None else None) for n, b in mod._buffers.items()}
    tmp._modules = {}
    return tmp


def _shape(p) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def _construction_draws(root: nn.Module) -> None:
    """Consume the random numbers nn.Embedding / nn.Linear draw in their constructors (registration
    order), on throw-away tensors: transformers overwrites these values, but they move the stream."""
    for mod in root.modules():
        if isinstance(mod, (nn.Embedding, nn.Linear)):
            _module_with(mod, {n: torch.empty(_shape(p)) for n, p in mod._parameters.items() if p is not None}).reset_parameters()


def _post_order(root: nn.Module) -> Iterator[nn.Module]:
    for child in root.children():
        yield from _post_order(child)
    yield root


def stream_init(model: nn.Module, seed: int, dtype: torch.dtype, placement: Placement) -> None:
    """Fill `model` (a `skeleton`) with the weights `torch.manual_seed(seed); MixtralForCausalLM(config)`
    creates, keeping only this rank's share of each tensor; the generator is left where that
    constructor leaves it (LoRA adapters drawn next are the same in every layout too).

    The stream of that constructor (transformers 5.17) is:
        MixtralModel.__init__:  Embedding/Linear constructor draws, then post_init: `_init_weights` post-order
        lm_head = nn.Linear:    its constructor draw
        post_init:              `_init_weights` of what is left (lm_head)
    Each module's tensors exist whole only while it is initialised (the largest: one layer's experts).
    `tests/unit/test_load.py` checks the result equals the plain constructor bit for bit.
    """
    filler = _Filler(model, dtype, placement)
    names = {id(p): q for q, p in model.named_parameters(remove_duplicate=False)}
    done: set[int] = set()

    def init_post_order(root: nn.Module) -> None:
        for mod in _post_order(root):
            if id(mod) in done:
                continue
            done.add(id(mod))
            direct = {n: p for n, p in mod._parameters.items() if p is not None}
            if not direct and not mod._buffers:
                continue
            tmp = _module_with(mod, {n: torch.empty(_shape(p)) for n, p in direct.items()})
            model._init_weights(tmp)
            for n, p in direct.items():
                if id(p) not in names:  # a tied weight, already placed under its first name
                    continue
                value = tmp._parameters[n].data
                filler.fill(p, names[id(p)], full=lambda v=value: v, rows=lambda a, b, v=value: v[a:b],
                            flat=lambda a, b, v=value: v.reshape(-1)[a:b])
            for n, b in mod._buffers.items():
                if b is not None and b.is_meta:
                    mod._buffers[n] = tmp._buffers[n]

    torch.manual_seed(seed)
    with torch.no_grad():
        _construction_draws(model.model)
        init_post_order(model.model)
        _construction_draws(model.lm_head)
        init_post_order(model)
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()


def check_expert_placement(module: nn.Module, placement: Placement) -> None:
    """After `deepspeed.initialize`: every AutoEP layer holds the block of experts this rank loaded."""
    if placement.ep_size == 1 or placement.partitioned:
        return
    for name, mod in module.named_modules():
        if getattr(mod, "_is_autoep_layer", False) and mod.ep_rank != placement.ep_rank:
            raise RuntimeError(f"{name}: AutoEP placed expert block {mod.ep_rank} on this rank, but block "
                               f"{placement.ep_rank} was loaded (expert_parallel_rank disagrees with DeepSpeed's groups)")
