"""Supervised fine-tuning of Mixtral on [INST] chats, on DeepSpeed ZeRO with expert parallelism.

    torchrun --nproc_per_node 2 train/sft.py recipe=tiny/sft                  # CPU, ~1 minute
    torchrun --nproc_per_node 8 train/sft.py recipe=mixtral_8x7b/sft          # one 8-GPU node

Data: `messages`, alpaca or sharegpt records (data/formats.py) → `data.chat.encode_chat`
(labels only on assistant answers and their </s>) → packed rows (data/dataset.py).

The loop, shared with pretraining, and its loss: train/causal_lm.py (ce over the answer tokens).
"""

from __future__ import annotations

from train import causal_lm, cli
from train.checks import stage_checks
from train.config import SFTConfig
from train.runtime import start


@cli.main("sft", SFTConfig, stage_checks)
def main(cfg) -> None:
    with start(cfg) as run:
        causal_lm.train(cfg, run, kind="messages")


if __name__ == "__main__":
    main()
