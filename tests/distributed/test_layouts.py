"""Every layout, every stage, equal to one rank.

Each stage runs the same global batch (8 rows, router losses off, plain SGD, fp32) on one ZeRO-0 rank
and under a layout; the per-step losses must agree to 1e-4 relative, and the layout's export must load
in transformers with every expert distinct (the stage itself checks the export's logits against the
live model's before it exits 0). Pretraining starts from the preset (so this also checks that every
layout draws the same initial weights), SFT from a hub-layout folder (`block_sparse_moe.experts.E.w1`,
what `save_pretrained` writes) and DPO from a fused-layout folder (`mlp.experts.gate_up_proj`).

The full matrix is marked `layouts` (`pytest -m layouts`, run by CI); the default run keeps a cross-section:
DPO from `model_path` under ZeRO-3 + EP 2 (with its export), on top of test_stages.py's SFT layouts.
"""

import pytest
import torch

from helpers import losses, run_stage

pytestmark = pytest.mark.distributed

LAYOUTS = {  # name: (ranks, overrides)
    "zero2": (2, ["deepspeed=zero2"]),
    "zero2_ep2": (2, ["deepspeed=zero2", "expert_parallel_size=2"]),
    "zero3": (2, ["deepspeed=zero3"]),
    "zero3_ep2": (2, ["deepspeed=zero3", "expert_parallel_size=2"]),
    "zero3_ep2_edp2": (4, ["deepspeed=zero3", "expert_parallel_size=2"]),
    "zero2_ep4": (4, ["deepspeed=zero2", "expert_parallel_size=4"]),
}
EXACT = ["max_steps=3", "router.aux_loss_coef=0", "router.z_loss_coef=0", "optim.name=sgd", "optim.grad_clip=0",
         "optim.schedule=constant", "optim.warmup_steps=0", "global_batch_size=8", "micro_batch_size=2",
         "max_seq_len=64", "logging=none"]
STAGES = {
    "pretrain": ["recipe=tiny/pretrain", "data.synthetic_samples=64", "optim.lr=2"],
    "sft": ["recipe=tiny/sft", "data.synthetic_samples=64", "optim.lr=5"],
    "dpo": ["recipe=tiny/dpo", "data.synthetic_samples=16", "optim.lr=2", "dpo.beta=1"],
}
KEY = {"pretrain": "loss", "sft": "loss", "dpo": "loss"}


def _tiny(seed: int):
    from omegaconf import OmegaConf

    from model.build import build_model
    from train.config import compose

    return build_model(OmegaConf.to_container(compose("sft", ["recipe=tiny/sft"]).model), seed=seed)


def hub_folder(path, seed: int = 1):
    """A tiny Mixtral in the hub key layout (transformers 5's `save_pretrained` default)."""
    _tiny(seed).save_pretrained(path)
    return path


def fused_folder(path, seed: int = 2):
    """A tiny Mixtral in transformers 5's fused key layout (its state_dict as is)."""
    from safetensors.torch import save_file

    model = _tiny(seed)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def starts(tmp_path_factory):
    root = tmp_path_factory.mktemp("starts")
    return {"pretrain": [], "sft": [f"model_path={hub_folder(root / 'hub')}"],
            "dpo": [f"model_path={fused_folder(root / 'fused')}"]}


def one_rank_losses(starts, tmp_path_factory, common: list[str], tag: str):
    """stage → the 1-rank ZeRO-0 losses of `common` settings (computed once per stage, on first use)."""
    cache = {}

    def get(stage):
        if stage not in cache:
            out = tmp_path_factory.mktemp(f"{tag}_{stage}")
            run_stage(stage, out, [*STAGES[stage], *common, *starts[stage], "deepspeed=zero0"], nproc=1)
            cache[stage] = losses(out, KEY[stage])
        return cache[stage]

    return get


@pytest.fixture(scope="module")
def baselines(starts, tmp_path_factory):
    return one_rank_losses(starts, tmp_path_factory, EXACT, "one")


def export_experts_distinct(hf) -> None:
    """The export is in the hub layout (one w1/w2/w3 per expert, no fused key) and no two experts are equal."""
    from model.weights import Checkpoint

    ckpt = Checkpoint(hf)
    assert ckpt.layout == "hub" and not any("gate_up_proj" in k or ".mlp." in k for k in ckpt.file_of), list(ckpt.file_of)[:5]
    names = [n for n in ckpt.names() if n.endswith("gate_up_proj")]
    assert names, "no expert tensors in the export"
    for name in names:
        flat = ckpt.full(name).reshape(ckpt.num_experts, -1)
        for a in range(len(flat)):
            for b in range(a + 1, len(flat)):
                assert not torch.equal(flat[a], flat[b]), f"{name}: experts {a} and {b} are identical"


