"""Preference optimisation of Mixtral (DPO / IPO / hinge / robust, KTO, ORPO, SimPO), MoE-aware, on
DeepSpeed ZeRO with expert parallelism.

    torchrun --nproc_per_node 2 train/dpo.py recipe=tiny/dpo model_path=outputs/tiny/sft/hf      # CPU
    torchrun --nproc_per_node 8 train/dpo.py recipe=mixtral_8x7b/dpo model_path=<sft>/hf         # 8 GPUs

Data: {prompt, chosen, rejected} strings, UltraFeedback-style message lists, sharegpt with
chosen/rejected, or HH-RLHF transcripts (data/formats.py) → a micro-batch is one row holding both answers of
every pair as isolated segments (data/preference.py): ONE forward gives every log-prob. KTO: below.

Loss per optimizer step over the G pairs of the global batch (model/losses.py for the formulas):
    logp(y|x) = Σ_(answer tokens incl. </s>) log π(token)        (IPO, ORPO, SimPO: averaged over the tokens;
                with dpo.mask_common_suffix, without the ending both answers share, data/preference.py)
    dpo  = (1/G) Σ_pairs dpo_loss(logp_π(y_w), logp_π(y_l), logp_ref(y_w), logp_ref(y_l))
           (dpo.loss_type=orpo | simpo: orpo_loss / simpo_loss of the policy's log-probs alone: no reference
           pass, no reference cache)
    nll  = −Σ_(chosen tokens) log π / (number of chosen tokens)  (RPO-style, when dpo.sft_weight > 0; ORPO: always)
    loss = dpo + dpo.sft_weight · nll + router.aux_loss_coef · aux + router.z_loss_coef · z   (ORPO: weight 1 on nll)
(dpo.dpop_lambda > 0: DPO-Positive, model/losses.py.)

KTO (dpo.loss_type=kto) trains on unpaired examples {prompt, completion, label} (or pairs split in two): one
segment per example, and before each step a no-grad pass over every example's KL row (its prompt with another
prompt's completion) for the reference point z₀; then
    dpo  = (1/G) Σ_examples kto_loss(logp_π(y), logp_ref(y), label, z₀)        (summed log-probs)
aux and z are taken on the policy pass with the shared prompt counted once. With policy == reference
the first loss is ln 2 ≈ 0.6931 (sigmoid).
"""

from __future__ import annotations

import contextlib

import torch

from data.chat import IGNORE_INDEX
from data.dataset import GlobalBatches
from data.preference import collate
from model.attention import shares_prompts
from model.lora import adapters_off, apply_lora
from model.losses import REFERENCE_FREE, dpo_loss, kto_loss, orpo_loss, simpo_loss
from model.router import (ExpertLoadAccumulator, RouterLogitsRecorder, drift_sums, load_balancing_loss,
                          routing_drift, z_loss)
from train import cli, reference
from train.checkpoints import end_of_step, maybe_resume
from train.finish import finish
from train.metrics import Metrics, RouterStep, step_values
from train.model_setup import build_engine, load_model, stage_tokenizer
from train.rows import training_rows
from train.runtime import Run, start
from train.stops import STOPS
from train.checks import stage_checks
from train.config import DPOStageConfig


@cli.main("dpo", DPOStageConfig, stage_checks)
def main(cfg) -> None:
    with start(cfg) as run:
        align(cfg, run)


