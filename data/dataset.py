"""From records to fixed-size training rows, and the deterministic order the stages read them in.

    load_canonical  records → canonical dicts (bad records raise or are skipped and written out)
    tokenize        canonical dicts → input_ids/labels, cached on disk (datasets `map`, with progress)
    pack_rows       token sequences → rows of exactly `max_seq_len` tokens (B rows × S)
    GlobalBatches   step → the rows of each rank's micro-batches

Packing puts several documents in one row with `position_ids` restarting at 0 for each
document. Transformers derives the attention segments from those restarts (block-diagonal
causal mask with SDPA/eager on CPU, varlen kernels with flash-attention on GPU), so no token
attends across documents and positions restart per document — no attention mask needed.
Padding at the end of a row is its own segment, with labels -100 and `real_mask` False (the
router losses ignore it). Each document's first label is -100, so no document predicts the next.

Over-long examples (`data.overlong`): text documents are split into `max_seq_len` chunks
("truncate") or dropped ("drop"); chats are cut at `max_seq_len` (kept only if an answer token
survives) or dropped. Every case is counted in the returned report.

Over 250 lines because the four steps above hand each other one row format; splitting them would split it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data import synthetic
from data.chat import IGNORE_INDEX, encode_chat
from data.formats import canonical, unpair
from data.readers import RecordError, read_records
from data.preference import encode_example, encode_pair, fit_pair, with_kl_completions

CACHE_VERSION = "2"


@dataclass
class DataReport:
    records: int = 0
    skipped: Counter = field(default_factory=Counter)
    overlong: Counter = field(default_factory=Counter)
    rows: int = 0
    real_tokens: int = 0
    label_tokens: int = 0

    def lines(self) -> list[str]:
        out = [f"{self.records} records → {self.rows} rows, {self.real_tokens} tokens "
               f"({self.label_tokens} with labels)"]
        if self.skipped:
            out.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(self.skipped.items())))
        if self.overlong:
            out.append("over-long: " + ", ".join(f"{k} {v}" for k, v in sorted(self.overlong.items())))
        return out


def load_canonical(data_cfg, kind: str, seed: int, skipped_path: str | Path | None = None,
                   report: DataReport | None = None, version: str = "v1") -> list[dict]:
    """Canonical records of `kind` ("text", "messages", "preference", "unpaired") from `data_cfg.path`, chats
    checked for the tokenizer `version` (a chat with tools needs "v3"); for "unpaired" each preference pair
    gives two records (data/formats.py `unpair`).

    `data_cfg.on_error="raise"` stops at the first bad record with file and line;
    "skip" counts each kind of problem and writes the bad records to `skipped_path`.
    """
    report = report if report is not None else DataReport()
    if data_cfg.path == "synthetic":
        out = synthetic.records("preference" if kind == "unpaired" else kind, data_cfg.synthetic_samples, seed,
                                passkey_share=data_cfg.synthetic_passkey_share,
                                passkey_filler=data_cfg.synthetic_passkey_filler)
        out = [u for c in out for u in unpair(c)] if kind == "unpaired" else out
    else:
        out, skipped, seen = [], [], {}
        for rec in read_records(data_cfg.path, split=data_cfg.split, name=data_cfg.name, text_field=data_cfg.text_field,
                                max_record_chars=data_cfg.max_record_chars, yield_errors=True):
            try:
                if isinstance(rec, RecordError):  # unreadable line or file
                    raise rec
                c = canonical(rec, data_cfg.format, kind, data_cfg.text_field, version)
            except RecordError as e:
                if data_cfg.on_error == "raise":
                    raise
                report.skipped[e.kind] += 1
                skipped.append({"where": e.where, "kind": e.kind, "detail": e.detail,
                                "record": None if isinstance(rec, RecordError) else rec.value})
                continue
            key = hashlib.sha256(json.dumps(c, sort_keys=True, ensure_ascii=False).encode()).digest()
            if data_cfg.dedup and key in seen:  # a policy, not an error: dropped whatever on_error says
                report.skipped["duplicate record"] += 1
                skipped.append({"where": rec.where, "kind": "duplicate record", "detail": f"same as {seen[key]}",
                                "record": rec.value})
                continue
            seen.setdefault(key, rec.where)
            out.extend(unpair(c) if kind == "unpaired" else [c])
            if data_cfg.max_samples and len(out) >= data_cfg.max_samples:
                break
        if skipped_path is not None and skipped:
            Path(skipped_path).parent.mkdir(parents=True, exist_ok=True)
            with open(skipped_path, "w") as f:
                for s in skipped:
                    f.write(json.dumps(s, ensure_ascii=False, default=str) + "\n")
        if not out:
            raise RecordError(data_cfg.path, "no usable records",
                              f"every record was skipped ({dict(report.skipped)})" if report.skipped else "no records")
    if data_cfg.max_samples:
        out = out[: data_cfg.max_samples]
    report.records = len(out)
    return out


def fingerprint(*parts) -> str:
    h = hashlib.sha256(CACHE_VERSION.encode())
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def file_sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:20]


def encode_text(text: str, tokenizer) -> tuple[list[int], list[int]]:
    """<s> text </s>; every token is a label except <s> (nothing predicts a document's start)."""
    ids = [tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id]
    return ids, [IGNORE_INDEX] + ids[1:]


def tokenize(records: list[dict], kind: str, tokenizer, cache_dir: str | Path, desc: str = "tokenize"):
    """A `datasets.Dataset` with `input_ids` and `labels`, cached under `cache_dir` by content hash."""
    import datasets

    key = fingerprint(kind, file_sha(tokenizer.path), records)
    cache = Path(cache_dir) / f"tokens-{kind}-{key}.arrow"
    cache.parent.mkdir(parents=True, exist_ok=True)
    # chats travel as JSON text: Arrow would give every tool schema the union of all schemas' keys
    ds = datasets.Dataset.from_list(records if kind == "text" else
                                    [{"record": json.dumps(r, ensure_ascii=False)} for r in records])

    def fn(batch):
        if kind == "preference":
            enc = [encode_pair(json.loads(r), tokenizer) for r in batch["record"]]
            return {k: [e[k] for e in enc] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        if kind == "unpaired":
            enc = [encode_example(json.loads(r), tokenizer) for r in batch["record"]]
            return {k: [e[k] for e in enc] for k in ("prompt_ids", "completion_ids", "label")}
        out = {"input_ids": [], "labels": []}
        rows = batch["text"] if kind == "text" else [json.loads(r) for r in batch["record"]]
        for row in rows:
            ids, labels = (encode_text(row, tokenizer) if kind == "text"
                           else encode_chat(row["messages"], tokenizer, row.get("tools")))
            out["input_ids"].append(ids)
            out["labels"].append(labels)
        return out

    return ds.map(fn, batched=True, remove_columns=ds.column_names, cache_file_name=str(cache),
                  load_from_cache_file=True, desc=desc)


@dataclass
class Rows:
    """Fixed-size training rows, all `(R, S)` int32 / bool numpy arrays."""
    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    real_mask: np.ndarray

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def batch(self, index: list[int]) -> dict:
        import torch

        return {k: torch.from_numpy(getattr(self, k)[index]).long() if k != "real_mask"
                else torch.from_numpy(self.real_mask[index]) for k in ("input_ids", "labels", "position_ids", "real_mask")}


def _fit(seqs, max_seq_len: int, overlong: str, report: DataReport, kind: str):
    for ids, labels in seqs:
        if len(ids) <= max_seq_len:
            yield ids, labels
            continue
        if overlong == "drop":
            report.overlong["dropped"] += 1
        elif kind == "text":
            report.overlong["split"] += 1
            for start in range(0, len(ids), max_seq_len):
                chunk_ids, chunk_labels = ids[start:start + max_seq_len], list(labels[start:start + max_seq_len])
                chunk_labels[0] = IGNORE_INDEX
                if len(chunk_ids) > 1:
                    yield chunk_ids, chunk_labels
        else:
            cut_labels = labels[:max_seq_len]
            if all(x == IGNORE_INDEX for x in cut_labels):
                report.overlong["dropped (no answer left after truncation)"] += 1
            else:
                report.overlong["truncated"] += 1
                yield ids[:max_seq_len], cut_labels


def pack_rows(seqs, max_seq_len: int, pad_id: int, packing: bool = True, overlong: str = "truncate",
              kind: str = "messages", report: DataReport | None = None) -> Rows:
    """Greedy in-order packing of (input_ids, labels) pairs into rows of exactly `max_seq_len`."""
    report = report if report is not None else DataReport()
    rows: list[list[tuple[list[int], list[int]]]] = []
    used = max_seq_len + 1
    for ids, labels in _fit(seqs, max_seq_len, overlong, report, kind):
        if not packing or used + len(ids) > max_seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, labels))
        used += len(ids)
    if not rows:
        raise ValueError("no training rows: every example was dropped (see data.overlong and max_seq_len)")
    R, S = len(rows), max_seq_len
    input_ids = np.full((R, S), pad_id, dtype=np.int32)
    labels_a = np.full((R, S), IGNORE_INDEX, dtype=np.int32)
    position_ids = np.zeros((R, S), dtype=np.int32)
    real = np.zeros((R, S), dtype=bool)
    for r, docs in enumerate(rows):
        at = 0
        for ids, labels in docs:
            n = len(ids)
            input_ids[r, at:at + n] = ids
            labels_a[r, at:at + n] = labels
            position_ids[r, at:at + n] = np.arange(n)
            real[r, at:at + n] = True
            at += n
        position_ids[r, at:] = np.arange(S - at)  # padding: its own segment
    report.rows = R
    report.real_tokens = int(real.sum())
    report.label_tokens = int((labels_a != IGNORE_INDEX).sum())
    return Rows(input_ids, labels_a, position_ids, real)