def check_layout(stage, layout, starts, baselines, tmp_path):
    nproc, overrides = LAYOUTS[layout]
    one = baselines(stage)
    out = tmp_path / layout
    run_stage(stage, out, [*STAGES[stage], *EXACT, *starts[stage], *overrides], nproc=nproc, timeout=900)
    got = losses(out, KEY[stage])
    assert abs(one[1] - one[0]) > 0.05, one  # the updates really change the model
    assert got == pytest.approx(one, rel=1e-4), (stage, layout, one, got)
    export_experts_distinct(out / "hf")


# CI's layouts run: every layout for SFT but the two the bf16 matrix holds too, the 4-rank ones for pretraining and
# DPO; the rest with -m extended
FP32_CASES = [pytest.param(stage, layout, id=f"{stage}-{layout}", marks=pytest.mark.layouts
                           if (stage == "sft" and layout not in ("zero3", "zero2_ep2")) or LAYOUTS[layout][0] == 4
                           else pytest.mark.extended) for stage in STAGES for layout in LAYOUTS]


@pytest.mark.parametrize("stage, layout", FP32_CASES)
def test_layout_equals_one_rank(stage, layout, starts, baselines, tmp_path):
    check_layout(stage, layout, starts, baselines, tmp_path)


@pytest.mark.extended
def test_dpo_from_model_path_zero3_ep2_equals_one_rank(starts, baselines, tmp_path):
    """DPO from a hub-layout folder under ZeRO-3 + EP 2: this combination crashed in its export once."""
    check_layout("dpo", "zero3_ep2", starts, baselines, tmp_path)


# LoRA under expert parallelism (ZeRO-0/1: train/checks.py): attention adapters, a trained router (SFT), the
# adapters-off reference (DPO). The experts are frozen and partitioned by expert; ZeRO-1 trains the adapters as
# a dense model's (model/distributed.py `frozen_experts_dense`).
LORA = {"sft": ["lora.enabled=true", "lora.train_router=true"],
        "dpo": ["lora.enabled=true", "dpo.reference=adapters_off"]}
LORA_LAYOUTS = {
    "zero0_ep2": (2, ["deepspeed=zero0", "expert_parallel_size=2"]),
    "zero1_ep2": (2, ["deepspeed=zero1", "expert_parallel_size=2"]),
    "zero1_ep2_edp2": (4, ["deepspeed=zero1", "expert_parallel_size=2"]),
}
LORA_CASES = [("sft", "zero1_ep2"), ("sft", "zero1_ep2_edp2"), ("dpo", "zero0_ep2"), ("dpo", "zero1_ep2_edp2")]


@pytest.fixture(scope="module")
def lora_baselines(starts, tmp_path_factory):
    cache = {}

    def get(stage):
        if stage not in cache:
            cache[stage] = one_rank_losses(starts, tmp_path_factory, [*EXACT, *LORA[stage], "export=false"],
                                           f"lora_one_{stage}")(stage)
        return cache[stage]

    return get


@pytest.mark.layouts
@pytest.mark.parametrize("stage, layout", LORA_CASES, ids=[f"{s}-{l}" for s, l in LORA_CASES])
def test_lora_expert_parallel_equals_one_rank(stage, layout, starts, lora_baselines, tmp_path):
    """LoRA under EP 2 and EP 2 × expert-data-parallel 2 trains like one rank (fp32, 1e-4 relative), and its
    merged export passes the stage's check."""
    nproc, overrides = LORA_LAYOUTS[layout]
    out = tmp_path / layout
    run_stage(stage, out, [*STAGES[stage], *EXACT, *LORA[stage], *starts[stage], *overrides], nproc=nproc, timeout=900)
    one, got = lora_baselines(stage), losses(out, KEY[stage])
    assert abs(one[2] - one[0]) > 1e-3, one  # the adapters really change the model
    assert got == pytest.approx(one, rel=1e-4), (stage, layout, one, got)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    export_experts_distinct(out / "hf")


@pytest.mark.layouts
def test_lora_expert_parallel_resume_continues_exactly(tmp_path):
    """LoRA + EP 2 under ZeRO-1, stopped after 2 steps and resumed: steps 3-4 equal the uninterrupted run's
    (the adapters, their sharded optimizer states and each rank's frozen experts come back as they were)."""
    common = ["recipe=tiny/sft", "lora.enabled=true", "lora.train_router=true", "data.synthetic_samples=64",
              "checkpoint_every=1", "optim.schedule=constant", "optim.warmup_steps=0", "logging=none", "export=false",
              "deepspeed=zero1", "expert_parallel_size=2"]
    run_stage("sft", tmp_path / "cut", [*common, "max_steps=2"])
    run_stage("sft", tmp_path / "cut", [*common, "max_steps=4", "resume=true"])
    run_stage("sft", tmp_path / "whole", [*common, "max_steps=4"])
    assert losses(tmp_path / "cut")[-2:] == losses(tmp_path / "whole")[2:]