def align(cfg, run: Run) -> None:
    """The whole stage in `run` (train/runtime.py `start`): load the pairs (KTO: examples), train, checkpoint,
    export."""
    tokenizer = stage_tokenizer(cfg, run)
    beta, loss_type = cfg.dpo.beta, cfg.dpo.loss_type
    kto = loss_type == "kto"  # unpaired examples: one answer per row, and a KL row each (data/preference.py)
    pairs, _ = training_rows(cfg, "unpaired" if kto else "preference", tokenizer, run)
    answers = ("completion_ids",) if kto else ("chosen_ids", "rejected_ids")
    if kto:
        kto_balance(pairs, cfg, run)
    model = load_model(cfg, run)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, run.dtype)
    engine, guard = build_engine(cfg, model, run)
    share_prompt = not kto and shares_prompts(model)  # each prompt computed once per pair (data/preference.py)
    recorder = RouterLogitsRecorder(engine.module)
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    balance = ExpertLoadAccumulator(top_k) if cfg.router.global_batch else None
    batches = GlobalBatches(len(pairs), cfg.global_batch_size, cfg.seed)
    step, _ = maybe_resume(engine, cfg, run)

    ref_table, ref_engine = None, None
    free = loss_type in REFERENCE_FREE  # ORPO, SimPO: no reference pass, no reference cache
    if cfg.dpo.reference == "precomputed" and not free:
        if step > 0:  # resumed: the cache was written from the starting weights before step 1
            ref_table = reference.precomputed(None, cfg, run, pairs, tokenizer, share_prompt=share_prompt)
        else:
            ref_table = reference.precomputed(engine, cfg, run, pairs, tokenizer, adapters_off=cfg.lora.enabled,
                                              share_prompt=share_prompt)
    # routing drift: measured on every micro-batch where a reference forward runs anyway (live, adapters_off),
    # else (dpo.drift_every) on the first micro-batch of every N-th step with one extra reference forward: the
    # policy with its adapters off (LoRA), or a live copy of the starting model (full fine-tuning)
    extra_drift = cfg.dpo.drift_every > 0 and (free or cfg.dpo.reference == "precomputed")
    if (cfg.dpo.reference == "live" and not free) or (extra_drift and not cfg.lora.enabled):
        ref_ds = reference.reference_ds_config(cfg, run)
        ref_engine = reference.live_engine(run, load_model(cfg, run, ref_ds, phase="load_reference"), ref_ds)
    ref_recorder = RouterLogitsRecorder(ref_engine.module) if ref_engine is not None else None

    def reference_forward(b):
        """(chosen, rejected, router logits) of batch `b` under the live reference: its own engine, or the policy
        with its adapters off."""
        model_, recorder_ = (ref_engine, ref_recorder) if ref_engine is not None else (engine, recorder)
        with torch.no_grad(), adapters_off(engine.module) if ref_engine is None else contextlib.nullcontext(), recorder_:
            ref_c, ref_r, _, _ = reference.answer_logps(model_, b, run.sp_group)
        return ref_c, ref_r, recorder_.logits

    def collated(index: list[list[int]], keys: tuple[str, ...]) -> list[dict]:
        """This rank's micro-batches of pairs (its data-parallel group's) as rows holding the answers `keys`, and
        with sequence parallelism its share of their tokens."""
        return [run.shard(collate([pairs[i] for i in ix], tokenizer.pad_id, cfg.dpo.mask_common_suffix, tokenizer, keys,
                                  share_prompt), tokenizer.pad_id) for ix in index]

    metrics = Metrics(cfg, run, step, recorder.num_layers, num_experts)
    average = loss_type in ("ipo", "orpo", "simpo")  # these compare per-token averages of the log-probs
    nll_weight = 1.0 if loss_type == "orpo" else cfg.dpo.sft_weight

    engine.train()
    STOPS.start_training()  # from here on Ctrl-C / SIGTERM stop between steps, with a checkpoint
    while step < cfg.max_steps:
        lr = engine.get_lr()[0]  # the rate this step applies (logged with it)
        index = batches.micro_batches(step, run.dp_rank, run.dp, cfg.micro_batch_size)
        micro_batches = collated(index, answers)
        # the chosen tokens the log-probs sum over (without a masked shared ending): the NLL's denominator
        n_chosen_tokens = run.all_sum(sum(int(((b["target_segment"] == 1) & (b["targets"] != IGNORE_INDEX)).sum())
                                          for b in micro_batches))
        if kto:  # its reference point z₀, from every example's KL row, before the step's first backward
            kl = kto_reference_point(engine, collated(index, ("kl_ids",)), index, cfg, run,
                                     lambda ix, b: ref_table[ix, 1] if ref_table is not None else reference_forward(b)[0])
        sums = torch.zeros(8, dtype=torch.float64)  # loss, r_chosen, r_rejected, acc, logp_c, logp_r, nll, log OR
        router = RouterStep(recorder.num_layers, num_experts, top_k, run.gas)
        drift = None  # (L, 2 + 2E) sums of this step's routing drift (model/router.py drift_sums)
        for micro, (ix, b) in enumerate(zip(index, micro_batches)):
            # whole-row sums of the answers' log-probs, from the LM head without logits (a sequence-parallel
            # rank's gradient flows through its own tokens); the router logits of every layer in recorder.logits
            with recorder:
                pol_c, pol_r, n_c, n_r = reference.answer_logps(engine, b, run.sp_group)
            logits, ref_logits = recorder.logits, None
            nll = -pol_c.sum() / n_chosen_tokens.to(pol_c)
            if not free:
                if ref_table is not None:
                    ref_c, ref_r = ref_table[ix, 0].to(pol_c), ref_table[ix, 1].to(pol_c)
                else:
                    ref_c, ref_r, ref_logits = reference_forward(b)
            if kto:  # one completion per row: "chosen" are the desirable ones, "rejected" the undesirable
                desirable = torch.tensor([pairs[i]["label"] for i in ix], device=pol_c.device)
                losses, rewards = kto_loss(pol_c, ref_c, desirable, kl, beta, cfg.dpo.desirable_weight,
                                           cfg.dpo.undesirable_weight)
                d = desirable.to(rewards)
                part = [rewards.mul(d).sum(), rewards.mul(1 - d).sum(), d.sum(), pol_c.mul(d).sum(), pol_c.mul(1 - d).sum()]
            else:
                if average:  # IPO, ORPO and SimPO compare per-token averages
                    pol_c, pol_r = pol_c / n_c, pol_r / n_r
                    ref_c, ref_r = (ref_c / n_c, ref_r / n_r) if not free else (None, None)
                log_odds = None
                if loss_type == "orpo":
                    losses, r_chosen, r_rejected, log_odds = orpo_loss(pol_c, pol_r, beta)
                elif loss_type == "simpo":
                    losses, r_chosen, r_rejected = simpo_loss(pol_c, pol_r, beta, cfg.dpo.simpo_gamma, cfg.dpo.label_smoothing)
                else:
                    losses, r_chosen, r_rejected = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta, loss_type,
                                                            cfg.dpo.label_smoothing, cfg.dpo.dpop_lambda)
                part = [r_chosen.sum(), r_rejected.sum(), (r_chosen > r_rejected).float().sum(), pol_c.sum(),
                        pol_r.sum(), nll.detach(), log_odds.sum() if log_odds is not None else torch.zeros(())]
            if extra_drift and micro == 0 and (step + 1) % cfg.dpo.drift_every == 0:
                ref_logits = reference_forward(b)[2]
            if ref_logits is not None:  # over the positions that predict answer tokens
                part_drift = drift_sums(logits, ref_logits, top_k, b["targets"] != IGNORE_INDEX)
                drift = part_drift if drift is None else drift + part_drift
            mask = b["router_mask"].reshape(-1)
            if balance is not None:
                balance.add(logits, mask)
            aux = load_balancing_loss(logits, top_k, mask, balance.fraction() if balance else None, run.sp_group)
            z = z_loss(logits, mask, run.sp_group)
            pref = losses.sum() / cfg.global_batch_size
            # DeepSpeed divides gradients by the accumulation steps and averages them over data-parallel groups;
            # `pref` and `nll` are this micro-batch's shares of global means, so scale them back by both.
            loss = (pref + nll_weight * nll) * (run.gas * run.dp) \
                + cfg.router.aux_loss_coef * aux + cfg.router.z_loss_coef * z
            loss = guard.watch(loss, step + 1)  # a non-finite loss makes every rank skip this step
            engine.backward(loss * run.grad_factor)  # 1 but under ZeRO-3 + sequence parallelism
            engine.step()
            sums[0] += losses.sum().item()
            sums[1:1 + len(part)] += torch.stack([x.detach().double().cpu() for x in part])
            router.add(logits, mask, aux, z)
        if balance is not None:
            balance.reset()
        step += 1
        skipped = guard.end_step(engine)

        g = run.all_sum(sums) / run.sp  # a sequence-parallel group's ranks hold the same pair sums
        G = cfg.global_batch_size
        aux_step, z_step = router.means(run)
        stats = metrics.expert_load(router.counts_LE)
        metrics.log(step, {
            "loss": float(g[0] / G + nll_weight * g[6]) + cfg.router.aux_loss_coef * aux_step
                    + cfg.router.z_loss_coef * z_step,
            **({"log_odds_ratio": float(g[7] / G)} if loss_type == "orpo" else {}),
            "dpo": float(g[0] / G), "aux": aux_step, "z": z_step,
            **(kto_values(g, G, float(kl)) if kto else {
                "nll": float(g[6]), "rewards/chosen": float(g[1] / G), "rewards/rejected": float(g[2] / G),
                "rewards/margins": float((g[1] - g[2]) / G), "rewards/accuracy": float(g[3] / G),
                "logps/chosen": float(g[4] / G), "logps/rejected": float(g[5] / G), "pairs": G}),
            "tokens": int(run.all_sum(sum(int((b["input_ids"] != tokenizer.pad_id).sum()) for b in micro_batches))),
            **step_values(engine, guard, batches, step, skipped, lr),
            **(drift_metrics(run.all_sum(drift), cfg, run, step) if drift is not None else {}),
        }, stats)
        end_of_step(engine, cfg, run, guard, step)

    metrics.close()
    finish(engine, cfg, run, model, tokenizer, step)


