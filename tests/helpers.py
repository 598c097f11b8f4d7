"""Run the stage scripts the way a user does (`torchrun ... train/<stage>.py key=value`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_stage(stage: str, out: Path, overrides: list[str], nproc: int = 2, timeout: int = 600, check: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train" / f"{stage}.py"), f"output_dir={out}", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def losses(out: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in metrics(out)]


def crash_after(full: Path, crashed: Path, step: int) -> None:
    """A copy of a finished run as if it had died right after the checkpoint of `step`."""
    import shutil

    shutil.copytree(full, crashed)
    ckpt = crashed / "checkpoints"
    for tag in ckpt.glob("step_*"):
        if int(tag.name.split("_")[1]) > step:
            shutil.rmtree(tag)
    shutil.rmtree(crashed / "hf", ignore_errors=True)
    (ckpt / "latest").write_text(f"step_{step}")
