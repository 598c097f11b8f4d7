"""QLoRA (model.quantize=nf4) stage runs against their oracle: quantization changes storage, nothing else.

A QLoRA run from a 16-bit folder must train exactly like a LoRA run from the folder of its dequantized
weights (the same model, stored in 16 bits): same losses at every step (router losses on, AdamW, fp32,
1e-5 relative), and the same adapters. The unit-level twin is tests/unit/test_quantize.py.
"""

import pytest
import torch

from helpers import losses, metrics, run_stage

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.distributed

COMMON = ["max_steps=5", "lora.enabled=true", "lora.train_router=true", "optim.lr=1e-2", "optim.schedule=constant",
          "optim.warmup_steps=0", "global_batch_size=8", "micro_batch_size=2", "max_seq_len=64", "logging=none",
          "router.aux_loss_coef=0.02", "router.z_loss_coef=0.001"]
STAGE = {"sft": ["recipe=tiny/sft", "data.synthetic_samples=64"],
         "dpo": ["recipe=tiny/dpo", "data.synthetic_samples=16", "dpo.reference=adapters_off", "lora.train_router=false"]}


def _folders(root, preset_name: str):
    """(a Mixtral of `preset_name` in 16 bits, the same model with its weights replaced by their NF4-dequantized
    values)."""
    from omegaconf import OmegaConf

    from model import quantize
    from model.build import build_model
    from train.config import compose

    preset = OmegaConf.to_container(compose("sft", ["recipe=tiny/sft", f"model={preset_name}"]).model)
    build_model(preset, seed=5).save_pretrained(root / "base")
    model = build_model({**preset, "quantize": "nf4"}, model_path=root / "base")
    quantize.dequantize_model(model)
    model.save_pretrained(root / "dequantized")
    return root / "base", root / "dequantized"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return _folders(tmp_path_factory.mktemp("qlora"), "tiny")


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory):
    return _folders(tmp_path_factory.mktemp("qlora_small"), "small")


def _adapters(out):
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


EP2 = ["deepspeed=zero1", "expert_parallel_size=2"]


@pytest.mark.parametrize("stage,layout,nproc", [
    ("sft", [], 1), ("dpo", [], 1),
    # each rank quantizes and holds only its own experts
    pytest.param("sft", EP2, 2, id="sft-ep2", marks=pytest.mark.layouts),
    pytest.param("dpo", EP2, 2, id="dpo-ep2", marks=pytest.mark.extended),
    pytest.param("sft", ["deepspeed=zero0", "expert_parallel_size=2"], 4, id="sft-zero0-ep2xdp2", marks=pytest.mark.layouts),
    pytest.param("sft", ["model=small"], 1, id="sft-small", marks=pytest.mark.extended),
    pytest.param("dpo", ["model=small", *EP2], 2, id="dpo-small-ep2", marks=pytest.mark.extended)])
def test_qlora_trains_like_lora_on_the_dequantized_model(stage, layout, nproc, request, tmp_path):
    base, dequantized = request.getfixturevalue("small_folders" if "model=small" in layout else "folders")
    q, o = tmp_path / "qlora", tmp_path / "lora"
    proc = run_stage(stage, q, [*COMMON, *STAGE[stage], *layout, f"model_path={base}", "model.quantize=nf4"], nproc=nproc)
    run_stage(stage, o, [*COMMON, *STAGE[stage], *layout, f"model_path={dequantized}", "verify_export=false"], nproc=nproc)
    got, want = losses(q), losses(o)
    assert abs(want[-1] - want[0]) > 1e-3, want  # the adapters really train
    assert got == pytest.approx(want, rel=1e-5), (got, want)
    a, b = _adapters(q), _adapters(o)
    assert a.keys() == b.keys()
    for k in a:
        # under EP, DeepSpeed's expert layer runs gate and up as two GEMMs, ours as one: rounding differs slightly,
        # and Adam's normalised steps carry it into the weights (measured on one CPU: 1.8e-5 on 1 of 4096 entries of
        # ~5e-3 after DPO on `small` with EP 2); a wrong kernel differs by the weights' own size
        torch.testing.assert_close(a[k], b[k], rtol=1e-3 if layout else 1e-4, atol=5e-5 if layout else 1e-6)
    assert "export check: " in proc.stdout  # the merged export (the 16-bit base + adapters) passed it
    if stage == "dpo":
        assert metrics(q)[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # adapters-off reference == policy
    elif not layout:  # the merged export is the original 16-bit base plus the adapters; the trained model is that up to NF4
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        def logits(folder, adapter=None):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter)
            with torch.no_grad():
                return model.eval()(ids).logits

        ids = torch.randint(3, 32000, (2, 32), generator=torch.Generator().manual_seed(0))
        merged, on_base = logits(q / "hf"), logits(base, q / "adapter")
        trained, plain = logits(dequantized, q / "adapter"), logits(base)
        torch.testing.assert_close(merged, on_base, rtol=1e-4, atol=1e-4)  # PEFT's merge of the same adapter
        gap = ((on_base - trained).norm() / trained.norm()).item()
        print(f"adapters on the 16-bit base vs the trained model: relative RMS logits gap {gap:.4f}")
        # NF4 stores normal weights with ~10% relative RMS error (tests/unit/test_quantize.py); through the model
        # the logits move by less than that, and far less than the adapters moved them
        assert 0 < gap < 0.1, gap
        assert ((plain - trained).norm() / trained.norm()).item() > gap


