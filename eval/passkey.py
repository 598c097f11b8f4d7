"""Passkey retrieval, the protocol of Landmark Attention (Mohtashami & Jaggi 2023) that the Mixtral
paper reports:

    <task description>
    <filler × a>                     (a = depth × n repeats of the filler)
    The pass key is K. Remember it. K is the pass key.
    <filler × (n − a)>
    What is the pass key? The pass key is

over a grid of context lengths (tokens) × depths (0 = key at the start, 1 = just before the
question), N seeded trials per cell, greedy decoding; a trial is correct iff the first number the
model generates equals K. `mode=completion` feeds the raw text (base models); `mode=chat` wraps it
in [INST] ... [/INST] (chat models; the trailing "The pass key is" is left out of the question).

    python eval/passkey.py model_path=outputs/tiny/sft/hf output_dir=outputs/passkey lengths=[256,512]

Writes `passkey.json` (settings and per-cell accuracy), `passkey.png` (heatmap, fixed 0-1 scale),
`passkey.md` (the same table).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

from data.chat import encode_prompt
from eval.config import PasskeyConfig, validate_eval
from train import cli, console

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
CHAT_QUESTION = "What is the pass key?"


def passkey_text(n_filler: int, depth: float, key: int, mode: str = "completion") -> str:
    before = round(n_filler * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    prefix = " ".join([FILLER] * before)
    suffix = " ".join([FILLER] * (n_filler - before))
    question = QUESTION if mode == "completion" else CHAT_QUESTION
    return "\n".join(part for part in (TASK, prefix, needle, suffix, question) if part)


def prompt_ids(text: str, tokenizer, mode: str) -> list[int]:
    if mode == "chat":
        return encode_prompt([{"role": "user", "content": text}], tokenizer)
    return [tokenizer.bos_id] + tokenizer.encode(text)


def filler_for_length(length: int, tokenizer, mode: str) -> int:
    """Largest number of filler repeats whose prompt (key 99999 at depth 0.5) fits in `length` tokens."""
    lo, hi = 0, max(1, length // 10)
    while len(prompt_ids(passkey_text(hi, 0.5, 99999, mode), tokenizer, mode)) <= length:
        lo, hi = hi, hi * 2
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(prompt_ids(passkey_text(mid, 0.5, 99999, mode), tokenizer, mode)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return lo


def first_number(text: str) -> str | None:
    m = re.search(r"\d+", text)
    return m.group(0) if m else None


def default_lengths(max_positions: int) -> list[int]:
    lengths, n = [], 256
    while n <= max_positions:
        lengths.append(n)
        n *= 2
    return lengths


def run_grid(model, tokenizer, lengths, depths, trials: int, mode: str, seed: int = 0, batch_size: int = 8,
             max_new_tokens: int = 10, progress: bool = True) -> list[dict]:
    """Per-cell results [{length, depth, correct, trials, accuracy, examples}]."""
    from eval.generate import generate

    rng = random.Random(seed)
    jobs = []  # (cell, key, prompt)
    for length in lengths:
        n = filler_for_length(length, tokenizer, mode)
        for depth in depths:
            for _ in range(trials):
                key = rng.randint(10000, 99999)
                jobs.append(((length, depth), key, prompt_ids(passkey_text(n, depth, key, mode), tokenizer, mode)))
    outs = generate(model, tokenizer, [j[2] for j in jobs], max_new_tokens=max_new_tokens, temperature=0.0,
                    batch_size=batch_size, progress=progress, desc="passkey")
    cells: dict = {}
    for (cell, key, prompt), out in zip(jobs, outs):
        text = tokenizer.decode(out)
        c = cells.setdefault(cell, {"length": cell[0], "depth": cell[1], "correct": 0, "trials": 0,
                                    "prompt_tokens": len(prompt), "examples": []})
        c["trials"] += 1
        c["correct"] += int(first_number(text) == str(key))
        if len(c["examples"]) < 2:
            c["examples"].append({"key": key, "generated": text})
    for c in cells.values():
        c["accuracy"] = c["correct"] / c["trials"]
    return list(cells.values())


def markdown_table(cells: list[dict], lengths, depths) -> str:
    acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    head = "| length \\ depth | " + " | ".join(f"{d:.0%}" for d in depths) + " | mean |"
    lines = [head, "|" + "---|" * (len(depths) + 2)]
    for L in lengths:
        row = [acc[(L, d)] for d in depths]
        lines.append(f"| {L} | " + " | ".join(f"{a:.2f}" for a in row) + f" | {sum(row) / len(row):.2f} |")
    return "\n".join(lines)


def heatmap(cells: list[dict], lengths, depths, path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    acc = {(c["length"], c["depth"]): c["accuracy"] for c in cells}
    grid = np.array([[acc[(L, d)] for L in lengths] for d in depths])
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(lengths), 1.2 + 0.5 * len(depths)))
    im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(model, tokenizer, cfg, out_dir: str | Path, progress: bool = True) -> dict:
    """Run the grid and write passkey.json / .png / .md into `out_dir`; returns the JSON dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lengths = list(cfg.lengths) if cfg.lengths else default_lengths(model.config.max_position_embeddings)
    depths = list(cfg.depths)
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths={depths}: each depth must be within [0, 1]")
    if max(lengths) > model.config.max_position_embeddings:
        raise ValueError(f"lengths={lengths} exceed the model's max_position_embeddings={model.config.max_position_embeddings}")
    cells = run_grid(model, tokenizer, lengths, depths, cfg.trials, cfg.mode, cfg.seed, cfg.batch_size,
                     cfg.max_new_tokens, progress)
    result = {"settings": {"model_path": str(cfg.model_path), "mode": cfg.mode, "lengths": lengths, "depths": depths,
                           "trials": cfg.trials, "seed": cfg.seed, "protocol": "landmark-attention passkey"},
              "accuracy": sum(c["correct"] for c in cells) / sum(c["trials"] for c in cells),
              "cells": cells}
    (out / "passkey.json").write_text(json.dumps(result, indent=2))
    table = markdown_table(cells, lengths, depths)
    (out / "passkey.md").write_text(f"# Passkey retrieval ({cfg.mode})\n\n{table}\n\noverall accuracy: {result['accuracy']:.3f}\n")
    heatmap(cells, lengths, depths, out / "passkey.png", f"passkey ({cfg.mode}), {cfg.trials} trials/cell")
    return result


@cli.main("passkey", PasskeyConfig, validate_eval)
def main(cfg) -> None:
    from eval.generate import load

    model, tokenizer = load(cfg.model_path, cfg.dtype)
    result = evaluate(model, tokenizer, cfg, cfg.output_dir)
    out = Path(cfg.output_dir)
    print((out / "passkey.md").read_text())
    console.summary("passkey", time.time() - console.STARTED, [f"retrieval accuracy {result['accuracy']:.3f}"],
                    [out / "passkey.json", out / "passkey.png", out / "passkey.md"])


if __name__ == "__main__":
    main()
