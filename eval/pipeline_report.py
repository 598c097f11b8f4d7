"""The embedded pipeline's evaluation and report (train/pipeline.py runs it after the three stages, as a user
would: `python eval/pipeline_report.py` with the pipeline's own settings): held-out loss, exact match, DPO reward
accuracy, passkey retrieval, routing drift, expert load, optionally MT-Bench answers, written to
`<output_dir>/report.md` (+ PNGs) and `summary.json`.

    python eval/pipeline_report.py                  # the report of outputs/pipeline's finished stages
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf

from eval import curriculum, mt_bench, passkey
from eval.config import PasskeyConfig
from eval.generate import load
from train import cli
from train.config import PipelineConfig
from train.metrics import load_heatmap


def metrics(stage_dir: Path) -> list[dict]:
    return [json.loads(l) for l in (stage_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]


def loss_plot(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    for ax, (name, key) in zip(axes, (("pretrain", "ce"), ("sft", "ce"), ("dpo", "dpo"))):
        m = metrics(out / name)
        ax.plot([r["step"] for r in m], [r[key] for r in m])
        ax.set_title(f"{name}: {key}")
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)


def drift_section(out: Path) -> str:
    """The DPO stage's routing drift (train/dpo.py: its routers against the reference's over the answer tokens):
    `drift.png` (per layer, router KL and load shift over the steps) and the report's paragraph."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = [r for r in metrics(out / "dpo") if "drift/kl_layers" in r]
    if not m:
        return "No routing drift was measured (dpo.drift_every=0 with a precomputed reference)."
    steps, layers = [r["step"] for r in m], len(m[0]["drift/kl_layers"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for key, ax, title in (("drift/kl_layers", axes[0], "router KL(policy ‖ reference)"),
                           ("drift/load_shift_layers", axes[1], "expert load shift (total variation)")):
        for l in range(layers):
            ax.plot(steps, [r[key][l] for r in m], marker="o", label=f"layer {l}")
        ax.set_title(title)
        ax.set_xlabel("DPO step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "drift.png", dpi=100)
    plt.close(fig)
    last = m[-1]
    rows = "\n".join(f"| {l} | {last['drift/kl_layers'][l]:.4f} | {last['drift/load_shift_layers'][l]:.3f} |"
                      for l in range(layers))
    return (f"Measured every {steps[1] - steps[0] if len(steps) > 1 else steps[0]} steps against the starting (SFT) "
            f"model over the answer tokens; at step {last['step']}:\n\n| layer | router KL | load shift |\n|---|---|---|\n"
            f"{rows}\n\n![routing drift](drift.png)")


def evaluate(cfg, out: Path, walls: dict) -> str:
    import torch

    from data import synthetic

    torch.manual_seed(cfg.seed)
    n = cfg.heldout
    pre, pre_tok = load(out / "pretrain" / "hf")
    sft, _ = load(out / "sft" / "hf")
    dpo, _ = load(out / "dpo" / "hf")
    tok = pre_tok
    # pretraining: held-out documents (a different seed: new passkeys, new fact orderings)
    train_docs = synthetic.pretrain_texts(2000, seed=cfg.seed)
    heldout_docs = synthetic.pretrain_texts(n, seed=cfg.seed + 999)
    pre_loss = curriculum.heldout_loss(pre, tok, heldout_docs)
    uni_loss = curriculum.unigram_loss(tok, train_docs, heldout_docs)
    # SFT and DPO: held-out prompts and pairs
    chats = synthetic.sft_chats(n, seed=cfg.seed, split="heldout")
    pairs = synthetic.preference_pairs(cfg.heldout_pairs, seed=cfg.seed, split="heldout")
    em = {name: curriculum.exact_match(m, tok, chats) for name, m in (("pretrain", pre), ("sft", sft), ("dpo", dpo))}
    beta = OmegaConf.load(out / "dpo" / "config.yaml").dpo.beta
    pref = curriculum.preference_eval(dpo, sft, tok, pairs, beta)
    pref_kind = {kind: curriculum.preference_eval(dpo, sft, tok, [p for p in pairs if (" + " in p["chosen"]) == (kind == "sums")],
                                                  beta)["reward_accuracy"] for kind in ("sums", "capitals")}
    pref_sft = curriculum.preference_eval(sft, sft, tok, pairs, beta)
    pk_cfg = OmegaConf.merge(OmegaConf.structured(PasskeyConfig), {"model_path": str(out / "dpo" / "hf"),
                             "lengths": list(cfg.passkey_lengths), "depths": list(cfg.passkey_depths),
                             "trials": cfg.passkey_trials, "mode": "completion", "seed": cfg.seed})
    pk_pre = passkey.evaluate(pre, tok, OmegaConf.merge(pk_cfg, {"model_path": str(out / "pretrain" / "hf")}),
                              out / "passkey_pretrain", progress=False)
    pk = passkey.evaluate(dpo, tok, pk_cfg, out / "passkey", progress=False)
    loss_plot(out)
    stage_rows = []
    for name in ("pretrain", "sft", "dpo"):
        m = metrics(out / name)
        load_heatmap(m[-1]["expert_load"], f"{name}: expert load at step {m[-1]['step']}", out / f"experts_{name}.png")
        key = "dpo" if name == "dpo" else "ce"
        stage_rows.append(f"| {name} | {len(m)} | {m[0][key]:.3f} → {m[-1][key]:.3f} | {m[-1]['aux']:.3f} | "
                          f"{sum(m[-1]['dead_experts'])} | {sum(r['tokens'] for r in m) / max(1e-9, sum(r['step_time_s'] for r in m)):.0f} | "
                          f"{walls[name]:.0f} s |")
    mt = ""
    if cfg.mt_bench.questions:
        mt_cfg = OmegaConf.create({"model_path": str(out / "dpo" / "hf"), "model_id": "pipeline-dpo",
                                   "output_dir": str(out / "mt_bench"), "questions": cfg.mt_bench.questions,
                                   "judge_prompts": None, "reference_answers": None,
                                   "max_new_tokens": cfg.mt_bench.max_new_tokens, "batch_size": 16,
                                   "limit": cfg.mt_bench.limit, "seed": cfg.seed, "dtype": "auto",
                                   "judge": {"base_url": cfg.mt_bench.judge_base_url, "model": cfg.mt_bench.judge_model,
                                             "api_key_env": cfg.mt_bench.judge_api_key_env, "max_tokens": 2048,
                                             "temperature": 0.0, "retries": 5, "timeout_s": 120.0, "concurrency": 4}})
        s = mt_bench.run(mt_cfg, dpo, tok, progress=False)
        mt = (f"\n## MT-Bench\n\n{s['answers']} questions answered (two turns each) in "
              f"`mt_bench/model_answer/pipeline-dpo.jsonl`.\n" + (s.get("table", "No judge configured "
              "(mt_bench.judge_base_url): answers only.") + "\n"))
    report = f"""# Embedded pipeline report

Tiny Mixtral ({cfg.model} preset, 8 experts top-2, vocabulary 32000) trained from scratch on CPU,
{cfg.nproc} ranks, on the curriculum of `data/synthetic.py`. Total wall time: {sum(walls.values()):.0f} s
(+ evaluation).

## Stages

| stage | steps | loss first → last | aux (1.0 = balanced) | dead experts (last step) | tokens/s | wall |
|---|---|---|---|---|---|---|
{chr(10).join(stage_rows)}

![losses](loss.png)

Expert load at the last step of each stage: ![pretrain](experts_pretrain.png) ![sft](experts_sft.png) ![dpo](experts_dpo.png)

## Routing drift during DPO

{drift_section(out)}

## What each stage learned (held-out)

| measurement | value |
|---|---|
| pretraining: held-out loss (nats/token) | {pre_loss:.3f} |
| unigram baseline on the same documents | {uni_loss:.3f} |
| SFT exact match on held-out prompts: before SFT (pretrained) | {em['pretrain']['exact_match']:.1%} |
| SFT exact match: after SFT | {em['sft']['exact_match']:.1%} |
| DPO held-out reward accuracy (policy vs SFT reference), {pref['n']} pairs | {pref['reward_accuracy']:.1%} (sums {pref_kind['sums']:.1%}, capitals {pref_kind['capitals']:.1%}) |
| DPO held-out reward margin | {pref['reward_margin']:.3f} (SFT vs itself: {pref_sft['reward_margin']:.3f}) |
| exact match after DPO | {em['dpo']['exact_match']:.1%} |
| passkey accuracy, pretrained model (completion) | {pk_pre['accuracy']:.1%} |
| passkey accuracy, final model (completion) | {pk['accuracy']:.1%} |

Examples after SFT: {json.dumps(em['sft']['examples'][:3], ensure_ascii=False)}

## Passkey retrieval (lengths the model was trained at)

Pretrained model (completion):

{passkey.markdown_table(pk_pre['cells'], list(cfg.passkey_lengths), list(cfg.passkey_depths))}

Final model (completion):

{passkey.markdown_table(pk['cells'], list(cfg.passkey_lengths), list(cfg.passkey_depths))}

![passkey, pretrained](passkey_pretrain/passkey.png) ![passkey, final](passkey/passkey.png)
{mt}"""
    summary = {"pretrain_heldout_loss": pre_loss, "unigram_loss": uni_loss,
               "exact_match": {k: v["exact_match"] for k, v in em.items()},
               "dpo_reward_accuracy": pref["reward_accuracy"], "dpo_reward_accuracy_by_kind": pref_kind, "dpo_reward_margin": pref["reward_margin"],
               "passkey_pretrain": pk_pre["accuracy"], "passkey_final": pk["accuracy"], "wall_s": walls}
    (out / "report.md").write_text(report)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return report


@cli.main("pipeline", PipelineConfig)
def main(cfg) -> None:
    out = Path(cfg.output_dir)
    walls = {}
    for name in ("pretrain", "sft", "dpo"):
        done = out / name / "DONE"
        if not done.is_file():
            raise SystemExit(f"[pipeline] {done} is missing: run `python train/pipeline.py` first")
        walls[name] = json.loads(done.read_text())["wall_s"]
    print(evaluate(cfg, out, walls))
    print(f"[pipeline] report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
