"""Hub names without a network (data/hub.py): one line and status 2, with no retries, when the Hugging Face
cache has no copy; a run from the cache when it has one. The Hub is made unreachable for certain by pointing
HF_ENDPOINT at a closed local port, and the cache is a fresh folder (HF_HOME)."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO, losses

CLOSED = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


def _env(tmp_path, **extra):
    return {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "HF_ENDPOINT": CLOSED,
            "HF_HOME": str(tmp_path / "hf_home"), **extra}


def _run(args, env):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("key, name, kind, offline", [
    ("model_path", "mistralai/Mixtral-8x7B-v0.1", "model", False),
    ("model_path", "mistralai/Mixtral-8x7B-v0.1", "model", True),
    ("data.path", "tatsu-lab/alpaca", "dataset", False),
])
def test_an_unreachable_hub_name_is_one_line_and_status_2(key, name, kind, offline, tmp_path):
    env = _env(tmp_path, **({"HF_HUB_OFFLINE": "1"} if offline else {}))
    proc = _run(["train/sft.py", "recipe=tiny/sft", f"output_dir={tmp_path / 'run'}", f"{key}={name}"], env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face Hub (127.0.0.1) cannot be reached from this machine"
    assert f"{key}={name}: not a local path, {why}, and the Hugging Face cache has no copy of this {kind}" in lines[0]
    assert f"`hf download {name}" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr and "Retrying" not in proc.stdout + proc.stderr


def test_a_cached_hub_model_trains_without_the_hub(tmp_path):
    """A hub model in the Hugging Face cache (laid out as `hf download` leaves it) is used as it is."""
    from omegaconf import OmegaConf

    from data.tokenizer import default_tokenizer_path
    from model.build import build_model
    from train.config import compose

    snapshot = tmp_path / "hf_home" / "hub" / "models--acme--tiny-mixtral" / "snapshots" / ("a" * 40)
    build_model(OmegaConf.to_container(compose("sft").model), seed=0).save_pretrained(snapshot)
    shutil.copy(default_tokenizer_path(), snapshot / "tokenizer.model")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    out = tmp_path / "run"
    proc = _run(["train/sft.py", "recipe=tiny/sft", f"output_dir={out}", "model_path=acme/tiny-mixtral", "max_steps=2",
                 "data.synthetic_samples=32", "global_batch_size=2", "micro_batch_size=2", "verify_export=false"],
                _env(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(out)) == 2
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == "mixtral"
