"""The MoE block's experts in sequence tiles, so a long row's expert activations are never whole:
`model.tiled_mlp_tokens=N` (0 = off).

An MoE block's activations grow with the tokens it sees: the (T·K, 2F) gate/up and (T·K, H) down
projections of its T tokens' K experts. With the switch on, the router runs on all T tokens as usual
(its logits feed the router losses, model/router.py, and its top-k weights carry the LM loss's gradient
back to it), and the experts run N tokens at a time: the forward keeps nothing but the block's input and
the routing; the backward recomputes one tile at a time with gradients, so a block's peak holds one tile's
activations, at the cost of a second forward of the experts (gradient checkpointing's price, per block).

This is DeepSpeed ALST's `TiledMLP` (deepspeed.runtime.sequence_parallel.ulysses_sp) for a block with two
differentiable inputs: `TiledMLP` tiles a function of one input whose output has the input's width, and the
experts take the routing weights as well. As there, the expert weights' gradients accumulate over the tiles
and DeepSpeed is told (`ds_grad_is_ready`) to reduce them only after the last tile.

    out[tile] = experts(x[tile], top_k_index[tile], top_k_weights[tile])     (MixtralSparseMoeBlock.forward)
"""

from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist


class TiledExperts(torch.autograd.Function):
    """experts(x, index, weights) over `tiles` row chunks; returns (T, H). Only the inputs are saved."""

    @staticmethod
    def forward(ctx, experts, x_TH, index_TK, weights_TK, tiles: int, params: list):
        ctx.experts, ctx.tiles, ctx.params = experts, tiles, params
        ctx.save_for_backward(x_TH, index_TK, weights_TK)
        with torch.no_grad():
            return torch.cat([experts(x, i, w) for x, i, w in zip(x_TH.chunk(tiles), index_TK.chunk(tiles),
                                                                    weights_TK.chunk(tiles))])

    @staticmethod
    def backward(ctx, grad_TH):
        x_TH, index_TK, weights_TK = ctx.saved_tensors
        grad_x, grad_w = torch.zeros_like(x_TH), torch.zeros_like(weights_TK)
        chunks = list(zip(x_TH.chunk(ctx.tiles), index_TK.chunk(ctx.tiles), weights_TK.chunk(ctx.tiles),
                          grad_TH.chunk(ctx.tiles)))
        start = 0
        for t, (x, i, w, g) in enumerate(chunks):
            for p in ctx.params:  # DeepSpeed reduces a weight's gradient once, after its last tile
                p.ds_grad_is_ready = t == len(chunks) - 1
            x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
            with torch.enable_grad():
                out = ctx.experts(x, i, w)
            torch.autograd.backward(out, g)  # the expert weights' gradients accumulate (DeepSpeed's hooks see each)
            grad_x[start:start + len(x)], grad_w[start:start + len(w)] = x.grad, w.grad
            start += len(x)
        return None, grad_x, None, grad_w, None, None


def tiled_moe_forward(self, hidden_BSH: torch.Tensor) -> torch.Tensor:
    """MixtralSparseMoeBlock.forward with the experts in tiles of `self.tile_tokens` tokens."""
    B, S, H = hidden_BSH.shape
    flat_TH = hidden_BSH.reshape(-1, H)
    _, top_w_TK, top_i_TK = self.gate(flat_TH)
    if not torch.is_grad_enabled():  # nothing is kept for a backward anyway
        return self.experts(flat_TH, top_i_TK, top_w_TK).reshape(B, S, H)
    tiles = torch.tensor(max(1, math.ceil(flat_TH.shape[0] / self.tile_tokens)), device=flat_TH.device)
    if dist.is_initialized():  # every rank runs as many tiles (ZeRO-3 gathers the weights per call)
        dist.all_reduce(tiles, op=dist.ReduceOp.MAX)
    params = [p for p in self.experts.parameters() if p.requires_grad]
    out_TH = TiledExperts.apply(self.experts, flat_TH, top_i_TK, top_w_TK, int(tiles), params)
    return out_TH.reshape(B, S, H)


def tile_moe_blocks(model, tile_tokens: int) -> int:
    """Make every Mixtral MoE block of `model` run its experts in tiles of `tile_tokens` tokens; returns how many."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    n = 0
    for module in model.modules():
        if isinstance(module, MixtralSparseMoeBlock):
            if module.jitter_noise:
                raise ValueError("model.tiled_mlp_tokens with router jitter noise: not supported")
            module.tile_tokens = tile_tokens
            module.forward = types.MethodType(tiled_moe_forward, module)
            n += 1
    return n
