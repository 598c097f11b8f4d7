"""The LM head's chunked losses without logits (model/losses.py): `linear_ce_sum` (pretraining, SFT) and
`linear_logps` (the alignment stage) against autograd through the logits, in fp32 and bf16, and `final_hidden`."""

import pytest
import torch


def _head_case(seed, dtype, labelled):
    """(generator, hidden (3, 11, 16), LM-head weight (50, 16), labels with a share `labelled` not IGNORE_INDEX)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(3, 11, 16, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(50, 16, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 11), generator=g)
    labels[torch.rand(3, 11, generator=g) > labelled] = -100
    return g, hidden, weight, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("labelled", [0.9, 0.3], ids=["mostly_labelled", "sparse"])
def test_linear_ce_sum_matches_autograd_through_logits(labelled, dtype):
    """The chunked LM-head cross-entropy (gradients computed in forward) against F.linear + log-softmax by
    definition: same sum, same gradients for hidden and weight, with chunks that do not divide N."""
    from model.losses import linear_ce_sum

    g, hidden, weight, labels = _head_case(0, dtype, labelled)
    total = linear_ce_sum(hidden, weight, labels, chunk_rows=4)
    (total * 0.5).backward()  # a non-unit upstream gradient, as DeepSpeed's loss scaling gives
    logits = (hidden.detach().float() @ weight.detach().float().T).requires_grad_()
    want, count = 0.0, 0
    for b in range(3):
        for i in range(1, 11):
            if labels[b, i] != -100:
                want = want - logits[b, i - 1].log_softmax(-1)[labels[b, i]]
                count += 1
    assert count > 3 and total.dtype == torch.float32
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(total.detach(), want.detach(), **tol)
    dlogits = torch.autograd.grad(want * 0.5, logits)[0]
    torch.testing.assert_close(hidden.grad.float(), dlogits @ weight.detach().float(), **tol)
    torch.testing.assert_close(weight.grad.float(), dlogits.flatten(0, 1).T @ hidden.detach().float().flatten(0, 1), **tol)


def test_linear_ce_sum_frozen_weight_and_no_grad():
    from model.losses import linear_ce_sum

    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 7, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g)  # frozen (LoRA): no weight gradient is made
    labels = torch.randint(0, 30, (2, 7), generator=g)
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                            reduction="sum")
    total = linear_ce_sum(hidden, weight, labels, chunk_rows=5)
    total.backward()
    torch.testing.assert_close(hidden.grad, torch.autograd.grad(ref, hidden)[0], atol=1e-5, rtol=1e-5)
    assert weight.grad is None
    with torch.no_grad():
        torch.testing.assert_close(linear_ce_sum(hidden, weight, labels), ref.detach(), atol=1e-4, rtol=1e-5)
        # logits hundreds of nats apart: p(target) underflows to 0 in fp32, the loss stays exact and finite
        wide = hidden * 200
        want = torch.nn.functional.cross_entropy((wide @ weight.T)[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                                 reduction="sum")
        assert want > 1000
        torch.testing.assert_close(linear_ce_sum(wide, weight, labels), want, atol=1e-2, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("labelled", [0.9, 0.3], ids=["mostly_labelled", "sparse"])
def test_linear_logps_match_autograd_through_logits(labelled, dtype):
    """DPO's chunked LM-head log-probs (logits recomputed in backward) against F.linear + log-softmax by
    definition: same values, same gradients for hidden and weight under a random upstream gradient, with
    chunks and backward tiles that do not divide N or V, and the default tiles; under no_grad nothing is kept."""
    from model.losses import linear_logps

    g, hidden, weight, targets = _head_case(2, dtype, labelled)
    logp = linear_logps(hidden, weight, targets, chunk_rows=4, tile=(3, 16))  # tiles that divide neither N nor V
    upstream = torch.randn(logp.shape, generator=g)
    (logp * upstream).sum().backward()
    logits = (hidden.detach().float() @ weight.detach().float().T).requires_grad_()
    sel = targets != -100
    want = logits.log_softmax(-1)[sel].gather(1, targets[sel].unsqueeze(1)).squeeze(1)
    assert sel.sum() > 3 and logp.dtype == torch.float32 and logp.shape == want.shape
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(logp.detach(), want.detach(), **tol)
    dlogits = torch.autograd.grad((want * upstream).sum(), logits)[0]
    torch.testing.assert_close(hidden.grad.float(), dlogits @ weight.detach().float(), **tol)
    torch.testing.assert_close(weight.grad.float(), dlogits.flatten(0, 1).T @ hidden.detach().float().flatten(0, 1), **tol)
    frozen = weight.detach()  # LoRA: the head is frozen, only hidden gets a gradient
    hidden.grad = None
    (linear_logps(hidden, frozen, targets, chunk_rows=5) * upstream).sum().backward()
    torch.testing.assert_close(hidden.grad.float(), dlogits @ weight.detach().float(), **tol)
    with torch.no_grad():
        assert linear_logps(hidden, weight, targets).grad_fn is None
    # no target at all (a sequence-parallel shard holding only prompt tokens): empty log-probs, zero gradients
    none = torch.full_like(targets, -100)
    hidden.grad = weight.grad = None
    empty = linear_logps(hidden, weight, none)
    assert empty.shape == (0,)
    (empty.sum() + 0 * hidden.sum()).backward()
    assert weight.grad is not None and not weight.grad.any() and not hidden.grad.any()


def test_final_hidden_is_what_the_head_reads(tokenizer):
    """`final_hidden` hands over the last norm's output, which through the head gives the model's own logits."""
    from omegaconf import OmegaConf

    from model.build import build_model
    from model.head import NO_LOGITS, final_hidden
    from train.config import compose

    model = build_model(OmegaConf.to_container(compose("sft").model), seed=0).eval()
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris.")])
    with torch.no_grad():
        logits = model(ids).logits
        with final_hidden(model) as hidden:
            out = model(ids, logits_to_keep=NO_LOGITS)
        assert out.logits.numel() == 0 and len(hidden) == 1
        torch.testing.assert_close(model.get_output_embeddings()(hidden[0]), logits)
