"""Supervised fine-tuning of Mixtral on [INST] chats, on DeepSpeed ZeRO with expert parallelism.

    torchrun --nproc_per_node 2 train/sft.py recipe=tiny/sft                  # CPU, ~1 minute
    torchrun --nproc_per_node 8 train/sft.py recipe=mixtral_8x7b/sft          # one 8-GPU node

Data: `messages`, alpaca or sharegpt records (data/formats.py) → `data.chat.encode_chat`
(labels only on assistant answers and their </s>) → packed rows (data/dataset.py).

Loss per optimizer step (one global batch of G sequences over all ranks):
    ce  = Σ_(answer tokens in the global batch) −log p(token) / (number of those tokens)
    aux = per-layer Switch load-balancing loss (1.0 when balanced), mean over micro-batches
    loss = ce + router.aux_loss_coef · aux + router.z_loss_coef · z
Every real token (prompt included, padding excluded) passes the router, so aux and z count them all.
From scratch the first loss is ≈ ln(32000) ≈ 10.4.
"""

from __future__ import annotations

import torch

from data.chat import IGNORE_INDEX
from data.dataset import GlobalBatches
from data.tokenizer import load_tokenizer
from model.lora import apply_lora
from model.router import ExpertLoadAccumulator, RouterLogitsRecorder, expert_counts, load_balancing_loss, z_loss
from train import cli, common, faults
from train.config import SFTConfig, stage_checks

KIND = "messages"  # pretrain.py differs from this file in KIND and its docstring only


@cli.main("sft", SFTConfig, stage_checks)
@faults.exit_on_peer_loss
def main(cfg) -> None:
    run = common.start(cfg)
    tokenizer = load_tokenizer(cfg.model_path)
    rows, _ = common.training_rows(cfg, KIND, tokenizer, run)
    model = common.load_model(cfg, run)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora)
    engine, guard = common.build_engine(cfg, model, run)
    recorder = RouterLogitsRecorder(engine.module)
    head = model.get_output_embeddings()  # a LossHead: returns Σ CE instead of logits inside loss_on
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    balance = ExpertLoadAccumulator(top_k) if cfg.router.global_batch else None
    batches = GlobalBatches(len(rows), cfg.global_batch_size, cfg.seed)
    step, _ = common.maybe_resume(engine, cfg, run)
    metrics = common.Metrics(cfg, run, step, recorder.num_layers, num_experts)

    engine.train()
    while step < cfg.max_steps:
        # this rank's rows (its data-parallel group's), and with sequence parallelism its share of their tokens
        micro_batches = [run.shard(rows.batch(ix), tokenizer.pad_id)
                         for ix in batches.micro_batches(step, run.dp_rank, run.dp, cfg.micro_batch_size)]
        # Normalise by the answer tokens of the whole global batch (every micro-batch, every rank).
        n_labels = run.all_sum(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro_batches))
        ce_total = aux_total = z_total = 0.0
        counts_LE = torch.zeros(recorder.num_layers, num_experts, dtype=torch.float64)
        for b in micro_batches:
            with recorder, head.loss_on(b["targets"], shifted=True):
                out = engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
            real = b["real_mask"].reshape(-1)
            if balance is not None:
                balance.add(recorder.logits, real)
            ce = out.logits / n_labels.to(out.logits)  # out.logits is Σ −log p(label) (LossHead)
            aux = load_balancing_loss(recorder.logits, top_k, real, balance.fraction() if balance else None, run.sp > 1)
            z = z_loss(recorder.logits, real, run.sp > 1)
            # DeepSpeed divides gradients by the accumulation steps and averages them over data-parallel groups;
            # `ce` is already this micro-batch's share of the global mean, so scale it back by both.
            loss = ce * (run.gas * run.dp) + cfg.router.aux_loss_coef * aux + cfg.router.z_loss_coef * z
            loss = guard.watch(loss, step + 1)  # a non-finite loss makes every rank skip this step
            engine.backward(loss * run.grad_factor)  # 1 but under ZeRO-3 + sequence parallelism
            engine.step()
            ce_total += ce.item()
            aux_total += aux.item() / run.gas
            z_total += z.item() / run.gas
            counts_LE += expert_counts(recorder.logits, top_k, real).cpu().double()
        if balance is not None:
            balance.reset()
        step += 1
        skipped = guard.end_step(engine)

        ce_step = float(run.all_sum(ce_total))
        aux_step = float(run.all_sum(aux_total)) / run.world  # (a sequence-parallel group's ranks hold the same value)
        z_step = float(run.all_sum(z_total)) / run.world
        tokens = int(run.all_sum(sum(int(b["real_mask"].sum()) for b in micro_batches)))
        stats = metrics.expert_load(counts_LE)
        metrics.log(step, {
            "loss": ce_step + cfg.router.aux_loss_coef * aux_step + cfg.router.z_loss_coef * z_step,
            "ce": ce_step, "aux": aux_step, "z": z_step, "lr": engine.get_lr()[0],
            "grad_norm": float(engine.get_global_grad_norm() or 0.0), "tokens": tokens,
            "label_tokens": int(n_labels), "epoch": batches.epoch(step),
            "skipped": skipped, "skipped_total": guard.total, "rows": batches.global_rows(step - 1),
        }, stats)
        common.stop_if_diverged(engine, cfg, run, guard, step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            common.save_checkpoint(engine, cfg, run, step)

    metrics.close()
    common.finish(engine, cfg, run, model, tokenizer, step)


if __name__ == "__main__":
    main()
