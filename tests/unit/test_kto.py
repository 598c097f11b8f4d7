"""KTO: its data (unpaired examples, pairs split in two, the KL rows) and its loss against the paper's formula
and TRL 1.16's KTOTrainer itself."""

import math

import pytest
import torch

from data.formats import canonical, unpair
from data.preference import collate, encode_example, with_kl_completions
from data.readers import Record, RecordError
from model.losses import kto_loss

QA = [("What is 2 + 2?", "4.", True), ("Capital of Peru?", "Quito, I think.", False),
      ("Name a prime.", "Seven.", True), ("Is ice hot?", "Yes, very.", False)]


def test_kto_loss_is_the_papers_formula():
    """Eq. 7 of Ethayarajh et al. 2024: λ_D(1 − σ(β(r − z₀))) on desirable, λ_U(1 − σ(β(z₀ − r))) on the rest."""
    g = torch.Generator().manual_seed(0)
    pol, ref = -torch.rand(12, generator=g, dtype=torch.float64) * 40, -torch.rand(12, generator=g, dtype=torch.float64) * 40
    desirable = torch.rand(12, generator=g) > 0.5
    beta, z0, wd, wu = 0.3, 0.7, 1.5, 0.8
    losses, rewards = kto_loss(pol, ref, desirable, z0, beta, wd, wu)
    for i in range(12):
        r = float(pol[i] - ref[i])
        sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        want = wd * (1 - sigmoid(beta * (r - z0))) if desirable[i] else wu * (1 - sigmoid(beta * (z0 - r)))
        assert losses[i].item() == pytest.approx(want, rel=1e-12)
        assert rewards[i].item() == pytest.approx(beta * r, rel=1e-12)
    # policy == reference and z₀ = 0: every loss is half its weight
    half, _ = kto_loss(pol, pol, desirable, 0.0, beta, wd, wu)
    torch.testing.assert_close(half, torch.where(desirable, wd / 2, wu / 2).double())


def test_unpaired_records_and_pairs_split_in_two():
    rec = Record("f.jsonl:1", {"prompt": "Capital of Peru?", "completion": "Lima.", "label": True})
    assert canonical(rec, "auto", "unpaired") == {"prompt": [{"role": "user", "content": "Capital of Peru?"}],
                                                  "completion": "Lima.", "label": True}
    with pytest.raises(RecordError, match="only dpo.loss_type=kto trains on unpaired data"):
        canonical(rec, "auto", "preference")
    with pytest.raises(RecordError, match="'label' should be bool"):
        canonical(Record("f.jsonl:2", {"prompt": "a", "completion": "b", "label": "yes"}), "auto", "unpaired")
    pair = canonical(Record("f.jsonl:3", {"prompt": "Capital of Peru?", "chosen": "Lima.", "rejected": "Rome."}),
                     "auto", "unpaired")
    assert [(u["completion"], u["label"]) for u in unpair(pair)] == [("Lima.", True), ("Rome.", False)]


def test_kl_rows_take_the_nearest_earlier_completion_of_another_prompt(tokenizer):
    """Pairs split in two sit side by side with one prompt: the KL row skips the twin. With distinct prompts
    the pairing is TRL's: completions rotated by one over the batch."""
    ex = [{"prompt_ids": [1, p], "completion_ids": [10 * p + k], "label": k == 0} for p in range(3) for k in range(2)]
    kl = [e["kl_ids"] for e in with_kl_completions(ex, 64)]
    assert kl == [[21], [21], [1], [1], [11], [11]]
    distinct = [encode_example({"prompt": [{"role": "user", "content": q}], "completion": a, "label": d}, tokenizer)
                for q, a, d in QA]
    rotated = [e["completion_ids"] for e in distinct]
    assert [e["kl_ids"] for e in with_kl_completions(distinct, 256)] == [rotated[-1]] + rotated[:-1]
    assert with_kl_completions(distinct, len(distinct[0]["prompt_ids"]) + 1)[0]["kl_ids"] == rotated[-1][:1]
    with pytest.raises(ValueError, match="at least two different prompts"):
        with_kl_completions(ex[:2], 64)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.3, 0.6)])
