"""Router losses and statistics for Mixtral's top-k softmax router, computed per layer.

Shape convention: suffixes name dimensions — T tokens, E experts, K top-k, L layers.
`router_logits` is a sequence with one `(T, E)` tensor of raw logits per MoE layer
(what `RouterLogitsRecorder` collects); `mask` is `(T,)` bool, True = the token counts.

Load-balancing loss (Switch Transformer, Fedus et al. 2021, eq. 4, generalised to top-k):

    f_e = (1 / (K·N)) Σ_t Σ_k 1[expert_k(t) = e]    fraction of the K·N assignments sent to e
    P_e = (1 / N)     Σ_t softmax(logits_t)_e        mean router probability of e
    loss_layer = E · Σ_e f_e · P_e                   = 1.0 for perfectly balanced routing
    loss = mean over layers

Computed per layer so that opposite imbalances in two layers cannot cancel, with
padding masked. Compared with Hugging Face's `load_balancing_loss_func`: HF concatenates
all layers' tokens before taking f and P (imbalances across layers cancel) and does not
divide f by K, so its balanced value is K (2 for Mixtral). To match the gradient scale of an
HF `router_aux_loss_coef = c`, use `router.aux_loss_coef = K · c` here (0.02 in HF ≈ 0.04 here);
our default 0.01 is Switch's α.

Router z-loss (ST-MoE, Zoph et al. 2022, eq. 5): per layer, mean over counted tokens of
logsumexp(logits_t)², averaged over layers. It keeps router logits small.

Global-batch balancing (Qiu et al. 2025, "Demons in the Detail"): f_e is taken over many
micro-batches and all data-parallel ranks (`ExpertLoadAccumulator`), P_e stays local (it
carries the gradient). f_e has no gradient in any case (top-k is not differentiable).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

from model.sequence_parallel import group_sum


def _flat_mask(mask: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(num_tokens, dtype=torch.bool, device=device)
    mask = mask.reshape(-1).to(device=device, dtype=torch.bool)
    if mask.numel() != num_tokens:
        raise ValueError(f"mask has {mask.numel()} entries but router logits have {num_tokens} tokens")
    return mask


def expert_counts(router_logits: Sequence[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Number of top-k assignments each expert received, per layer: `(L, E)` float, no grad."""
    rows = []
    with torch.no_grad():
        for logits_TE in router_logits:
            m_T = _flat_mask(mask, logits_TE.shape[0], logits_TE.device)
            idx_TK = torch.topk(logits_TE.float(), top_k, dim=-1).indices  # softmax is monotonic
            onehot_TE = F.one_hot(idx_TK, logits_TE.shape[-1]).sum(1).float()
            rows.append((onehot_TE * m_T[:, None]).sum(0))
    return torch.stack(rows)


