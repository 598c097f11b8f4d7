"""DPO-family losses against the papers' formulas and against TRL's DPOTrainer itself."""

import math

import pytest
import torch
import torch.nn.functional as F

from data.preference import collate, encode_pair, pair_logps
from model.losses import dpo_loss

TYPES = ["sigmoid", "ipo", "hinge", "robust"]


def _rand(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 50) for _ in range(4)]


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_formulas_on_random_inputs(label_smoothing):
    pc, pr, rc, rr = _rand()
    beta, eps = 0.3, label_smoothing
    h = (pc - pr) - (rc - rr)
    expected = {
        "sigmoid": -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps,   # DPO eq. 7 + cDPO
        "robust": (-F.logsigmoid(beta * h) * (1 - eps) + F.logsigmoid(-beta * h) * eps) / (1 - 2 * eps),
        "hinge": torch.clamp(1 - beta * h, min=0),
        "ipo": (h - 1 / (2 * beta)) ** 2,
    }
    for t in TYPES:
        losses, rc_, rr_ = dpo_loss(pc, pr, rc, rr, beta, t, eps)
        torch.testing.assert_close(losses, expected[t])
        torch.testing.assert_close(rc_, beta * (pc - rc))
        torch.testing.assert_close(rr_, beta * (pr - rr))


def test_dpop_formula_and_where_it_acts():
    """DPO-Positive (Pal et al. 2024, eq. 3): −log σ(β·(h − λ·max(0, log π_ref(y_w) − log π(y_w))))."""
    pc, pr, rc, rr = _rand(1)
    beta, lam = 0.3, 50.0
    penalty = torch.clamp(rc - pc, min=0)
    expected = -F.logsigmoid(beta * ((pc - pr) - (rc - rr) - lam * penalty))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, dpop_lambda=lam)[0], expected)
    # where the chosen answer's likelihood has not fallen below the reference's, DPOP is plain DPO
    up = rc + 0.5
    torch.testing.assert_close(dpo_loss(up, pr, rc, rr, beta, dpop_lambda=lam)[0], dpo_loss(up, pr, rc, rr, beta)[0])
    # where it has fallen, DPOP pulls the chosen log-likelihood up harder than DPO does
    down = (rc - 0.5).requires_grad_()
    dpo_loss(down, pr, rc, rr, beta)[0].sum().backward()
    g_dpo = down.grad.clone()
    down.grad = None
    dpo_loss(down, pr, rc, rr, beta, dpop_lambda=lam)[0].sum().backward()
    assert (down.grad < g_dpo).all()   # more negative gradient = a larger push up on log π(y_w)


