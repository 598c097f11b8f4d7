"""Preference pairs → token ids, and the one-row-per-pair layout the DPO stage trains on.

A pair {prompt: messages ending with user, chosen: str, rejected: str} is encoded as
    prompt   = data.chat.encode_prompt(prompt)          (<s> [INST] ... [/INST])
    chosen   = enc(chosen) + </s>       rejected = enc(rejected) + </s>
exactly the tokens `encode_chat(prompt + [assistant answer])` gives, split at the answer.

Over-long pairs (prompt + longer answer > max_seq_len): the prompt is cut from the left
(keeping <s>) down to `max_prompt_len` or until it fits, then the answers are cut from the
right; both are counted. A pair needs at least one answer token on each side.

Layout (`collate`): each pair is ONE row holding two segments,
    [prompt chosen][prompt rejected][padding]
with position ids restarting at 0 per segment, so transformers' packed-sequence masking keeps
the segments from attending to each other: one forward computes both sides. `segment` is
1 / 2 on the chosen / rejected answer tokens (0 elsewhere); `router_mask` is False on padding
and on the rejected segment's copy of the prompt, so the shared prompt is counted once in the
router losses (its router logits are identical in both copies).

Unpaired examples (KTO) {prompt, completion, label}: `encode_example`, the same over-long policy with one answer,
and `with_kl_completions` gives each the mismatched completion of its KL row; `collate(..., answers=...)` lays
out one answer per row.
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
            answers: tuple[str, ...] = ("chosen_ids", "rejected_ids")) -> dict:
    """Rows for a micro-batch of fitted pairs (each with prompt_ids/chosen_ids/rejected_ids), `(B, L)`.

    `answers` names the answers each row holds after its own copy of the prompt, segment k + 1 for
    answers[k]: a KTO row holds one, ("completion_ids",) or its KL row ("kl_ids",).

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
    seqs = [[p["prompt_ids"] + p[key] for key in answers] for p in pairs]
    width = max(sum(map(len, s)) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, width), pad_id, dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((B, width), dtype=torch.long)
    segment = torch.zeros((B, width), dtype=torch.long)
    router_mask = torch.zeros((B, width), dtype=torch.bool)
    for r, (p, seq) in enumerate(zip(pairs, seqs)):
        n_p = len(p["prompt_ids"])
        k = common_suffix(p["chosen_ids"], p["rejected_ids"], joins) if mask_common_suffix else 0
        at = 0
        for seg, ids in enumerate(seq, start=1):
            n = len(ids)
            input_ids[r, at:at + n] = torch.tensor(ids)
            labels[r, at + n_p:at + n - k] = torch.tensor(ids[n_p:n - k])
            segment[r, at + n_p:at + n] = seg
            position_ids[r, at:at + n] = torch.arange(n)
            router_mask[r, at + (n_p if seg > 1 else 0):at + n] = True  # the prompt counted once
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "segment": segment, "router_mask": router_mask}


def pair_logps(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, segment_BL: torch.Tensor, shifted: bool = False):
    """Summed log-probs of the chosen and rejected answers, and their token counts, each `(B,)`, from logits
    (eval; the DPO stage computes the log-probs from the LM head without logits and calls `answer_sums`).

    Only labelled positions are gathered (N of them), so no `(B, L, V)` fp32 log-softmax is built.
    `shifted=True`: labels and segment are already those of the token each position predicts (a
    sequence-parallel shard's `targets` / `target_segment`, model/sequence_parallel.py).
    """
    if shifted:
        targets, seg, logits_BLV = labels_BL, segment_BL, logits_BLV
    else:
        targets, seg, logits_BLV = labels_BL[:, 1:], segment_BL[:, 1:], logits_BLV[:, :-1]
    sel = targets != IGNORE_INDEX
    logp_N = torch.gather(logits_BLV[sel].float().log_softmax(-1), 1, targets[sel].unsqueeze(1)).squeeze(1)
    return answer_sums(logp_N, targets, seg)


def answer_sums(logp_N: torch.Tensor, targets_BL: torch.Tensor, segment_BL: torch.Tensor):
    """(chosen, rejected, n_chosen, n_rejected), each `(B,)`: the sums of `logp_N`, the log-probs of the positions
    with a target (targets_BL ≠ IGNORE_INDEX, row-major order: `model.losses.token_logps`), over each row's
    chosen (segment 1) and rejected (segment 2) answer, and how many positions each sum has."""
    sel = targets_BL != IGNORE_INDEX
    rows_N = torch.nonzero(sel, as_tuple=True)[0]
    seg_N = segment_BL[sel]
    B, dtype, wide_N = targets_BL.shape[0], logp_N.dtype, logp_N.double()
    out = []
    for s in (1, 2):  # summed in fp64: an fp32 index_add's order, and so its last bits, depends on the batch's size
        m = (seg_N == s).double()
        out.append(torch.zeros(B, dtype=torch.float64, device=logp_N.device).index_add(0, rows_N, wide_N * m).to(dtype))
        out.append(torch.zeros(B, dtype=torch.float64, device=logp_N.device).index_add(0, rows_N, m).to(dtype))
    chosen, n_chosen, rejected, n_rejected = out
    return chosen, rejected, n_chosen, n_rejected
