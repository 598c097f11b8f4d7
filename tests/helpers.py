"""Run the stage scripts the way a user does (`torchrun ... train/<stage>.py key=value`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_cmd(stage: str, out: Path, overrides: list[str], nproc: int = 2) -> tuple[list[str], dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(REPO / "train" / f"{stage}.py"), f"output_dir={out}", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return cmd, env


def run_stage(stage: str, out: Path, overrides: list[str], nproc: int = 2, timeout: int = 600, check: bool = True,
              env: dict | None = None):
    cmd, base_env = stage_cmd(stage, out, overrides, nproc)
    proc = subprocess.run(cmd, cwd=REPO, env={**base_env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def metrics(out: Path) -> list[dict]:
    """metrics.jsonl rows; a last line still being written (or cut by a kill) is left out."""
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def losses(out: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in metrics(out)]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
