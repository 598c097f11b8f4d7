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


def test_pair_layout_logps_equal_separate_forwards(tokenizer):
    """The one-row, two-segment layout gives exactly the log-probs of two separate sequences."""
    from omegaconf import OmegaConf

    from model.build import build_model
    from train.config import compose

    model = build_model(OmegaConf.to_container(compose("sft").model), seed=0).eval()
    pair = encode_pair({"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "chosen": "4.", "rejected": "It is 5."},
                       tokenizer)
    b = collate([pair, pair], tokenizer.pad_id)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        c, r, nc, nr = pair_logps(out, b["labels"], b["segment"])
        for ans, got, n in (("chosen_ids", c, nc), ("rejected_ids", r, nr)):
            ids = torch.tensor([pair["prompt_ids"] + pair[ans]])
            logp = model(ids).logits[0, :-1].log_softmax(-1)
            want = sum(logp[i - 1, ids[0, i]] for i in range(len(pair["prompt_ids"]), ids.shape[1]))
            torch.testing.assert_close(got[0].double(), want.double(), atol=1e-4, rtol=1e-5)
            assert n[0] == len(pair[ans])
    # the router mask counts the shared prompt once: chosen segment whole, rejected answer only
    assert b["router_mask"][0].sum() == len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


def test_common_suffix_masking(tokenizer):
    """mask_common_suffix drops the answers' shared ending (". </s>" here) from both log-probs, and nothing else:
    each masked sum equals the unmasked one minus those tokens' own log-probs."""
    from omegaconf import OmegaConf

    from data.preference import common_suffix, word_joins
    from model.build import build_model
    from train.config import compose

    assert common_suffix([1, 2, 3], [4, 2, 3]) == 2 and common_suffix([1, 2], [2]) == 0 and common_suffix([5, 1], [1]) == 0
    # "7." against "17.": the tokens "7 . </s>" are common, but in "17" the "7" continues a word, so the shared
    # ending is ". </s>" and each answer keeps its own number
    joins = word_joins(tokenizer)
    c, r = tokenizer.encode("3 + 4 = 7.") + [tokenizer.eos_id], tokenizer.encode("3 + 4 = 17.") + [tokenizer.eos_id]
    assert common_suffix(c, r) == 3 and common_suffix(c, r, joins) == 2
    assert tokenizer.decode(c[:-2]).endswith("7") and tokenizer.decode(r[:-2]).endswith("17")
    c, r = tokenizer.encode("It is Lima.") + [tokenizer.eos_id], tokenizer.encode("It is New Lima.") + [tokenizer.eos_id]
    k = common_suffix(c, r, joins)
    assert k == common_suffix(c, r) and tokenizer.decode(c[-k:-1]) == "Lima."  # " Lima. </s>" starts a word in both
    model = build_model(OmegaConf.to_container(compose("sft").model), seed=0).eval()
    pair = encode_pair({"prompt": [{"role": "user", "content": "What is the capital of Peru?"}],
                        "chosen": "The capital of Peru is Lima.", "rejected": "The capital of Peru is Rome."}, tokenizer)
    k = common_suffix(pair["chosen_ids"], pair["rejected_ids"])
    assert k == 2 and pair["chosen_ids"][-k:] == tokenizer.encode("Lima.")[-1:] + [tokenizer.eos_id]
    full, masked = collate([pair], tokenizer.pad_id), collate([pair], tokenizer.pad_id, True, tokenizer)
    with pytest.raises(ValueError, match="needs the tokenizer"):
        collate([pair], tokenizer.pad_id, mask_common_suffix=True)
    assert torch.equal(full["input_ids"], masked["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=full["input_ids"], position_ids=full["position_ids"]).logits
        c, r, nc, nr = pair_logps(logits, full["labels"], full["segment"])
        mc, mr, mnc, mnr = pair_logps(logits, masked["labels"], masked["segment"])
        logp = logits[0, :-1].log_softmax(-1)
    assert (nc - mnc).item() == k and (nr - mnr).item() == k
    ends = [len(pair["prompt_ids"]) + len(pair["chosen_ids"]), full["input_ids"].shape[1]]
    ids = full["input_ids"][0]
    for got, want, end in ((mc, c, ends[0]), (mr, r, ends[1])):
        tail = sum(logp[i - 1, ids[i]] for i in range(end - k, end))
        torch.testing.assert_close(got, want - tail, atol=1e-4, rtol=1e-5)


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
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=2, report_to=[], use_cpu=True,
                     beta=0.2, loss_type=[loss_type], label_smoothing=eps, precompute_ref_log_probs=False,
                     router_aux_loss_coef=0.0)  # compare the preference loss alone (no HF aux term)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dummy, processing_class=hf_tok)
    batch = trainer.data_collator([{k: p[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for p in pairs])
    with torch.no_grad():
        trl_loss = trainer._compute_loss(trainer.model, batch, False)
        b = collate(pairs, tokenizer.pad_id)
        pc, pr, nc, nr = pair_logps(policy(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits, b["labels"], b["segment"])
        rc, rr, _, _ = pair_logps(ref(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits, b["labels"], b["segment"])
        # the DPO stage's own path: the LM head's log-probs without logits, from the final norm's output
        from model.head import install_lm_head
        from model.sequence_parallel import shift
        from train.reference import answer_logps

        install_lm_head(policy), install_lm_head(ref)
        staged = {**b, "targets": shift(b["labels"]), "target_segment": shift(b["segment"])}
        stage_logps = [answer_logps(policy, staged), answer_logps(ref, staged)]
    for got, want in zip([*stage_logps[0], *stage_logps[1][:2]], [pc, pr, nc, nr, rc, rr]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if loss_type == "ipo":
        pc, pr, rc, rr = pc / nc, pr / nr, rc / nc, rr / nr
    ours = dpo_loss(pc, pr, rc, rr, 0.2, loss_type, eps)[0].mean()
    assert abs(ours.item() - math.log(2)) > 1e-3 or loss_type == "hinge"  # a non-trivial comparison
    assert ours.item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-5)


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
    chunks that do not divide N; under no_grad nothing is kept."""
    from model.losses import linear_logps

    g, hidden, weight, targets = _head_case(2, dtype, labelled)
    logp = linear_logps(hidden, weight, targets, chunk_rows=4)
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
