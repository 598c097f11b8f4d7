"""One TRL SFTTrainer + PEFT + bitsandbytes 4-bit run for bench/qlora_memory.py (its own process, so its peak
RSS is its own): the QLoRA set-up a user would pick with TRL (`BitsAndBytesConfig(load_in_4bit=True)`, NF4, double
quantization, bf16 compute; LoRA r 16 on the attention projections). Reads the same token ids our stage trains on;
prints one JSON line with tokens/s, losses, peak RSS and how many weights bitsandbytes stored in 4 bits."""

import json
import sys

import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from _common import trainer_clock, train_timed, trl_sft_inputs


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM). Not getrusage's ru_maxrss: Linux carries the parent's peak across
    fork + exec into it (the benchmark's parent holds the model it saved)."""
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


args = json.loads(sys.argv[1])
ds, tok = trl_sft_inputs(args)
quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.bfloat16, quantization_config=quant)
model.config.output_router_logits = False
four_bit = sum(p.numel() * 2 for p in model.parameters() if p.dtype == torch.uint8)  # two 4-bit weights a byte
total = sum(p.numel() for p in model.parameters() if p.dtype != torch.uint8) + four_bit
lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                  task_type="CAUSAL_LM")
clock = trainer_clock()
cfg = SFTConfig(output_dir=args["out"], per_device_train_batch_size=args["micro"],
                gradient_accumulation_steps=args["gas"], max_steps=args["steps"], learning_rate=args["lr"],
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
                report_to=[], save_strategy="no", use_cpu=True, bf16=True, max_length=args["max_len"], packing=True,
                completion_only_loss=True, dataloader_num_workers=0, seed=0, data_seed=0,
                gradient_checkpointing=True)
trainer = SFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, callbacks=[clock], peft_config=lora)
tokens_per_s = train_timed(trainer, clock, args["gas"], args["steps"])
print(json.dumps({"tokens_per_s": tokens_per_s, "losses": clock.losses, "four_bit_share": four_bit / total,
                  "peak_rss_mb": peak_rss_mb()}))
