"""Mixed precision as the stages run it: fp32 routers inside bf16 models, and an export check that fits the
dtype (model/export.py `export_tolerance`) and still catches a wrong export."""

import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from model.build import build_model
from model.export import export_hf, export_tolerance, probe_ids, verify_export
from model.router import RouterLogitsRecorder
from train.config import compose


@pytest.fixture(scope="module")
def tiny_preset():
    return OmegaConf.to_container(compose("sft").model)


def test_router_logits_are_fp32_inside_a_bf16_forward(tiny_preset):
    model = build_model(tiny_preset, dtype=torch.bfloat16, seed=0).eval()
    recorder = RouterLogitsRecorder(model)
    ids = torch.randint(3, 32000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), recorder:
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and model.model.layers[0].mlp.gate.weight.dtype == torch.bfloat16
    assert [l.dtype for l in recorder.logits] == [torch.float32] * tiny_preset["num_hidden_layers"]
    # the logits are the fp32 product of the bf16 weights and the layer's bf16 input, not its bf16 rounding
    captured = {}
    gate = model.model.layers[1].mlp.gate
    handle = gate.register_forward_hook(lambda m, i, o: captured.update(x=i[0], logits=o[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = captured["x"].reshape(-1, gate.weight.shape[1])
    exact = x.float() @ gate.weight.float().T
    torch.testing.assert_close(captured["logits"], exact, rtol=1e-6, atol=1e-6)
    assert not torch.equal(exact.bfloat16().float(), exact)  # bf16 logits would have been rounded


def test_fp32_models_compute_as_transformers_does(tiny_preset):
    from transformers import MixtralForCausalLM

    ours = build_model(tiny_preset, seed=0).eval()
    plain = MixtralForCausalLM(ours.config).eval()
    plain.load_state_dict(ours.state_dict())
    ids = torch.randint(3, 32000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, plain(ids).logits)


def test_export_tolerance_follows_the_dtype():
    assert export_tolerance(torch.float32) == 1e-4
    assert export_tolerance(torch.bfloat16) == 4 * 2**-7
    assert export_tolerance(torch.float16) == 4 * 2**-10


def _bf16_model_and_probe(preset):
    """A bf16 tiny Mixtral whose experts matter (their weights scaled up from the initialisation), and the
    probe the stage would take: ids, live logits, the live expert choices."""
    torch.manual_seed(0)
    model = build_model(preset, dtype=torch.bfloat16, seed=0).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.mul_(4)
            layer.mlp.experts.down_proj.mul_(4)
    ids = probe_ids(model.config.vocab_size)
    recorder = RouterLogitsRecorder(model)
    with torch.no_grad(), recorder:
        live = model(ids).logits.float()
    routing = [torch.topk(l, 2, dim=-1).indices for l in recorder.logits]
    recorder.remove()
    return model, (ids, live, routing)


def test_a_bf16_export_passes_and_one_wrong_expert_fails(tiny_preset, tmp_path):
    model, probe = _bf16_model_and_probe(tiny_preset)
    export_hf(model, model.config, tmp_path / "hf", dtype=torch.bfloat16)
    ok = verify_export(None, tmp_path / "hf", probe, torch.bfloat16)
    assert ok["passed"] and ok["max_abs_diff"] == 0.0, ok  # same weights, same kernels, same expert choices
    # the fp32 check's tolerance against a bf16 model: what made every bf16 run fail before
    assert ok["max_abs_diff"] <= 1e-4 * ok["scale"]
    # one expert's up projection replaced by another's (what a wrong expert order under EP would write)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "hf", bad)
    weights = load_file(bad / "model.safetensors")
    a, b = (f"model.layers.1.block_sparse_moe.experts.{e}.w3.weight" for e in (2, 6))
    weights[a], weights[b] = weights[b].clone(), weights[a].clone()
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    failed = verify_export(None, bad, probe, torch.bfloat16)
    assert not failed["passed"], failed
    assert failed["max_abs_diff"] > 2 * failed["tol"] * failed["scale"], failed  # not a near miss


def test_the_check_replays_the_live_expert_choices(tiny_preset, tmp_path):
    """A near-tie that rounds the other way in another kernel must not move a logit: with a live choice
    forced to another expert at one position, the export's logits follow the live choice."""
    from model.stream import streamed_logits

    model, (ids, live, routing) = _bf16_model_and_probe(tiny_preset)
    export_hf(model, model.config, tmp_path / "hf", dtype=torch.bfloat16)
    own = streamed_logits(tmp_path / "hf", ids, torch.bfloat16)
    assert torch.equal(own, streamed_logits(tmp_path / "hf", ids, torch.bfloat16, routing))
    moved = [r.clone() for r in routing]
    moved[0][5] = torch.tensor([e for e in range(8) if e not in routing[0][5].tolist()][:2])
    other = streamed_logits(tmp_path / "hf", ids, torch.bfloat16, moved)
    changed = (other - own).abs().amax(-1).reshape(-1)
    assert changed[5] > 0 and changed[:5].abs().max() == 0  # position 5 and (through attention) later ones only


def test_bf16_expert_blocks_padded_on_cpu_change_nothing(tiny_preset, monkeypatch):
    """model/experts.py pads each expert's rows to a multiple of CPU_ROW_BLOCK in 16-bit on CPU (fewer matrix
    shapes for oneDNN to compile): logits and every gradient equal the unpadded computation bit for bit."""
    from model import experts

    ids = torch.randint(3, 32000, (2, 37), generator=torch.Generator().manual_seed(0))
    results = []
    for block in (experts.CPU_ROW_BLOCK, 1):
        monkeypatch.setattr(experts, "CPU_ROW_BLOCK", block)
        model = build_model(tiny_preset, dtype=torch.bfloat16, seed=0).train()
        logits = model(ids).logits
        logits.float().square().mean().backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    (padded, grads), (plain, plain_grads) = results
    assert experts.CPU_ROW_BLOCK == 1 and torch.equal(padded, plain)
    assert all(torch.equal(grads[n], plain_grads[n]) for n in grads)
