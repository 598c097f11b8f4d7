"""Checkpoints: save (atomic, with the data position and the layout record), resume (same layout through
DeepSpeed, another layout through portable checkpoints: train/elastic.py), the allow-list of classes a
checkpoint may hold, and stopping with a checkpoint after non-finite steps."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from model.distributed import deepspeed_checkpoint_globals, deepspeed_config
from model.load import placement
from train import elastic, faults
from train.contract import complete_checkpoints
from train.runtime import Run
from train.stops import STOPS, NAMES, resume_command


def checkpoint_dir(run: Run) -> Path:
    return run.out / "checkpoints"


def prepare_elastic_resume(cfg, run: Run, ds: dict) -> None:
    """Before `deepspeed.initialize`: when `resume=true` finds a checkpoint written under another world size,
    expert-parallel size or ZeRO stage, convert it to a portable checkpoint (train/elastic.py) that
    `maybe_resume` loads into the new engine. A changed global batch or LoRA setting is refused."""
    ckpt = checkpoint_dir(run)
    tags = complete_checkpoints(ckpt) if cfg.resume and ckpt.is_dir() else []
    run.resume_from = elastic.prepare(cfg, run, ds, ckpt, tags, lambda message: _refuse(cfg, run, message))


def _refuse(cfg, run: Run, message: str) -> None:
    if run.main:
        print(f"[{cfg.stage}] config error: {message}", file=sys.stderr, flush=True)
    run.finished()
    sys.exit(2)


def save_checkpoint(engine, cfg, run: Run, step: int, extra: dict | None = None) -> None:
    """Checkpoint `step_<n>`: DeepSpeed's files plus the data position (`client_state["step"]`) and every
    rank's RNG states. Atomic: everything is written under `.step_<n>.partial`; after a barrier (every
    rank done) rank 0 renames it to `step_<n>` and then replaces `latest` (write + rename), so a crash at
    any point leaves the previous checkpoint as the one `resume=true` loads. Only the newest
    `keep_checkpoints` are kept."""
    ckpt = checkpoint_dir(run)
    final, partial = ckpt / f"step_{step}", ckpt / f".step_{step}.partial"
    if run.main:
        shutil.rmtree(partial, ignore_errors=True)  # debris of a crash mid-save
        shutil.rmtree(final, ignore_errors=True)    # an older run's step_<n> beyond where we resumed
    run.barrier()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain tensors and lists only, so resuming loads it with torch.load(weights_only=True)
    rng = {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
           "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss], "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    partial.mkdir(parents=True, exist_ok=True)
    torch.save(rng, partial / f"rng_rank{run.rank}.pt")
    engine.save_checkpoint(str(ckpt), tag=partial.name, client_state={"step": step, **(extra or {})}, save_latest=False)
    if run.main:
        (partial / elastic.LAYOUT_FILE).write_text(json.dumps(elastic.checkpoint_record(engine, cfg, run.world, step)))
    faults.kill_self_if("kill_in_save", step)  # tests: die with the files written but not yet published
    faults.pause_if("pause_in_save", step, lambda: False, timeout_s=20)  # tests: a second Ctrl-C while saving
    run.barrier()
    if run.main:
        os.replace(partial, final)
        tmp = ckpt / "latest.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, ckpt / "latest")
        tags = complete_checkpoints(ckpt)
        for old in tags[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    run.barrier()
    STOPS.saved()


def maybe_resume(engine, cfg, run: Run) -> tuple[int, dict]:
    """Load the newest complete checkpoint when `resume=true`; returns (step to start at, client state).
    DeepSpeed's own files are unpickled with torch.load(weights_only=True) plus an allow-list of the few
    DeepSpeed classes they hold (`safe_checkpoint_loading`); our RNG files are plain tensors."""
    ckpt = checkpoint_dir(run)
    if not cfg.resume:
        return 0, {}
    if not (ckpt / "latest").is_file():
        run.print(f"[{cfg.stage}] resume=true but no checkpoint in {ckpt}: starting from step 0")
        return 0, {}
    # A `step_<n>` folder gets its name only once complete, so the newest one is the one to load
    # (`latest` may lag behind it by one if the crash fell between the rename and `latest`'s update).
    tags = complete_checkpoints(ckpt)
    if not tags:
        raise RuntimeError(f"{ckpt / 'latest'} exists but {ckpt} holds no complete step_<n> checkpoint")
    tag = tags[-1].name
    run.barrier()
    if run.main:
        for debris in ckpt.glob(".step_*.partial"):
            run.print(f"[{cfg.stage}] removing {debris} (a checkpoint interrupted while being written)")
            shutil.rmtree(debris, ignore_errors=True)
    if run.resume_from is not None:  # another layout: the portable checkpoint, re-sliced for this one
        p = placement(deepspeed_config(cfg, run.world, run.dtype, run.model_config), run.rank)
        step = elastic.load_portable(engine, run.resume_from, run.model_config, p.ep_size, p.ep_rank)["step"]
        run.print(f"[{cfg.stage}] resumed from {run.resume_from} at step {step} (random states start afresh "
                  f"from seed {cfg.seed}: the old ranks' states do not map onto the new ones)")
        return step, {"step": step}
    # A 4-bit base (model.quantize=nf4) is read again from model_path, not from the checkpoint: bitsandbytes'
    # Linear4bit writes its quantization state beside each weight (`weight.absmax`, ...), keys that a module
    # loaded afresh has no slot for; the trainable adapters are in the checkpoint as always.
    with safe_checkpoint_loading(engine):
        path, client = engine.load_checkpoint(str(ckpt), tag=tag, load_module_strict=cfg.model.quantize == "none")
    if path is None:
        raise RuntimeError(f"could not load checkpoint {ckpt / tag}")
    step = int(client["step"])
    elastic.set_schedule(engine.lr_scheduler, engine.lr_scheduler.last_epoch)  # this run's schedule from here on
    rng = torch.load(ckpt / tag / f"rng_rank{run.rank}.pt", weights_only=True)
    version, state, gauss_next = rng["python"]
    random.setstate((version, tuple(state), gauss_next))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    run.print(f"[{cfg.stage}] resumed from {ckpt / tag} at step {step}")
    return step, client


@contextlib.contextmanager
def safe_checkpoint_loading(engine):
    """Make DeepSpeed's checkpoint engine unpickle with `weights_only=True`, allowing only the DeepSpeed
    and Python classes its files are known to hold (loss scalers, enums, ...); anything else fails
    loudly instead of running code from the checkpoint."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ce = getattr(engine, "checkpoint_engine", None)
    if not isinstance(ce, TorchCheckpointEngine):
        yield
        return
    original = ce.load

    def load(path, map_location=None):
        with torch.serialization.safe_globals(deepspeed_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    ce.load = load
    try:
        yield
    finally:
        ce.load = original


def end_of_step(engine, cfg, run: Run, guard: faults.NonFinite, step: int) -> None:
    """After each optimizer step: stop (with a checkpoint) if too many steps in a row were non-finite or a rank
    got Ctrl-C / SIGTERM (train/stops.py), and save a checkpoint every `checkpoint_every` steps and when
    `checkpoint_minutes` have passed since the last one (the last one is saved by finish)."""
    stop_if_diverged(engine, cfg, run, guard, step)
    faults.pause_if("pause", step, lambda: STOPS.signum)  # tests: wait here for the signal they send
    signum, due = STOPS.after_step(cfg.checkpoint_minutes)
    if signum:
        stop_interrupted(engine, cfg, run, step, signum)
    if step < cfg.max_steps and (due or cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
        save_checkpoint(engine, cfg, run, step)


def stop_interrupted(engine, cfg, run: Run, step: int, signum: int) -> None:
    """Every rank: checkpoint this step, then one line with the command that continues, status 128 + signal."""
    save_checkpoint(engine, cfg, run, step)
    if run.main:
        print(f"[{cfg.stage}] stopped by {NAMES.get(signum, signum)} after step {step}/{cfg.max_steps}; checkpoint "
              f"{checkpoint_dir(run) / f'step_{step}'}; continue with: {resume_command(cfg.stage)}",
              file=sys.stderr, flush=True)
    run.finished()
    sys.exit(128 + signum)


def stop_if_diverged(engine, cfg, run: Run, guard: faults.NonFinite, step: int) -> None:
    """After `max_bad_steps` non-finite steps in a row: checkpoint (the weights are those before the bad
    steps, which were skipped) and stop with status 3."""
    if not guard.must_stop:
        return
    save_checkpoint(engine, cfg, run, step)
    run.print(f"[{cfg.stage}] stopping: {guard.in_a_row} optimizer steps in a row (up to step {step}) had a non-finite "
              f"loss or gradient and were skipped ({guard.total} in all). Checkpoint saved in {checkpoint_dir(run)}. "
              f"Lower optim.lr, raise optim.warmup_steps or check the data, then rerun with resume=true.")
    run.finished()
    sys.exit(3)
