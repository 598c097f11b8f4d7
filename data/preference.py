"""Preference pairs → token ids, and the packed layout the DPO stage trains on.

A pair {prompt: messages ending with user, chosen: str, rejected: str} is encoded as
    prompt   = data.chat.encode_prompt(prompt)          (<s> [INST] ... [/INST])
    chosen   = enc(chosen) + </s>       rejected = enc(rejected) + </s>
exactly the tokens `encode_chat(prompt + [assistant answer])` gives, split at the answer.

Over-long pairs (prompt + longer answer > max_seq_len): the prompt is cut from the left
(keeping <s>) down to `max_prompt_len` or until it fits, then the answers are cut from the
right; both are counted. A pair needs at least one answer token on each side.

Layout (`collate`): a micro-batch is ONE row of isolated segments, two per pair,
    [prompt₁ chosen₁][prompt₁ rejected₁][prompt₂ chosen₂][prompt₂ rejected₂] ...
with position ids restarting at 0 per segment, so the per-document attention keeps the segments
from attending to each other: one forward computes every answer, with no padding. The DPO stage
shares each prompt between its answers (`share_prompt`): the prompt runs through the model once.

Unpaired examples (KTO) {prompt, completion, label}: `encode_example`, the same over-long policy with one answer,
and `with_kl_completions` gives each the mismatched completion of its KL row; `collate(..., answers=...)` lays
out one answer per example.
"""

from __future__ import annotations

from collections import Counter

import torch

from data.chat import IGNORE_INDEX, encode_answer, encode_prompt


def encode_pair(pair: dict, tokenizer) -> dict:
    return {
        "prompt_ids": encode_prompt(pair["prompt"], tokenizer, pair.get("tools")),
        "chosen_ids": encode_answer(pair["chosen"], tokenizer),
        "rejected_ids": encode_answer(pair["rejected"], tokenizer),
    }


def encode_example(example: dict, tokenizer) -> dict:
    """An unpaired example (KTO): {prompt, completion, label} → prompt_ids, completion_ids (with </s>), label."""
    return {"prompt_ids": encode_prompt(example["prompt"], tokenizer, example.get("tools")),
            "completion_ids": encode_answer(example["completion"], tokenizer), "label": bool(example["label"])}