def launch_nodes(stage: str, out, overrides: list[str], nodes: int, per_node: int, timeout: int = 900):
    """`nodes` torchrun agents on this machine, as on a cluster (README, "Real Mixtral on GPUs"):
        torchrun --nnodes N --node_rank i --nproc_per_node G --rdzv-backend c10d --rdzv-endpoint HEAD:PORT ...
    """
    import subprocess

    from helpers import REPO, free_port, stage_cmd

    port = free_port()
    procs = []
    for node in range(nodes):
        cmd, env = stage_cmd(stage, out, overrides, per_node)
        launcher = cmd[:cmd.index("--standalone")]
        script = cmd[cmd.index("--standalone") + 2:]
        cmd = [*launcher, f"--nnodes={nodes}", f"--node_rank={node}", f"--nproc_per_node={per_node}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=layouts", *script]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (o, e) in zip(procs, outputs):
        assert p.returncode == 0, f"node exited {p.returncode}:\n{o[-3000:]}\n{e[-5000:]}"
    return outputs


@pytest.mark.layouts
@pytest.mark.parametrize("per_node, ep", [(2, 2), (1, 2)], ids=["ep2_within_nodes", "ep2_across_nodes"])
def test_two_nodes_equal_one_rank(per_node, ep, starts, baselines, tmp_path):
    """2 "nodes" on this machine: EP 2 inside each node of 2 ranks (EP 2 × expert-data-parallel 2), and EP 2
    across two nodes of one rank each. ZeRO-3, SFT from the hub-layout folder."""
    out = tmp_path / "run"
    launch_nodes("sft", out, [*STAGES["sft"], *EXACT, *starts["sft"], "deepspeed=zero3",
                              f"expert_parallel_size={ep}"], nodes=2, per_node=per_node)
    assert losses(out, "loss") == pytest.approx(baselines("sft"), rel=1e-4)
    export_experts_distinct(out / "hf")


@pytest.mark.parametrize("before, after", [pytest.param((4, 2), (2, 2), id="ep2xdp2_to_ep2", marks=pytest.mark.layouts),
                                           pytest.param((2, 2), (4, 4), id="ep2_to_ep4", marks=pytest.mark.extended)])
def test_resume_zero3_ep_on_another_layout(before, after, tmp_path):
    """ZeRO-3 + expert parallelism, resumed on another world and EP size through the portable checkpoint:
    the continuation equals the uninterrupted runs (tests/helpers.py `check_resume_elsewhere`)."""
    from helpers import ELASTIC, check_resume_elsewhere

    check_resume_elsewhere("sft", [*ELASTIC, "recipe=tiny/sft", "deepspeed=zero3"],
                           (before[0], [f"expert_parallel_size={before[1]}"]), (after[0], [f"expert_parallel_size={after[1]}"]),
                           tmp_path, env={"OMP_NUM_THREADS": "1"})


# bf16: the same comparison in the precision GPU runs use, with AdamW, router losses on and gradient clipping.
# The 1-rank ZeRO-0 baseline keeps fp32 masters inside DeepSpeed's FP16_UnfusedOptimizer; every layout rounds
# its bf16 activations and gradients in its own kernels and reduction order: SFT measured within 5e-5 relative of
# the baseline over 3 steps, DPO (whose loss holds whole answers' summed log-probs) within 1.4e-4 to 3.8e-4
# (fp32: 1e-6). The bounds are that noise with room, and below what a wrongly stepped optimizer moves
# (ZeRO-0's Adam that started one step ahead: 2e-3 at step 2).
BF16 = ["precision=bf16", "max_steps=3", "router.aux_loss_coef=0.01", "router.z_loss_coef=0.001", "optim.name=adamw",
        "optim.lr=3e-3", "optim.grad_clip=1.0", "optim.schedule=constant", "optim.warmup_steps=0",
        "global_batch_size=8", "micro_batch_size=2", "max_seq_len=64", "logging=none"]
BF16_REL = {"sft": 2e-4, "dpo": 6e-4}
BF16_LAYOUTS = {
    "zero1": (2, ["deepspeed=zero1"]),
    "zero2_ep2": (2, ["deepspeed=zero2", "expert_parallel_size=2"]),
    "zero3": (2, ["deepspeed=zero3"]),
    "zero3_ep2": (2, ["deepspeed=zero3", "expert_parallel_size=2"]),
    "zero3_ep2_edp2": (4, ["deepspeed=zero3", "expert_parallel_size=2"]),
    "zero3_sp2": (2, ["deepspeed=zero3", "sequence_parallel_size=2"]),
}
BF16_CASES = [("sft", layout) for layout in BF16_LAYOUTS] + [("dpo", "zero3_ep2"), ("dpo", "zero3_ep2_edp2"),
                                                             ("dpo", "zero3_sp2")]


