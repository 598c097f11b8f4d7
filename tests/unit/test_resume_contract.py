"""The resume contract (train/contract.py): a resumed run refuses, in one line before anything loads, a key its
checkpoint was trained with; a key that may change is applied and recorded in config.yaml and the model card."""

import os
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from helpers import REPO, losses, run_stage
from train.config import ConfigError, compose
from train.contract import check_resume, resume_history

TINY = ["recipe=tiny/sft", "max_steps=30", "checkpoint_every=5"]


@pytest.fixture
def sft_folder(tmp_path):
    out = tmp_path / "int2"
    out.mkdir()
    (out / "config.yaml").write_text(OmegaConf.to_yaml(compose("sft", [*TINY, f"output_dir={out}"]), resolve=True)
                                     + "tokenizer_used:\n  version: v1\n")
    return out


@pytest.mark.parametrize("stage, overrides, key, before, after", [
    ("sft", ["optim.lr=0.05"], "optim.lr", 0.003, 0.05),
    ("pretrain", ["recipe=tiny/pretrain"], "stage", "sft", "pretrain"),
    ("sft", ["global_batch_size=16"], "global_batch_size", 8, 16),
    ("sft", ["lora.enabled=true"], "lora.enabled", False, True),
    ("sft", ["model=small"], "model.name", "tiny", "small"),
    ("sft", ["data.path=other.jsonl"], "data.path", "synthetic", "other.jsonl"),
    ("sft", ["precision=bf16"], "precision", "auto", "bf16"),
])
def test_a_key_the_checkpoint_was_trained_with_is_refused(sft_folder, stage, overrides, key, before, after):
    base = [o for o in TINY if not (stage == "pretrain" and o.startswith("recipe="))]
    cfg = compose(stage, [*base, *overrides, f"output_dir={sft_folder}", "resume=true"])
    with pytest.raises(ConfigError) as err:
        check_resume(cfg)
    assert str(err.value).startswith(f"resume=true: {key} was {before!r} in {sft_folder / 'config.yaml'}, this "
                                     f"command has {after!r}; a resumed run keeps it"), str(err.value)


def test_keys_that_may_change_are_recorded(sft_folder):
    cfg = compose("sft", [*TINY[:1], "max_steps=60", "checkpoint_every=10", "micro_batch_size=2",
                          f"output_dir={sft_folder}", "resume=true"])
    check_resume(cfg)  # accepted
    assert resume_history(cfg, 30) == [{"step": 30, "changed": {"checkpoint_every": [5, 10], "max_steps": [30, 60],
                                                                 "micro_batch_size": [4, 2]}}]
    assert resume_history(compose("sft", [*TINY, f"output_dir={sft_folder}"]), 30) == []  # not a resume


def test_the_command_line_refuses_in_one_line_before_loading(sft_folder):
    """`python train/pretrain.py` on an SFT folder: status 2, one line, nothing written."""
    before = (sft_folder / "config.yaml").read_text()
    proc = subprocess.run([sys.executable, "train/pretrain.py", "recipe=tiny/pretrain", f"output_dir={sft_folder}",
                           "resume=true"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("config error: resume=true: stage was 'sft'")
    assert (sft_folder / "config.yaml").read_text() == before


def test_a_longer_run_is_applied_and_recorded(tmp_path):
    """Train 4 steps, then resume=true max_steps=6: 2 more steps on the schedule of 6 steps (the rate logged is
    the one applied), config.yaml and the model card say so."""
    from train.model_setup import lr_lambda

    out = tmp_path / "run"
    common = ["recipe=tiny/sft", "deepspeed=zero0", "data.synthetic_samples=64", "global_batch_size=4",
              "micro_batch_size=4", "optim.warmup_steps=0", "optim.schedule=linear", "verify_export=false",
              "checkpoint_every=2"]
    run_stage("sft", out, [*common, "max_steps=4"], nproc=1)
    proc = run_stage("sft", out, [*common, "max_steps=6", "resume=true"], nproc=1)
    assert "resumed from" in proc.stdout
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["resumes"] == [{"step": 4, "changed": {"max_steps": [4, 6]}}]
    lrs = losses(out, "lr")
    assert len(lrs) == 6
    f4, f6 = lr_lambda(OmegaConf.create(saved | {"max_steps": 4})), lr_lambda(OmegaConf.create(saved))
    assert lrs == pytest.approx([3e-3 * f4(k) for k in range(4)] + [3e-3 * f6(k) for k in (4, 5)])
    card = (out / "hf" / "README.md").read_text()
    assert "Resumed at step 4: max_steps 4 → 6." in card
