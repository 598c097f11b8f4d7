"""Layouts that cannot work are refused before any weight is read (train/preflight.py)."""

import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from model.build import mixtral_config
from train import preflight
from train.config import ConfigError, compose

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def config_folder(tmp_path, model="mixtral_8x7b", **changes):
    """A folder with only a config.json: loading any weight from it would fail."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = mixtral_config(OmegaConf.to_container(compose("sft", [f"model={model}"]).model)).to_dict()
    cfg.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_expert_parallel_size_is_checked_against_config_json(tmp_path):
    folder = config_folder(tmp_path, model="tiny", num_local_experts=6)
    cfg = compose("sft", ["recipe=tiny/sft", f"model_path={folder}", "expert_parallel_size=4"])  # preset says 8
    with pytest.raises(ConfigError, match=r"expert_parallel_size=4 does not divide num_local_experts=6 of model_path="):
        preflight.check(cfg, world=4, local_world=4, dtype=torch.float32)


def test_expert_groups_must_not_straddle_nodes():
    cfg = compose("sft", ["recipe=tiny/sft", "expert_parallel_size=2"])
    with pytest.raises(ConfigError, match="3 ranks per node"):
        preflight.check(cfg, world=6, local_world=3, dtype=torch.float32)
    preflight.check(cfg, world=8, local_world=4, dtype=torch.float32)   # EP 2 within a node of 4
    cfg = compose("sft", ["recipe=tiny/sft", "expert_parallel_size=4"])
    preflight.check(cfg, world=4, local_world=2, dtype=torch.float32)   # EP 4 over two whole nodes of 2


def test_a_model_that_cannot_fit_is_refused_with_the_numbers(tmp_path):
    cfg = compose("sft", ["recipe=tiny/sft", f"model_path={config_folder(tmp_path)}", "deepspeed=zero3"])
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg, world=2, local_world=2, dtype=torch.bfloat16)
    msg = str(err.value)
    assert "46.70B parameters" in msg and "ZeRO-3" in msg and "plan.enforce=false" in msg and "GiB" in msg
    ok = compose("sft", ["recipe=tiny/sft", f"model_path={tmp_path}", "deepspeed=zero3", "plan.enforce=false"])
    assert "46.70B parameters" in preflight.check(ok, world=2, local_world=2, dtype=torch.bfloat16)


def test_stage_command_refuses_in_one_line_before_loading(tmp_path):
    """The folder has no weights at all: exit 2 with one line proves nothing was loaded."""
    folder = config_folder(tmp_path / "m")
    proc = subprocess.run([sys.executable, str(REPO / "train" / "sft.py"), "recipe=tiny/sft", f"model_path={folder}",
                           f"output_dir={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if "config error" in l]
    assert len(lines) == 1 and "46.70B parameters" in lines[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
