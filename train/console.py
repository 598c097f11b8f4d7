"""What a person sees in a terminal or a log file: third-party noise silenced at its source (`setup()` runs
first in every command, train/cli.py), progress as a bar or as plain lines, and the summary that ends a run.

Each item was seen in a run's log and is understood:

* DeepSpeed warns "Setting accelerator to CPU. If you have GPU ..." when it finds no GPU by itself:
  `DS_ACCELERATOR=cpu` says so upfront on a machine without CUDA (a GPU machine auto-detects silently).
* DeepSpeed compiles its CPU shared-memory collective op in `init_distributed` and the compiler's command
  lines go to the terminal: `build_output_to(<output_dir>/build.log)` sends them (and any build error) there.
* "You are using ZeRO with an untested optimizer": the stages hand DeepSpeed torch's AdamW / SGD on purpose
  (`zero_allow_untested_optimizer`); tests/distributed compare every ZeRO layout with one rank.
* FutureWarning "`torch.distributed.all_gather_into_tensor` is deprecated": DeepSpeed's own calls.
* Progress bars of datasets, huggingface_hub and transformers write `\\r` into log files: off when stderr
  is not a terminal (the stages then print plain progress lines instead).

torchrun's own "Setting OMP_NUM_THREADS environment variable ..." banner comes from the launcher before any
of this runs; `OMP_NUM_THREADS=<n> torchrun ...` avoids it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings

STARTED = time.time()  # when the command started (this module is imported first by train/cli.py)


def is_terminal() -> bool:
    return sys.stderr.isatty() or os.environ.get("MIXTRAL_TUNE_PROGRESS") == "1"


class _DropKnown(logging.Filter):
    KNOWN = ("untested optimizer",
             "gemm_4bit_forward from kernels-community")  # bitsandbytes' optional CPU kernel, unused (model/quantize.py)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(k in record.getMessage() for k in self.KNOWN)


def setup() -> None:
    """Environment and filters before any third-party import of consequence (idempotent)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+ is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logging.getLogger("DeepSpeed").addFilter(_DropKnown())
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_DropKnown())
    if not is_terminal():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        try:
            import datasets
            import transformers

            datasets.disable_progress_bars()
            transformers.utils.logging.disable_progress_bar()
        except ImportError:
            pass


@contextlib.contextmanager
def build_output_to(path):
    """Send everything written to this process's stdout/stderr file descriptors (compilers run by
    DeepSpeed's op builder write there directly) to `path` while the block runs."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True, lines: int = 10):
    """A tqdm bar in a terminal; otherwise about `lines` plain lines (`[desc] 30/100 (30%), 12s elapsed,
    ETA 28s`), so a log file gets no `\\r`."""
    import time

    from tqdm import tqdm

    if not enabled:
        yield from iterable
        return
    if is_terminal():
        yield from tqdm(iterable, desc=desc, total=total, dynamic_ncols=True)
        return
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    t0, every = time.time(), max(1, (total or 10) // lines)
    done = 0
    for item in iterable:
        yield item
        done += 1
        if done % every == 0 or done == total:
            elapsed = time.time() - t0
            share = f"/{total} ({100 * done / total:.0f}%)" if total else ""
            eta = f", ETA {duration(elapsed / done * (total - done))}" if total else ""
            print(f"[{desc}] {done}{share}, {duration(elapsed)} elapsed{eta}", flush=True)


def loss_terms(values: dict, cfg) -> str:
    """`loss 9.9556 = ce 9.9447 + aux 0.0109 (0.01 × 1.0907)`: the weighted terms add up to the total."""
    orpo = "dpo" in values and cfg.dpo.loss_type == "orpo"  # ORPO's loss holds the NLL at weight 1
    stage = [("dpo", 1.0), ("nll", 1.0 if orpo else cfg.dpo.sft_weight)] if "dpo" in values else [("ce", 1.0)]
    terms = [(k, w) for k, w in [*stage, ("aux", cfg.router.aux_loss_coef), ("z", cfg.router.z_loss_coef)]
             if w and k in values]
    label = {"dpo": cfg.dpo.loss_type} if "dpo" in values and cfg.dpo.loss_type in ("kto", "orpo", "simpo") else {}
    parts = [f"{label.get(k, k)} {values[k]:.4f}" if w == 1.0 else f"{k} {w * values[k]:.4f} ({w:g} × {values[k]:.4f})"
             for k, w in terms]
    return f"loss {values['loss']:.4f} = " + " + ".join(parts)


def summary(tag: str, seconds: float, results: list[str], files) -> None:
    """The block that ends every stage and eval: wall time, final results, every file written."""
    from pathlib import Path

    lines = [f"wall time {duration(seconds)}", *results, "files:"]
    for f in files:
        f = Path(f)
        if f.is_dir():
            inside = [p for p in f.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in inside)
            lines.append(f"  {f}/  ({len(inside)} files, {size / 2**20:.1f} MiB)")
        elif f.is_file():
            lines.append(f"  {f}  ({f.stat().st_size / 2**10:.1f} KiB)")
    width = max(len(l) for l in lines) + 2
    print(f"[{tag}] {'─' * 8} summary {'─' * max(0, width - 17)}", flush=True)
    for line in lines:
        print(f"[{tag}] {line}", flush=True)