@torch.no_grad()
def kto_reference_point(engine, kl_batches: list[dict], index: list[list[int]], cfg, run, ref_logps) -> torch.Tensor:
    """KTO's z₀ for this step (model/losses.py `kto_loss`), the same on every rank and in every layout:

        z₀ = max(0, (1/G) Σ_(the global batch) log π(y'|x) − log π_ref(y'|x))

    over each example's KL row (its prompt x with another prompt's completion y', data/preference.py
    `with_kl_completions`); `ref_logps(ix, b)` gives the reference's, `(B,)`. No gradient flows through z₀."""
    total = torch.zeros((), dtype=torch.float64)
    for ix, b in zip(index, kl_batches):
        pol, _, _, _ = reference.answer_logps(engine, b, run.sp_group)
        total += (pol.double() - ref_logps(ix, b).double().to(pol.device)).sum().cpu()
    return (run.all_sum(total) / run.sp / cfg.global_batch_size).clamp(min=0)


def kto_values(g: torch.Tensor, G: int, kl: float) -> dict:
    """The step's KTO metrics from its summed values `g` (train/dpo.py): the means over the desirable ("chosen")
    and the undesirable ("rejected") examples, as TRL's KTOTrainer logs them, and the reference point z₀."""
    n_d, n_u = float(g[3]), G - float(g[3])
    out = {"kl": kl, "desirable": int(n_d), "examples": G}
    if n_d:
        out |= {"rewards/chosen": float(g[1]) / n_d, "logps/chosen": float(g[4]) / n_d}
    if n_u:
        out |= {"rewards/rejected": float(g[2]) / n_u, "logps/rejected": float(g[5]) / n_u}
    if n_d and n_u:
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    return out


