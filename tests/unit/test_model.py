"""Model presets: build, save_pretrained → AutoModelForCausalLM round trip, router recording."""

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from model.build import build_model, count_parameters, mixtral_config
from model.router import RouterLogitsRecorder, load_balancing_loss
from train.config import compose


@pytest.fixture(scope="module")
def tiny_preset():
    return OmegaConf.to_container(compose("sft").model)


def test_tiny_preset_is_mixtral_shaped(tiny_preset):
    config = mixtral_config(tiny_preset)
    assert config.vocab_size == 32000
    assert (config.num_local_experts, config.num_experts_per_tok) == (8, 2)


def test_real_presets_have_published_shapes():
    c7 = mixtral_config(OmegaConf.to_container(compose("sft", ["model=mixtral_8x7b"]).model))
    assert (c7.hidden_size, c7.num_hidden_layers, c7.num_attention_heads, c7.num_key_value_heads,
            c7.intermediate_size, c7.num_local_experts, c7.num_experts_per_tok, c7.rope_parameters["rope_theta"],
            c7.max_position_embeddings, c7.vocab_size) == (4096, 32, 32, 8, 14336, 8, 2, 1e6, 32768, 32000)
    counts = count_parameters(c7)
    # published: 46.7B total, 12.9B active
    assert counts["total"] / 1e9 == pytest.approx(46.7, abs=0.1)
    assert counts["active"] / 1e9 == pytest.approx(12.9, abs=0.1)
    c22 = mixtral_config(OmegaConf.to_container(compose("sft", ["model=mixtral_8x22b"]).model))
    assert count_parameters(c22)["total"] / 1e9 == pytest.approx(140.6, abs=0.5)


def test_save_and_reload_gives_identical_logits(tiny_preset, tmp_path):
    model = build_model(tiny_preset, seed=0).eval()
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=False).eval()
    ids = torch.randint(0, 32000, (2, 17))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    # and build_model(model_path=...) loads the same weights
    again = build_model(tiny_preset, model_path=tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_same_seed_same_weights(tiny_preset):
    a, b = build_model(tiny_preset, seed=3), build_model(tiny_preset, seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_recorder_matches_hf_router_logits(tiny_preset):
    model = build_model(tiny_preset, seed=0).eval()
    recorder = RouterLogitsRecorder(model)
    assert recorder.num_layers == tiny_preset["num_hidden_layers"]
    ids = torch.randint(0, 32000, (2, 9))
    with torch.no_grad():
        with recorder:
            model(ids)
        hf = model(ids, output_router_logits=True).router_logits
    assert len(recorder.logits) == len(hf)
    for ours, theirs in zip(recorder.logits, hf):
        assert ours.shape == (18, 8)
        assert torch.equal(ours, theirs)
    # outside the context nothing is recorded
    with torch.no_grad():
        model(ids)
    assert len(recorder.logits) == len(hf)


def test_gradient_checkpointing_records_once_and_router_gets_grad(tiny_preset):
    model = build_model(tiny_preset, seed=0, gradient_checkpointing=True).train()
    recorder = RouterLogitsRecorder(model)
    ids = torch.randint(0, 32000, (2, 9))
    with recorder:
        out = model(ids)
    loss = out.logits.float().mean() + load_balancing_loss(recorder.logits, 2)
    loss.backward()
    assert len(recorder.logits) == tiny_preset["num_hidden_layers"]
    assert model.model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["sorted_grouped_mm", "grouped_mm", "batched_mm"])
def test_expert_kernels_match_the_eager_loop(tiny_preset, impl):
    """Each `experts_implementation` (ours is the default) computes what HF's per-expert loop computes, gradients too."""
    ids = torch.randint(3, 32000, (2, 24), generator=torch.Generator().manual_seed(0))
    results = {}
    for name in ("eager", impl):
        model = build_model({**tiny_preset, "experts_implementation": name}, seed=0)
        assert model.config._experts_implementation == name
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        results[name] = (out.logits.detach(), model.model.layers[0].mlp.experts.gate_up_proj.grad)
    torch.testing.assert_close(results[impl][0], results["eager"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[impl][1], results["eager"][1], atol=1e-6, rtol=1e-4)
    assert results["eager"][1].abs().sum() > 0


def test_packed_attention_matches_the_masked_sdpa(tiny_preset, monkeypatch):
    """Training on packed rows: per-document attention (the default) gives transformers' masked sdpa result,
    logits and gradients, for rows of several documents with trailing padding; eval mode takes sdpa's path."""
    from model import attention
    from model.attention import document_spans

    def not_per_document(*args, **kwargs):
        raise AssertionError("packed training rows went to transformers' sdpa")

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (2, 40), generator=g)
    position_ids = torch.cat([torch.cat([torch.arange(n) for n in (7, 20, 1, 12)]).unsqueeze(0),
                              torch.cat([torch.arange(n) for n in (30, 5)] + [torch.zeros(5, dtype=torch.long)]).unsqueeze(0)])
    assert document_spans(position_ids)[1] == [(0, 30), (30, 35), (35, 36), (36, 37), (37, 38), (38, 39), (39, 40)]
    results = {}
    for attn in ("sdpa", "packed_sdpa"):
        model = build_model({**tiny_preset, "attn_implementation": attn}, seed=0)
        assert model.config._attn_implementation == attn
        model.train()
        with monkeypatch.context() as m:
            if attn == "packed_sdpa":  # the per-document path, not the fallback, computes these
                m.setattr(attention, "sdpa_attention_forward", not_per_document)
            logits = model(input_ids=ids, position_ids=position_ids).logits
        (logits[:, :, :50].float() ** 2).mean().backward()
        q_grad = model.model.layers[0].self_attn.q_proj.weight.grad
        model.eval()
        with torch.no_grad():
            eval_logits = model(input_ids=ids, position_ids=position_ids).logits
        results[attn] = (logits.detach(), q_grad, eval_logits)
    assert results["sdpa"][1].abs().sum() > 0
    for ours, theirs in zip(results["packed_sdpa"], results["sdpa"]):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    # and the documents really are isolated: changing document 1 of row 0 leaves document 2's logits alone
    model.train()
    other = ids.clone()
    other[0, :7] = 5
    with torch.no_grad():
        a = model(input_ids=ids, position_ids=position_ids).logits
        b = model(input_ids=other, position_ids=position_ids).logits
    torch.testing.assert_close(a[0, 7:], b[0, 7:])
    assert not torch.allclose(a[0, :7], b[0, :7])


@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_gives_logits_or_the_cross_entropy_of_them(tiny_preset, tied):
    """`LMHead` keeps the state dict (tied or not); called without targets it is the nn.Linear it replaced;
    `causal_lm_loss` on the model's final hidden states (no logits computed) equals Σ CE of those logits,
    with autograd's gradients through them, for the LM head's weight and the model's other weights."""
    from model.head import NO_LOGITS, LMHead, install_lm_head
    from model.losses import causal_lm_loss

    model = build_model({**tiny_preset, "tie_word_embeddings": tied}, seed=0)
    keys, weight = list(model.state_dict()), model.get_output_embeddings().weight
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 32000, (2, 16), generator=g)
    plain = model(input_ids=ids).logits.detach()
    head = install_lm_head(model)
    assert isinstance(model.lm_head, LMHead) and head.weight is weight and list(model.state_dict()) == keys
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], 1)
    targets[:, :4] = -100
    logits = model(input_ids=ids).logits
    torch.testing.assert_close(logits, plain)
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                             reduction="sum")
    inner = model.model.layers[0].self_attn.q_proj.weight
    want_grads = torch.autograd.grad(want, [weight, inner])
    out = model(input_ids=ids, output_hidden_states=True, logits_to_keep=NO_LOGITS)
    assert out.logits.shape == (2, 0, 32000)
    total = causal_lm_loss(out.hidden_states[-1], model.lm_head, targets)
    assert total.dim() == 0
    torch.testing.assert_close(total, want, atol=1e-3, rtol=1e-5)
    for got, w in zip(torch.autograd.grad(total, [weight, inner]), want_grads):
        torch.testing.assert_close(got, w, atol=1e-5, rtol=1e-4)


