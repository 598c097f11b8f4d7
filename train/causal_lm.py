"""The causal-LM training loop that pretraining and SFT share (train/pretrain.py, train/sft.py configure it).

Rows: packed documents (pretraining: every token but each document's <s> is a label) or packed [INST] chats
(SFT: labels only on assistant answers and their </s>), data/dataset.py.

Loss per optimizer step (one global batch of G rows over all data-parallel groups):
    ce   = Σ_(label tokens in the global batch) −log p(token) / (number of those tokens)
    aux  = per-layer Switch load-balancing loss (1.0 when balanced), mean over micro-batches
    z    = router z-loss (ST-MoE), mean over micro-batches
    loss = ce + router.aux_loss_coef · aux + router.z_loss_coef · z
Every real token (an SFT prompt included, padding excluded) passes the router, so aux and z count them all.
From scratch the first loss is ≈ ln(32000) ≈ 10.4.
"""

from __future__ import annotations

from data.chat import IGNORE_INDEX
from data.dataset import GlobalBatches
from model.head import NO_LOGITS
from model.lora import apply_lora
from model.losses import causal_lm_loss
from model.router import ExpertLoadAccumulator, RouterLogitsRecorder, load_balancing_loss, z_loss
from train.checkpoints import end_of_step, maybe_resume
from train.finish import finish
from train.metrics import Metrics, RouterStep, step_values
from train.model_setup import build_engine, load_model, stage_tokenizer
from train.rows import training_rows
from train.runtime import Run
from train.stops import STOPS


def train(cfg, run: Run, kind: str) -> None:
    """The whole stage in `run` (train/runtime.py `start`): load `kind` rows ("text" or "messages"), train,
    checkpoint, export."""
    tokenizer = stage_tokenizer(cfg, run)
    rows, _ = training_rows(cfg, kind, tokenizer, run)
    model = load_model(cfg, run)
    if cfg.lora.enabled:
        model = apply_lora(model, cfg.lora, run.dtype)
    engine, guard = build_engine(cfg, model, run)
    recorder = RouterLogitsRecorder(engine.module)
    head = model.get_output_embeddings()  # an LMHead (model/head.py): head(hidden, targets) is Σ CE
    top_k, num_experts = model.config.num_experts_per_tok, model.config.num_local_experts
    balance = ExpertLoadAccumulator(top_k) if cfg.router.global_batch else None
    batches = GlobalBatches(len(rows), cfg.global_batch_size, cfg.seed)
    step, _ = maybe_resume(engine, cfg, run)
    metrics = Metrics(cfg, run, step, recorder.num_layers, num_experts)

    engine.train()
    STOPS.start_training()  # from here on Ctrl-C / SIGTERM stop between steps, with a checkpoint
    while step < cfg.max_steps:
        lr = engine.get_lr()[0]  # the rate this step applies (logged with it)
        # this rank's rows (its data-parallel group's), and with sequence parallelism its share of their tokens
        micro_batches = [run.shard(rows.batch(ix), tokenizer.pad_id)
                         for ix in batches.micro_batches(step, run.dp_rank, run.dp, cfg.micro_batch_size)]
        # Normalise by the label tokens of the whole global batch (every micro-batch, every rank).
        n_labels = run.all_sum(sum(int((b["targets"] != IGNORE_INDEX).sum()) for b in micro_batches))
        ce_total, router = 0.0, RouterStep(recorder.num_layers, num_experts, top_k, run.gas)
        for b in micro_batches:
            with recorder:  # the hidden states, no logits; the router logits of every layer in recorder.logits
                out = engine(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False,
                             output_hidden_states=True, logits_to_keep=NO_LOGITS)
            ce_sum = causal_lm_loss(out.hidden_states[-1], head, b["targets"])  # Σ −log p(target), fused
            ce = ce_sum / n_labels.to(ce_sum)
            real = b["real_mask"].reshape(-1)
            if balance is not None:
                balance.add(recorder.logits, real)
            aux = load_balancing_loss(recorder.logits, top_k, real, balance.fraction() if balance else None, run.sp_group)
            z = z_loss(recorder.logits, real, run.sp_group)
            # DeepSpeed divides gradients by the accumulation steps and averages them over data-parallel groups;
            # `ce` is already this micro-batch's share of the global mean, so scale it back by both.
            loss = ce * (run.gas * run.dp) + cfg.router.aux_loss_coef * aux + cfg.router.z_loss_coef * z
            loss = guard.watch(loss, step + 1)  # a non-finite loss makes every rank skip this step
            engine.backward(loss * run.grad_factor)  # 1 but under ZeRO-3 + sequence parallelism
            engine.step()
            ce_total += ce.item()
            router.add(recorder.logits, real, aux, z)
        if balance is not None:
            balance.reset()
        step += 1
        skipped = guard.end_step(engine)

        ce_step = float(run.all_sum(ce_total))
        aux_step, z_step = router.means(run)
        tokens = int(run.all_sum(sum(int(b["real_mask"].sum()) for b in micro_batches)))
        stats = metrics.expert_load(router.counts_LE)
        metrics.log(step, {
            "loss": ce_step + cfg.router.aux_loss_coef * aux_step + cfg.router.z_loss_coef * z_step,
            "ce": ce_step, "aux": aux_step, "z": z_step, "tokens": tokens, "label_tokens": int(n_labels),
            **step_values(engine, guard, batches, step, skipped, lr),
        }, stats)
        end_of_step(engine, cfg, run, guard, step)

    metrics.close()
    finish(engine, cfg, run, model, tokenizer, step)