def kto_balance(examples: list[dict], cfg, run) -> None:
    """One line on the desirable / undesirable balance, and the KTO paper's advice (eq. 8) when the weights do not
    follow it: λ_D·n_D / (λ_U·n_U) in [1, 4/3]."""
    n_d = sum(e["label"] for e in examples)
    n_u = len(examples) - n_d
    ratio = cfg.dpo.desirable_weight * n_d / max(cfg.dpo.undesirable_weight * n_u, 1e-9)
    run.print(f"[{cfg.stage}] KTO: {n_d} desirable and {n_u} undesirable examples")
    if n_d and n_u and not 1 <= ratio <= 4 / 3:
        run.print(f"[{cfg.stage}] note: λ_D·n_D / (λ_U·n_U) = {ratio:.2f}, outside the KTO paper's [1, 4/3]: e.g. "
                  f"dpo.desirable_weight={n_u * cfg.dpo.undesirable_weight / n_d:.2f} (eq. 8)")


def drift_metrics(sums, cfg, run, step: int) -> dict:
    """This step's routing drift (model/router.py `routing_drift`) as metrics.jsonl keys, and the alarm line when
    the mean KL passes `dpo.drift_alarm`."""
    kl, shift = routing_drift(sums)
    mean = float(kl.mean())
    if cfg.dpo.drift_alarm and mean > cfg.dpo.drift_alarm:
        worst = ", ".join(f"layer {int(l)} {float(kl[l]):.4f}" for l in kl.argsort(descending=True)[:3])
        run.print(f"[{cfg.stage}] routing drift alarm at step {step}: mean router KL(policy ‖ reference) {mean:.4f} "
                  f"> dpo.drift_alarm={cfg.dpo.drift_alarm:g} (most: {worst})")
    return {"drift/kl": mean, "drift/kl_layers": [round(float(x), 8) for x in kl],
            "drift/load_shift": float(shift.mean()), "drift/load_shift_layers": [round(float(x), 8) for x in shift]}


if __name__ == "__main__":
    main()
