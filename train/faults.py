"""Surviving faults: non-finite steps, dead peer ranks, and the hooks the tests use to inject faults.

* `guarded(optimizer_cls)` — an optimizer whose `step()` is skipped on every rank when any rank saw a
  non-finite loss (reported with `NonFinite.watch`) or holds a non-finite gradient. It sits *inside*
  DeepSpeed (DeepSpeed's ZeRO wrappers call it on their fp32 partitions), so the skip works the same for
  ZeRO 0-3, with or without expert parallelism, and DeepSpeed's micro-step accounting is untouched:
  every micro-batch still calls `engine.backward` and `engine.step`.
* `Watchdog` — a heartbeat thread per rank in the rendezvous store. When a peer's heartbeat is older than
  `dist_timeout_s` (it was killed, its node died, it froze), this rank prints which rank went silent and
  exits instead of waiting in a collective forever. `after_failure` gives a collective error on the
  main thread (gloo notices a closed socket at once) the same treatment. The run holds its watchdog
  (train/runtime.py `Run`).
* `inject(point, step)` — fault injection points for the tests. Nothing is injected unless a test installs
  faults with `install("nan_loss@3", "kill_in_save@4")` in the stage's processes (tests/helpers.py
  `with_faults` does so through a `sitecustomize` module on the test run's PYTHONPATH).
"""

from __future__ import annotations

import atexit
import datetime
import os
import signal
import sys
import threading
import time
import traceback

import torch
import torch.distributed as dist

from model.distributed import all_reduce_here


# ---------------------------------------------------------------------------------------------
# fault injection (tests only)

_INSTALLED: set[str] = set()  # "point@step" entries; empty outside the tests


def install(*faults: str) -> None:
    """Tests only: inject each `point@step` fault (e.g. "nan_loss@3") in this process."""
    _INSTALLED.update(faults)


def inject(point: str, step: int) -> bool:
    """True when a test installed fault `point` at `step` (1-based optimizer step)."""
    return f"{point}@{step}" in _INSTALLED


