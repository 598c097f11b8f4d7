"""SFT throughput against TRL's SFTTrainer on the same model, data, batch, optimizer and LR (CPU).

    python bench/sft_vs_trl.py [--steps 12] [--repeats 2] [--data alpaca|synthetic]

Model: the `small` preset (hidden 256, 4 layers, 8 experts top-2, vocabulary 32000), initialised
once and saved as an HF folder that both sides load. Data: LLaMA-Factory's alpaca demo
(../shared/data, 999 chats) or the project's synthetic chats, tokenized once with our [INST]
encoder (assistant-only labels) and handed to both sides as token ids. Batch: 8 packed rows of
512 tokens (micro 4 × accumulation 2), AdamW(0.9, 0.95) lr 1e-4 constant, clip 1.0, fp32, one
process each, runs alternating ours / TRL. Ours: `train/sft.py` on DeepSpeed ZeRO-0 (router aux
off so both optimise the same cross-entropy). TRL: SFTTrainer with packing (its fastest setting
that runs here; `--trl padding_free` tries the other). Reported: label tokens/s (tokens that carry a
loss, measured from step 2 on), peak RSS, loss at the last steps. Last line:
    sft tokens/s ratio vs TRL: X.XX
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
RSS_WRAPPER = ("import atexit, resource, runpy, sys; atexit.register(lambda: print('PEAK_RSS_MB', "
               "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def prepare(tmp: Path, data: str, max_len: int) -> tuple[Path, Path, Path]:
    from omegaconf import OmegaConf

    from data.chat import encode_chat
    from data.formats import canonical, read_records
    from data.synthetic import sft_chats
    from data.tokenizer import default_tokenizer_path, load_tokenizer
    from model.build import build_model
    from train.config import compose

    tok = load_tokenizer()
    model_dir = tmp / "model"
    build_model(OmegaConf.to_container(compose("sft", ["model=small"]).model), seed=0).save_pretrained(model_dir)
    shutil.copy(default_tokenizer_path(), model_dir / "tokenizer.model")
    if data == "alpaca" and (SHARED / "llama_factory_demo" / "alpaca_en_demo.json").is_file():
        src = SHARED / "llama_factory_demo" / "alpaca_en_demo.json"
        chats = [canonical(r, "alpaca", "messages") for r in read_records(str(src))]
    else:
        chats = sft_chats(2000, seed=0)
    rows = []
    for c in chats:
        ids, labels = encode_chat(c["messages"], tok)
        if len(ids) <= max_len:
            rows.append({"messages": c["messages"], "input_ids": ids, "labels": labels})
    jsonl = tmp / "chats.jsonl"
    with open(jsonl, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return model_dir, jsonl, default_tokenizer_path()


def run_ours(model_dir, jsonl, out, a) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", RSS_WRAPPER, str(REPO / "train" / "sft.py"), "recipe=tiny/sft", f"model_path={model_dir}",
           f"data.path={jsonl}", "data.format=messages", f"max_seq_len={a.max_len}", "global_batch_size=8",
           "micro_batch_size=4", f"max_steps={a.steps}", "data.dedup=false", "optim.lr=1e-4", "optim.schedule=constant",
           "optim.warmup_steps=0", "router.aux_loss_coef=0", "deepspeed=zero0", "export=false", "logging=none",
           f"output_dir={out}", "precision=fp32"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(29650 + os.getpid() % 100)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"ours failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    timed = m[1:]  # from step 2 on, like TRL's
    rss = float(next(l.split()[1] for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_MB")))
    return {"tokens_per_s": sum(r["label_tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
            "losses": [r["ce"] for r in m], "peak_rss_mb": rss}


def run_trl(model_dir, jsonl, tok_path, out, a) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    spec = {"data": str(jsonl), "tokenizer": str(tok_path), "model": str(model_dir), "out": str(out), "micro": 4,
            "gas": 2, "steps": a.steps, "lr": 1e-4, "max_len": a.max_len, "packing": a.trl == "packing",
            "padding_free": a.trl == "padding_free"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "_trl_sft_worker.py"), json.dumps(spec)], cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"TRL failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["losses"] = r.pop("losses")
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-len", dest="max_len", type=int, default=512)
    p.add_argument("--data", choices=["alpaca", "synthetic"], default="alpaca")
    p.add_argument("--trl", choices=["packing", "padding_free"], default="packing")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    model_dir, jsonl, tok_path = prepare(tmp, a.data, a.max_len)
    ours, trl = [], []
    for i in range(a.repeats):  # alternate so drift on the machine hits both sides
        ours.append(run_ours(model_dir, jsonl, tmp / f"ours{i}", a))
        trl.append(run_trl(model_dir, jsonl, tok_path, tmp / f"trl{i}", a))
        print(f"run {i}: ours {ours[-1]['tokens_per_s']:.0f} tok/s, TRL ({a.trl}) {trl[-1]['tokens_per_s']:.0f} tok/s", flush=True)
    o = statistics.median(r["tokens_per_s"] for r in ours)
    t = statistics.median(r["tokens_per_s"] for r in trl)
    print(f"model: small preset; data: {a.data}; batch 8 × {a.max_len} packed; {a.steps} steps; TRL: SFTTrainer {a.trl}")
    print(f"ours: {o:.0f} label tokens/s, peak RSS {max(r['peak_rss_mb'] for r in ours):.0f} MB, "
          f"loss last 3 steps {statistics.mean(ours[0]['losses'][-3:]):.3f}")
    print(f"TRL:  {t:.0f} label tokens/s, peak RSS {max(r['peak_rss_mb'] for r in trl):.0f} MB, "
          f"loss last 3 steps {statistics.mean(trl[0]['losses'][-3:]):.3f}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"sft tokens/s ratio vs TRL: {o / t:.2f}")


if __name__ == "__main__":
    main()
