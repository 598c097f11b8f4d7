"""The DPO stage's packed rows (data/preference.py `collate`): every pair's log-probs equal separate sequences',
with the prompt laid out per answer or shared, gradients included, and the common-suffix masking."""

import pytest
import torch

from data.preference import collate, encode_pair, pair_logps


@pytest.mark.parametrize("share_prompt", [False, True])
def test_pair_layout_logps_equal_separate_forwards(tokenizer, share_prompt, monkeypatch):
    """The packed layout (a micro-batch's pairs in one row, two segments each, no padding) gives the log-probs of
    separate sequences, each pair's in its own slot; so does the shared-prompt layout, where the rejected answer
    holds only the prompt's last token and reads the prompt from the chosen segment (training mode: the
    per-document attention), with the prompt in the row once — also where rows of separate documents would
    take transformers' masked sdpa (GPUs: `splits_documents_on` False)."""
    from omegaconf import OmegaConf

    from model import attention
    from model.build import build_model
    from train.config import compose

    model = build_model(OmegaConf.to_container(compose("sft").model), seed=0).train()
    pairs = [encode_pair({"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}, tokenizer)
             for q, c, r in [("What is 2 + 2?", "4.", "It is 5."), ("Name a colour.", "Blue, like the sea.", "Seven.")]]
    b = collate(pairs, tokenizer.pad_id, share_prompt=share_prompt)
    copies = [1 if share_prompt else len(p["prompt_ids"]) for p in pairs]  # the second segment's prompt tokens
    assert b["input_ids"].shape == (1, sum(len(p["prompt_ids"]) + c + len(p["chosen_ids"]) + len(p["rejected_ids"])
                                           for p, c in zip(pairs, copies))) and b["pairs"] == 2  # no padding
    if share_prompt:
        monkeypatch.setattr(attention, "splits_documents_on", lambda device: False)
    with torch.no_grad():
        out = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        c, r, nc, nr = pair_logps(out, b)
        for k, pair in enumerate(pairs):
            for ans, got, n in (("chosen_ids", c, nc), ("rejected_ids", r, nr)):
                ids = torch.tensor([pair["prompt_ids"] + pair[ans]])
                logp = model(ids).logits[0, :-1].log_softmax(-1)
                want = sum(logp[i - 1, ids[0, i]] for i in range(len(pair["prompt_ids"]), ids.shape[1]))
                torch.testing.assert_close(got[k].double(), want.double(), atol=1e-4, rtol=1e-5)
                assert n[k] == len(pair[ans])
    # the router mask counts each shared prompt once: chosen segment whole, rejected answer only
    assert b["router_mask"].sum() == sum(len(p["prompt_ids"]) + len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in pairs)


def test_shared_prompt_gradients_equal_separate_prompts(tokenizer):
    """With the prompt shared (the rejected answer reads the chosen segment's copy), the gradient that reaches
    every weight through both answers' log-probs equals the one of the layout with a prompt copy per answer."""
    from omegaconf import OmegaConf

    from model.build import build_model
    from train.config import compose

    pairs = [encode_pair({"prompt": [{"role": "user", "content": q}], "chosen": c, "rejected": r}, tokenizer)
             for q, c, r in [("What is 2 + 2?", "4.", "It is 5."), ("Name a colour.", "Blue, like the sea.", "Seven.")]]
    grads = []
    for share in (False, True):
        model = build_model(OmegaConf.to_container(compose("sft").model), seed=0).train()
        b = collate(pairs, tokenizer.pad_id, share_prompt=share)
        c, r, _, _ = pair_logps(model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits, b)
        (c.sum() - 2 * r.sum()).backward()
        grads.append({n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]["model.layers.0.self_attn.k_proj.weight"].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


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
        c, r, nc, nr = pair_logps(logits, full)
        mc, mr, mnc, mnr = pair_logps(logits, masked)
        logp = logits[0, :-1].log_softmax(-1)
    assert (nc - mnc).item() == k and (nr - mnr).item() == k
    ends = [len(pair["prompt_ids"]) + len(pair["chosen_ids"]), full["input_ids"].shape[1]]
    ids = full["input_ids"][0]
    for got, want, end in ((mc, c, ends[0]), (mr, r, ends[1])):
        tail = sum(logp[i - 1, ids[i]] for i in range(end - k, end))
        torch.testing.assert_close(got, want - tail, atol=1e-4, rtol=1e-5)