def fit_pairs(ds, max_seq_len: int, max_prompt_len: int | None, report: DataReport) -> list[dict]:
    """Tokenized preference pairs after the over-long policy (data/preference.py), counted in `report`."""
    pairs = []
    for p, c, r in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"]):
        fitted = fit_pair(p, c, r, max_seq_len, max_prompt_len, report.overlong)
        if fitted is not None:
            pairs.append(dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), fitted)))
    if not pairs:
        raise ValueError("no training pairs: every pair was dropped (see max_seq_len and dpo.max_prompt_len)")
    report.rows = len(pairs)
    report.real_tokens = sum(2 * len(q["prompt_ids"]) + len(q["chosen_ids"]) + len(q["rejected_ids"]) for q in pairs)
    report.label_tokens = sum(len(q["chosen_ids"]) + len(q["rejected_ids"]) for q in pairs)
    return pairs


def fit_examples(ds, max_seq_len: int, max_prompt_len: int | None, report: DataReport) -> list[dict]:
    """Tokenized unpaired examples (KTO) after the over-long policy, each with the mismatched completion its KL
    term takes (data/preference.py `with_kl_completions`), counted in `report`."""
    examples = []
    for p, c, label in zip(ds["prompt_ids"], ds["completion_ids"], ds["label"]):
        fitted = fit_pair(p, c, None, max_seq_len, max_prompt_len, report.overlong)
        if fitted is not None:
            examples.append({"prompt_ids": fitted[0], "completion_ids": fitted[1], "label": bool(label)})
    if not examples:
        raise ValueError("no training examples: every example was dropped (see max_seq_len and dpo.max_prompt_len)")
    examples = with_kl_completions(examples, max_seq_len)
    report.rows = len(examples)
    report.real_tokens = sum(len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples)
    report.label_tokens = sum(len(e["completion_ids"]) for e in examples)
    return examples


class GlobalBatches:
    """Deterministic global order of row indices: step s uses rows [s·G, (s+1)·G) of an endless
    sequence of per-epoch permutations (seeded by `seed + epoch`). Rank r of W takes the r-th
    contiguous slice of G/W rows, cut into micro-batches of `micro`. The same global batch is thus
    seen whatever the world size, and resuming at step s needs nothing but s."""

    def __init__(self, num_rows: int, global_batch: int, seed: int):
        self.n, self.g, self.seed = num_rows, global_batch, seed
        self._perms: dict[int, np.ndarray] = {}

    def _row(self, i: int) -> int:
        epoch, j = divmod(i, self.n)
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n)}
        return int(self._perms[epoch][j])

    def global_rows(self, step: int) -> list[int]:
        return [self._row(i) for i in range(step * self.g, (step + 1) * self.g)]

    def micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[list[int]]:
        per_rank = self.g // world
        mine = self.global_rows(step)[rank * per_rank:(rank + 1) * per_rank]
        return [mine[i:i + micro] for i in range(0, per_rank, micro)]

    def epoch(self, step: int) -> float:
        return step * self.g / self.n
