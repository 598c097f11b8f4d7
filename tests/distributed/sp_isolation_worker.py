"""torchrun worker for test_sequence_parallel.py: per-document isolation across sequence-parallel shards.

Every rank builds the same tiny Mixtral and first runs each document of a packed row alone (no sequence
parallelism). Then the model's attention is made sequence-parallel over all ranks (model/sequence_parallel.py),
each rank runs its shard of the packed row — the documents straddle the shard borders — and the shards'
logits are gathered. Rank 0 writes the largest difference per document, in training and in eval mode,
and the gradient check: Σ CE over the packed row through `causal_lm_loss` on shards (summed over ranks) equals
the sum of the documents' own losses.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from model import sequence_parallel  # noqa: E402
from model.build import build_model  # noqa: E402
from model.head import NO_LOGITS, install_lm_head  # noqa: E402
from model.losses import IGNORE_INDEX, causal_lm_loss  # noqa: E402


def main(out: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    preset = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "model" / "tiny.yaml"))
    model = build_model(preset, seed=0)
    head = install_lm_head(model)
    g = torch.Generator().manual_seed(1)
    lengths = [37, 50, 41, 31]  # 159 tokens: padded to a multiple of the world size, borders inside documents
    docs = [torch.randint(3, 32000, (n,), generator=g) for n in lengths]

    alone = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():
            alone[mode] = [model(input_ids=d[None], position_ids=torch.arange(len(d))[None]).logits[0] for d in docs]
    ce_alone = sum(float(torch.nn.functional.cross_entropy(l[:-1], d[1:], reduction="sum"))
                   for l, d in zip(alone["train"], docs))

    sequence_parallel.setup(model, world, rows=1)
    row = {"input_ids": torch.cat(docs)[None], "position_ids": torch.cat([torch.arange(n) for n in lengths])[None]}
    labels = row["input_ids"].clone()
    labels[0, torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)] = IGNORE_INDEX  # nothing predicts a document's start
    b = sequence_parallel.shard({**row, "labels": labels}, rank, world, pad_id=0)
    S = row["input_ids"].shape[1]
    result = {"shard_len": b["input_ids"].shape[1], "row_len": S}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():
            logits = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0]
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits.contiguous())
        full = torch.cat(parts)[:S]
        starts = torch.cumsum(torch.tensor([0] + lengths), 0)
        result[mode] = [float((full[s:e] - a).abs().max()) for s, e, a in zip(starts[:-1], starts[1:], alone[mode])]
    model.train()
    fwd = model(input_ids=b["input_ids"], position_ids=b["position_ids"], output_hidden_states=True,
                logits_to_keep=NO_LOGITS)
    ce = causal_lm_loss(fwd.hidden_states[-1], head, b["targets"])
    total = ce.detach().clone()
    dist.all_reduce(total)
    result["ce_packed"], result["ce_alone"] = float(total), ce_alone
    if rank == 0:
        Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