@pytest.mark.parametrize("stage", ["sft", pytest.param("dpo", marks=pytest.mark.layouts)])
def test_qlora_expert_adapters_merge_onto_the_16_bit_base_as_peft_does(stage, folders, tmp_path):
    """`lora.experts=true` over 4-bit experts (per-expert adapters in peft's layout; their math against peft's:
    tests/unit/test_quantize.py): the run trains and passes its export check, the adapter folder loads with PEFT
    onto the 16-bit base and gives the merged export's logits, and (DPO) the adapters-off reference is the
    policy at step 1."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, dequantized = folders
    q = tmp_path / "qlora"
    proc = run_stage(stage, q, [*COMMON, *STAGE[stage], "lora.experts=true", f"model_path={base}", "model.quantize=nf4"],
                     nproc=1)
    assert "export check: " in proc.stdout
    got = losses(q)
    assert abs(got[-1] - got[0]) > 1e-3, got
    if stage == "dpo":
        assert metrics(q)[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    ids = torch.randint(3, 32000, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(q / "hf", dtype=torch.float32).eval()(ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), q / "adapter")
        assert any("experts" in n for n, _ in peft.named_parameters() if "lora_" in n)
        on_base = peft.eval()(ids).logits
    torch.testing.assert_close(merged, on_base, rtol=1e-4, atol=1e-4)


@pytest.mark.layouts
def test_qlora_data_parallel_zero2_equals_one_rank(folders, tmp_path):
    """The 4-bit base replicated on 2 ranks (ZeRO-2 shards the adapters' optimizer states): one rank's losses."""
    base, _ = folders
    one, two = tmp_path / "one", tmp_path / "two"
    exact = ["router.aux_loss_coef=0", "router.z_loss_coef=0", "optim.name=sgd", "optim.grad_clip=0", "export=false"]
    run_stage("sft", one, [*COMMON, *STAGE["sft"], *exact, f"model_path={base}", "model.quantize=nf4"], nproc=1)
    run_stage("sft", two, [*COMMON, *STAGE["sft"], *exact, f"model_path={base}", "model.quantize=nf4",
                           "deepspeed=zero2"], nproc=2)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


@pytest.mark.parametrize("layout,nproc", [([], 1), pytest.param(EP2, 2, id="ep2", marks=pytest.mark.layouts)])
def test_qlora_resume_continues_exactly(layout, nproc, folders, tmp_path):
    """Stopped after 2 steps and resumed: steps 3-4 equal the uninterrupted run's. The 4-bit base is read again
    from model_path (its quantization state is not the checkpoint's to restore); the adapters and their AdamW
    states come from the checkpoint. Under EP 2 the checkpoint also resumes on 1 rank (no expert files: the
    portable checkpoint of train/elastic.py holds the adapters and routers)."""
    import shutil

    base, _ = folders
    common = [*COMMON, *STAGE["sft"], f"model_path={base}", "model.quantize=nf4", "checkpoint_every=1", "export=false"]
    run_stage("sft", tmp_path / "cut", [*common, *layout, "max_steps=2"], nproc=nproc)
    if layout:
        shutil.copytree(tmp_path / "cut", tmp_path / "elsewhere")
    resumed = run_stage("sft", tmp_path / "cut", [*common, *layout, "max_steps=4", "resume=true"], nproc=nproc)
    assert "resumed from" in resumed.stdout
    run_stage("sft", tmp_path / "whole", [*common, *layout, "max_steps=4"], nproc=nproc)
    assert losses(tmp_path / "cut")[-2:] == losses(tmp_path / "whole")[2:4]
    if layout:
        moved = run_stage("sft", tmp_path / "elsewhere", [*common, "max_steps=4", "resume=true"], nproc=1)
        assert "converted to a portable checkpoint" in moved.stdout
        assert losses(tmp_path / "elsewhere")[-2:] == pytest.approx(losses(tmp_path / "whole")[2:4], rel=1e-5)
