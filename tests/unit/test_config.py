"""Config schemas: every recipe composes; bad keys, types and combinations are named."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from train.cli import recipe_stage
from train.checks import validate
from train.config import ConfigError, compose

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.relative_to(REPO / "recipes").with_suffix("").as_posix() for p in (REPO / "recipes").rglob("*.yaml"))
DESIGN_KEYS = ["output_dir", "max_steps", "seed", "model_path", "model", "deepspeed", "expert_parallel_size",
               "global_batch_size", "micro_batch_size", "max_seq_len", "optim.lr", "router.aux_loss_coef",
               "router.z_loss_coef", "router.global_batch", "data.path", "data.format", "checkpoint_every",
               "resume", "logging"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_validates(recipe):
    stage = recipe_stage(recipe)
    cfg = compose(stage, [f"recipe={recipe}"] + (["model_path=org/sft-model"] if stage == "dpo" else []))
    validate(cfg)  # DPO recipes take the SFT export on the command line (model_path is required)
    assert cfg.stage == stage


@pytest.mark.parametrize("stage", ["pretrain", "sft", "dpo"])
def test_design_keys_exist(stage):
    cfg = compose(stage)
    for key in DESIGN_KEYS:
        node = cfg
        for part in key.split("."):
            assert part in node, f"{stage}: missing key {key}"
            node = node[part]


def test_command_line_overrides_recipe():
    cfg = compose("sft", ["recipe=tiny/sft", "max_steps=7", "optim.lr=0.5", "deepspeed=zero3", "model=small"])
    assert (cfg.max_steps, cfg.optim.lr, cfg.deepspeed.zero_optimization.stage, cfg.model.name) == (7, 0.5, 3, "small")


def _error_text(overrides, world_size=None):
    with pytest.raises((ConfigCompositionException, ConfigError, ValidationError, ConfigKeyError)) as err:
        validate(compose("sft", overrides), world_size)
    e = err.value
    return str(e) + " " + str(getattr(e, "__cause__", "") or "")


@pytest.mark.parametrize(
    "overrides, world_size, needle",
    [
        (["optim.lrr=1"], None, "optim.lrr"),
        (["max_steps=abc"], None, "max_steps"),
        (["router.global_batch=maybe"], None, "router.global_batch"),
        (["expert_parallel_size=3"], None, "expert_parallel_size=3"),
        (["expert_parallel_size=4"], 2, "world size"),
        (["global_batch_size=6", "micro_batch_size=4"], 2, "global_batch_size=6"),
        (["data.format=csv"], None, "data.format"),
        (["model_path=/no/such/folder"], None, "model_path=/no/such/folder"),
        (["max_seq_len=100000"], None, "max_seq_len"),
        (["deepspeed=zero3_offload", "deepspeed.zero_optimization.stage=2"], None, "offload_param"),
        (["lora.enabled=true", "lora.experts=true", "expert_parallel_size=2"], None, "lora.experts=true with expert_parallel_size>1"),
        (["lora.enabled=true", "expert_parallel_size=2", "deepspeed=zero2"], None, "LoRA with expert parallelism runs under deepspeed=zero0 or zero1"),
        (["model.quantize=nf4"], None, "model.quantize=nf4 needs lora.enabled=true"),
        (["model.quantize=int4", "lora.enabled=true"], None, "expected one of [none, nf4]"),
        (["model.quantize=nf4", "lora.enabled=true", "deepspeed=zero3"], None, "model.quantize=nf4 with ZeRO-3"),
        (["model.quantize=nf4", "lora.enabled=true", "expert_parallel_size=2"], None, "expert_parallel_size>1 needs model_path"),
        (["lora.enabled=true", "lora.experts=true", "deepspeed=zero3"], None, "lora.experts=true with ZeRO-3"),
        (["data.synthetic_passkey_share=1.5"], None, "data.synthetic_passkey_share=1.5"),
        (["data.synthetic_passkey_filler=-1"], None, "data.synthetic_passkey_filler=-1"),
        (["optim.schedule=wsd", "optim.decay_fraction=0"], None, "optim.decay_fraction=0"),
        (["sequence_parallel_size=0"], None, "sequence_parallel_size"),
        (["malloc_mmap_threshold=0"], None, "malloc_mmap_threshold=0"),
        (["sequence_parallel_size=8"], None, "must divide model.num_attention_heads=4"),
        (["sequence_parallel_size=2"], 3, "sequence_parallel_size=2 does not divide the world size 3"),
        (["sequence_parallel_size=2", "global_batch_size=2", "micro_batch_size=2"], 4,
         "micro_batch_size × data-parallel groups (world size / sequence_parallel_size 2) = 2 × 2 = 4"),
    ],
)
def test_config_errors_name_the_key(overrides, world_size, needle):
    assert needle in _error_text(overrides, world_size)


def test_recipe_with_unknown_key_fails(tmp_path, monkeypatch):
    bad = REPO / "recipes" / "tiny" / "_test_bad.yaml"
    bad.write_text("# @package _global_\noptim:\n  lrr: 1\n")
    try:
        assert "lrr" in _error_text(["recipe=tiny/_test_bad"])
    finally:
        bad.unlink()


@pytest.mark.parametrize("overrides, needle", [(["dpo.beta=0"], "dpo.beta=0"), (["dpo.dpop_lambda=-1"], "dpo.dpop_lambda=-1"),
                                               (["dpo.loss_type=kpo"], "dpo.loss_type='kpo': expected one of sigmoid, ipo"),
                                               (["dpo.loss_type=kto", "dpo.sft_weight=1"], "no chosen answer for an NLL"),
                                               (["dpo.loss_type=kto", "dpo.mask_common_suffix=true"], "needs a pair"),
                                               (["dpo.loss_type=kto", "dpo.undesirable_weight=0"], "both must be > 0"),
                                               (["dpo.loss_type=orpo", "dpo.sft_weight=1"], "holds the chosen answer's NLL"),
                                               (["dpo.loss_type=simpo", "dpo.dpop_lambda=1"], "DPOP compares with a reference"),
                                               (["lora.enabled=true", "lora.train_router=true", "dpo.reference=adapters_off",
                                                 "expert_parallel_size=2", "deepspeed=zero1"],
                                                "with lora.train_router=true and expert_parallel_size>1")])
def test_dpo_config_errors_name_the_key(overrides, needle):
    from train.cli import compose_strict
    from train.config import DPOStageConfig

    with pytest.raises(ConfigError) as err:
        validate(compose_strict("dpo", overrides, DPOStageConfig))
    assert needle in str(err.value)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine", "wsd"])
def test_lr_schedule_shapes(schedule):
    """Warmup (s + 1) / w, then: constant 1; linear and cosine from 1 towards the floor; wsd (warmup-
    stable-decay) exactly 1 until the last decay_fraction of the steps, then equal steps down to the floor
    at the last step."""
    from train.model_setup import lr_lambda

    total, warmup, floor = 50, 5, 0.1
    cfg = compose("pretrain", ["recipe=tiny/pretrain", f"max_steps={total}", f"optim.schedule={schedule}",
                               f"optim.warmup_steps={warmup}", f"optim.min_lr_ratio={floor}", "optim.decay_fraction=0.2"])
    f = [lr_lambda(cfg)(s) for s in range(total)]
    assert f[:warmup] == pytest.approx([(s + 1) / warmup for s in range(warmup)])
    after = f[warmup:]
    assert all(floor - 1e-9 <= x <= 1 + 1e-9 for x in after)
    if schedule == "constant":
        assert after == [1.0] * len(after)
        return
    assert all(a >= b for a, b in zip(after, after[1:])) and after[-1] < 0.2
    if schedule == "wsd":
        decay = round(0.2 * (total - warmup))
        assert after[:-decay] == [1.0] * (len(after) - decay)
        assert after[-1] == pytest.approx(floor)
        steps = [a - b for a, b in zip(after[-decay - 1:], after[-decay:])]
        assert steps == pytest.approx([(1 - floor) / decay] * decay)


def test_deepspeed_section_is_checked_against_deepspeeds_keys():
    """A typo in the `deepspeed:` section is a one-line error before anything loads (DeepSpeed ignores an unknown
    top-level key, and rejects one in zero_optimization only inside deepspeed.initialize); every group's own
    section, and DeepSpeed keys we do not set, pass."""
    from train.checks import check_deepspeed_section

    for group in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        validate(compose("sft", [f"deepspeed={group}"]))
    check_deepspeed_section({"gradient_clipping": 1.0, "zero_optimization": {"stage": 2, "reduce_bucket_size": 1000,
                                                                              "stage3_gather_fp16_weights_on_model_save": True}})
    with pytest.raises(ConfigError, match=r"deepspeed.zero_optimisation: not a DeepSpeed key; did you mean deepspeed.zero_optimization\?"):
        check_deepspeed_section({"zero_optimisation": {"stage": 3}})
    with pytest.raises(ConfigError, match=r"deepspeed.zero_optimization.overlap_com: .*did you mean overlap_comm\?"):
        validate(compose("sft", ["+deepspeed.zero_optimization.overlap_com=true"]))
