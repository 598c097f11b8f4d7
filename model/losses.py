"""Token and preference losses.

Shapes: B batch rows, S sequence length, V vocabulary, N selected tokens.

`causal_lm_loss` (through `linear_ce_sum`) returns a *sum*, not a mean: the stage loops divide by the number
of label tokens in the whole global batch (all micro-batches, all data-parallel ranks), which is
the only normalisation that is exact under gradient accumulation and data parallelism with
rows of different label counts (a per-micro-batch mean over-weights short micro-batches).

`dpo_loss` follows the papers and TRL's DPOTrainer:
    h = (log π(y_w|x) − log π(y_l|x)) − (log π_ref(y_w|x) − log π_ref(y_l|x))
    sigmoid (DPO, Rafailov et al. 2023, eq. 7):  −log σ(β h)·(1−ε) − log σ(−β h)·ε   (ε = label smoothing, cDPO)
    robust  (Chowdhury et al. 2024, eq. 21):     (−log σ(β h)·(1−ε) + log σ(−β h)·ε) / (1 − 2ε)
    hinge   (SLiC, Zhao et al. 2023):            max(0, 1 − β h)
    ipo     (Azar et al. 2023, eq. 17):          (h − 1/(2β))²   (log-probs averaged over tokens, not summed)
    rewards: β (log π(y|x) − log π_ref(y|x)) for chosen and rejected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(hidden_BSH: torch.Tensor, lm_head, targets_BS: torch.Tensor) -> torch.Tensor:
    """The causal-LM training loss of a micro-batch, as a sum:

        Σ over positions (b, i) with targets_BS[b, i] ≠ IGNORE_INDEX of  −log softmax(h_bi · Wᵀ)[targets_BS[b, i]]

    hidden_BSH: the model's final (normed) hidden states; targets_BS: the token each position predicts
    (labels shifted left by one, model/sequence_parallel.py `shard`); lm_head: the model's `LMHead`
    (model/head.py), W its weight. Computed by `linear_ce_sum` through a call of the head module, so ZeRO-3
    gathers W for it. The loops divide by the label tokens of the whole global batch. Returns 0-d fp32."""
    return lm_head(hidden_BSH, targets_BS)


def token_logps(hidden_BSH: torch.Tensor, lm_head, targets_BS: torch.Tensor) -> torch.Tensor:
    """log softmax(h_bi · Wᵀ)[targets_BS[b, i]] at each position with a target, `(N,)` fp32 in row-major order:
    `causal_lm_loss`'s terms one by one, through the same call of the head module (`linear_logps`)."""
    return lm_head(hidden_BSH, targets_BS, per_token=True)


