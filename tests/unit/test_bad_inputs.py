"""The bad-input corpus (tests/data/bad_inputs, described by its manifest.json): every kind of bad record
or file stops the default run naming file, line and problem, and with data.on_error=skip is skipped,
counted per kind and listed in skipped.jsonl; harmless variations (BOM, CRLF) load like clean files."""

import json
import os
import shutil
import subprocess
import sys
import pytest

from data.dataset import DataReport, fit_pairs, load_canonical, tokenize
from data.readers import RecordError
from data.tokenizer import load_tokenizer
from helpers import REPO, run_stage
from train.config import DataConfig

CORPUS = REPO / "tests" / "data" / "bad_inputs"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
BAD = [m for m in MANIFEST if m["error"]]
CLEAN = {"messages": [{"messages": [{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}]}],
         "preference": [{"prompt": "Hello?", "chosen": "Hi.", "rejected": "Go away."}],
         "text": [{"text": "A clean document."}]}


def _cfg(entry, path, on_error):
    return DataConfig(path=str(path), format=entry["format"], on_error=on_error,
                      max_record_chars=entry.get("max_record_chars", 1_000_000))


def test_corpus_has_at_least_20_kinds():
    assert len({m["file"] for m in BAD}) >= 20
    assert all((CORPUS / m["file"]).is_file() for m in MANIFEST)


@pytest.mark.parametrize("entry", BAD, ids=[m["file"] for m in BAD])
def test_default_raises_naming_file_line_and_problem(entry, tmp_path):
    cfg = _cfg(entry, CORPUS / entry["file"], "raise")
    if entry.get("raises", True) is False:  # duplicates: dropped and counted even under on_error=raise
        report = DataReport()
        recs = load_canonical(cfg, entry["kind"], 0, skipped_path=tmp_path / "skipped.jsonl", report=report)
        assert len(recs) == entry["good"] and report.skipped == {entry["error"]: 1}
        return
    with pytest.raises(RecordError) as err:
        load_canonical(cfg, entry["kind"], 0, skipped_path=tmp_path / "skipped.jsonl")
    assert f"{entry['file']}{entry['where']}: {entry['error']}: " in str(err.value), str(err.value)


@pytest.mark.parametrize("entry", [m for m in BAD if not m.get("direct_only")],
                         ids=[m["file"] for m in BAD if not m.get("direct_only")])
def test_skip_counts_per_kind_and_lists_the_records(entry, tmp_path):
    path = CORPUS / entry["file"]
    if entry.get("whole_file"):  # an unreadable file in a folder of good ones: the file is skipped
        path = tmp_path / "data"
        path.mkdir()
        shutil.copy(CORPUS / entry["file"], path / entry["file"])
        (path / "clean.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CLEAN[entry["kind"]]))
    report, skipped = DataReport(), tmp_path / "skipped.jsonl"
    recs = load_canonical(_cfg(entry, path, "skip"), entry["kind"], 0, skipped_path=skipped, report=report)
    assert len(recs) == (entry["good"] or len(CLEAN[entry["kind"]]))
    assert report.skipped == {entry["error"]: 1}
    assert any(f"skipped: {entry['error']} 1" in line for line in report.lines())
    (listed,) = [json.loads(l) for l in skipped.read_text().splitlines()]
    assert listed["kind"] == entry["error"] and listed["where"].endswith(f"{entry['file']}{entry['where']}")


def test_a_folder_ignores_unsupported_files(tmp_path):
    (tmp_path / "notes.csv").write_bytes((CORPUS / "unsupported.csv").read_bytes())
    (tmp_path / "chat.jsonl").write_text(json.dumps(CLEAN["messages"][0]) + "\n")
    assert len(load_canonical(DataConfig(path=str(tmp_path)), "messages", 0)) == 1


@pytest.mark.parametrize("name", ["bom.jsonl", "crlf.jsonl"])
def test_harmless_variations_load_like_clean_files(name, tmp_path):
    clean = tmp_path / "clean.jsonl"
    clean.write_bytes((CORPUS / name).read_bytes().lstrip(b"\xef\xbb\xbf").replace(b"\r\n", b"\n"))
    assert load_canonical(DataConfig(path=str(CORPUS / name)), "messages", 0) == \
        load_canonical(DataConfig(path=str(clean)), "messages", 0)


def test_prompt_longer_than_max_seq_len_is_cut_and_counted(tmp_path):
    tok = load_tokenizer(None)
    recs = load_canonical(DataConfig(path=str(CORPUS / "long_prompt_pair.jsonl")), "preference", 0)
    report = DataReport()
    pairs = fit_pairs(tokenize(recs, "preference", tok, tmp_path / "cache"), 64, None, report)
    assert len(pairs) == 2 and report.overlong["prompt truncated (left)"] == 1
    assert all(2 * len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) <= 2 * 64 for p in pairs)


def test_stage_stops_with_the_message_then_the_corrected_command_trains_in_the_same_folder(tmp_path):
    """Default on_error=raise at the stage level (`python train/sft.py`, a world of one): status 2, the
    file:line message, no traceback. (Under torchrun the launcher adds its own report of the exit.) What the
    failed run left (config.yaml, build.log) does not block the corrected command: no overwrite=true needed."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train" / "sft.py"), "recipe=tiny/sft", f"output_dir={out}",
           f"data.path={CORPUS / 'malformed_json.jsonl'}", "max_steps=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "malformed_json.jsonl:2: malformed JSON" in proc.stderr
    assert "data.on_error=skip" in proc.stderr and "Traceback" not in proc.stderr
    assert not (out / "metrics.jsonl").exists() and (out / "config.yaml").is_file()

    data = tmp_path / "data"
    data.mkdir()
    chats = [m for m in BAD if m["kind"] == "messages" and m["format"] == "auto" and not m.get("direct_only")
             and "max_record_chars" not in m]
    for m in chats:
        shutil.copy(CORPUS / m["file"], data / m["file"])
    proc = run_stage("sft", out, ["recipe=tiny/sft", f"data.path={data}", "data.on_error=skip", "max_steps=1",
                                  "global_batch_size=2", "micro_batch_size=1", "export=false"], nproc=1)
    listed = [json.loads(l) for l in (out / "skipped.jsonl").read_text().splitlines()]
    kinds = {m["error"] for m in chats}
    assert {s["kind"] for s in listed} == kinds
    assert "data: skipped: " in proc.stdout and all(k in proc.stdout for k in kinds)
    assert (out / "metrics.jsonl").is_file()