@pytest.fixture(scope="module")
def bf16_baselines(starts, tmp_path_factory):
    return one_rank_losses(starts, tmp_path_factory, [*BF16, "export=false"], "bf16_one")


@pytest.mark.layouts
@pytest.mark.parametrize("stage, layout", BF16_CASES, ids=[f"{s}-{l}" for s, l in BF16_CASES])
def test_bf16_layout_equals_one_rank(stage, layout, starts, bf16_baselines, tmp_path):
    """Each bf16 layout trains like one bf16 rank and exports (the stage's export check passes: exit 0)."""
    nproc, overrides = BF16_LAYOUTS[layout]
    out = tmp_path / layout
    proc = run_stage(stage, out, [*STAGES[stage], *BF16, *starts[stage], *overrides], nproc=nproc, timeout=900)
    one, got = bf16_baselines(stage), losses(out, KEY[stage])
    assert abs(one[2] - one[0]) > 0.01, one  # the updates really change the model
    assert got == pytest.approx(one, rel=BF16_REL[stage]), (stage, layout, one, got)
    assert "export check: " in proc.stdout and ", bfloat16;" in proc.stdout
    export_experts_distinct(out / "hf")


@pytest.mark.extended
@pytest.mark.parametrize("before, after", [((2, ["deepspeed=zero3", "expert_parallel_size=2"]), (1, ["deepspeed=zero0"])),
                                           ((1, ["deepspeed=zero0"]), (2, ["deepspeed=zero2", "expert_parallel_size=2"]))],
                         ids=["zero3_ep2_to_1rank_zero0", "1rank_zero0_to_zero2_ep2"])
def test_resume_fp32_zero0_on_another_layout(before, after, tmp_path):
    """The fp32 twins of the bf16 ZeRO-0 resumes in test_reliability.py (a plain torch AdamW there, no masters)."""
    from helpers import ELASTIC, check_resume_elsewhere

    check_resume_elsewhere("sft", [*ELASTIC, "recipe=tiny/sft"], before, after, tmp_path)


# The other preference losses (dpo.loss_type=kto | orpo | simpo): the same loop; ORPO and SimPO without a
# reference pass, KTO with a reference point z₀ that must be the global batch's in every layout.
PREFERENCE = {"kto": ["recipe=tiny/kto", "data.synthetic_samples=8", "optim.lr=0.5", "dpo.beta=1",
                      "dpo.undesirable_weight=0.1"],  # steps that raise the completions' likelihood: z₀ > 0
              "orpo": ["recipe=tiny/orpo", "data.synthetic_samples=16", "optim.lr=2"],
              "simpo": ["recipe=tiny/simpo", "data.synthetic_samples=16", "optim.lr=2", "dpo.beta=1"]}


@pytest.mark.parametrize("loss, layout", [
    ("kto", "zero3_ep2"), *[pytest.param(loss, layout, marks=pytest.mark.layouts)
                            for loss, layout in (("orpo", "zero3_ep2"), ("simpo", "zero3_ep2"))],
    pytest.param("kto", "zero3_sp2", marks=pytest.mark.extended)])
def test_preference_loss_equals_one_rank(loss, layout, starts, tmp_path):
    """KTO / ORPO / SimPO under ZeRO-3 + EP 2 (KTO also with sequence parallelism) train like one ZeRO-0 rank (fp32,
    1e-4 relative); ORPO and SimPO compute no reference log-probs (no reference cache is written)."""
    layouts = {**LAYOUTS, "zero3_sp2": (2, ["deepspeed=zero3", "sequence_parallel_size=2"])}
    runs = {}
    for name, nproc, overrides in (("one", 1, ["deepspeed=zero0"]), (layout, *layouts[layout])):
        out = tmp_path / name
        proc = run_stage("dpo", out, [*PREFERENCE[loss], *EXACT, *starts["dpo"], *overrides], nproc=nproc, timeout=900)
        cached = bool(list(out.rglob("ref-logps-*"))) and "reference log-probs" in proc.stdout
        assert cached == (loss == "kto"), proc.stdout[-2000:]
        runs[name] = losses(out, "loss") + (losses(out, "kl") if loss == "kto" else [])
    one, got = runs["one"], runs[layout]
    assert abs(one[2] - one[0]) > 1e-3, one  # the updates really change the model
    assert loss != "kto" or max(one[3:]) > 0.1, one  # KTO's reference point z₀ is at work (not clamped to 0)
    assert got == pytest.approx(one, rel=1e-4), (loss, one, got)
