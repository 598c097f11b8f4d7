"""Held-out measurements of the embedded curriculum (data/synthetic.py), used by the pipeline report.

    heldout_loss    mean next-token cross-entropy of a model on held-out documents (nats/token)
    unigram_loss    the same for a unigram model of the training tokens (add-one smoothing): the
                    baseline a pretrained model must beat by learning context
    exact_match     greedy answers to held-out [INST] prompts compared with the reference, exactly
    preference_eval reward accuracy and margin of a DPO policy against its reference on held-out pairs
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from data.chat import encode_prompt
from data.preference import collate, encode_pair, pair_logps
from eval.generate import generate


@torch.no_grad()
def heldout_loss(model, tokenizer, texts: list[str], max_len: int = 512) -> float:
    total, count = 0.0, 0
    for t in texts:
        ids = torch.tensor([([tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id])[:max_len]], device=model.device)
        logits = model(ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def unigram_loss(tokenizer, train_texts: list[str], heldout_texts: list[str]) -> float:
    counts = Counter()
    for t in train_texts:
        counts.update(tokenizer.encode(t) + [tokenizer.eos_id])
    total = sum(counts.values()) + tokenizer.vocab_size
    nll, n = 0.0, 0
    for t in heldout_texts:
        for tok in tokenizer.encode(t) + [tokenizer.eos_id]:
            nll -= math.log((counts[tok] + 1) / total)
            n += 1
    return nll / n


def exact_match(model, tokenizer, chats: list[dict], max_new_tokens: int = 24, batch_size: int = 32) -> dict:
    prompts = [encode_prompt(c["messages"][:-1], tokenizer) for c in chats]
    outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False)
    answers = [tokenizer.decode(o).strip() for o in outs]
    refs = [c["messages"][-1]["content"].strip() for c in chats]
    correct = [a == r for a, r in zip(answers, refs)]
    return {"exact_match": sum(correct) / len(correct), "n": len(correct),
            "examples": [{"prompt": c["messages"][-2]["content"], "answer": a, "reference": r}
                         for c, a, r in list(zip(chats, answers, refs))[:5]]}


@torch.no_grad()
def preference_eval(policy, reference, tokenizer, pairs: list[dict], beta: float, batch_size: int = 16) -> dict:
    enc = [encode_pair(p, tokenizer) for p in pairs]
    margins = []
    for s in range(0, len(enc), batch_size):
        b = {k: v.to(policy.device) if isinstance(v, torch.Tensor) else v
             for k, v in collate(enc[s:s + batch_size], tokenizer.pad_id).items()}
        # use_cache=False: with a KV cache (an export's config.json says use_cache: true) transformers does not
        # build the per-segment mask from the restarting position ids, and the rejected answer attends to
        # the chosen one laid out before it in the row
        kw = dict(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
        pc, pr, _, _ = pair_logps(policy(**kw).logits, b)
        rc, rr, _, _ = pair_logps(reference(**kw).logits, b)
        margins += (beta * ((pc - rc) - (pr - rr))).tolist()
    return {"reward_accuracy": sum(m > 0 for m in margins) / len(margins), "reward_margin": sum(margins) / len(margins),
            "n": len(margins)}
