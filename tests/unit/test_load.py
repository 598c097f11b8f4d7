"""Partitioned loading (model/load.py, model/weights.py) and the per-rank memory arithmetic (model/memory.py)."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from transformers import MixtralForCausalLM

from model.build import build_model, mixtral_config
from model.load import Placement, expert_parallel_rank, skeleton, stream_init
from model.memory import Layout, parameter_counts, per_rank_bytes
from model.weights import Checkpoint
from helpers import REPO
from train.config import compose


@pytest.fixture(scope="module")
def preset():
    return OmegaConf.to_container(compose("sft", ["recipe=tiny/sft"]).model)


@pytest.mark.parametrize("tied", [False, True])
def test_stream_init_equals_the_plain_constructor(preset, tied):
    """Fresh weights are those of `torch.manual_seed(s); MixtralForCausalLM(config)`, bit for bit, and the
    generator ends where that constructor leaves it (so LoRA adapters drawn next agree too)."""
    config = mixtral_config({**preset, "tie_word_embeddings": tied})
    torch.manual_seed(5)
    plain = MixtralForCausalLM(config)
    after_plain = torch.get_rng_state()
    model = skeleton(config, torch.float32, Placement())
    assert all(p.is_meta for p in model.parameters())
    stream_init(model, 5, torch.float32, Placement())
    assert torch.equal(torch.get_rng_state(), after_plain)
    got, want = model.state_dict(), plain.state_dict()
    assert set(got) == set(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def _folders(preset, tmp_path):
    model = build_model(preset, seed=1)
    hub = tmp_path / "hub"
    model.save_pretrained(hub)  # transformers 5 writes the hub layout
    fused = tmp_path / "fused"
    model.config.save_pretrained(fused)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    half = len(state) // 2  # two shards with an index, as large exports are written
    names = sorted(state)
    save_file({k: state[k] for k in names[:half]}, str(fused / "a.safetensors"))
    save_file({k: state[k] for k in names[half:]}, str(fused / "b.safetensors"))
    (fused / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: ("a" if i < half else "b") + ".safetensors" for i, k in enumerate(names)}}))
    return model, hub, fused


def test_checkpoint_reads_both_layouts_piece_by_piece(preset, tmp_path):
    model, hub, fused = _folders(preset, tmp_path)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(0)
    for folder, layout in ((hub, "hub"), (fused, "fused")):
        ckpt = Checkpoint(folder)
        assert ckpt.layout == layout
        assert set(ckpt.names()) == {k for k in state if k != "lm_head.weight" or not model.config.tie_word_embeddings}
        for name, want in state.items():
            assert ckpt.shape(name) == list(want.shape), name
            assert torch.equal(ckpt.full(name), want), name
            if name.endswith(("gate_up_proj", "down_proj")):
                assert torch.equal(ckpt.rows(name, 2, 5), want[2:5])
            n = want.numel()
            for _ in range(3):  # random flat ranges, many straddling expert and w1/w3 block borders
                a = int(torch.randint(0, n, (1,), generator=gen))
                b = int(torch.randint(a + 1, n + 1, (1,), generator=gen))
                assert torch.equal(ckpt.flat(name, a, b), want.reshape(-1)[a:b]), (folder, name, a, b)
    if "model.layers.0.mlp.experts.gate_up_proj" in state:  # the hub file holds separate gate and up
        f = Checkpoint(hub)
        assert "model.layers.0.block_sparse_moe.experts.3.w3.weight" in f.file_of


@pytest.mark.parametrize("layout", ["hub", "fused"])
def test_build_from_either_layout_equals_the_saved_model(preset, tmp_path, layout):
    model, hub, fused = _folders(preset, tmp_path)
    loaded = build_model(preset, model_path=hub if layout == "hub" else fused)
    ids = torch.randint(3, 32000, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, loaded.eval()(ids).logits)


def test_expert_parallel_rank_holds_dense_and_its_own_experts(preset, tmp_path):
    model, hub, _ = _folders(preset, tmp_path)
    want = model.state_dict()
    part = build_model(preset, model_path=hub, placement=Placement(zero_stage=2, ep_size=4, ep_rank=2))
    got = part.state_dict()
    for name, w in want.items():
        if name.endswith(("gate_up_proj", "down_proj")):
            assert torch.equal(got[name][4:6], w[4:6]), name  # block 2 of 4 = experts 4, 5
        else:
            assert torch.equal(got[name], w), name
    # the fresh preset too: the same experts the full model draws
    fresh = build_model(preset, seed=3, placement=Placement(ep_size=2, ep_rank=1)).state_dict()
    full = build_model(preset, seed=3).state_dict()
    assert torch.equal(fresh["model.layers.1.mlp.experts.down_proj"][4:], full["model.layers.1.mlp.experts.down_proj"][4:])
    assert torch.equal(fresh["model.embed_tokens.weight"], full["model.embed_tokens.weight"])
    assert [expert_parallel_rank(r, 2) for r in range(4)] == [0, 1, 0, 1]


def test_checkpoint_shape_mismatch_is_named(preset, tmp_path):
    _, hub, _ = _folders(preset, tmp_path)
    cfg = json.loads((hub / "config.json").read_text())
    cfg["intermediate_size"] = 2 * cfg["intermediate_size"]  # config.json and the weights disagree
    (hub / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"mlp.experts.(gate_up|down)_proj has shape"):
        build_model(preset, model_path=hub)


def test_per_rank_bytes_mixtral_8x7b():
    config = mixtral_config(OmegaConf.to_container(compose("sft", ["model=mixtral_8x7b"]).model))
    c = parameter_counts(config)
    assert c["total"] / 1e9 == pytest.approx(46.7, abs=0.1)
    assert c["experts"] / 1e9 == pytest.approx(45.1, abs=0.1)
    # full fine-tuning, bf16, AdamW, ZeRO-3 on 8 ranks: ~16 bytes per parameter / 8, plus one layer gathered
    z3 = per_rank_bytes(config, Layout(world=8, zero_stage=3, dtype_bytes=2))
    head_grad = (4 + 2) * config.vocab_size * config.hidden_size  # the fused loss's whole LM-head gradient (fp32 + bf16)
    assert (z3["weights"] + z3["gradients"] + z3["optimizer"]) == pytest.approx(16 * c["total"] / 8 + head_grad, rel=1e-9)
    assert z3["gathered"] == 2 * 2 * (c["layer_experts"] + c["layer_dense"])  # two layers live, bf16
    ep8 = per_rank_bytes(config, Layout(world=8, zero_stage=3, ep_size=8, dtype_bytes=2))
    assert ep8["gathered"] == 2 * c["layer_experts"]  # AutoEP's conversion gathers one layer's experts whole
    # LoRA under ZeRO-3: only the base weights' shard (and the gather)
    lora = per_rank_bytes(config, Layout(world=8, zero_stage=3, dtype_bytes=2, lora=True))
    assert lora["weights"] == pytest.approx(2 * c["total"] / 8) and lora["optimizer"] == 0 == lora["gradients"]
    # ZeRO-2 + EP 8: dense weights whole, 1/8 of the experts
    z2 = per_rank_bytes(config, Layout(world=8, zero_stage=2, ep_size=8, dtype_bytes=2))
    assert z2["weights"] == pytest.approx(2 * (c["dense"] + c["experts"] / 8))
    assert z2["gathered"] == 0
    # DeepSpeed's ZeRO-1/2 step flattens the largest group's gradient partition anew (bf16, plus its fp32 copy)
    assert z2["step"] == pytest.approx((2 + 4) * max(c["dense"], c["experts"]) / 8)
    assert z3["step"] == 0 == lora["step"]
    # an fp32 model: ZeRO-1/2 still copy the master weights, ZeRO-3's partitions are the master weights
    fp32 = {s: per_rank_bytes(config, Layout(world=8, zero_stage=s, dtype_bytes=4, optimizer="sgd")) for s in (2, 3)}
    assert fp32[2]["optimizer"] == pytest.approx(4 * c["total"] / 8) and fp32[3]["optimizer"] == 0
    # offloading moves optimizer states to the host
    off = per_rank_bytes(config, Layout(world=8, zero_stage=3, dtype_bytes=2, offload_optimizer=True))
    assert off["host"] == off["optimizer"] and off["device"] == pytest.approx(off["total"] - off["optimizer"])
    assert math.isclose(per_rank_bytes(config, Layout(world=16, zero_stage=3, dtype_bytes=2))["optimizer"],
                        z3["optimizer"] / 2)


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_logits_equal_transformers(preset, tmp_path, tied):
    """The export check's layer-by-layer forward (model/stream.py) against transformers' own loading."""
    from transformers import AutoModelForCausalLM

    from model.stream import streamed_logits

    model, hub, fused = _folders({**preset, "tie_word_embeddings": tied}, tmp_path)
    ids = torch.randint(3, 32000, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hub, dtype=torch.float32).eval()(ids).logits
    for folder in (hub, fused):
        torch.testing.assert_close(streamed_logits(folder, ids), want, atol=2e-5, rtol=1e-5)


_ZERO3_SCRIPT = """
import os, sys, torch, deepspeed
sys.path.insert(0, {repo!r})
from model.distributed import fp32_master_shared
deepspeed.init_distributed("gloo")
def train(shared):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 64))
    cfg = {{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {{"stage": 3}},
           "zero_allow_untested_optimizer": True}}
    with (fp32_master_shared() if shared else torch.no_grad()):
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                          config=cfg)
    opt = engine.optimizer
    same = [a.data_ptr() == b.data_ptr() for a, b in zip(opt.fp32_partitioned_groups_flat, opt.fp16_partitioned_groups_flat)]
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(3):
        x = torch.randn(4, 64, generator=g)
        loss = engine(x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        flat = torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])
    return same, losses, flat
same_off, losses_off, off = train(False)
same_on, losses_on, on = train(True)
print("SHARED", all(same_on), "LOSSES", losses_on == losses_off, "WEIGHTS", torch.equal(on, off), losses_on)
"""


def test_zero3_fp32_master_weights_are_the_partitions(tmp_path):
    """`fp32_master_shared`: under ZeRO-3 an fp32 model's partitions are the optimizer's master weights (no
    second copy), and three SGD steps give bit-identical losses and weights to DeepSpeed's own copy."""
    import os
    import subprocess
    import sys

    script = tmp_path / "zero3.py"
    script.write_text(_ZERO3_SCRIPT.format(repo=str(REPO)))
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(29400 + os.getpid() % 500), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    line = next((l for l in out.stdout.splitlines() if l.startswith("SHARED")), None)
    assert line is not None, out.stdout[-2000:] + out.stderr[-3000:]
    assert line.startswith("SHARED True LOSSES True WEIGHTS True"), line
