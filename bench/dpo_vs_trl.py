"""DPO throughput against TRL's DPOTrainer on the same model, pairs, order, batch, optimizer and LR (CPU).

    python bench/dpo_vs_trl.py [--steps 10] [--repeats 1] [--max-len 512] [--model small] [--pairs N]

Model: the `small` preset (hidden 256, 4 layers, 8 experts top-2, vocabulary 32000), initialised once
and saved as an HF folder both sides load. Data: LLaMA-Factory's dpo_en_demo.json (../shared/data),
the pairs whose prompt + longer answer fit `--max-len` tokens (no truncation on either side),
tokenized once with our [INST] encoder and handed to TRL as token ids, in our global-batch order
(TRL gets a sequential sampler). Batch: 8 pairs (micro 4 × accumulation 2), sigmoid loss β 0.1,
AdamW(0.9, 0.95) lr 1e-4 constant, clip 1.0, fp32, router aux off, one process each, runs
alternating. Ours: `train/dpo.py` on DeepSpeed ZeRO-0 with its default precomputed reference.
TRL: DPOTrainer with precompute_ref_log_probs=True and =False (a live reference model).
Reported: training pairs/s from step 2 on, the one-time reference pass, peak RSS, per-step loss
(step 1 is ln 2 on both sides; later steps must agree closely). Also our SimPO (dpo.loss_type=simpo) on the same
run: the reference-free saving against our DPO (no reference pass; the same steps). Last line, against TRL's
faster setting:
    dpo pairs/s ratio vs TRL: X.XX
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import tempfile
from pathlib import Path

from _common import demo_pairs, run_stage_measured, run_worker, save_model

MICRO, GAS, LR, BETA = 4, 2, 1e-4, 0.1


def prepare(tmp: Path, max_len: int, steps: int, preset: str, max_pairs: int | None = None) -> tuple[Path, Path, Path, int]:
    from data.dataset import GlobalBatches

    model_dir = save_model(tmp / "model", preset)
    recs = demo_pairs(max_len, max_pairs)
    ours = tmp / "pairs.jsonl"
    ours.write_text("".join(json.dumps(c) + "\n" for c, _ in recs))
    order = [i for s in range(steps) for i in GlobalBatches(len(recs), MICRO * GAS, seed=0).global_rows(s)]
    trl = tmp / "pairs_ids_in_order.jsonl"
    trl.write_text("".join(json.dumps(recs[i][1]) + "\n" for i in order))
    return model_dir, ours, trl, len(recs)


def run_ours(model_dir: Path, data: Path, out: Path, a, loss_type: str = "sigmoid") -> dict:
    m, rss, stdout = run_stage_measured("dpo", [
        "recipe=tiny/dpo", f"model_path={model_dir}", f"data.path={data}", "data.format=preference", "data.dedup=false",
        f"max_seq_len={a.max_len}", f"global_batch_size={MICRO * GAS}", f"micro_batch_size={MICRO}",
        f"max_steps={a.steps}", f"optim.lr={LR}", "optim.schedule=constant", "optim.warmup_steps=0",
        "optim.weight_decay=0", "optim.grad_clip=1.0", "router.aux_loss_coef=0", "router.z_loss_coef=0",
        f"dpo.beta={BETA}", f"dpo.loss_type={loss_type}", "dpo.sft_weight=0", "dpo.reference=precomputed",
        "deepspeed=zero0", "export=false", "precision=fp32"], out)
    timed = m[1:]
    ref = re.search(r"reference log-probs: computed for \d+ pairs in ([\d.]+)s", stdout)
    return {"pairs_per_s": sum(r["pairs"] for r in timed) / sum(r["step_time_s"] for r in timed),
            "init_s": float(ref.group(1)) if ref else 0.0, "losses": [r["dpo"] for r in m], "peak_rss_mb": rss,
            "train_s": sum(r["step_time_s"] for r in m)}


def run_trl(model_dir: Path, data: Path, out: Path, precompute: bool, a) -> dict:
    from data.tokenizer import default_tokenizer_path

    shutil.rmtree(out, ignore_errors=True)
    return run_worker("_trl_dpo_worker.py", {
        "data": str(data), "tokenizer": str(default_tokenizer_path()), "model": str(model_dir), "out": str(out),
        "micro": MICRO, "gas": GAS, "steps": a.steps, "lr": LR, "beta": BETA, "precompute": precompute})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-len", dest="max_len", type=int, default=512)
    p.add_argument("--model", default="small", help="model preset (configs/model)")
    p.add_argument("--pairs", type=int, default=None, help="use only the first N pairs that fit (default: all)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_dpo_"))
    model_dir, ours_data, trl_data, n = prepare(tmp, a.max_len, a.steps, a.model, a.pairs)
    runs = {"ours (precomputed reference)": [], "ours SimPO (reference-free)": [],
            "TRL precompute_ref_log_probs=True": [], "TRL precompute_ref_log_probs=False": []}
    for i in range(a.repeats):  # alternate so drift on the machine hits every side
        runs["ours (precomputed reference)"].append(run_ours(model_dir, ours_data, tmp / f"ours{i}", a))
        runs["ours SimPO (reference-free)"].append(run_ours(model_dir, ours_data, tmp / f"simpo{i}", a, "simpo"))
        runs["TRL precompute_ref_log_probs=True"].append(run_trl(model_dir, trl_data, tmp / f"trl_pre{i}", True, a))
        runs["TRL precompute_ref_log_probs=False"].append(run_trl(model_dir, trl_data, tmp / f"trl_live{i}", False, a))
        print(f"run {i}: " + ", ".join(f"{k} {v[-1]['pairs_per_s']:.2f} pairs/s" for k, v in runs.items()), flush=True)
    print(f"model: {a.model} preset; data: dpo_en_demo.json, {n} pairs ≤ {a.max_len} tokens; batch {MICRO * GAS} pairs "
          f"(micro {MICRO} × accumulation {GAS}); {a.steps} steps; sigmoid β={BETA}; lr {LR}")
    med = {}
    for k, v in runs.items():
        med[k] = statistics.median(r["pairs_per_s"] for r in v)
        print(f"{k:36s} {med[k]:6.2f} pairs/s  setup (model load + reference pass) {v[0]['init_s']:6.1f}s  "
              f"peak RSS {max(r['peak_rss_mb'] for r in v):6.0f} MB  loss per step "
              + " ".join(f"{x:.4f}" for x in v[0]["losses"]))
    shutil.rmtree(tmp, ignore_errors=True)
    dpo = runs["ours (precomputed reference)"][0]
    print(f"reference-free saving against our DPO: no reference pass ({dpo['init_s']:.1f}s avoided, "
          f"{100 * dpo['init_s'] / (dpo['init_s'] + dpo['train_s']):.0f}% of the DPO run's reference pass + steps); "
          f"training pairs/s ratio SimPO / DPO {med['ours SimPO (reference-free)'] / med['ours (precomputed reference)']:.2f}")
    best = max(med["TRL precompute_ref_log_probs=True"], med["TRL precompute_ref_log_probs=False"])
    print(f"dpo pairs/s ratio vs TRL: {med['ours (precomputed reference)'] / best:.2f}")


if __name__ == "__main__":
    main()
