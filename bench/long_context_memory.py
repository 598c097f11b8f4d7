"""Peak memory of one training step against row length, one rank against sequence parallelism.

    python bench/long_context_memory.py                         # small preset, 1k-8k tokens (~14 min on 2 cores)
    python bench/long_context_memory.py --model tiny --lengths 256 512 1024   # the CI smoke run

Each point runs 2 optimizer steps of continued pretraining (`train/pretrain.py`, ZeRO-1, fp32, no
gradient checkpointing, micro-batch 1 = one row) on one long document: the C4 demo texts of
../shared/data joined into one, cut into rows of exactly L tokens (so attention spans the whole row).
Once on 1 rank, once on 2 ranks with `sequence_parallel_size=2` (each rank holds L/2 tokens of the row), and
once more with the experts in tiles of 256 tokens (`model.tiled_mlp_tokens=256`, model/tiled_moe.py).

    peak(L)        = max over ranks of (peak RSS of step 2 − RSS when loading began)   (memory.json; from step 2
                     on the optimizer's states exist, so everything but the activations is the same at every L)
    activation(L)  = peak(L) − peak(L_min)      the part that grows with the row

The runs use the stages' own allocator settings (train/memory_log.py `set_mmap_threshold`). Goals
(issue: long context): activation(SP 2) ≤ 0.6 × activation(1 rank) at the longest row, and activation
per token per rank flat across lengths (linear growth: no (L × L) score matrix and no (L × V) logits,
model/attention.py and model/losses.py). The last line is activation(SP 2) / activation(1 rank) at the
longest row.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import SHARED, peak_above_load  # noqa: E402


LAYOUTS = (("1 rank", 1, []), ("SP 2", 2, ["sequence_parallel_size=2"]),
           ("SP 2 + tiles", 2, ["sequence_parallel_size=2", "model.tiled_mlp_tokens=256"]))


def long_document(folder: Path) -> Path:
    texts = [json.loads(line)["text"] for line in (SHARED / "llama_factory_demo" / "c4_demo.jsonl").open()]
    path = folder / "long.jsonl"
    path.write_text(json.dumps({"text": "\n\n".join(texts)}) + "\n")
    return path


def peak_bytes(ranks: int, overrides: list[str], out: Path) -> float:
    return peak_above_load("pretrain", ranks, overrides, out, ("later_steps",))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    a = ap.parse_args()
    lengths = sorted(a.lengths)
    mb = 2**20
    with tempfile.TemporaryDirectory() as tmp:
        data = long_document(Path(tmp))
        common = ["recipe=tiny/pretrain", f"model={a.model}", f"data.path={data}", "data.format=text",
                  "data.overlong=truncate", "max_steps=2", "global_batch_size=1", "micro_batch_size=1",
                  "deepspeed=zero1", "export=false", "logging=none", "optim.warmup_steps=0",
                  f"model.max_position_embeddings={max(lengths)}"]
        peaks = {}
        for n in lengths:
            for name, ranks, extra in LAYOUTS:
                peaks[name, n] = peak_bytes(ranks, [*common, f"max_seq_len={n}", *extra], Path(tmp) / "run")
                print(f"  measured {name:6s} {n:6d} tokens: {peaks[name, n] / mb:7.0f} MB", file=sys.stderr, flush=True)
    base = lengths[0]
    print(f"{'tokens':>7s}" + "".join(f" {name + ': peak':>19s} {'activation':>11s} {'per 1k tok/rank':>16s}"
                                      for name, _, _ in LAYOUTS) + f" {'SP2/1':>6s}")
    for n in lengths:
        act = {name: peaks[name, n] - peaks[name, base] for name, _, _ in LAYOUTS}
        cells = ""
        for name, ranks, _ in LAYOUTS:
            per = act[name] / mb / ((n - base) / ranks) * 1000 if n > base else float("nan")
            cells += f" {peaks[name, n] / mb:16.0f} MB {act[name] / mb:8.0f} MB {per:13.1f} MB"
        ratio = act["SP 2"] / act["1 rank"] if n > base else float("nan")
        print(f"{n:7d}{cells} {ratio:6.2f}")
    top = lengths[-1]
    ratio = (peaks["SP 2", top] - peaks["SP 2", base]) / (peaks["1 rank", top] - peaks["1 rank", base])
    print(f"sp2 / 1-rank activation at {top} tokens: {ratio:.2f}")


if __name__ == "__main__":
    main()
