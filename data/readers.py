"""Reading records from files, folders or the Hub: jsonl / json / parquet / .txt (plain or gzipped), one
`Record` per record with where it came from, or a `RecordError` naming the file and line (or record index) and
the kind of problem (malformed JSON, undecodable bytes, a non-finite number, an over-long record, ...).
data/formats.py turns the records into the canonical forms.
"""

from __future__ import annotations

import gzip
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".jsonl.gz", ".json.gz")


class RecordError(ValueError):
    """A bad record or file. `where` is "file:line" or "file[record i]"; `kind` a short category."""

    def __init__(self, where: str, kind: str, detail: str):
        super().__init__(f"{where}: {kind}: {detail}")
        self.where, self.kind, self.detail = where, kind, detail


@dataclass
class Record:
    where: str      # "path:line" or "path[i]" or "hub:name[i]"
    value: dict


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in FILE_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def list_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in FILE_SUFFIXES)
    if not files:
        raise RecordError(str(path), "empty folder", f"no {', '.join(FILE_SUFFIXES)} files inside")
    return files


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.name.lower().endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise RecordError(str(path), "unreadable file", f"not a valid gzip file ({e})") from None
    return raw


def _decode(raw: bytes, where: str, line_of: bool = False) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if line_of:
            line = raw[: e.start].count(b"\n") + 1
            where = f"{where}:{line}"
        raise RecordError(where, "not UTF-8", f"byte {raw[e.start]:#x} at offset {e.start}") from None


def _read_text(path: Path) -> str:
    return _decode(_read_bytes(path), str(path), line_of=True).lstrip("\ufeff")  # a UTF-8 BOM is harmless


def _check_finite(value, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise RecordError(where, "non-finite number", repr(value))
    if isinstance(value, dict):
        for v in value.values():
            _check_finite(v, where)
    elif isinstance(value, list):
        for v in value:
            _check_finite(v, where)


def _check_size(value_text: str, where: str, max_chars: int) -> None:
    if len(value_text) > max_chars:
        raise RecordError(where, "record too large", f"{len(value_text):,} characters > data.max_record_chars={max_chars:,}")


def _parse_line(raw: bytes, where: str, first: bool, max_record_chars: int) -> dict:
    line = _decode(raw, where)
    if first:
        line = line.lstrip("\ufeff")
    _check_size(line, where, max_record_chars)
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        raise RecordError(where, "malformed JSON", e.msg) from None
    if not isinstance(value, dict):
        raise RecordError(where, "not an object", f"expected a JSON object, got {type(value).__name__}")
    _check_finite(value, where)
    return value


def read_file(path: Path, text_field: str = "text", max_record_chars: int = 1_000_000) -> Iterator[Record | RecordError]:
    """Records of one file. A bad record is yielded as its RecordError (the caller raises or skips it);
    a file that cannot be read at all raises."""
    suffix = _suffix(path)
    if suffix in (".jsonl", ".jsonl.gz"):
        raw = _read_bytes(path)
        if not raw.strip(b"\xef\xbb\xbf \t\r\n"):
            raise RecordError(str(path), "empty file", "no records")
        for i, line_bytes in enumerate(raw.split(b"\n"), start=1):
            if not line_bytes.strip(b"\xef\xbb\xbf \t\r"):
                continue
            try:  # a bad line costs that line, not the file
                yield Record(f"{path}:{i}", _parse_line(line_bytes, f"{path}:{i}", i == 1, max_record_chars))
            except RecordError as e:
                yield e
    elif suffix in (".json", ".json.gz"):
        text = _read_text(path)
        if not text.strip():
            raise RecordError(str(path), "empty file", "no records")
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{e.lineno}", "malformed JSON", e.msg) from None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not value:
            raise RecordError(str(path), "empty file" if value == [] else "not a list", "expected a JSON list of records")
        for i, v in enumerate(value):
            where = f"{path}[{i}]"
            try:
                if not isinstance(v, dict):
                    raise RecordError(where, "not an object", f"expected a JSON object, got {type(v).__name__}")
                _check_finite(v, where)
                _check_size(json.dumps(v, ensure_ascii=False), where, max_record_chars)
            except RecordError as e:
                yield e
                continue
            yield Record(where, v)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors: ArrowInvalid, OSError, ...
            raise RecordError(str(path), "unreadable file", f"not a readable parquet file ({type(e).__name__}: {e})") from None
        if table.num_rows == 0:
            raise RecordError(str(path), "empty file", "no rows")
        for i, v in enumerate(table.to_pylist()):
            yield Record(f"{path}[{i}]", v)
    elif suffix == ".txt":
        text = _read_text(path)
        if not text.strip():
            raise RecordError(str(path), "empty file", "no text")
        _check_size(text, str(path), max_record_chars)
        yield Record(str(path), {text_field: text})
    else:
        raise RecordError(str(path), "unknown format", f"unsupported file type {path.suffix!r}; use {', '.join(FILE_SUFFIXES)}")


def read_records(path: str, *, split: str = "train", name: str | None = None, text_field: str = "text",
                 max_record_chars: int = 1_000_000, yield_errors: bool = False) -> Iterator[Record]:
    """Records from a file, a folder (recursively, sorted), or a Hub dataset name.

    By default the first bad record or file raises its RecordError. With `yield_errors=True` bad
    records and unreadable files (of a folder) are yielded as RecordError instances instead, and
    reading goes on with the next record or file."""
    p = Path(path).expanduser()
    if p.exists():
        files = list_files(p)
        for f in files:
            try:
                for item in read_file(f, text_field, max_record_chars):
                    if isinstance(item, RecordError) and not yield_errors:
                        raise item
                    yield item
            except RecordError as e:
                if not yield_errors or len(files) == 1:
                    raise
                yield e
        return
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise RecordError(path, "missing", "no such file or folder")
    import datasets  # a Hub dataset: needs internet (or a populated HF cache)

    from data.hub import check_dataset

    check_dataset(path)

    ds = datasets.load_dataset(path, name, split=split)
    if len(ds) == 0:
        raise RecordError(f"hub:{path}", "empty dataset", f"split {split!r} has no rows")
    for i, v in enumerate(ds):
        yield Record(f"hub:{path}[{i}]", dict(v))


# ---------------------------------------------------------------------------------------------
# format detection and adapters
