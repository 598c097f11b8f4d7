"""NF4 base weights (model/quantize.py): storage changes, nothing else.

The oracle is the same model whose weights were replaced by their dequantized values (`dequantize_model`):
logits, losses and LoRA gradients must be equal; bitsandbytes' own `dequantize_4bit` is the reference for the
stored values.
"""

import copy

import pytest
import torch

pytest.importorskip("bitsandbytes")

from model import quantize  # noqa: E402


def _tiny(quantized: str = "none", dtype=torch.float32):
    from omegaconf import OmegaConf

    from model.build import build_model
    from train.config import compose

    preset = OmegaConf.to_container(compose("sft", ["recipe=tiny/sft", f"model.quantize={quantized}"]).model)
    return build_model(preset, seed=3, dtype=dtype)


def _same_adapters_loss_backward(q, oracle, ours: dict):
    """Give `oracle`'s adapters the values of `ours` ({oracle's parameter name: q's parameter}, made non-zero),
    then one forward and backward of both on the same ids; returns (q's output, oracle's output, ids)."""
    theirs = dict(oracle.named_parameters())
    for n, p in ours.items():
        with torch.no_grad():
            p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(n)))
            theirs[n].copy_(p)
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(1))
    out_q, out_o = q(ids, labels=ids), oracle(ids, labels=ids)
    out_q.loss.backward()
    out_o.loss.backward()
    return out_q, out_o, ids


def test_nf4_tensor_equals_bitsandbytes_and_keeps_its_dtypes_when_cast():
    import bitsandbytes.functional as F

    w = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(0))
    t = quantize.NF4Tensor(w)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(t.dequantize(), F.dequantize_4bit(packed, state))
    err = (t.dequantize() - w).norm() / w.norm()
    assert 0.01 < err < 0.15  # 4 bits: lossy (NF4 on normal weights: ~10% relative RMS), but close
    dtypes = {n: b.dtype for n, b in t.named_buffers()}
    t.bfloat16()  # what DeepSpeed does to a bf16 run's module
    assert {n: b.dtype for n, b in t.named_buffers()} == dtypes
    assert t.dequantize().dtype == torch.float32 and t.packed.numel() * 2 == w.numel()


def test_quantized_tiny_model_stores_4_bits_where_it_should():
    model = _tiny("nf4")
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["model.layers.0.self_attn.q_proj"] == "Linear4bit"
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] == "NF4Experts"
    assert kinds["model.layers.0.mlp.experts.down_proj"] == "NF4Experts"
    floats = {n for n, p in model.named_parameters() if p.is_floating_point()}
    assert floats == {n for n in floats if any(k in n for k in ("embed_tokens", "lm_head", "norm", "mlp.gate"))}, floats
    # the 4-bit values are those of the 16-bit weights the same seed draws
    plain = _tiny("none")
    w = plain.model.layers[1].mlp.experts.down_proj.data
    got = model.model.layers[1].mlp.experts.down_proj.dequantize()
    assert torch.equal(got, torch.stack([quantize.NF4Tensor(w[e]).dequantize() for e in range(len(w))]))
    # each expert on its own: a block of experts (expert parallelism) holds the values the whole tensor does
    assert torch.equal(quantize.NF4Experts(w[4:6], first=4).dequantize(), got[4:6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qlora_equals_lora_on_the_dequantized_model(dtype):
    """Forward, loss and every adapter gradient of a LoRA model over the 4-bit base equal those over the
    dequantized base (the expert kernel's recomputed dequantization included)."""
    from omegaconf import OmegaConf

    from model.lora import apply_lora

    lora = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                             "experts": False, "train_router": True})
    q = _tiny("nf4", dtype)
    oracle = copy.deepcopy(q)
    quantize.dequantize_model(oracle)
    assert not any(type(m).__name__ in ("Linear4bit", "NF4Tensor", "NF4Experts") for m in oracle.modules())
    torch.manual_seed(0)
    q = apply_lora(q, lora, dtype)
    torch.manual_seed(0)
    oracle = apply_lora(oracle, lora, dtype)
    out_q, out_o = _same_adapters_loss_backward(q, oracle, {n: p for n, p in q.named_parameters() if "lora_" in n})[:2]
    tol = 0 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out_q.logits, out_o.logits, atol=tol, rtol=tol)
    grads = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    assert len(grads) > 10 and all(g is not None for g in grads.values())
    for n, p in oracle.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=1e-5 if dtype == torch.float32 else 2e-2)


