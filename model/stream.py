"""Logits of a saved Mixtral with one decoder layer in memory at a time.

The export check compares a run's exported folder with the live model. Loading the export whole on
one rank would need the whole model there (Mixtral-8x7B: 187 GB in fp32), so `streamed_logits` runs
transformers' own modules over the probe batch layer by layer: embeddings, then each
`MixtralDecoderLayer` with its weights read from the folder (either key layout, model/weights.py) and
dropped after use, then the final norm and LM head. Peak: one layer's weights + the activations.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.load import Placement, skeleton
from model.router import fp32_router_logits
from model.weights import Checkpoint


def _materialise(module: nn.Module, prefix: str, ckpt: Checkpoint, dtype: torch.dtype, substitute=None) -> None:
    for name, p in list(module.named_parameters()):
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        attr = name.rsplit(".", 1)[-1]
        value = ckpt.full(prefix + name).to(dtype)
        if substitute is not None:
            value = substitute(prefix + name, value)
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)


class _ForcedRouting:
    """Around one decoder layer: its router keeps its own weights (the routing weights are the softmax of its
    own logits over the chosen experts) but chooses the experts given in `indices` (T, K)."""

    def __init__(self, router, indices: torch.Tensor):
        self.router, self.indices, self.forward = router, indices, router.forward

    def __enter__(self):
        def forward(hidden_states):
            logits, _, _ = self.forward(hidden_states)
            probs = torch.softmax(logits.float(), dim=-1).gather(-1, self.indices)
            return logits, probs / probs.sum(-1, keepdim=True), self.indices

        self.router.forward = forward

    def __exit__(self, *exc):
        del self.router.forward


@torch.no_grad()
def streamed_logits(folder: str | Path, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32,
                    routing: list[torch.Tensor] | None = None, substitute=None) -> torch.Tensor:
    """(B, S, V) logits of the HF folder's model on `input_ids` (one document per row, no padding), computed
    in `dtype` (routers in fp32, as in training: model/router.py). `routing`: one (B·S, K) tensor of expert
    indices per layer to use instead of the folder's own top-k choices (the export check replays the live
    model's choices, so that a near-tie that rounds the other way in another kernel cannot move a logit).
    `substitute(name, tensor) -> tensor`: applied to each decoder-layer weight as it is read (the QLoRA export
    check swaps each 16-bit base weight for its NF4 value: model/export.py `requantized`)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    folder = Path(folder)
    config = MixtralConfig.from_json_file(str(folder / "config.json"))
    config._attn_implementation = "sdpa"
    ckpt = Checkpoint(folder)
    model = skeleton(config, dtype, Placement())  # meta: nothing allocated yet
    inner = model.model
    _materialise(inner.embed_tokens, "model.embed_tokens.", ckpt, dtype)
    hidden = inner.embed_tokens(input_ids)
    inner.embed_tokens.to_empty(device="meta")
    position_ids = torch.arange(input_ids.shape[1]).unsqueeze(0).expand(input_ids.shape[0], -1)
    rope = MixtralRotaryEmbedding(config)(hidden, position_ids)
    for i, layer in enumerate(inner.layers):
        _materialise(layer, f"model.layers.{i}.", ckpt, dtype, substitute)
        fp32_router_logits(layer)
        if routing is None:
            hidden = layer(hidden, position_embeddings=rope, attention_mask=None, position_ids=position_ids)
        else:
            with _ForcedRouting(layer.mlp.gate, routing[i]):
                hidden = layer(hidden, position_embeddings=rope, attention_mask=None, position_ids=position_ids)
        layer.to_empty(device="meta")
    _materialise(inner.norm, "model.norm.", ckpt, dtype)
    hidden = inner.norm(hidden)
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    return hidden @ ckpt.full(head).to(dtype).T
