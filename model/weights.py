"""Read a Mixtral checkpoint folder piece by piece, in either key layout, without loading it whole.

Two layouts exist on disk (both hold the same numbers):

  hub    what mistralai publishes and transformers 5 writes by default; vLLM, TGI, llama.cpp read it:
         model.layers.N.block_sparse_moe.gate.weight                      (E, hidden)
         model.layers.N.block_sparse_moe.experts.E.w1|w3.weight           (ffn, hidden)   gate | up
         model.layers.N.block_sparse_moe.experts.E.w2.weight              (hidden, ffn)   down
  fused  transformers 5's in-memory layout (what `MixtralForCausalLM.state_dict()` holds):
         model.layers.N.mlp.gate.weight                                   (E, hidden)
         model.layers.N.mlp.experts.gate_up_proj                          (E, 2·ffn, hidden) = cat(w1, w3, dim=1)
         model.layers.N.mlp.experts.down_proj                             (E, hidden, ffn)   = w2

`Checkpoint` answers in the fused names (the names of the live model's parameters) and reads only
what is asked for, through `safetensors.safe_open(...).get_slice`:

  * `full(name)`        the whole tensor,
  * `rows(name, a, b)`  experts a..b-1 of an expert tensor (a rank's block under expert parallelism),
  * `flat(name, a, b)`  elements a..b-1 of the row-major flattened tensor (a ZeRO-3 partition).

In the hub layout a fused expert tensor is a sequence of blocks in flat order — gate_up_proj of
expert e is [w1_e; w3_e], so its blocks are w1_0, w3_0, w1_1, w3_1, ... — and a flat range is read
from the blocks it overlaps, row range by row range. Nothing is ever stacked whole.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import safe_open

_HUB_EXPERT = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
_HUB_GATE = re.compile(r"^(model\.layers\.\d+)\.block_sparse_moe\.gate\.weight$")
_FUSED_EXPERT = re.compile(r"^(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def hub_name(fused_name: str, expert: int | None = None, part: str | None = None) -> str:
    """The hub-layout key of a fused-layout parameter name (experts: one key per expert and part)."""
    m = _FUSED_EXPERT.match(fused_name)
    if m:
        return f"{m.group(1)}.block_sparse_moe.experts.{expert}.{part}.weight"
    return fused_name.replace(".mlp.gate.weight", ".block_sparse_moe.gate.weight")


def to_hub(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The hub-layout (key, tensor) pairs of one fused-layout parameter: an expert tensor becomes one
    (ffn, hidden) or (hidden, ffn) matrix per expert (gate_up_proj[e] = [w1_e; w3_e], down_proj[e] = w2_e),
    the router moves to `block_sparse_moe.gate`, everything else keeps its name."""
    m = _FUSED_EXPERT.match(name)
    if not m:
        return [(hub_name(name), tensor)]
    if m.group(2) == "down_proj":
        return [(hub_name(name, e, "w2"), tensor[e]) for e in range(tensor.shape[0])]
    ffn = tensor.shape[1] // 2
    return [(hub_name(name, e, part), tensor[e, rows]) for e in range(tensor.shape[0])
            for part, rows in (("w1", slice(0, ffn)), ("w3", slice(ffn, 2 * ffn)))]