def drift_sums(policy_logits: Sequence[torch.Tensor], reference_logits: Sequence[torch.Tensor], top_k: int,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """Routing drift of one micro-batch, as sums that add over micro-batches and ranks: `(L, 2 + 2E)` float64,
    per layer [Σ_t KL_t, tokens, policy expert counts (E), reference expert counts (E)] over the tokens in
    `mask`, where KL_t = Σ_e p_te (log p_te − log q_te), p = softmax(policy logits), q = softmax(reference
    logits) (the router's full distribution, in fp32). `routing_drift` turns them into the logged values."""
    rows = []
    with torch.no_grad():
        counts_p, counts_q = expert_counts(policy_logits, top_k, mask), expert_counts(reference_logits, top_k, mask)
        for l, (pol_TE, ref_TE) in enumerate(zip(policy_logits, reference_logits)):
            m_T = _flat_mask(mask, pol_TE.shape[0], pol_TE.device)
            logp, logq = F.log_softmax(pol_TE.float(), -1), F.log_softmax(ref_TE.float().to(pol_TE.device), -1)
            kl_T = (logp.exp() * (logp - logq)).sum(-1)
            rows.append(torch.cat([torch.stack([(kl_T * m_T).sum(), m_T.sum()]).double(),
                                   counts_p[l].double().to(pol_TE.device), counts_q[l].double().to(pol_TE.device)]))
        return torch.stack(rows).cpu()  # one device-to-host copy


def routing_drift(sums_L: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From `drift_sums` added up: per layer (L,) the mean KL(policy router ‖ reference router) over the tokens,
    and the load shift ½ Σ_e |share_policy(e) − share_reference(e)| (total variation between the two expert
    load shares, 0 … 1; share(e) = e's fraction of the top-k assignments)."""
    E = (sums_L.shape[1] - 2) // 2
    kl = sums_L[:, 0] / sums_L[:, 1].clamp(min=1)
    share_p = sums_L[:, 2:2 + E] / sums_L[:, 2:2 + E].sum(-1, keepdim=True).clamp(min=1)
    share_q = sums_L[:, 2 + E:] / sums_L[:, 2 + E:].sum(-1, keepdim=True).clamp(min=1)
    return kl, 0.5 * (share_p - share_q).abs().sum(-1)


def load_balancing_loss(
    router_logits: Sequence[torch.Tensor],
    top_k: int,
    mask: torch.Tensor | None = None,
    expert_fraction: torch.Tensor | None = None,
    sp_group=None,
) -> torch.Tensor:
    """Per-layer Switch load-balancing loss averaged over layers (1.0 when balanced).

    Args:
        router_logits: one `(T, E)` raw-logit tensor per layer.
        top_k: experts per token (2 for Mixtral).
        mask: `(T,)` bool, True = token counted (padding False). None counts all.
        expert_fraction: optional `(L, E)` f_e from global-batch statistics
            (`ExpertLoadAccumulator.fraction()`); default: this batch's own f_e.
        sp_group: the sequence-parallel process group (None: none) whose ranks share the rows, the logits being this
            rank's shard: n, f_e and P_e are taken over the whole rows (`model.sequence_parallel.group_sum`),
            so every rank gets the rows' loss, with the gradient of its own tokens.
    Returns:
        scalar tensor, differentiable w.r.t. the logits through P_e.
    """
    losses = []
    for layer, logits_TE in enumerate(router_logits):
        num_experts = logits_TE.shape[-1]
        m_T = _flat_mask(mask, logits_TE.shape[0], logits_TE.device).float()
        n = group_sum(m_T.sum(), sp_group).clamp_min(1.0)
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        p_E = group_sum((probs_TE * m_T[:, None]).sum(0), sp_group) / n
        if expert_fraction is None:
            with torch.no_grad():
                idx_TK = torch.topk(probs_TE, top_k, dim=-1).indices
                counts_E = (F.one_hot(idx_TK, num_experts).sum(1).float() * m_T[:, None]).sum(0)
                f_E = group_sum(counts_E, sp_group) / (top_k * n)
        else:
            f_E = expert_fraction[layer].to(p_E)
        losses.append(num_experts * (f_E * p_E).sum())
    return torch.stack(losses).mean()


def z_loss(router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None,
           sp_group=None) -> torch.Tensor:
    """Router z-loss: mean over layers of mean_t logsumexp(logits_t)² over counted tokens
    (`sp_group`: over the whole rows, as in `load_balancing_loss`)."""
    losses = []
    for logits_TE in router_logits:
        m_T = _flat_mask(mask, logits_TE.shape[0], logits_TE.device).float()
        z_T = torch.logsumexp(logits_TE.float(), dim=-1)
        losses.append(group_sum((z_T.square() * m_T).sum(), sp_group)
                      / group_sum(m_T.sum(), sp_group).clamp_min(1.0))
    return torch.stack(losses).mean()


class ExpertLoadAccumulator:
    """Global-batch f_e: assignment counts summed over micro-batches and data-parallel ranks.

    Call `add(router_logits, mask)` on each micro-batch before computing its loss and
    `reset()` after each optimizer step. `fraction()` returns `(L, E)` f_e over everything
    added since the last reset, across all ranks of `group` (all-reduced in `add`).
    Within one optimizer step, micro-batch m therefore sees the counts of micro-batches
    1..m of every rank (the future ones are not known yet); with one micro-batch per step
    it is exactly the global batch.
    """

    def __init__(self, top_k: int, group=None):
        self.top_k = top_k
        self.group = group
        self.counts_LE: torch.Tensor | None = None

    def add(self, router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> None:
        counts_LE = expert_counts(router_logits, self.top_k, mask)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts_LE, op=dist.ReduceOp.SUM, group=self.group)
        self.counts_LE = counts_LE if self.counts_LE is None else self.counts_LE + counts_LE

    def fraction(self) -> torch.Tensor:
        if self.counts_LE is None:
            raise RuntimeError("ExpertLoadAccumulator.fraction() called before add()")
        return self.counts_LE / self.counts_LE.sum(-1, keepdim=True).clamp_min(1.0)

    def reset(self) -> None:
        self.counts_LE = None


def router_statistics(counts_LE: torch.Tensor) -> dict:
    """Per-layer routing statistics from assignment counts `(L, E)` (e.g. `expert_counts`).

    Returns a dict of plain Python values:
        load: (L, E) fraction of assignments per expert (rows sum to 1)
        load_entropy: (L,) entropy of each row divided by ln E (1.0 = perfectly even)
        max_share, min_share: (L,) largest / smallest expert fraction
        dead_experts: (L,) number of experts that received no token
    """
    counts_LE = counts_LE.double()
    load_LE = counts_LE / counts_LE.sum(-1, keepdim=True).clamp_min(1.0)
    num_experts = load_LE.shape[-1]
    ent_L = -(load_LE * load_LE.clamp_min(1e-12).log()).sum(-1) / torch.log(torch.tensor(float(num_experts)))
    return {
        "load": load_LE.tolist(),
        "load_entropy": ent_L.tolist(),
        "max_share": load_LE.max(-1).values.tolist(),
        "min_share": load_LE.min(-1).values.tolist(),
        "dead_experts": (counts_LE == 0).sum(-1).tolist(),
    }


class RouterLogitsRecorder:
    """Collects each MoE layer's raw router logits `(T, E)` during a forward pass.

    Works on plain HF Mixtral (hooks `mlp.gate`, a `MixtralTopKRouter` whose output[0] is the
    logits) and on DeepSpeed AutoEP's replacement block (hooks `mlp.router.gate`, a linear
    layer whose output is the logits). We record ourselves rather than use HF's
    `output_router_logits=True`, which also computes HF's concatenated aux loss and cannot
    take a packed/4D attention mask.

    Usage:  with recorder: out = model(...);  logits = recorder.logits  (one per layer)
    Recording is on only inside the `with`, so activation-checkpoint recomputation in
    backward does not append duplicates.
    """

    def __init__(self, model: nn.Module):
        self.logits: list[torch.Tensor] = []
        self._active = False
        self._handles = []
        for module in _router_modules(model):
            self._handles.append(module.register_forward_hook(self._hook))
        if not self._handles:
            raise ValueError("no Mixtral router modules found (expected model.layers.*.mlp.gate or .mlp.router.gate)")

    @property
    def num_layers(self) -> int:
        return len(self._handles)

    def _hook(self, module, inputs, output):
        if self._active:
            self.logits.append(output[0] if isinstance(output, tuple) else output)

    def __enter__(self):
        self.logits = []
        self._active = True
        return self

    def __exit__(self, *exc):
        self._active = False
        return False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class _Fp32TopKRouter(MixtralTopKRouter):
    """transformers' `MixtralTopKRouter` with its logits computed in fp32 (the class an instance is switched to
    by `fp32_router_logits`; same parameters, same outputs in an fp32 model)."""

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.float(), self.weight.float())  # (T, E) fp32
        router_probs = torch.softmax(router_logits, dim=-1)
        top_value, indices = torch.topk(router_probs, self.top_k, dim=-1)
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value, indices


class _Fp32Linear(nn.Linear):
    """AutoEP's router projection (`mlp.router.gate`, an nn.Linear) with fp32 output."""

    def forward(self, x):
        return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


def fp32_router_logits(model: nn.Module) -> int:
    """Make every MoE router compute its logits in fp32, whatever the weights' dtype; returns how many.

    In a bf16 model both transformers' router and AutoEP's project the hidden states in bf16 and only then
    take the softmax in fp32: logits rounded to 8 significant bits flip near-tied top-2 choices, and the
    router losses (z-loss squares the logsumexp) see the rounding. Here x and W are upcast before the
    product (the gradient flows back to the bf16 weight and activations as usual). A no-op in fp32 models.
    Instances keep their parameters and hooks (ZeRO-3's included); only their class changes.
    """
    n = 0
    for router in _router_modules(model):
        for m in router.modules():  # peft's modules_to_save wraps the router: switch the copies inside
            if type(m) is MixtralTopKRouter:
                m.__class__ = _Fp32TopKRouter
            elif type(m) is nn.Linear:
                m.__class__ = _Fp32Linear
            else:
                continue
            n += 1
    return n


def _router_modules(model: nn.Module) -> list[nn.Module]:
    """The router module of every MoE layer, in layer order."""
    found = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] != "mlp":
            continue
        router = getattr(getattr(module, "router", None), "gate", None)  # DeepSpeed AutoEP layer
        if router is None:
            router = getattr(module, "gate", None)  # HF MixtralSparseMoeBlock
        if router is not None:
            found.append(router)
    return found
