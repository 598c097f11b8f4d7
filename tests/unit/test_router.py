"""Router load-balancing and z-loss against hand-worked values and the paper formulas."""

import math

import pytest
import torch
import torch.nn.functional as F

from model.router import (ExpertLoadAccumulator, expert_counts, load_balancing_loss, router_statistics, z_loss)


def _logits_for(assign, num_experts, strong=20.0):
    """Logits whose top-k are exactly the experts listed per token; rest near-zero prob."""
    logits = torch.zeros(len(assign), num_experts)
    for t, experts in enumerate(assign):
        for e in experts:
            logits[t, e] = strong
    return logits


def test_balanced_routing_gives_one():
    # 4 experts, top-2; 4 tokens covering every expert twice, uniform probabilities among chosen.
    E = 4
    logits = _logits_for([(0, 1), (2, 3), (0, 2), (1, 3)], E)
    loss = load_balancing_loss([logits], top_k=2)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    # uniform logits: P_e = 1/E exactly; f ties broken by topk but P is flat → E * sum f * 1/E = 1
    assert load_balancing_loss([torch.zeros(16, 8)], top_k=2).item() == pytest.approx(1.0, abs=1e-6)


def test_skewed_routing_hand_worked():
    # E=4, k=1, 2 tokens both routed to expert 0 with logits [ln3, 0, 0, 0]:
    # softmax = [3/6, 1/6, 1/6, 1/6]; f = [1, 0, 0, 0]; P = [1/2, 1/6, 1/6, 1/6]
    # loss = E * f·P = 4 * 1/2 = 2.0
    logits = torch.tensor([[math.log(3), 0.0, 0.0, 0.0]] * 2)
    assert load_balancing_loss([logits], top_k=1).item() == pytest.approx(2.0, abs=1e-6)
    # k=2 on the same logits: top-2 = {0, 1} (tie among 1..3 broken to the lowest index by topk)
    # f = [2/4, 2/4, 0, 0]; loss = 4 * (1/2*1/2 + 1/2*1/6) = 4 * (1/4 + 1/12) = 4/3
    assert load_balancing_loss([logits], top_k=2).item() == pytest.approx(4 / 3, abs=1e-6)


def test_matches_switch_formula_on_random_logits():
    torch.manual_seed(0)
    E, k, T = 8, 2, 50
    logits = torch.randn(T, E)
    probs = logits.softmax(-1)
    idx = probs.topk(k, -1).indices
    f = F.one_hot(idx, E).sum(1).float().mean(0) / k
    P = probs.mean(0)
    assert load_balancing_loss([logits], k).item() == pytest.approx((E * (f * P).sum()).item(), rel=1e-6)


def test_padding_is_masked():
    torch.manual_seed(0)
    real = torch.randn(10, 8)
    pad = torch.randn(6, 8) * 10  # garbage that would change the loss if counted
    mask = torch.tensor([True] * 10 + [False] * 6)
    masked = load_balancing_loss([torch.cat([real, pad])], 2, mask)
    assert masked.item() == pytest.approx(load_balancing_loss([real], 2).item(), rel=1e-6)
    assert z_loss([torch.cat([real, pad])], mask).item() == pytest.approx(z_loss([real]).item(), rel=1e-6)


def test_per_layer_opposite_skews_do_not_cancel():
    # layer A sends everything to experts {0,1}, layer B to {2,3}: concatenated they look balanced.
    a = _logits_for([(0, 1)] * 4, 4)
    b = _logits_for([(2, 3)] * 4, 4)
    ours = load_balancing_loss([a, b], top_k=2)
    assert ours.item() == pytest.approx(2.0, abs=1e-4)  # each layer: 4 * (2 * 1/2 * 1/2) = 2
    concatenated = load_balancing_loss([torch.cat([a, b])], top_k=2)
    assert concatenated.item() == pytest.approx(1.0, abs=1e-4)  # what HF's concatenation sees