class Checkpoint:
    """A folder of `*.safetensors` (with or without `model.safetensors.index.json`), hub or fused layout."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {k: self.folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.folder}: no *.safetensors files (weights are read from safetensors only)")
            self.file_of = {}
            for f in files:
                with safe_open(str(f), "pt") as h:
                    self.file_of.update({k: f for k in h.keys()})
        keys = set(self.file_of)
        self.layout = "hub" if any(_HUB_EXPERT.match(k) for k in keys) else "fused"
        self._meta: dict[str, tuple[list[int], torch.dtype]] = {}
        self.num_experts = 0
        if self.layout == "hub":
            self.num_experts = 1 + max(int(_HUB_EXPERT.match(k).group(2)) for k in keys if _HUB_EXPERT.match(k))

    # ---- what is in it, in fused names --------------------------------------------------------
    def names(self) -> list[str]:
        """Every parameter name the checkpoint provides, in the fused layout."""
        out = set()
        for k in self.file_of:
            m = _HUB_EXPERT.match(k)
            if m:
                out.add(f"{m.group(1)}.mlp.experts.{'down_proj' if m.group(3) == 'w2' else 'gate_up_proj'}")
            elif _HUB_GATE.match(k):
                out.add(_HUB_GATE.match(k).group(1) + ".mlp.gate.weight")
            else:
                out.add(k)
        return sorted(out)

    def _key_meta(self, key: str) -> tuple[list[int], torch.dtype]:
        if key not in self._meta:
            if key not in self.file_of:
                raise KeyError(f"{self.folder}: no tensor {key!r}")
            with safe_open(str(self.file_of[key]), "pt") as h:
                s = h.get_slice(key)
                self._meta[key] = (list(s.get_shape()), _DTYPES.get(s.get_dtype(), torch.float32))
        return self._meta[key]

    def _blocks(self, name: str) -> list[str]:
        """The keys whose row-major concatenation is `name`'s flattened tensor."""
        m = _FUSED_EXPERT.match(name)
        if self.layout == "hub" and m:
            parts = ("w1", "w3") if m.group(2) == "gate_up_proj" else ("w2",)
            return [hub_name(name, e, p) for e in range(self.num_experts) for p in parts]
        return [hub_name(name) if self.layout == "hub" else name]

    def shape(self, name: str) -> list[int]:
        blocks = self._blocks(name)
        if len(blocks) == 1:
            return self._key_meta(blocks[0])[0]
        rows, cols = self._key_meta(blocks[0])[0]
        per_expert = len(blocks) // self.num_experts
        return [self.num_experts, rows * per_expert, cols]

    def __contains__(self, name: str) -> bool:
        return all(k in self.file_of for k in self._blocks(name))

    # ---- reading ------------------------------------------------------------------------------
    def _read_rows(self, key: str, a: int, b: int) -> torch.Tensor:
        with safe_open(str(self.file_of[key]), "pt") as h:
            return h.get_slice(key)[a:b]

    def full(self, name: str) -> torch.Tensor:
        return self.rows(name, 0, self.shape(name)[0])

    def rows(self, name: str, a: int, b: int) -> torch.Tensor:
        """Rows a..b-1 along the first dimension (experts, for an expert tensor)."""
        blocks = self._blocks(name)
        if len(blocks) == 1:
            return self._read_rows(blocks[0], a, b)
        per_expert = len(blocks) // self.num_experts
        experts = []
        for e in range(a, b):
            mats = [self._read_rows(k, 0, self._key_meta(k)[0][0]) for k in blocks[e * per_expert:(e + 1) * per_expert]]
            experts.append(torch.cat(mats, dim=0))
        return torch.stack(experts)

    def flat(self, name: str, a: int, b: int) -> torch.Tensor:
        """Elements a..b-1 of the flattened tensor, reading only the rows of the blocks they overlap."""
        out, offset = [], 0
        for key in self._blocks(name):
            shape = self._key_meta(key)[0]
            n = math.prod(shape)
            lo, hi = max(a, offset), min(b, offset + n)
            if lo < hi:
                out.append(_flat_slice(self.file_of[key], key, shape, lo - offset, hi - offset))
            offset += n
            if offset >= b:
                break
        return torch.cat(out) if len(out) > 1 else out[0]


def _flat_slice(path: Path, key: str, shape: list[int], a: int, b: int) -> torch.Tensor:
    """Elements a..b-1 of one stored tensor, read as the rows (first dimension) that cover them."""
    if len(shape) == 0:
        with safe_open(str(path), "pt") as h:
            return h.get_tensor(key).reshape(1)[a:b]
    row = math.prod(shape[1:])
    r0, r1 = a // row, -(-b // row)
    with safe_open(str(path), "pt") as h:
        rows = h.get_slice(key)[r0:r1]
    return rows.reshape(-1)[a - r0 * row:b - r0 * row].clone()
