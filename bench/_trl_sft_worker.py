"""One TRL SFTTrainer run for bench/sft_vs_trl.py (a separate process, so its peak RSS is its own).

Reads the same token ids our stage trains on (input_ids + assistant-only labels), so both sides
see identical examples; prints one JSON line with tokens/s, loss and peak RSS.
"""

import json
import resource
import sys

import torch
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from _common import trainer_clock, train_timed, trl_sft_inputs

args = json.loads(sys.argv[1])
ds, tok = trl_sft_inputs(args)
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
model.config.output_router_logits = False  # HF aux off on both sides' comparison of ce (ours: aux_loss_coef=0)


clock = trainer_clock()
cfg = SFTConfig(output_dir=args["out"], per_device_train_batch_size=args["micro"],
                gradient_accumulation_steps=args["gas"], max_steps=args["steps"], learning_rate=args["lr"],
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95,
                max_grad_norm=1.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
                bf16=False,  # TRL's configs default to bf16 autocast; fp32 as ours
                max_length=args["max_len"], packing=args["packing"], padding_free=args["padding_free"],
                completion_only_loss=True, dataloader_num_workers=0, seed=0, data_seed=0,
                dataset_kwargs={"skip_prepare_dataset": False})
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock])
tokens_per_s = train_timed(trainer, clock, args["gas"], args["steps"])
print(json.dumps({"tokens_per_s": tokens_per_s, "loss_last": clock.losses[-1], "losses": clock.losses,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
