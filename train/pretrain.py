"""Pretraining or continued pretraining of Mixtral on plain text, on DeepSpeed ZeRO with expert parallelism.

    torchrun --nproc_per_node 2 train/pretrain.py recipe=tiny/pretrain                  # CPU, ~1 minute
    torchrun --nproc_per_node 8 train/pretrain.py recipe=mixtral_8x7b/pretrain          # one 8-GPU node

Data: `text` records (jsonl/json/parquet field, .txt files, folders, or a Hub dataset) →
`<s> text </s>` → packed rows of `max_seq_len` (documents never attend to each other; over-long
documents are split into chunks). Every token but each document's `<s>` is a label.

The loop, shared with SFT, and its loss: train/causal_lm.py (ce over every token but a document's <s>).
LoRA adapters (lora.enabled) turn it into continued pretraining with adapters.
"""

from __future__ import annotations

from train import causal_lm, cli
from train.checks import stage_checks
from train.config import PretrainConfig
from train.runtime import start


@cli.main("pretrain", PretrainConfig, stage_checks)
def main(cfg) -> None:
    with start(cfg) as run:
        causal_lm.train(cfg, run, kind="text")


if __name__ == "__main__":
    main()
