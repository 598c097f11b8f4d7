"""Peak memory of every rank, phase by phase (load, engine, first step, later steps, export).

Host memory is the process's peak resident set (`VmHWM` in /proc/self/status), reset at the start of
each phase by writing 5 to /proc/self/clear_refs (Linux ≥ 4.0); GPU memory is
`torch.cuda.max_memory_allocated`, reset likewise. `end(phase)` gathers every rank's peaks (all ranks
call it), prints one line on rank 0 and keeps them; `summary()` is what goes into the first step's
`metrics.jsonl` row, and `save()` writes `<output_dir>/memory.json` with every phase.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import re
from pathlib import Path

import torch
import torch.distributed as dist


def peak_rss_bytes(field: str = "VmHWM") -> int:
    """This process's peak resident set since the last reset (VmHWM; `field="VmRSS"`: the current one), 0
    where /proc is absent."""
    try:
        return int(re.search(field + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        return 0


def reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # peaks then run from the process start: still an upper bound


def set_mmap_threshold(nbytes: int) -> bool:
    """glibc: serve every allocation of at least `nbytes` with its own mmap, so freeing it returns the pages to
    the OS at once (and trim the heap top beyond `nbytes`). Loading reads tensors of a few MB and frees them,
    and with glibc's default (a threshold that rises to 32 MB) those freed pages stay in the heap, counted in
    the process's RSS: bench/load_memory.py measured 1.4× the model's bytes above baseline per rank with the
    default, 0.95× with 1 MiB. During training the stages use 32 MiB (1 MiB made every activation a fresh
    mmap: a ZeRO-0 CPU step fell from MFU 0.68 to 0.44), and 4 MiB under ZeRO-3, where every step gathers
    and frees each layer's parameters (first-step peak 1.38× → 0.97× of the model above baseline).
    False where there is no glibc. These settings are the stages' own, for every run; the key
    `malloc_mmap_threshold` replaces them (e.g. 131072: RSS then follows the bytes allocated, as the planner
    counts them, tests/bench/test_plan_accuracy.py)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, nbytes)) and bool(libc.mallopt(m_trim_threshold, nbytes))
    except (OSError, AttributeError, TypeError):
        return False


class PhaseMemory:
    def __init__(self, run, stage: str):
        self.run, self.stage = run, stage
        self.phases: dict[str, dict] = {}
        self.begin()

    def begin(self) -> None:
        self.start_rss = peak_rss_bytes("VmRSS")  # the phase's baseline (train/plan.py's figures sit above it)
        reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def end(self, phase: str) -> dict:
        mine = {"rss": peak_rss_bytes(), "start": self.start_rss,
                "device": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0}
        every = [mine]
        if dist.is_initialized() and dist.get_world_size() > 1:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        record = {"peak_rss_bytes": [m["rss"] for m in every], "peak_device_bytes": [m["device"] for m in every],
                  "start_rss_bytes": [m["start"] for m in every]}
        self.phases[phase] = record
        rss = record["peak_rss_bytes"]
        line = (f"[{self.stage}] memory, {phase}: peak RSS per rank "
                + " ".join(f"{r / 2**30:.2f}" for r in rss) + " GiB")
        if any(record["peak_device_bytes"]):
            line += ", peak GPU memory " + " ".join(f"{d / 2**30:.2f}" for d in record["peak_device_bytes"]) + " GiB"
        self.run.print(line)
        self.begin()
        return record

    def summary(self) -> dict:
        return {phase: dict(r) for phase, r in self.phases.items()}

    def save(self) -> None:
        if self.run.main:
            (self.run.out / "memory.json").write_text(json.dumps(self.phases, indent=2) + "\n")
