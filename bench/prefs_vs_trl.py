"""KTO, SimPO and ORPO against TRL's KTOTrainer, CPOTrainer (loss_type="simpo") and ORPOTrainer (CPU): the same
model, token ids, order, batch, optimizer and LR, one process each.

    python bench/prefs_vs_trl.py [--steps 10] [--max-len 512] [--model small] [--pairs N] [--methods kto simpo orpo]

1. Losses, step by step (the `tiny` preset, 3 steps): one batch holding all the data, so that the batches are
   the same sets on both sides whatever the order, and KTO's KL rows pair the same completions with the same
   prompts (8 examples with distinct prompts: TRL rotates completions by one within the batch, ours take the
   nearest earlier example's; data/preference.py `with_kl_completions`). Plain SGD (lr 1, no clipping) on both
   sides, so that fp32's last bits stay last bits (Adam's first step divides each gradient by its own size);
   the steps after the first test the updates. Printed: both sides' losses and the largest relative gap. ORPO:
   its odds-ratio term at step 1 (ours `dpo`, TRL −β·`log_odds_ratio`): TRL's ORPOTrainer takes its NLL over the
   prompt and the answer, ours over the chosen answer (the ORPO paper's L_SFT; our SFT stage's labels too), so
   the totals and later steps differ by design.
2. Throughput (the `--model` preset, `--steps` steps): LLaMA-Factory's dpo_en_demo.json pairs whose prompt +
   longer answer fit `--max-len` tokens; KTO on the pairs split in two (chosen desirable, rejected
   undesirable: twice as many examples). Batch: 8 pairs or examples (micro 4 × accumulation 2), β 0.1 (SimPO β 2,
   γ 0.5), AdamW(0.9, 0.95) lr 1e-4 constant, clip 1.0, fp32, router aux off. Ours: `train/dpo.py` on DeepSpeed
   ZeRO-0, KTO with its default precomputed reference; TRL's KTOTrainer with precompute_ref_log_probs=True.
   Reported: examples (KTO) or pairs (SimPO, ORPO) per second from step 2 on, setup, peak RSS. Last line:
       prefs examples/s ratio vs TRL (lowest of kto, simpo, orpo): X.XX
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from _common import demo_pairs, run_stage_measured, run_worker, save_model

MICRO, GAS, LR, BETA = 4, 2, 1e-4, 0.1
SETTINGS = {"kto": {"beta": BETA}, "simpo": {"beta": 2.0, "simpo_gamma": 0.5}, "orpo": {"beta": BETA}}
TRL_NAME = {"kto": "KTOTrainer", "simpo": "CPOTrainer(simpo)", "orpo": "ORPOTrainer"}


def write_data(tmp: Path, method: str, pairs: list[tuple[dict, dict]], order: list[int], split: str) -> tuple[Path, Path]:
    """Our data file (canonical records) and TRL's (token ids, rows in `order`). KTO: `split="both"` gives each pair's
    two examples, side by side; "alternate" one example per pair, chosen and rejected by turns (distinct prompts)."""
    from data.formats import unpair

    if method == "kto":
        ours = [u for i, (c, _) in enumerate(pairs) for j, u in enumerate(unpair(c)) if split == "both" or j == i % 2]
        ids = [{"prompt_ids": p["prompt_ids"], "completion_ids": p[f"{side}_ids"], "label": side == "chosen"}
               for i, (_, p) in enumerate(pairs) for j, side in enumerate(("chosen", "rejected"))
               if split == "both" or j == i % 2]
    else:
        ours, ids = [c for c, _ in pairs], [p for _, p in pairs]
    a, b = tmp / f"{method}_{split}.jsonl", tmp / f"{method}_{split}_ids_in_order.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in ours))
    b.write_text("".join(json.dumps(ids[i]) + "\n" for i in order))
    return a, b


def run_ours(method: str, model_dir: Path, data: Path, out: Path, steps: int, micro: int, gas: int, lr: float,
             max_len: int, sgd: bool = False) -> dict:
    s = SETTINGS[method]
    m, rss, _ = run_stage_measured("dpo", [
        "recipe=tiny/dpo", f"model_path={model_dir}", f"data.path={data}", "data.dedup=false",
        f"data.format={'unpaired' if method == 'kto' else 'preference'}", f"max_seq_len={max_len}",
        f"global_batch_size={micro * gas}", f"micro_batch_size={micro}", f"max_steps={steps}", f"optim.lr={lr}",
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0",
        *(["optim.name=sgd", "optim.grad_clip=0"] if sgd else ["optim.grad_clip=1.0"]),
        "router.aux_loss_coef=0", "router.z_loss_coef=0", f"dpo.loss_type={method}", "dpo.sft_weight=0",
        *[f"dpo.{k}={v}" for k, v in s.items()], "deepspeed=zero0", "export=false", "precision=fp32"], out)
    timed = m[1:]
    n = sum(r.get("examples", r.get("pairs", 0)) for r in timed)
    return {"examples_per_s": n / sum(r["step_time_s"] for r in timed) if timed else 0.0,
            "losses": [r["loss"] for r in m], "metrics": m, "peak_rss_mb": rss}


def run_trl(method: str, model_dir: Path, data: Path, out: Path, steps: int, micro: int, gas: int, lr: float,
            sgd: bool = False) -> dict:
    from data.tokenizer import default_tokenizer_path

    shutil.rmtree(out, ignore_errors=True)
    return run_worker("_trl_prefs_worker.py", {
        "method": method, "data": str(data), "tokenizer": str(default_tokenizer_path()), "model": str(model_dir),
        "out": str(out), "micro": micro, "gas": gas, "steps": steps, "lr": lr, "sgd": sgd, **SETTINGS[method]})


def compared(method: str, ours: dict, theirs: dict) -> tuple[list[float], list[float]]:
    """The losses the two sides define alike: every step's loss, or ORPO's odds-ratio term at step 1."""
    if method == "orpo":
        return [ours["metrics"][0]["dpo"]], [-SETTINGS["orpo"]["beta"] * theirs["logs"][0]["log_odds_ratio"]]
    return ours["losses"], theirs["losses"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--max-len", dest="max_len", type=int, default=512)
    p.add_argument("--model", default="small", help="model preset (configs/model) of the throughput runs")
    p.add_argument("--pairs", type=int, default=None, help="throughput on the first N pairs that fit (default: all)")
    p.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    a = p.parse_args()
    from data.dataset import GlobalBatches

    tmp = Path(tempfile.mkdtemp(prefix="bench_prefs_"))
    pairs = demo_pairs(a.max_len, a.pairs)
    # 1. losses on one batch holding all the data
    tiny = save_model(tmp / "tiny", "tiny")
    few = demo_pairs(256, 8)
    gaps = {}
    for method in a.methods:
        ours_data, trl_data = write_data(tmp, method, few, list(range(len(few))), "alternate")
        ours = run_ours(method, tiny, ours_data, tmp / f"check_{method}", 3, len(few), 1, 1.0, 256, sgd=True)
        theirs = run_trl(method, tiny, trl_data, tmp / f"check_trl_{method}", 3, len(few), 1, 1.0, sgd=True)
        a_, b_ = compared(method, ours, theirs)
        gaps[method] = max(abs(x - y) / abs(y) for x, y in zip(a_, b_))
        what = "odds-ratio term at step 1" if method == "orpo" else "loss per step"
        print(f"{method:6s} {what}, one batch of all {len(few)} {'examples' if method == 'kto' else 'pairs'}: ours "
              + " ".join(f"{x:.6f}" for x in a_) + f" | TRL {TRL_NAME[method]} " + " ".join(f"{x:.6f}" for x in b_)
              + f" | largest relative gap {gaps[method]:.1e}", flush=True)
    # 2. throughput
    model_dir = save_model(tmp / "model", a.model)
    ratios = {}
    for method in a.methods:
        n = len(pairs) * (2 if method == "kto" else 1)
        order = [i for s in range(a.steps) for i in GlobalBatches(n, MICRO * GAS, seed=0).global_rows(s)]
        ours_data, trl_data = write_data(tmp, method, pairs, order, "both")
        ours = run_ours(method, model_dir, ours_data, tmp / method, a.steps, MICRO, GAS, LR, a.max_len)
        theirs = run_trl(method, model_dir, trl_data, tmp / f"trl_{method}", a.steps, MICRO, GAS, LR)
        ratios[method] = ours["examples_per_s"] / theirs["examples_per_s"]
        unit = "examples" if method == "kto" else "pairs"
        print(f"{method:6s} ours {ours['examples_per_s']:6.2f} {unit}/s (peak RSS {ours['peak_rss_mb']:.0f} MB) | TRL "
              f"{TRL_NAME[method]} {theirs['examples_per_s']:6.2f} {unit}/s (peak RSS {theirs['peak_rss_mb']:.0f} MB) | "
              f"ratio {ratios[method]:.2f}", flush=True)
    print(f"model: {a.model} preset; data: dpo_en_demo.json, {len(pairs)} pairs ≤ {a.max_len} tokens; batch {MICRO * GAS} "
          f"(micro {MICRO} × accumulation {GAS}); {a.steps} steps; lr {LR}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"prefs largest first-steps loss gap vs TRL: {max(gaps.values()):.1e}")
    print(f"prefs examples/s ratio vs TRL (lowest of {', '.join(a.methods)}): {min(ratios.values()):.2f}")


if __name__ == "__main__":
    main()