def swap_two_experts(folder) -> None:
    """`corrupt_export@N`: swap the up projections (w3) of experts 0 and 1 of layer 0 in an exported folder,
    the kind of mistake a wrong expert order would make, for the export check to catch."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    a, b = (f"model.layers.0.block_sparse_moe.experts.{e}.w3.weight" for e in (0, 1))
    for f in sorted(Path(folder).glob("*.safetensors")):
        weights = load_file(f)
        if a in weights and b in weights:
            weights[a], weights[b] = weights[b].clone(), weights[a].clone()
            save_file(weights, f, metadata={"format": "pt"})
            print(f"[fault injection] swapped {a} and {b} in {f}", file=sys.stderr, flush=True)
            return


def pause_if(point: str, step: int, until, timeout_s: float = 120.0) -> None:
    """`pause@N`: wait after step N until `until()` is true (a test sends its signal meanwhile) or the timeout."""
    if inject(point, step):
        print(f"[fault injection] pausing after step {step}", file=sys.stderr, flush=True)
        end = time.monotonic() + timeout_s
        while not until() and time.monotonic() < end:
            time.sleep(0.05)


def kill_self_if(point: str, step: int) -> None:
    if inject(point, step):
        print(f"[fault injection] SIGKILL at {point}@{step}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# non-finite losses and gradients

def guarded(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """`cls` with a `step()` that every rank skips together when any rank saw a non-finite loss or
    gradient. The verdict is one all-reduce (MAX) of a single flag per optimizer step."""

    class Guarded(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.nonfinite_loss = False   # set by NonFinite.watch during the micro-batches
            self.skipped = None           # None: step() not called (DeepSpeed skipped it itself)

        @torch.no_grad()
        def step(self, closure=None):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            device = grads[0].device if grads else torch.device("cpu")
            bad = torch.tensor([float(self.nonfinite_loss)], device=device)
            # A NaN or ±inf anywhere makes its tensor's sum non-finite: one cheap reduction per tensor (a finite
            # gradient whose sum overflows fp32, beyond 3e38, counts as non-finite too).
            if grads:
                sums = torch.stack([g.sum(dtype=torch.float32) for g in grads])
                bad = torch.maximum(bad, (~torch.isfinite(sums).all()).float().reshape(1))
            if dist.is_initialized() and dist.get_world_size() > 1:
                bad = all_reduce_here(bad, dist.ReduceOp.MAX)  # (host gradients under ZeRO-Offload: NCCL)
            self.nonfinite_loss = False
            self.skipped = bool(bad.item())
            self.overflow = self.skipped  # ZeRO-0: DeepSpeed's engine then also holds the LR schedule back
            if self.skipped:
                for g in self.param_groups:
                    for p in g["params"]:
                        p.grad = None
                return None
            return super().step(closure)

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{cls.__name__}"
    return Guarded


class NonFinite:
    """Per-run bookkeeping of skipped steps; `watch` each micro-batch's loss before backward,
    `end_step` once per optimizer step.

        loss = guard.watch(loss, step + 1)
        engine.backward(loss); engine.step()
        ...
        skipped = guard.end_step(engine)
    """

    def __init__(self, optimizer, max_in_a_row: int):
        self.optimizer, self.max_in_a_row = optimizer, max_in_a_row
        self.in_a_row = 0
        self.total = 0
        self._ds_skipped = 0

    def watch(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        if inject("nan_loss", step):
            loss = loss * float("nan")
        if not bool(torch.isfinite(loss.detach()).all()):
            self.optimizer.nonfinite_loss = True
        return loss

    def end_step(self, engine) -> bool:
        """Whether the optimizer step just taken was skipped (by us, or by DeepSpeed's own overflow check)."""
        ds_skipped = int(getattr(engine, "skipped_steps", 0))
        skipped = bool(self.optimizer.skipped) or ds_skipped > self._ds_skipped
        self._ds_skipped = ds_skipped
        self.optimizer.skipped = None
        self.optimizer.nonfinite_loss = False
        self.in_a_row = self.in_a_row + 1 if skipped else 0
        self.total += int(skipped)
        return skipped

    @property
    def must_stop(self) -> bool:
        return self.in_a_row >= self.max_in_a_row


# ---------------------------------------------------------------------------------------------
# dead peers

class Watchdog:
    """Heartbeats in the rendezvous store (`mixtral_tune/heartbeat/<rank>` = unix time, every second)
    from a daemon thread, so they keep coming while the main thread computes or waits in a collective.
    A peer whose heartbeat is older than `timeout_s`, or a store that stops answering for that long,
    makes this rank print the verdict and exit with status 1."""

    def __init__(self, rank: int, world: int, timeout_s: float, stage: str, interval_s: float = 1.0):
        self.rank, self.world, self.timeout_s, self.stage, self.interval_s = rank, world, timeout_s, stage, interval_s
        self.step = 0
        self._stop = threading.Event()
        self._thread = None
        if world > 1:
            host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
            self.store = dist.TCPStore(host, port, world, is_master=False,
                                       timeout=datetime.timedelta(seconds=max(5.0, timeout_s)))
            self._beat()
            self._thread = threading.Thread(target=self._loop, name="mixtral-tune-watchdog", daemon=True)
            self._thread.start()
            atexit.register(self.close)

    def _key(self, rank: int) -> str:
        return f"mixtral_tune/heartbeat/{rank}"

    def _beat(self) -> None:
        self.store.set(self._key(self.rank), f"{time.time():.3f} {self.step}")

    def silent_peers(self) -> list[tuple[int, float, int]]:
        """(rank, seconds since its last heartbeat, its last step) for peers silent for over timeout_s."""
        now, out = time.time(), []
        for r in range(self.world):
            if r == self.rank or not self.store.check([self._key(r)]):
                continue
            value = self.store.get(self._key(r)).decode()
            if value == "done":  # that rank finished its work and exited normally
                continue
            t, step = value.split()
            if now - float(t) > self.timeout_s:
                out.append((r, now - float(t), int(step)))
        return out

    def _loop(self) -> None:
        unreachable_since = None
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                silent = self.silent_peers()
                unreachable_since = None
            except Exception as e:  # the store's host (rank 0 or the launcher) is gone
                unreachable_since = unreachable_since or time.time()
                if time.time() - unreachable_since > self.timeout_s:
                    self._die(f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} "
                              f"has not answered for {self.timeout_s:.0f}s ({type(e).__name__}): rank 0 or the "
                              f"launcher died")
                continue
            if silent:
                self._die("; ".join(f"rank {r} sent no heartbeat for {age:.0f}s (its last step: {step})"
                                    for r, age, step in silent) + ": it died or froze")

    def _die(self, why: str) -> None:
        print(f"[{self.stage}] rank {self.rank}: {why}. Stopping this rank (dist_timeout_s={self.timeout_s:g}). "
              f"Restart with resume=true to continue from the last checkpoint.", file=sys.stderr, flush=True)
        os._exit(1)

    def wait_for_verdict(self) -> None:
        """After a collective failed on the main thread: give the heartbeats time to name the dead rank."""
        deadline = time.time() + self.timeout_s + 3 * self.interval_s
        while time.time() < deadline:  # the thread calls _die when it knows
            time.sleep(self.interval_s)

    def close(self, done: bool = False) -> None:
        """Stop beating; with `done`, tell the peers this rank ended on purpose (they stop waiting for it).
        At exit without `done` (a crash) the peers notice the silence after `timeout_s`."""
        if self._thread is None or self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if done:
            try:
                self.store.set(self._key(self.rank), "done")
            except Exception:
                pass


def after_failure(dog: Watchdog, error: BaseException) -> None:
    """`error` escaped a stage's work (train/runtime.py `Run.__exit__`): on a multi-rank run, wait (at most
    `dist_timeout_s`) for the watchdog to name a dead peer, which ends the process. A purely local error
    (every peer still beating, nothing collective in the message) returns at once, to be raised."""
    if dog.world == 1 or not isinstance(error, Exception):
        return
    traceback.print_exception(error)
    try:
        local = not dog.silent_peers()
    except Exception:
        local = False
    if local and not _looks_distributed(error):
        return
    dog.wait_for_verdict()


def _looks_distributed(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))