def test_context_extension_overrides_a_model_paths_config(tiny_preset, tmp_path):
    """model.rope_theta_override / max_position_embeddings_override replace a loaded folder's config.json values
    (RoPE frequencies follow θ: inv_freq_i = θ^(−2i/d)); without them the folder's values stand, and a
    max_seq_len beyond the folder's max_position_embeddings is refused naming the override key."""
    from train.config import ConfigError
    from train.preflight import model_config_of, check

    build_model(tiny_preset, seed=0).save_pretrained(tmp_path)
    plain = build_model(tiny_preset, model_path=tmp_path)
    assert plain.config.rope_parameters["rope_theta"] == 1e6 and plain.config.max_position_embeddings == 2048
    extended = build_model({**tiny_preset, "rope_theta_override": 5e6, "max_position_embeddings_override": 8192},
                           model_path=tmp_path)
    assert extended.config.rope_parameters["rope_theta"] == 5e6 and extended.config.max_position_embeddings == 8192
    d = extended.config.hidden_size // extended.config.num_attention_heads
    expected = 5e6 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    torch.testing.assert_close(extended.model.rotary_emb.inv_freq.double(), expected, rtol=1e-6, atol=0)
    ids = torch.arange(3, 67)[None]
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, extended(ids).logits)
    cfg = compose("pretrain", ["recipe=tiny/pretrain", f"model_path={tmp_path}", "max_seq_len=4096"])
    with pytest.raises(ConfigError, match="max_position_embeddings_override"):
        check(cfg, 1, 1, torch.float32)
    cfg = compose("pretrain", ["recipe=tiny/pretrain", f"model_path={tmp_path}", "max_seq_len=4096",
                               "model.max_position_embeddings_override=8192"])
    assert model_config_of(cfg).max_position_embeddings == 8192
    check(cfg, 1, 1, torch.float32)