def fit_pair(prompt: list[int], chosen: list[int], rejected: list[int] | None, max_seq_len: int,
             max_prompt_len: int | None, counts: Counter) -> tuple[list[int], list[int], list[int] | None] | None:
    """Apply the over-long policy; returns None (and counts why) when nothing trainable is left.
    `rejected=None`: an unpaired example, one answer.

    1. The prompt is cut from the left (keeping <s>) to `max_prompt_len` when it is longer than that,
       or — with no explicit limit — to max_seq_len // 2 when the pair does not fit.
    2. Answers longer than the room left are cut from the right.
    """
    longest = max(len(chosen), len(rejected or ()))
    limit = max_prompt_len if max_prompt_len is not None else (
        max_seq_len // 2 if len(prompt) + longest > max_seq_len else len(prompt))
    if len(prompt) > limit:
        prompt = prompt[:1] + prompt[len(prompt) - limit + 1:]
        counts["prompt truncated (left)"] += 1
    room = max_seq_len - len(prompt)
    if room < 1:
        counts["dropped (prompt alone fills max_seq_len)"] += 1
        return None
    if longest > room:
        chosen, rejected = chosen[:room], None if rejected is None else rejected[:room]
        counts["answers truncated (right)"] += 1
        if chosen == rejected:
            counts["dropped (answers identical after truncation)"] += 1
            return None
    return prompt, chosen, rejected


def with_kl_completions(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Give each unpaired example (KTO) the mismatched completion `kl_ids` its KL reference point takes: that of
    the nearest example before it (cyclically, in the data's order) whose prompt differs, cut to fit
    max_seq_len after this example's prompt. Fixed per example, so the reference's log-probs of these rows can
    be cached like the completions' (train/reference.py). TRL's KTOTrainer rotates completions by one within
    each per-device batch of the data in order; with distinct prompts and one batch over all the data the two
    pairings are the same."""
    n = len(examples)
    out = []
    for i, e in enumerate(examples):
        j = next((j % n for j in range(i - 1, i - n, -1) if examples[j % n]["prompt_ids"] != e["prompt_ids"]), None)
        if j is None:
            raise ValueError("KTO's KL reference point pairs each prompt with another prompt's completion: the data "
                             f"needs at least two different prompts ({n} example(s), one prompt)")
        out.append({**e, "kl_ids": examples[j]["completion_ids"][:max_seq_len - len(e["prompt_ids"])]})
    return out


def common_suffix(a: list[int], b: list[int], joins=None) -> int:
    """Length of the longest common suffix of two different answers, leaving each at least one token.

    `joins(prev_id, next_id)` (from `word_joins`) says whether a token continues the word of the one before
    it; with it the suffix is shortened until it starts a word in both answers: "7." against "17." share the
    tokens "7 . </s>", but in the rejected answer that "7" ends the word "17", so only ". </s>" is shared
    (masking "7" too would leave the chosen answer's own digit out of its log-prob)."""
    n = 0
    while n < min(len(a), len(b)) - 1 and a[-1 - n] == b[-1 - n]:
        n += 1
    if joins is not None:
        while n and (joins(a[-1 - n], a[-n]) or joins(b[-1 - n], b[-n])):
            n -= 1
    return n


def word_joins(tokenizer):
    """`joins(prev_id, next_id)`: True when token `next_id` continues the word that `prev_id` ends — both are
    letters/digits where they meet and `next_id`'s piece does not start with sentencepiece's space "▁"."""
    piece = tokenizer.sp.id_to_piece

    def joins(prev_id: int, next_id: int) -> bool:
        return piece(int(prev_id))[-1].isalnum() and piece(int(next_id))[0].isalnum()

    return joins


def collate(pairs: list[dict], pad_id: int, mask_common_suffix: bool = False, tokenizer=None,
            answers: tuple[str, ...] = ("chosen_ids", "rejected_ids"), share_prompt: bool = False) -> dict:
    """ONE row `(1, L)` holding a micro-batch of fitted pairs (each with prompt_ids/chosen_ids/rejected_ids) one
    after the other, no padding; `pairs` in the result is how many it holds.

    Each pair lays out, for each of `answers`, a copy of the prompt and that answer: `segment` is k + 1 on the
    tokens of answers[k] (1 chosen, 2 rejected), `pair` the pair's index in the micro-batch (read only where
    there is a label). A KTO row holds one answer per example, ("completion_ids",) or its KL row ("kl_ids",).
    Position ids restart at 0 with every copy of the prompt, so the per-document attention (model/attention.py,
    or transformers' packed-sequence masking) keeps every segment to itself: one forward computes every answer
    of every pair, and no token is padding (a row per pair, padded to the longest, was 27% padding on
    dpo_en_demo's pairs). `router_mask` is False on repeated prompt tokens, so a prompt counts once in the router
    losses (its router logits are the same in every copy).

    `share_prompt` (the DPO stage, with the `packed_sdpa` attention): the answers after the first hold only the
    prompt's last token and the answer, at positions len(prompt) − 1 onwards, and the attention gives them
    the first answer's copy of the prompt as context (model/attention.py `shared_prefixes`): the same
    log-probs, and each prompt runs through the model once instead of twice,
        [prompt₁ chosen₁][p₁ rejected₁][prompt₂ chosen₂][p₂ rejected₂] ...     (p = the prompt's last token)

    A shared answer PREFIX cancels in the DPO margin by itself (same context, same log-probs under policy
    and reference). A shared SUFFIX does not: its tokens follow different text. `mask_common_suffix`
    leaves it out of both answers' labels. On pairs that differ in one word ("... is Lima. </s>" against
    "... is Rome. </s>"), plain DPO lowers the shared ". </s>" after the rejected word and, with it, the
    end of every answer: measured on the embedded pipeline, held-out answers ran on past their end
    (p(</s>) after "Damascus." 0.79 → 0.0003). The shared ending starts at a word boundary (`common_suffix`),
    which needs the `tokenizer`'s pieces."""
    if mask_common_suffix and tokenizer is None:
        raise ValueError("collate(mask_common_suffix=True) needs the tokenizer: the shared ending starts at a word boundary")
    joins = word_joins(tokenizer) if mask_common_suffix else None
    segments = []  # (pair, segment, context ids, answer ids, first position, shared ending's length)
    for i, p in enumerate(pairs):
        prompt = p["prompt_ids"]
        k = common_suffix(p["chosen_ids"], p["rejected_ids"], joins) if mask_common_suffix else 0
        for seg, key in enumerate(answers, start=1):
            shared = share_prompt and seg > 1
            segments.append((i, seg, prompt[-1:] if shared else prompt, p[key], len(prompt) - 1 if shared else 0, k))
    width = sum(len(c) + len(a) for _, _, c, a, _, _ in segments)
    input_ids = torch.full((1, width), pad_id, dtype=torch.long)
    labels = torch.full((1, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((1, width), dtype=torch.long)
    segment = torch.zeros((1, width), dtype=torch.long)
    pair = torch.zeros((1, width), dtype=torch.long)
    router_mask = torch.zeros((1, width), dtype=torch.bool)
    at = 0
    for i, seg, context, answer, first, k in segments:
        n_c, n = len(context), len(context) + len(answer)
        input_ids[0, at:at + n] = torch.tensor(context + answer)
        labels[0, at + n_c:at + n - k] = torch.tensor(answer[:len(answer) - k])
        segment[0, at + n_c:at + n] = seg
        pair[0, at:at + n] = i
        position_ids[0, at:at + n] = torch.arange(first, first + n)
        router_mask[0, at + (n_c if seg > 1 else 0):at + n] = True  # the prompt counted once
        at += n
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "segment": segment, "pair": pair, "router_mask": router_mask, "pairs": len(pairs)}


def pair_logps(logits_BLV: torch.Tensor, b: dict, shifted: bool = False):
    """Summed log-probs of the chosen and rejected answers of the pairs of a collated batch `b`, and their token
    counts, each `(b["pairs"],)`, from its logits (eval; the DPO stage computes the log-probs from the LM head
    without logits and calls `answer_sums`).

    Only labelled positions are gathered (N of them), so no `(B, L, V)` fp32 log-softmax is built.
    `shifted=True`: `b` holds the targets of each position (`targets`, `target_segment`, `target_pair`: a
    sequence-parallel shard's, model/sequence_parallel.py) instead of `labels`, `segment`, `pair`.
    """
    if shifted:
        targets, seg, pair = b["targets"], b["target_segment"], b["target_pair"]
    else:
        targets, seg, pair = b["labels"][:, 1:], b["segment"][:, 1:], b["pair"][:, 1:]
        logits_BLV = logits_BLV[:, :-1]
    sel = targets != IGNORE_INDEX
    logp_N = torch.gather(logits_BLV[sel].float().log_softmax(-1), 1, targets[sel].unsqueeze(1)).squeeze(1)
    return answer_sums(logp_N, targets, seg, pair, b["pairs"])


def answer_sums(logp_N: torch.Tensor, targets_BL: torch.Tensor, segment_BL: torch.Tensor, pair_BL: torch.Tensor,
                pairs: int):
    """(chosen, rejected, n_chosen, n_rejected), each `(pairs,)`: the sums of `logp_N`, the log-probs of the
    positions with a target (targets_BL ≠ IGNORE_INDEX, row-major order: `model.losses.token_logps`), over each
    pair's chosen (segment 1) and rejected (segment 2) answer (`pair_BL`: which pair), and how many positions each
    sum has."""
    sel = targets_BL != IGNORE_INDEX
    slot_N = pair_BL[sel] * 2 + segment_BL[sel] - 1  # chosen of pair i → 2i, rejected → 2i + 1
    wide_N = logp_N.double()  # summed in fp64: an fp32 index_add's order, and so its last bits, depends on the batch
    sums = torch.zeros(2 * pairs, dtype=torch.float64, device=logp_N.device).index_add(0, slot_N, wide_N)
    counts = torch.zeros(2 * pairs, dtype=torch.float64, device=logp_N.device).index_add(0, slot_N, torch.ones_like(wide_N))
    sums, counts = sums.to(logp_N.dtype).view(pairs, 2), counts.to(logp_N.dtype).view(pairs, 2)
    return sums[:, 0], sums[:, 1], counts[:, 0], counts[:, 1]
