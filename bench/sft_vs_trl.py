"""SFT throughput against TRL's SFTTrainer on the same model, data, batch, optimizer and LR (CPU).

    python bench/sft_vs_trl.py [--steps 12] [--repeats 2] [--data alpaca|synthetic] [--model small]

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
import shutil
import statistics
import tempfile
from pathlib import Path

from _common import SHARED, run_stage_measured, run_worker, save_model


def prepare(tmp: Path, data: str, max_len: int, preset: str) -> tuple[Path, Path, Path]:
    from data.chat import encode_chat
    from data.formats import canonical
    from data.readers import read_records
    from data.synthetic import sft_chats
    from data.tokenizer import default_tokenizer_path, load_tokenizer

    tok = load_tokenizer()
    model_dir = save_model(tmp / "model", preset)
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
    m, rss, _ = run_stage_measured("sft", [
        "recipe=tiny/sft", f"model_path={model_dir}", f"data.path={jsonl}", "data.format=messages", "data.dedup=false",
        f"max_seq_len={a.max_len}", "global_batch_size=8", "micro_batch_size=4", f"max_steps={a.steps}",
        "optim.lr=1e-4", "optim.schedule=constant", "optim.warmup_steps=0", "router.aux_loss_coef=0",
        "deepspeed=zero0", "export=false", "logging=none", "precision=fp32"], out)
    timed = m[1:]  # from step 2 on, like TRL's
    return {"tokens_per_s": sum(r["label_tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
            "losses": [r["ce"] for r in m], "peak_rss_mb": rss}


def run_trl(model_dir, jsonl, tok_path, out, a) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    return run_worker("_trl_sft_worker.py", {
        "data": str(jsonl), "tokenizer": str(tok_path), "model": str(model_dir), "out": str(out), "micro": 4,
        "gas": 2, "steps": a.steps, "lr": 1e-4, "max_len": a.max_len, "packing": a.trl == "packing",
        "padding_free": a.trl == "padding_free"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-len", dest="max_len", type=int, default=512)
    p.add_argument("--data", choices=["alpaca", "synthetic"], default="alpaca")
    p.add_argument("--trl", choices=["packing", "padding_free"], default="packing")
    p.add_argument("--model", default="small", help="model preset (configs/model)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    model_dir, jsonl, tok_path = prepare(tmp, a.data, a.max_len, a.model)
    ours, trl = [], []
    for i in range(a.repeats):  # alternate so drift on the machine hits both sides
        ours.append(run_ours(model_dir, jsonl, tmp / f"ours{i}", a))
        trl.append(run_trl(model_dir, jsonl, tok_path, tmp / f"trl{i}", a))
        print(f"run {i}: ours {ours[-1]['tokens_per_s']:.0f} tok/s, TRL ({a.trl}) {trl[-1]['tokens_per_s']:.0f} tok/s", flush=True)
    o = statistics.median(r["tokens_per_s"] for r in ours)
    t = statistics.median(r["tokens_per_s"] for r in trl)
    print(f"model: {a.model} preset; data: {a.data}; batch 8 × {a.max_len} packed; {a.steps} steps; TRL: SFTTrainer {a.trl}")
    print(f"ours: {o:.0f} label tokens/s, peak RSS {max(r['peak_rss_mb'] for r in ours):.0f} MB, "
          f"loss last 3 steps {statistics.mean(ours[0]['losses'][-3:]):.3f}")
    print(f"TRL:  {t:.0f} label tokens/s, peak RSS {max(r['peak_rss_mb'] for r in trl):.0f} MB, "
          f"loss last 3 steps {statistics.mean(trl[0]['losses'][-3:]):.3f}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"sft tokens/s ratio vs TRL: {o / t:.2f}")


if __name__ == "__main__":
    main()
