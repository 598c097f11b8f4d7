"""One TRL DPOTrainer run for bench/dpo_vs_trl.py (a separate process, so its peak RSS is its own).

Trains on the same token ids as our stage (prompt_ids / chosen_ids / rejected_ids from our [INST]
encoder), in the same order (a sequential sampler over pairs written in our global-batch order);
prints one JSON line with pairs/s (from step 2 on), the reference pass time, losses and peak RSS.
"""

import json
import resource
import sys
import time

import datasets
import torch
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, LlamaTokenizer
from trl import DPOConfig, DPOTrainer

from _common import trainer_clock

args = json.loads(sys.argv[1])
rows = [json.loads(l) for l in open(args["data"])]
ds = datasets.Dataset.from_list([{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows])
tok = LlamaTokenizer(vocab_file=args["tokenizer"], legacy=True)
tok.pad_token = tok.unk_token
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
ref = None if args["precompute"] else AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)


class PreTokenized(DPOTrainer):
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already prompt_ids / chosen_ids / rejected_ids

    def _get_train_sampler(self, *a, **k):
        return SequentialSampler(self.train_dataset)  # our global-batch order, written into the file


clock = trainer_clock()
cfg = DPOConfig(output_dir=args["out"], per_device_train_batch_size=args["micro"],
                gradient_accumulation_steps=args["gas"], max_steps=args["steps"], learning_rate=args["lr"],
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                bf16=False,  # TRL's configs default to bf16 autocast; fp32 as ours
                beta=args["beta"], loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=args["precompute"],
                precompute_ref_batch_size=args["micro"], router_aux_loss_coef=0.0, dataloader_num_workers=0,
                seed=0, data_seed=0, remove_unused_columns=False)
t_init = time.time()
trainer = PreTokenized(model=model, ref_model=ref, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
ref_s = time.time() - t_init  # includes the reference pass when precompute_ref_log_probs=True
trainer.train()
elapsed = time.time() - clock.t0
print(json.dumps({"pairs_per_s": args["micro"] * args["gas"] * (args["steps"] - 1) / elapsed, "init_s": ref_s,
                  "losses": clock.losses, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