def test_policy_equal_reference_gives_ln2():
    pc, pr, _, _ = _rand()
    losses, c, r = dpo_loss(pc, pr, pc, pr, beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)))
    assert (c == 0).all() and (r == 0).all()


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
def test_matches_trl_dpo_trainer(loss_type, eps, tokenizer, tmp_path):
    """TRL's DPOTrainer._compute_loss on the same model, reference and token ids."""
    import datasets
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaTokenizer
    from trl import DPOConfig, DPOTrainer

    from model.build import build_model
    from train.config import compose

    preset = OmegaConf.to_container(compose("sft").model)
    build_model(preset, seed=0).save_pretrained(tmp_path / "policy")
    build_model(preset, seed=1).save_pretrained(tmp_path / "ref")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "ref").eval()
    hf_tok = LlamaTokenizer(vocab_file=str(tokenizer.path), legacy=True)
    hf_tok.pad_token = hf_tok.unk_token
    pairs = [encode_pair({"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}, tokenizer)
             for q, c, r in [("What is 2 + 2?", "4.", "It is 5."), ("Capital of Peru?", "Lima.", "Quito, I think.")]]
    dummy = datasets.Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 2)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                     beta=0.2, loss_type=[loss_type], label_smoothing=eps, precompute_ref_log_probs=False,
                     router_aux_loss_coef=0.0)  # compare the preference loss alone (no HF aux term)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dummy, processing_class=hf_tok)
    batch = trainer.data_collator([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs])
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, False)
        b = collate(pairs, tokenizer.pad_id)
        pc, pr, nc, nr = pair_logps(policy(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits, b)
        rc, rr, _, _ = pair_logps(ref(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits, b)
        # the DPO stage's own path: the LM head's log-probs without logits, from the final norm's output
        from model.head import install_lm_head
        from model.sequence_parallel import shard
        from train.reference import answer_logps

        install_lm_head(policy), install_lm_head(ref)
        staged = shard(b, 0, 1, tokenizer.pad_id)  # labels shifted to targets, as the stage trains
        stage_logps = [answer_logps(policy, staged), answer_logps(ref, staged)]
    for got, want in zip([*stage_logps[0], *stage_logps[1][:2]], [pc, pr, nc, nr, rc, rr]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if loss_type == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    ours = dpo_loss(pc, pr, rc, rr, 0.2, loss_type, eps)[0].mean()
    assert abs(ours.item() - math.log(2)) > 1e-3 or loss_type == "hinge"  # a non-trivial comparison
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-5)


def _trl_self(**kwargs):
    """What TRL's loss methods read from their trainer: their settings and the accelerator's device."""
    from types import SimpleNamespace

    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **kwargs)


def _average_logps(seed: int, n: int = 16):
    """Per-token mean log-probs of chosen and rejected answers, (n,) each, spanning both sides of −ln 2."""
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 3 + 1e-3) for _ in range(2)]


def test_orpo_equals_trl_odds_ratio_loss():
    """ORPO's odds-ratio term (model/losses.py) against TRL 1.16's `ORPOTrainer.odds_ratio_loss` on the same
    log-probs: TRL returns β·log σ(log OR) (its loss subtracts the mean), ours the positive loss −β·log σ."""
    from trl.experimental.orpo import ORPOTrainer

    from model.losses import orpo_loss

    chosen, rejected = _average_logps(0)
    ours, oc, orr, log_odds = orpo_loss(chosen, rejected, 0.25)
    theirs, tc, tr, mean_ratio, mean_log_odds = ORPOTrainer.odds_ratio_loss(_trl_self(beta=0.25), chosen, rejected)
    torch.testing.assert_close(ours, -theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(oc, tc, rtol=1e-6, atol=1e-6), torch.testing.assert_close(orr, tr, rtol=1e-6, atol=1e-6)
    assert log_odds.mean().item() == pytest.approx(mean_log_odds.item(), rel=1e-6)
    assert (-ours / 0.25).mean().item() == pytest.approx(mean_ratio.item(), rel=1e-6)
    # by definition: odds = P / (1 − P), P = e^ℓ
    odds = lambda lp: lp.exp() / (1 - lp.exp())  # noqa: E731
    torch.testing.assert_close(log_odds, (odds(chosen) / odds(rejected)).log().float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_equals_trl_cpo_loss_with_simpo_settings(label_smoothing):
    """SimPO (model/losses.py) against TRL 1.16's `CPOTrainer.cpo_loss` with loss_type="simpo" on the same
    log-probs: losses and the logged rewards."""
    from trl.experimental.cpo import CPOTrainer

    from model.losses import simpo_loss

    chosen, rejected = _average_logps(1)
    settings = dict(beta=2.0, simpo_gamma=0.7, label_smoothing=label_smoothing)
    ours, oc, orr = simpo_loss(chosen, rejected, settings["beta"], settings["simpo_gamma"], label_smoothing)
    theirs, tc, tr = CPOTrainer.cpo_loss(_trl_self(alpha=0.0, loss_type="simpo", **settings), chosen, rejected)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(oc, tc, rtol=1e-6, atol=1e-6), torch.testing.assert_close(orr, tr, rtol=1e-6, atol=1e-6)
    h = chosen - rejected - 0.7 / 2.0  # the paper's eq. 6
    want = -F.logsigmoid(2.0 * h) * (1 - label_smoothing) - F.logsigmoid(-2.0 * h) * label_smoothing
    torch.testing.assert_close(ours, want)