def linear_ce_sum(hidden_BSH: torch.Tensor, weight_VH: torch.Tensor, labels_BS: torch.Tensor,
                  chunk_rows: int | None = None, shifted: bool = False) -> torch.Tensor:
    """Σ over label positions of the next-token cross-entropy of the LM head `hidden · Wᵀ`, never
    materialising the (B, S, V) logits.

    labels are unshifted (labels[b, i] is the token at position i); position i-1 predicts it, and
    positions labelled IGNORE_INDEX are skipped. `shifted=True`: labels[b, i] is what position i
    predicts (a sequence-parallel shard, whose last position predicts the next shard's first token). The N labelled rows of hidden are gathered (N × H),
    then, `chunk_rows` rows at a time (a chunk of logits that stays in cache):
        z = h Wᵀ (fp32),  loss += Σ −log softmax(z)[target],
        dz = softmax(z) − onehot(target),  dh = dz W,  dW += dzᵀ h
    The gradients are computed in the forward pass (the loss is the last op before the scalar
    the stage backpropagates), so backward only scales them: the same three matmuls as
    autograd through F.linear + F.cross_entropy, without the 2 × N × V logits and log-softmax
    buffers and their memory-bound passes (bench/mfu.py). Returns a 0-d fp32 tensor.
    """
    targets_BS, hidden_BSH = (labels_BS, hidden_BSH) if shifted else (labels_BS[:, 1:], hidden_BSH[:, :-1])
    sel_BS = targets_BS != IGNORE_INDEX
    return _LinearCrossEntropy.apply(hidden_BSH[sel_BS], weight_VH, targets_BS[sel_BS], chunk_rows,
                                     torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, chunk_rows, grad_enabled):
        need_h, need_w = grad_enabled and ctx.needs_input_grad[0], grad_enabled and ctx.needs_input_grad[1]
        chunk = _chunk(chunk_rows, weight_VH.shape[0])
        grad_NH = torch.empty_like(hidden_NH) if need_h else None
        grad_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden_NH.device)
        pad = _pads_chunks(hidden_NH)
        for s in range(0, hidden_NH.shape[0], chunk):
            h_CH, t_C = _rows(hidden_NH[s:s + chunk], chunk, pad), targets_N[s:s + chunk]
            n = len(t_C)
            z_CV = (h_CH @ weight_VH.T)[:n].float()
            rows = torch.arange(n, device=t_C.device)
            # softmax is one fused kernel (max, Σ exp, scale), 2x faster than logsumexp + exp here and
            # 3x when wide logits make exp() produce denormals; the loss is −log p(target), exact
            # through logsumexp for the rare rows where p(target) underflows.
            p_CV = torch.softmax(z_CV, -1)
            p_C = p_CV[rows, t_C]
            tiny_C = p_C < 1e-30
            nll_C = -p_C.log()
            if tiny_C.any():
                nll_C[tiny_C] = torch.logsumexp(z_CV[tiny_C], -1) - z_CV[tiny_C, t_C[tiny_C]]
            total += nll_C.sum()
            if not (need_h or need_w):
                continue
            dz_CV = p_CV
            dz_CV[rows, t_C] -= 1
            dz_CV = _rows(dz_CV.to(hidden_NH.dtype), chunk, pad)
            if need_h:
                grad_NH[s:s + chunk] = (dz_CV @ weight_VH)[:n]
            if need_w:
                if dz_CV.dtype == torch.float32:
                    grad_VH.addmm_(dz_CV.T, h_CH)
                else:  # bf16 / fp16: each chunk's product in its dtype, the sum over chunks in fp32
                    grad_VH += dz_CV.T @ h_CH
        ctx.save_for_backward(grad_NH, grad_VH.to(weight_VH.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_NH, grad_VH = ctx.saved_tensors
        scale = grad_total.to(grad_NH.dtype if grad_NH is not None else grad_VH.dtype)
        return (grad_NH * scale if grad_NH is not None else None,
                grad_VH * scale if grad_VH is not None else None, None, None, None)


def linear_logps(hidden_BSH: torch.Tensor, weight_VH: torch.Tensor, targets_BS: torch.Tensor,
                 chunk_rows: int | None = None, tile: tuple[int, int] | None = None) -> torch.Tensor:
    """log p(target) under the LM head `hidden · Wᵀ` at every position that has a target, never materialising
    the (B, S, V) logits: a `(N,)` fp32 vector, the positions with targets_BS ≠ IGNORE_INDEX in row-major order.

    targets_BS[b, i] is the token position i predicts (already shifted, as `LMHead` takes them).
        forward, `chunk_rows` rows at a time:   z = h Wᵀ (fp32),  logp = z[target] − logsumexp(z)
        backward (given g = ∂L/∂logp), in tiles of rows × vocabulary entries (`tile`, default all rows up to
        4096 × a power of two for ≤ 4M logits):   dz = g · (onehot(target) − exp(z − logsumexp)),
        dh += dz W_tile,  dW_tile += dzᵀ h,
    recomputing each tile's logits (the upstream gradient is not known in the forward, unlike `linear_ce_sum`'s).
    So a DPO step keeps N × H hidden rows and N log-sum-exps for its log-probs instead of N × V logits, their
    fp32 log-softmax and their gradient."""
    sel_BS = targets_BS != IGNORE_INDEX
    return _LinearLogProbs.apply(hidden_BSH[sel_BS], weight_VH, targets_BS[sel_BS], chunk_rows, tile)


def _chunk(chunk_rows: int | None, vocab: int) -> int:
    return chunk_rows or max(16, (1 << 22) // vocab)  # 4M fp32 logits (16 MB) per chunk


def _pads_chunks(hidden_NH: torch.Tensor) -> bool:
    """16-bit on CPU: a short last chunk is padded to the chunk's rows with zero rows. oneDNN, which runs CPU
    bf16 matmuls, compiles a kernel per new matrix shape (0.65 ms against 0.09 ms once compiled, and memory
    kept), and the number of label rows changes every batch; padded, every chunk has one shape. A zero row's
    logits and gradient rows are dropped, and it adds nothing to dW."""
    return hidden_NH.device.type == "cpu" and hidden_NH.dtype in (torch.bfloat16, torch.float16)


def _rows(x_CX: torch.Tensor, chunk: int, pad: bool) -> torch.Tensor:
    return F.pad(x_CX, (0, 0, 0, chunk - len(x_CX))) if pad and len(x_CX) < chunk else x_CX


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden_NH, weight_VH, targets_N, chunk_rows, tile):
        chunk = _chunk(chunk_rows, weight_VH.shape[0])
        logp_N = torch.empty(hidden_NH.shape[0], dtype=torch.float32, device=hidden_NH.device)
        lse_N = torch.empty_like(logp_N)
        ctx.tile = tile
        for s in range(0, hidden_NH.shape[0], chunk):
            h_CH, t_C = hidden_NH[s:s + chunk], targets_N[s:s + chunk]
            # a short chunk is padded to `chunk` rows: matmul kernels for few rows sum in another order, and a
            # pair's log-prob must not depend on which pairs share its batch (the precomputed reference's pass
            # groups pairs otherwise than training: policy = reference must give exactly ln 2)
            z_CV = (F.pad(h_CH, (0, 0, 0, chunk - len(h_CH))) @ weight_VH.T)[:len(h_CH)].float()
            lse_N[s:s + chunk] = torch.logsumexp(z_CV, -1)
            logp_N[s:s + chunk] = z_CV.gather(1, t_C.unsqueeze(1)).squeeze(1) - lse_N[s:s + chunk]
        ctx.save_for_backward(hidden_NH, weight_VH, targets_N, lse_N)
        return logp_N

    @staticmethod
    def backward(ctx, grad_N):
        """Tiles of R rows × K vocabulary entries (R·K ≈ 4M logits): each tile's logits are recomputed and turned
        into dz = g · (onehot − exp(z − logsumexp)) with the forward's logsumexp, then dh += dz W_K and
        dW_K (+)= dzᵀ h. All of a micro-batch's rows fit one row tile (up to 4096), so each block of dW is
        written once: the row-chunked loop of the forward would add into all of dW (V × H) once per 131 rows,
        which made this backward 1.4x slower on the CPU (N 1200, H 256, V 32000)."""
        hidden_NH, weight_VH, targets_N, lse_N = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, V = hidden_NH.shape[0], weight_VH.shape[0]
        grad_NH = torch.zeros(hidden_NH.shape, dtype=torch.float32, device=hidden_NH.device) if need_h else None
        grad_VH = torch.zeros(weight_VH.shape, dtype=torch.float32, device=weight_VH.device) if need_w else None
        pad = _pads_chunks(hidden_NH)
        if ctx.tile is not None:  # (tests)
            rows, vocab = ctx.tile
        else:
            rows = max(1, min(N, 4096))  # N = 0: a sequence-parallel shard without answer tokens
            if pad:  # 16-bit on the CPU: a few row counts only (one compiled kernel each)
                rows = -(-rows // 256) * 256
            vocab = max(256, 1 << ((1 << 22) // rows).bit_length() - 1)  # a power of two, rows · vocab ≤ 4M
        for s in range(0, N, rows):
            t_R, g_R, lse_R = targets_N[s:s + rows], grad_N[s:s + rows].float(), lse_N[s:s + rows]
            h_RH, n = _rows(hidden_NH[s:s + rows], rows, pad), len(t_R)
            for v in range(0, V, vocab):
                w_KH = weight_VH[v:v + vocab]
                dz_RK = (h_RH @ w_KH.T)[:n].float().sub_(lse_R.unsqueeze(1)).exp_().mul_(-g_R.unsqueeze(1))
                hit = torch.nonzero((t_R >= v) & (t_R < v + vocab)).squeeze(1)
                dz_RK[hit, t_R[hit] - v] += g_R[hit]
                dz_RK = _rows(dz_RK.to(hidden_NH.dtype), rows, pad)
                if dz_RK.dtype == torch.float32:
                    if need_h:
                        grad_NH[s:s + n].addmm_(dz_RK, w_KH)
                    if need_w:
                        grad_VH[v:v + vocab].addmm_(dz_RK.T, h_RH)
                else:  # bf16 / fp16: each tile's product in its dtype, the sums over tiles in fp32
                    if need_h:
                        grad_NH[s:s + n] += (dz_RK @ w_KH)[:n]
                    if need_w:
                        grad_VH[v:v + vocab] += dz_RK.T @ h_RH
        return (grad_NH.to(hidden_NH.dtype) if need_h else None,
                grad_VH.to(weight_VH.dtype) if need_w else None, None, None, None)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    dpop_lambda: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example DPO-family losses and implicit rewards, all `(B,)`.

        h = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l))
            − λ · max(0, log π_ref(y_w) − log π(y_w))          (DPOP, when dpop_lambda = λ > 0)

    DPOP (DPO-Positive, Pal et al. 2024, eq. 3) penalises the chosen answer's log-likelihood falling
    below the reference's. Plain DPO only widens the gap, and on pairs that differ in a few tokens it
    widens it by lowering both answers' shared tokens: the chosen answer's likelihood falls.
    For `ipo`, pass log-probs averaged over response tokens (as the IPO paper and TRL do).
    """
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if dpop_lambda:
        h = h - dpop_lambda * torch.relu(ref_chosen_logps - policy_chosen_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * h) * (1 - label_smoothing) + F.logsigmoid(-beta * h) * label_smoothing) / (
            1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}: expected sigmoid, robust, hinge or ipo")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


REFERENCE_FREE = ("orpo", "simpo")  # preference losses without a reference model (train/dpo.py skips its pass)


def kto_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor | float,
             beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, eq. 7) per example, all `(B,)`, on summed completion log-probs:

        r    = log π(y|x) − log π_ref(y|x)                     (the implied reward is β·r)
        loss = λ_D · (1 − σ(β (r − z₀)))   for a desirable y     (desirable = True)
               λ_U · (1 − σ(β (z₀ − r)))   for an undesirable y

    z₀ = `kl`, the reference point: max(0, mean over the batch of log π(y'|x) − log π_ref(y'|x)) on mismatched
    (prompt, completion) pairs, no gradient (train/dpo.py `kto_reference_point`). λ_D / λ_U: desirable_weight /
    undesirable_weight. Returns (losses, rewards β·r), as TRL's `KTOTrainer` computes them (its loss is their mean).
    """
    r = policy_logps - ref_logps
    kl = torch.as_tensor(kl, dtype=r.dtype, device=r.device)
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - r))))
    return losses, beta * r.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, without cancellation on either side of −ln 2."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ORPO's odds-ratio term (Hong et al. 2024, eqs. 4 and 7), per pair, all `(B,)`; log-probs averaged over
    each answer's tokens, ℓ = (1/|y|) Σ log π(token):

        log OR = (ℓ_w − ℓ_l) − (log(1 − e^ℓ_w) − log(1 − e^ℓ_l))      (odds(y) = P(y) / (1 − P(y)), P = e^ℓ)
        loss   = −β · log σ(log OR)

    ORPO's full objective adds the chosen answer's NLL at weight 1 (train/dpo.py). Returns (losses, chosen
    rewards β·ℓ_w, rejected rewards β·ℓ_l, log OR); TRL's `ORPOTrainer.odds_ratio_loss` returns −losses."""
    chosen_logps, rejected_logps = chosen_logps.float(), rejected_logps.float()
    log_odds = (chosen_logps - rejected_logps) - (_log1mexp(chosen_logps) - _log1mexp(rejected_logps))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach(), log_odds.detach()


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, eq. 6), per pair, all `(B,)`; log-probs averaged over each answer's tokens:

        h    = ℓ_w − ℓ_l − γ/β
        loss = −log σ(β h) · (1 − ε) − log σ(−β h) · ε            (ε: label smoothing)

    No reference model. Returns (losses, chosen rewards β·ℓ_w, rejected rewards β·ℓ_l), as TRL's
    `CPOTrainer.cpo_loss` with loss_type="simpo"."""
    h = chosen_logps - rejected_logps - gamma / beta
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    return losses, beta * chosen_logps.detach(), beta * rejected_logps.detach()
