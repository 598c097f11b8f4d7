"""Routing analysis (the Mixtral paper's §5 / Fig. 7-8): which experts each layer selects for
different kinds of text, and how often consecutive tokens go to the same expert.

    python eval/routing.py model_path=outputs/sft/hf output_dir=outputs/routing \
        +data.code=src.txt +data.prose=book.jsonl

For each named subset (text file or jsonl with a `text` field; default: the project's synthetic
arithmetic / capitals / passkey texts) and each layer: the fraction of top-k assignments per expert,
and the rates at which token t's first choice equals token t−1's first choice ("first") or is one
of t−1's top-k ("first or second" for Mixtral). Uniform routing gives 1/E and k/E. Writes
`routing.json` and `routing.png`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from eval.config import RoutingConfig, validate_eval
from model.router import RouterLogitsRecorder
from train import cli, console


def subset_texts(data: dict) -> dict[str, list[str]]:
    if not data:
        from data import synthetic

        docs = synthetic.pretrain_texts(60, seed=123)
        return {"arithmetic": docs[0::3], "capitals": docs[1::3], "passkey": docs[2::3]}
    out = {}
    for name, path in data.items():
        p = Path(path)
        if p.suffix == ".jsonl":
            out[name] = [json.loads(l)["text"] for l in p.read_text().splitlines() if l.strip()]
        else:
            out[name] = [p.read_text()]
    return out


@torch.no_grad()
def analyse(model, tokenizer, texts: list[str], max_tokens: int = 4096, seq_len: int = 512) -> dict:
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    recorder = RouterLogitsRecorder(model)
    ids = []
    for t in texts:
        ids += [tokenizer.bos_id] + tokenizer.encode(t)
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    L = recorder.num_layers
    counts = torch.zeros(L, E, dtype=torch.float64)
    same_first = torch.zeros(L)
    same_topk = torch.zeros(L)
    pairs = 0
    for s in range(0, len(ids), seq_len):
        chunk = torch.tensor([ids[s:s + seq_len]], device=model.device)
        with recorder:
            model(input_ids=chunk, use_cache=False)
        for layer, logits in enumerate(recorder.logits):
            top = logits.float().topk(k, -1).indices.cpu()  # (T, k)
            counts[layer] += torch.nn.functional.one_hot(top, E).sum((0, 1)).double()
            if top.shape[0] > 1:
                same_first[layer] += (top[1:, 0] == top[:-1, 0]).sum()
                same_topk[layer] += (top[1:, :1] == top[:-1]).any(-1).sum()
        pairs += chunk.shape[1] - 1
    recorder.remove()
    return {"tokens": len(ids), "load": (counts / counts.sum(-1, keepdim=True)).tolist(),
            "same_expert_first": (same_first / max(pairs, 1)).tolist(),
            "same_expert_topk": (same_topk / max(pairs, 1)).tolist(),
            "uniform_first": 1 / E, "uniform_topk": k / E}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(result)
    L = len(result[names[0]]["load"])
    layers = sorted({0, L // 2, L - 1})
    E = len(result[names[0]]["load"][0])
    fig, axes = plt.subplots(1, len(layers), figsize=(4 * len(layers), 3), squeeze=False)
    width = 0.8 / len(names)
    for ax, layer in zip(axes[0], layers):
        for i, n in enumerate(names):
            ax.bar(np.arange(E) + i * width, result[n]["load"][layer], width, label=n)
        ax.axhline(1 / E, color="gray", ls="--", lw=1)
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_ylabel("fraction of assignments")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@cli.main("routing", RoutingConfig, validate_eval)
def main(cfg) -> None:
    from eval.generate import load

    model, tokenizer = load(cfg.model_path, cfg.dtype)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {name: analyse(model, tokenizer, texts, cfg.max_tokens, cfg.seq_len)
              for name, texts in subset_texts(dict(cfg.data)).items()}
    (out / "routing.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "routing.png")
    for name, r in result.items():
        print(f"{name}: {r['tokens']} tokens; same first expert as previous token per layer: "
              + ", ".join(f"{x:.2f}" for x in r["same_expert_first"]) + f" (uniform {r['uniform_first']:.2f})")
    console.summary("routing", time.time() - console.STARTED, [f"{len(result)} subsets: {', '.join(result)}"],
                    [out / "routing.json", out / "routing.png"])


if __name__ == "__main__":
    main()
