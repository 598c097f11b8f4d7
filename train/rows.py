"""The training rows of a stage, agreed on by every rank: rank 0 reads, checks and tokenizes the data (into
the cache), the others read the cache; a bad record stops every rank with its file and line."""

from __future__ import annotations

import sys

import torch.distributed as dist

from data.dataset import DataReport, fit_examples, fit_pairs, load_canonical, pack_rows, tokenize
from data.hub import HubUnreachable
from data.readers import RecordError
from train.runtime import Run


def training_rows(cfg, kind: str, tokenizer, run: Run):
    """Load, tokenize (rank 0 first, cached) and pack the training data; prints the data report."""
    report = DataReport()
    cache_dir = cfg.data.cache_dir or str(run.out / "cache")
    rows = None
    for turn in (0, 1):  # rank 0 fills the cache, then the others read it
        error = None
        if (turn == 0) == run.main:
            try:
                records = load_canonical(cfg.data, kind, cfg.seed, skipped_path=run.out / "skipped.jsonl", report=report,
                                         version=tokenizer.version)
            except HubUnreachable as e:  # a hub dataset name with no network and no cached copy
                error = f"data error: {e}"
            except RecordError as e:  # named by file and line; stop every rank before any heavy work
                error = f"data error: {e}\n  (data.on_error=skip skips bad records, counts them and lists them in " \
                        f"{run.out / 'skipped.jsonl'})" if cfg.data.on_error == "raise" else f"data error: {e}"
            if error is None:
                ds = tokenize(records, kind, tokenizer, cache_dir)
                if kind == "preference":
                    rows = fit_pairs(ds, cfg.max_seq_len, cfg.dpo.max_prompt_len, report)
                elif kind == "unpaired":
                    try:
                        rows = fit_examples(ds, cfg.max_seq_len, cfg.dpo.max_prompt_len, report)
                    except ValueError as e:
                        error = f"data error: {e}"
                else:
                    rows = pack_rows(zip(ds["input_ids"], ds["labels"]), cfg.max_seq_len, tokenizer.pad_id,
                                     packing=cfg.data.packing, overlong=cfg.data.overlong, kind=kind, report=report)
        shared = [error]
        if dist.is_initialized() and run.world > 1:
            dist.broadcast_object_list(shared, src=0)  # also the barrier between the two turns
        if shared[0] is not None:
            if run.main:
                print(f"[{cfg.stage}] {shared[0]}", file=sys.stderr, flush=True)
            run.finished()
            sys.exit(2)
    run.data_report = report
    for line in report.lines():
        run.print(f"[{cfg.stage}] data: {line}")
    if report.skipped:
        run.print(f"[{cfg.stage}] data: skipped records are listed in {run.out / 'skipped.jsonl'}")
    if len(rows) < cfg.global_batch_size:
        run.print(f"[{cfg.stage}] note: {len(rows)} rows < global_batch_size {cfg.global_batch_size}; rows repeat within a step")
    return rows, report