def test_matches_trl_kto_trainer(weights, tokenizer, tmp_path):
    """TRL's KTOTrainer._compute_loss on the same model, reference and token ids: the loss, the KL reference
    point and the logged rewards and log-probs; the policy and reference in both orders, so that one of them
    has a positive KL estimate (the other clamps it to 0)."""
    import datasets
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, LlamaTokenizer
    from trl import KTOConfig, KTOTrainer

    from model.build import build_model
    from model.head import install_lm_head
    from model.sequence_parallel import shard
    from train.config import compose
    from train.reference import answer_logps

    preset = OmegaConf.to_container(compose("sft").model)
    for seed in (0, 1):
        build_model(preset, seed=seed).save_pretrained(tmp_path / f"m{seed}")
    hf_tok = LlamaTokenizer(vocab_file=str(tokenizer.path), legacy=True)
    hf_tok.pad_token = hf_tok.unk_token
    examples = with_kl_completions([encode_example({"prompt": [{"role": "user", "content": q}], "completion": a,
                                                    "label": d}, tokenizer) for q, a, d in QA], 256)
    dummy = datasets.Dataset.from_list([{"prompt": "a", "completion": "b", "label": True},
                                        {"prompt": "c", "completion": "d", "label": False}])
    kls = []
    for order in ((0, 1), (1, 0)):
        policy, ref = (AutoModelForCausalLM.from_pretrained(tmp_path / f"m{s}").eval() for s in order)
        args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=4, report_to=[], use_cpu=True, bf16=False,
                         beta=0.2, desirable_weight=weights[0], undesirable_weight=weights[1],
                         precompute_ref_log_probs=False, router_aux_loss_coef=0.0)  # the KTO loss alone
        trainer = KTOTrainer(model=policy, ref_model=ref, args=args, train_dataset=dummy, processing_class=hf_tok)
        batch = trainer.data_collator([{"prompt_ids": e["prompt_ids"], "completion_ids": e["completion_ids"],
                                        "KL_completion_ids": e["kl_ids"], "label": e["label"]} for e in examples])
        with torch.no_grad():
            trl_loss = trainer._compute_loss(trainer.model, batch, False)
            theirs = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
            install_lm_head(policy), install_lm_head(ref)
            logps = {}
            for key in ("completion_ids", "kl_ids"):
                b = shard(collate(examples, tokenizer.pad_id, answers=(key,)), 0, 1, tokenizer.pad_id)
                logps[key] = [answer_logps(m, b)[0].double() for m in (policy, ref)]
        desirable = torch.tensor([e["label"] for e in examples])
        z0 = (logps["kl_ids"][0] - logps["kl_ids"][1]).mean().clamp(min=0)
        losses, rewards = kto_loss(*logps["completion_ids"], desirable, z0, 0.2, *weights)
        # fp32 forwards of other shapes: log-probs agree to ~1e-5 relative, so β·(differences of ~−60) to ~1e-4
        assert losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-4, abs=1e-5)
        assert z0.item() == pytest.approx(theirs["kl"], abs=5e-4)
        assert rewards[desirable].mean().item() == pytest.approx(theirs["rewards/chosen"], abs=5e-4)
        assert rewards[~desirable].mean().item() == pytest.approx(theirs["rewards/rejected"], abs=5e-4)
        pol = logps["completion_ids"][0]
        assert pol[desirable].mean().item() == pytest.approx(theirs["logps/chosen"], rel=1e-5)
        assert pol[~desirable].mean().item() == pytest.approx(theirs["logps/rejected"], rel=1e-5)
        kls.append(z0.item())
    assert max(kls) > 1e-3 and min(kls) == 0.0, kls  # one order has a positive KL estimate, the other clamps it
