"""The resume contract: what `resume=true` may change, and the record of what each segment of a run used.

A resumed run continues the weights, optimizer state, schedule and data order of its checkpoint, so a key that
shaped them cannot take a new value silently. `check_resume` (train/checks.py, before anything starts)
compares the command's config with the run's `config.yaml` and refuses, in one line naming the key and both
values (exit 2), any change outside `MAY_CHANGE`:

    may change (applied from the resumed step on)     max_steps (the schedule is rebuilt for the new length),
                                                      output_dir (a run folder moved or copied),
                                                      checkpoint_every, keep_checkpoints, logging, export,
                                                      the layout (world size, expert_parallel_size, ZeRO stage,
                                                      deepspeed, micro_batch_size, sequence_parallel_size),
                                                      memory knobs (model.gradient_checkpointing, ...), hub, plan
    may not                                           stage, model and model_path, lora, data, global_batch_size,
                                                      max_seq_len, precision, optim, router, dpo, seed

Each resume is appended to `config.yaml`'s `resumes` list ({"step", "changed": {key: [before, after]}}), and the
model card lists them (model/card.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from train.config import ConfigError

MAY_CHANGE = ("output_dir", "max_steps", "checkpoint_every", "checkpoint_minutes", "keep_checkpoints", "resume",
              "overwrite", "export", "verify_export", "dist_timeout_s", "malloc_mmap_threshold", "max_bad_steps", "expert_parallel_size", "sequence_parallel_size", "micro_batch_size",
              "deepspeed", "logging", "plan", "hub", "recipe_name", "model.gradient_checkpointing",
              "model.attn_implementation", "model.experts_implementation", "model.tiled_mlp_tokens", "data.num_proc",
              "data.cache_dir")
RECORDS = ("tokenizer_used", "resumes")  # what a run writes into its config.yaml, not options
MODES = ("resume", "overwrite")          # how the command treats output_dir: not a change of the run
FIRST = ("stage", "model.name", "model_path")  # reported first when several keys changed


def flatten(tree, prefix: str = "") -> dict:
    """{"optim.lr": 3e-4, ...} of a nested dict (lists are values)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def may_change(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)


def _saved(cfg) -> tuple[Path, dict] | None:
    path = Path(os.path.expanduser(cfg.output_dir)) / "config.yaml"
    if not (cfg.resume and path.is_file()):
        return None
    import yaml

    return path, yaml.safe_load(path.read_text()) or {}


def _changes(cfg, saved: dict) -> dict:
    from omegaconf import OmegaConf

    before = flatten({k: v for k, v in saved.items() if k not in RECORDS})
    after = flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    keys = [k for k in after if k in before and before[k] != after[k] and k not in MODES]
    return {k: [before[k], after[k]] for k in sorted(keys, key=lambda k: (k not in FIRST, FIRST.index(k) if k in FIRST else 0, k))}


def check_resume(cfg) -> None:
    """Refuse (ConfigError, one line) a resume that changes a key outside `MAY_CHANGE`, or that has no checkpoint
    to continue from in a folder where a run took steps."""
    out = os.path.expanduser(cfg.output_dir)
    work = earlier_work(out) if cfg.resume and os.path.isdir(out) else []
    if work and "checkpoints" not in work:
        raise ConfigError(f"resume=true: output_dir={cfg.output_dir} holds a run ({', '.join(work)}) but "
                          f"no checkpoint to continue from (it stopped before checkpoint_every or checkpoint_minutes "
                          f"saved one); overwrite=true starts it afresh")
    found = _saved(cfg)
    if found is None:
        return
    path, saved = found
    for key, (before, after) in _changes(cfg, saved).items():
        if not may_change(key):
            raise ConfigError(f"resume=true: {key} was {before!r} in {path}, this command has {after!r}; a resumed run "
                              f"keeps it (its checkpoint was trained with it): drop the override, or start a new run "
                              f"(overwrite=true or another output_dir)")


def resume_history(cfg, step: int | None) -> list[dict]:
    """config.yaml's `resumes` for this run: the earlier segments' list, plus this resume (the step it starts
    from and the keys it changed) when `resume=true` continues a checkpoint."""
    found = _saved(cfg)
    if found is None or step is None:
        return []
    _, saved = found
    history = list(saved.get("resumes") or [])
    return history + [{"step": step, "changed": _changes(cfg, saved)}]


def complete_checkpoints(ckpt: Path) -> list[Path]:
    """The published `step_<n>` folders, oldest first (a folder gets that name only once complete)."""
    return sorted((p for p in ckpt.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))


def earlier_work(out: str) -> list[str]:
    """What in `out` shows that a run took at least one step: logged steps, a checkpoint, an export. A run that
    stopped before its first step (a data error, a bad layout) leaves only its config, logs and report."""
    found = []
    metrics = os.path.join(out, "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        found.append("metrics.jsonl")
    ckpt = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt) and any(n.startswith("step_") for n in os.listdir(ckpt)):
        found.append("checkpoints")
    found += [n for n in ("hf", "hf.check_failed", "adapter") if os.path.isdir(os.path.join(out, n))]
    return found
