"""One TRL run of KTOTrainer, CPOTrainer (SimPO's settings) or ORPOTrainer for bench/prefs_vs_trl.py (a separate
process, so its peak RSS is its own).

Trains on the same token ids as our stage (from our [INST] encoder), in the order written to the file (a
sequential sampler); prints one JSON line with examples/s (from step 2 on), its setup time, losses (and all it
logs) and peak RSS. AdamW(0.9, 0.95) with clip 1.0, or with `sgd` plain SGD without clipping.
KTO rows: prompt_ids, completion_ids, label (TRL builds its KL rows by rotating completions within each
per-device batch). SimPO / ORPO rows: prompt_ids, chosen_ids, rejected_ids.
"""

import json
import resource
import sys
import time

import datasets
import torch
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, LlamaTokenizer

from _common import trainer_clock

args = json.loads(sys.argv[1])
method = args["method"]
rows = [json.loads(l) for l in open(args["data"])]
tok = LlamaTokenizer(vocab_file=args["tokenizer"], legacy=True)
tok.pad_token = tok.unk_token
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
model.config.output_router_logits = False  # the preference loss alone, as ours with router.aux_loss_coef=0
common = dict(output_dir=args["out"], per_device_train_batch_size=args["micro"],
              gradient_accumulation_steps=args["gas"], max_steps=args["steps"], learning_rate=args["lr"],
              lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
              optim="sgd" if args["sgd"] else "adamw_torch", max_grad_norm=0.0 if args["sgd"] else 1.0, logging_steps=1,
              report_to=[], save_strategy="no", use_cpu=True, bf16=False,  # TRL's default is bf16 autocast; fp32 as ours
              beta=args["beta"],
              dataloader_num_workers=0, seed=0, data_seed=0, remove_unused_columns=False)


class Sequential:
    def _get_train_sampler(self, *a, **k):
        return SequentialSampler(self.train_dataset)  # the order written into the file


if method == "kto":
    from trl import KTOConfig, KTOTrainer

    class Trainer(Sequential, KTOTrainer):
        pass

    ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt_ids", "completion_ids", "label")} for r in rows])
    # _prepare_dataset would tokenize text: here it only adds TRL's own KL completions to our token ids
    Trainer._prepare_dataset = lambda self, dataset, *a, **k: dataset.map(
        lambda b: {"KL_completion_ids": [b["completion_ids"][-1]] + b["completion_ids"][:-1]}, batched=True,
        batch_size=args["micro"])
    cfg = KTOConfig(**common, max_length=None, precompute_ref_log_probs=True, precompute_ref_batch_size=args["micro"],
                    router_aux_loss_coef=0.0, train_sampling_strategy="sequential")
else:
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig as Config, CPOTrainer as Base

        extra = dict(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=args["simpo_gamma"])
    else:
        from trl.experimental.orpo import ORPOConfig as Config, ORPOTrainer as Base

        extra = {}

    class Trainer(Sequential, Base):
        def tokenize_row(self, feature, model=None):  # our token ids, with TRL's labels (-100 on the prompt)
            p = feature["prompt_ids"]
            out = {"prompt_input_ids": p, "prompt_attention_mask": [1] * len(p)}
            for side in ("chosen", "rejected"):
                ids = p + feature[f"{side}_ids"]
                out |= {f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                        f"{side}_labels": [-100] * len(p) + feature[f"{side}_ids"]}
            return out

    ds = datasets.Dataset.from_list([{"prompt": "", "chosen": "", "rejected": "",
                                      **{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}} for r in rows])
    cfg = Config(**common, max_length=4096, **extra)

clock = trainer_clock()
t_init = time.time()
trainer = Trainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
trainer.train()
init_s = clock.t0 - t_init  # setup and step 1 (with KTO the reference pass)
elapsed = time.time() - clock.t0
print(json.dumps({"examples_per_s": args["micro"] * args["gas"] * (args["steps"] - 1) / elapsed, "init_s": init_s,
                  "losses": clock.losses, "logs": clock.logs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