def test_hf_balanced_value_is_top_k():
    """Documented relation: HF's concatenated loss is K at balance where ours is 1."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = torch.zeros(16, 8)
    hf = load_balancing_loss_func((logits,), num_experts=8, top_k=2)
    assert hf.item() == pytest.approx(2.0, abs=1e-6)
    assert load_balancing_loss([logits], 2).item() == pytest.approx(1.0, abs=1e-6)


def test_gradients_reach_router_weights():
    torch.manual_seed(0)
    router = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(32, 16)
    logits = router(x)
    (load_balancing_loss([logits], 2) + z_loss([logits])).backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    # lse = ln 2 and ln 4
    expected = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z_loss([logits]).item() == pytest.approx(expected, rel=1e-6)
    assert z_loss([logits, logits * 0]).item() == pytest.approx((expected + math.log(2) ** 2) / 2, rel=1e-6)


def test_global_fraction_matches_one_big_batch():
    torch.manual_seed(0)
    chunks = [torch.randn(7, 8), torch.randn(5, 8), torch.randn(9, 8)]
    acc = ExpertLoadAccumulator(top_k=2)
    for c in chunks:
        acc.add([c])
    whole = torch.cat(chunks)
    # f from the accumulator == f of the concatenated batch
    big = load_balancing_loss([whole], 2)
    via_acc = load_balancing_loss([whole], 2, expert_fraction=acc.fraction())
    assert via_acc.item() == pytest.approx(big.item(), rel=1e-6)
    assert acc.fraction().sum().item() == pytest.approx(1.0)
    acc.reset()
    with pytest.raises(RuntimeError):
        acc.fraction()


def test_statistics_dead_experts_and_shares():
    logits = _logits_for([(0, 1), (0, 1), (0, 2)], 4)
    counts = expert_counts([logits], 2)
    assert counts.tolist() == [[3.0, 2.0, 1.0, 0.0]]
    stats = router_statistics(counts)
    assert stats["dead_experts"] == [1]
    assert stats["max_share"][0] == pytest.approx(0.5)
    assert stats["min_share"][0] == 0.0
    assert router_statistics(torch.ones(1, 8))["load_entropy"][0] == pytest.approx(1.0)


def test_routing_drift_is_zero_for_identical_routers_and_a_direct_computation_otherwise():
    """`drift_sums` / `routing_drift` (model/router.py): exactly 0 when the policy's router logits are the
    reference's; for a perturbed router, the KL and the load shift a direct computation gives (per token
    torch.distributions' KL, per expert the top-k counts), over the masked tokens only."""
    from model.router import drift_sums, routing_drift

    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(12, 8, generator=g) for _ in range(3)]
    mask = torch.rand(12, generator=g) > 0.3
    kl, shift = routing_drift(drift_sums(ref, [r.clone() for r in ref], 2, mask))
    assert torch.equal(kl, torch.zeros(3, dtype=kl.dtype)) and torch.equal(shift, torch.zeros(3, dtype=shift.dtype))
    pol = [r + torch.randn(12, 8, generator=g) * s for r, s in zip(ref, (0.0, 0.5, 2.0))]
    # two micro-batches (the halves), summed as the stage sums them over micro-batches and ranks
    sums = drift_sums([p[:6] for p in pol], [r[:6] for r in ref], 2, mask[:6]) + \
        drift_sums([p[6:] for p in pol], [r[6:] for r in ref], 2, mask[6:])
    kl, shift = routing_drift(sums)
    for l in range(3):
        p, q = torch.distributions.Categorical(logits=pol[l][mask]), torch.distributions.Categorical(logits=ref[l][mask])
        assert kl[l].item() == pytest.approx(torch.distributions.kl_divergence(p, q).mean().item(), rel=1e-5, abs=1e-7)
        share = [torch.bincount(x[mask].topk(2, -1).indices.reshape(-1), minlength=8).double() / (2 * mask.sum())
                 for x in (pol[l], ref[l])]
        assert shift[l].item() == pytest.approx(0.5 * (share[0] - share[1]).abs().sum().item(), abs=1e-12)
    assert kl[0] == 0 and 0 < kl[1] < kl[2]
