"""Between two steps: stop on Ctrl-C / SIGTERM with the work saved, and checkpoint when one is due.

    Ctrl-C or SIGTERM, on any rank    every rank finishes the step it is in; then a checkpoint is written
                                      and rank 0 prints one line with the command that continues the run;
                                      exit status 130 (SIGINT) or 143 (SIGTERM) on every rank
    before the first step             nothing to save: one line, the same status
    a second Ctrl-C                   (more than REPEAT_S after the first) ends the process at once
    checkpoint_minutes (default 30)   a checkpoint when this long has passed since the last one (or the start),
                                      besides every `checkpoint_every` steps

The ranks agree through one all-reduce (MAX) of [signal, checkpoint due] after each step, so all of them
stop, or save, at the same step. `python train/sft.py --nproc_per_node N` (train/cli.py `launch`) leaves Ctrl-C
to the workers; plain `torchrun` also forwards it to them (a repeat within REPEAT_S is the same request) and
prints its own report after ours.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time

import torch
import torch.distributed as dist

from model.distributed import all_reduce_here

REPEAT_S = 2.0   # a signal this soon after the first is the same request (torchrun forwards the terminal's)
NAMES = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}


class Stops:
    """One per process (`STOPS`): the signal handlers and the checkpoint clock."""

    def __init__(self):
        self.signum = 0
        self.first_at = 0.0
        self.training = False
        self.stage = "run"
        self.last_save = time.monotonic()

    def install(self, stage: str) -> None:
        """Handle SIGINT and SIGTERM from now on (`runtime.start`)."""
        self.stage = stage
        for sig in NAMES:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        now = time.monotonic()
        if self.signum:
            if now - self.first_at > REPEAT_S:  # a second Ctrl-C: at once
                os._exit(128 + signum)
            return
        self.signum, self.first_at = signum, now
        if not self.training:  # setting up (loading, tokenizing): nothing to save yet
            if os.environ.get("RANK", "0") == "0":
                print(f"[{self.stage}] interrupted by {NAMES.get(signum, signum)} before the first step: nothing to "
                      f"save", file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        if os.environ.get("RANK", "0") == "0":
            print(f"[{self.stage}] {NAMES.get(signum, signum)}: finishing this step, then saving a checkpoint "
                  f"(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def start_training(self) -> None:
        """From the first step on, a signal is handled between steps (`checkpoints.maybe_resume`)."""
        self.training = True
        self.last_save = time.monotonic()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def after_step(self, minutes: float) -> tuple[int, bool]:
        """(the signal every rank agrees to stop for, 0 for none; whether a timed checkpoint is due)."""
        due = float(minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes)
        flags = torch.tensor([float(self.signum), due])
        if dist.is_initialized() and dist.get_world_size() > 1:
            flags = all_reduce_here(flags, dist.ReduceOp.MAX)
        return int(flags[0]), bool(flags[1])


STOPS = Stops()


def resume_command(stage: str) -> str:
    """The command that continues this run: the one that started it, with resume=true (and no overwrite)."""
    overrides = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") not in ("resume", "overwrite")]
    script = f"train/{stage}.py"
    launch = os.environ.get("MIXTRAL_TUNE_LAUNCH_FLAGS")  # set by train/cli.py `launch`: its torchrun flags
    if launch is not None:
        head = f"python {script} {launch}"
    elif "TORCHELASTIC_RUN_ID" in os.environ:  # plain torchrun
        nodes = int(os.environ.get("WORLD_SIZE", "1")) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        head = (f"torchrun --nproc_per_node {os.environ.get('LOCAL_WORLD_SIZE', '1')}"
                + (f" --nnodes {nodes} (and your rendezvous flags)" if nodes > 1 else "") + f" {script}")
    else:
        head = f"python {script}"
    return " ".join([head, *map(shlex.quote, overrides), "resume=true"])