def test_expert_kernel_keeps_no_dequantized_weights_for_backward():
    """What autograd saves in an MoE layer's forward: over the 4-bit experts, nothing of the size of a
    layer's 16-bit expert weights (the kernel dequantizes again in the backward)."""
    model = _tiny("nf4")
    block = model.model.layers[0].mlp
    e = model.config
    weight_numel = e.num_local_experts * e.intermediate_size * e.hidden_size
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(1, 16, e.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = block(x)
    y[0].sum().backward() if isinstance(y, tuple) else y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert saved and max(saved) < weight_numel, (max(saved), weight_numel)
    plain = _tiny("none").model.layers[0].mlp
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain(x)
    assert max(saved) >= weight_numel  # the plain kernel does keep them: the check above can fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_export_check_sees_the_live_4_bit_base_under_the_original_weights(tmp_path, dtype):
    """`requantized` turns an export written from the 16-bit base (W₀ + adapter) into what the run computed
    with (NF4(W₀) + adapter) — exactly the live 4-bit layer's weight — and an export that wrote the dequantized
    base instead stays off by the quantization error, so the export check fails it."""
    from safetensors.torch import save_file

    from model.export import requantized
    from model.weights import Checkpoint

    torch.manual_seed(0)
    w0 = {"model.layers.0.self_attn.q_proj.weight": torch.randn(64, 128) * 0.02,
          "model.layers.0.mlp.experts.down_proj": torch.randn(8, 64, 96) * 0.02,
          "model.layers.0.input_layernorm.weight": torch.ones(64)}
    save_file(w0, str(tmp_path / "model.safetensors"))
    substitute = requantized(Checkpoint(tmp_path), dtype)
    name = "model.layers.0.self_attn.q_proj.weight"
    live = quantize.dequantized(quantize.linear4bit(w0[name].to(dtype), dtype).weight)  # the run's 4-bit q_proj
    adapter = torch.randn(64, 128) * 1e-3
    torch.testing.assert_close(substitute(name, (w0[name] + adapter).to(dtype)), (live.float() + adapter).to(dtype))
    for name, w in w0.items():
        nf4 = quantize.NF4Tensor(w.to(dtype)).dequantize() if quantize.quantized_name(name) else w.to(dtype)
        wrong = substitute(name, nf4)  # an export of the dequantized base
        if quantize.quantized_name(name):
            error = (nf4.float() - w.float()).norm()
            assert (wrong.float() - nf4.float()).norm() == pytest.approx(error.item(), rel=0.05) and error > 0
        else:
            assert torch.equal(wrong, nf4)  # what is not quantized is read as it is


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_by_expert_kernel_equals_grouped_gemm_on_the_dequantized_weights(dtype):
    """Forward and input gradient of the 4-bit projection, one expert dequantized at a time, are bit for bit
    transformers' grouped GEMM over the dequantized (E, ·, ·) weight (empty experts and trailing rows included);
    DeepSpeed AutoEP's `GroupedExperts` on the same weights is the oracle of `QuantizedGroupedExperts`."""
    from deepspeed.moe.ep_experts import GroupedExperts
    from transformers.integrations.moe import _grouped_linear

    torch.manual_seed(0)
    gate_up, down = torch.randn(4, 2 * 48, 32).to(dtype) * 0.1, torch.randn(4, 32, 48).to(dtype) * 0.1
    q_gate_up, q_down = quantize.NF4Experts(gate_up), quantize.NF4Experts(down)
    counts = torch.tensor([5, 0, 17, 9])
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    x = torch.randn(int(counts.sum()), 32, dtype=dtype, requires_grad=True)
    for transposed, weight in ((False, q_gate_up), (True, q_gate_up)):
        xin = x if not transposed else torch.randn(int(counts.sum()), 2 * 48, dtype=dtype, requires_grad=True)
        ours = quantize.grouped_linear(xin, weight, offsets, transposed)
        dy = torch.randn_like(ours)
        (g_ours,) = torch.autograd.grad(ours, xin, dy)
        ref = _grouped_linear(xin, weight.dequantize(), offsets, is_transposed=transposed)
        (g_ref,) = torch.autograd.grad(ref, xin, dy)
        assert torch.equal(ours, ref) and torch.equal(g_ours, g_ref)
    experts = GroupedExperts(dim=32, hidden_dim=48, num_experts=4, use_grouped_mm=True)
    deq = q_gate_up.dequantize()
    with torch.no_grad():
        experts.w1.copy_(deq[:, :48]), experts.w3.copy_(deq[:, 48:]), experts.w2.copy_(q_down.dequantize())
    experts.to(dtype)
    tol = {} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(quantize.QuantizedGroupedExperts(q_gate_up, q_down)(x, counts), experts(x, counts), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_adapters_over_4_bit_experts_equal_peft_on_the_dequantized_model(dtype):
    """`lora.experts=true` over 4-bit experts: per-expert adapters in peft's layout (model/quantize.py ExpertLoRA).
    With the same adapter values, logits and every adapter gradient equal peft's `target_parameters` LoRA on the
    dequantized model, and the adapters-off context gives the base model's logits."""
    from omegaconf import OmegaConf

    from model.lora import PEFT_EXPERT_KEYS, adapters_off, apply_lora, expert_adapters

    lora = OmegaConf.create({"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
                             "experts": True, "train_router": False})
    q = _tiny("nf4", dtype)
    oracle = copy.deepcopy(q)
    quantize.dequantize_model(oracle)
    q, oracle = apply_lora(q, lora, dtype), apply_lora(oracle, lora, dtype)
    ours = {}
    for module_name, weight, adapter in expert_adapters(q):
        for half in "AB":
            key = f"{module_name.rsplit('.experts', 1)[0]}.{PEFT_EXPERT_KEYS[weight].format(half)}".replace(
                ".weight", ".default.weight")
            ours[key] = getattr(adapter, f"lora_{half}")
    ours.update({n: p for n, p in q.named_parameters() if "lora_" in n and ".experts.adapters." not in n})
    assert set(ours) == {n for n, p in oracle.named_parameters() if p.requires_grad}
    out_q, out_o, ids = _same_adapters_loss_backward(q, oracle, ours)
    theirs = dict(oracle.named_parameters())
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(out_q.logits, out_o.logits, **tol)
    for n, p in ours.items():
        torch.testing.assert_close(p.grad, theirs[n].grad, **({"atol": 1e-6, "rtol": 1e-4} if dtype == torch.float32 else tol))
    with torch.no_grad(), adapters_off(q), oracle.disable_adapter():
        base_q, base_o = q(ids).logits, oracle(ids).logits
    torch.testing.assert_close(base_q, base_o, **tol)
    assert (base_q - out_q.logits).abs().max() > 1e-3  # the adapters were really off
