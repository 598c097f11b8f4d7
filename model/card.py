"""The export's model card (`README.md`): what the model is, how it was made, how to use it.

The YAML front matter is what the Hugging Face Hub reads (license, base_model, datasets, tags), plus
`mixtral_tune_stages`: one entry per stage that made the model, carried over from the card of the
`model_path` a stage started from, so a DPO export lists pretrain → SFT → DPO with each stage's data,
sample counts, steps and final metrics.
"""

from __future__ import annotations

from pathlib import Path

import yaml

FINAL_KEYS = ("loss", "ce", "dpo", "aux", "z", "rewards/accuracy", "rewards/margins", "grad_norm")


def read_stages(model_path: str | None) -> tuple[list[dict], str | None]:
    """(stages, root base model) recorded in the card of `model_path`, if it is one of our exports."""
    if not model_path:
        return [], None
    card = Path(model_path) / "README.md"
    if not card.is_file():
        return [], model_path  # a hub id or someone else's folder: that is the base model
    meta = front_matter(card.read_text())
    return list(meta.get("mixtral_tune_stages") or []), meta.get("base_model")


def front_matter(text: str) -> dict:
    """The YAML between the leading `---` lines of a model card ({} if none)."""
    if not text.startswith("---\n"):
        return {}
    end = text.find("\n---", 4)
    return yaml.safe_load(text[4:end]) or {} if end > 0 else {}


FORMATS = {
    "v1": "Mistral's v1 `[INST]` format, which the chat template in `tokenizer_config.json` applies (`<s>[INST] user "
          "[/INST] answer</s>[INST] ...`, a system prompt joined to the first user turn by a blank line)",
    "v3": "Mistral's v3 format (Mixtral-8x22B's: `[INST]`, `[/INST]`, `[AVAILABLE_TOOLS]`, `[TOOL_CALLS]`, "
          "`[TOOL_RESULTS]` are control tokens), which the chat template in `tokenizer_config.json` applies, tools "
          "included (`apply_chat_template(messages, tools=tools)`; a system prompt joins the last user turn)",
}


def model_card(cfg, data: dict, final: dict, parameters: int, recipe: str | None, repo_id: str | None = None,
               tokenizer_version: str = "v1", resumes: list | None = None) -> str:
    """Markdown model card for the export of a finished stage.

    Args:
        cfg: the stage's resolved config.
        data: the data report (records, rows, real_tokens, label_tokens, skipped) of this stage.
        final: the last metrics row (loss terms, DPO rewards).
        parameters: the model's parameter count.
        recipe: the recipe the stage ran (`recipe=` on the command line), if any.
        repo_id: the Hub repository the folder is pushed to, used in the usage snippet.
        tokenizer_version: "v1" or "v3" (data/tokenizer.py), for the prompt format.
        resumes: config.yaml's `resumes` ({"step", "changed": {key: [before, after]}}, train/contract.py).
    """
    stages, base = read_stages(cfg.model_path)
    this = {"stage": cfg.stage, "data": str(cfg.data.path), "records": int(data.get("records", 0)),
            "rows": int(data.get("rows", 0)), "tokens": int(data.get("real_tokens", 0)), "steps": int(cfg.max_steps),
            "lora": bool(cfg.lora.enabled), "recipe": recipe, "tokenizer": tokenizer_version,
            "final": {k: round(float(final[k]), 6) for k in FINAL_KEYS if k in final}}
    if resumes:
        this["resumes"] = [{"step": r["step"], "changed": {k: [str(v) for v in ba] for k, ba in r["changed"].items()}}
                           for r in resumes]
    stages = [*stages, this]
    datasets = sorted({s["data"] for s in stages if s["data"] != "synthetic"})
    meta = {"license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["mixtral", "moe", "mixtral-tune", *dict.fromkeys(s["stage"] for s in stages)]}
    if base:
        meta["base_model"] = base
    if datasets:
        meta["datasets"] = datasets
    meta["mixtral_tune_stages"] = stages
    size = f"{parameters / 1e9:.1f} B" if parameters >= 1e9 else f"{parameters / 1e6:.1f} M"
    where = repo_id or str(Path(cfg.output_dir).resolve() / "hf")
    origin = (f"fine-tuned from `{base}`" if base else
              f"trained from a randomly initialised preset, continued from `{cfg.model_path}`" if cfg.model_path else
              f"trained from a randomly initialised `{cfg.model.name}` preset")
    rows = "\n".join(
        f"| {i + 1} | {s['stage']}{' (LoRA, merged)' if s.get('lora') else ''} | `{s['data']}` | {s['records']} records → "
        f"{s['rows']} rows, {s['tokens']} tokens | {s['steps']} | "
        + ", ".join(f"{k} {v:.4g}" for k, v in s["final"].items()) + " |"
        for i, s in enumerate(stages))
    resumed = "".join(
        f"\nResumed at step {r['step']}" + (": " + ", ".join(f"{k} {a} → {b}" for k, (a, b) in r["changed"].items())
                                            if r["changed"] else " with the same settings") + "."
        for r in this.get("resumes", []))
    knobs = (f"ZeRO stage {cfg.deepspeed.get('zero_optimization', {}).get('stage', 0)}, expert_parallel_size "
             f"{cfg.expert_parallel_size}, global batch {cfg.global_batch_size} × {cfg.max_seq_len} tokens, "
             f"{cfg.optim.name} lr {cfg.optim.lr}, router aux {cfg.router.aux_loss_coef}, z {cfg.router.z_loss_coef}")
    return f"""---
{yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).strip()}
---

# {Path(cfg.output_dir).name}

A Mixtral sparse mixture-of-experts model ({size} parameters), {origin}, by mixtral-tune.
Last stage: **{cfg.stage}**{f" (recipe `{recipe}`)" if recipe else ""}; {knobs}. The fully resolved configuration
is `training_config.yaml` in this folder.{resumed}

## Stages

| # | stage | data | samples | steps | final metrics |
|---|---|---|---|---|---|
{rows}

## Intended use

Research and further fine-tuning of Mixtral chat models. Prompts use {FORMATS[tokenizer_version]}. The model inherits the biases of its base model and
data and has no safety tuning beyond what its stages' data taught it; evaluate it before any use.

## Usage

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{where}"
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
messages = [{{"role": "user", "content": "What is the capital of France?"}}]
ids = tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)["input_ids"]
out = model.generate(ids, max_new_tokens=32)  # greedy, stops at </s> (generation_config.json)
print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
```

Serving and conversion: the weights are in the hub layout (`block_sparse_moe.experts.E.w1|w2|w3`), which
vLLM, TGI and llama.cpp's `convert_hf_to_gguf.py` read as they read mistralai's Mixtral.

## License

Apache-2.0, as Mixtral's weights; the training data keep their own licenses.
"""
