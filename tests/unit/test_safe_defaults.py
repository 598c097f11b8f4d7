"""Safe defaults: checkpoints are not unpickled as arbitrary objects, weights come from safetensors only,
remote code is never run, configs refuse nonsense before any heavy work."""

import os
import pickle
import types

import pytest
import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum

from model.build import build_model
from train.checkpoints import safe_checkpoint_loading
from train.checks import validate
from train.config import ConfigError, compose


class Payload:
    """What a poisoned checkpoint would carry: unpickling it runs code."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _engine():
    return types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())


def test_deepspeed_checkpoint_files_load_weights_only(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"module": {"w": torch.ones(2)}, "zero_stage": ZeroStageEnum.gradients,
                "loss_scaler": LossScaler(1.0), "ds_version": "0.19.8"}, good)
    evil = tmp_path / "evil.pt"
    torch.save({"module": {"w": torch.ones(2)}, "client_state": Payload()}, evil)
    engine = _engine()
    with safe_checkpoint_loading(engine):
        sd = engine.checkpoint_engine.load(str(good))
        assert torch.equal(sd["module"]["w"], torch.ones(2)) and sd["zero_stage"] == ZeroStageEnum.gradients
        with pytest.raises(pickle.UnpicklingError, match="os.system|posix.system|Unsupported global"):
            engine.checkpoint_engine.load(str(evil))
    # outside the context DeepSpeed's own loader (weights_only=False) is back
    assert engine.checkpoint_engine.load.__func__ is TorchCheckpointEngine.load


def test_model_folder_with_only_pickled_weights_is_refused(tmp_path):
    from omegaconf import OmegaConf

    preset = OmegaConf.to_container(compose("sft", ["recipe=tiny/sft"]).model)
    model = build_model(preset, seed=0)
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the old pickle format only
    with pytest.raises((OSError, ValueError), match="safetensors|model.safetensors"):
        build_model(preset, model_path=str(tmp_path))


def test_remote_code_is_never_trusted(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mixtral", "auto_map": {"AutoModelForCausalLM": '
                                          '"evil.Model"}, "architectures": ["Model"]}')
    (tmp_path / "evil.py").write_text("raise SystemExit('remote code ran')\n")
    with pytest.raises(Exception) as err:
        build_model({}, model_path=str(tmp_path))
    assert "remote code ran" not in str(err.value)


@pytest.mark.parametrize("override, needle", [
    ("keep_checkpoints=0", "keep_checkpoints"),
    ("dist_timeout_s=1", "dist_timeout_s"),
    ("max_bad_steps=0", "max_bad_steps"),
    ("data.max_record_chars=0", "data.max_record_chars"),
])
def test_reliability_keys_are_checked(override, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(compose("sft", ["recipe=tiny/sft", override]), world_size=1)
