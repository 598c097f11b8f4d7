"""Packing: no attention across documents, positions restart, labels never cross documents;
the global batch order is independent of the world size."""

import pytest
import torch
from omegaconf import OmegaConf

from data.chat import IGNORE_INDEX
from data.dataset import DataReport, GlobalBatches, encode_text, pack_rows
from model.build import build_model
from train.config import compose


@pytest.fixture(scope="module")
def model():
    preset = OmegaConf.to_container(compose("sft").model)
    return build_model(preset, seed=0).eval()


def test_packed_row_logits_equal_each_document_alone(model, tokenizer):
    docs = [encode_text(t, tokenizer) for t in ["The grass is green.", "One two three four five six.", "Hi"]]
    rows = pack_rows(docs, max_seq_len=40, pad_id=tokenizer.pad_id, kind="text")
    assert len(rows) == 1
    b = rows.batch([0])
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0]
        at = 0
        for ids, _ in docs:
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[at:at + len(ids)], alone, atol=1e-5, rtol=1e-5)
            at += len(ids)
        # control: without the position restarts the second document *does* see the first
        wrong = model(input_ids=b["input_ids"]).logits[0]
        assert not torch.allclose(wrong[len(docs[0][0]):len(docs[0][0]) + 3], packed[len(docs[0][0]):len(docs[0][0]) + 3], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gpu_path_keeps_packed_documents_apart(dtype, tokenizer, monkeypatch):
    """Training mode as on a GPU (model/attention.py `splits_documents_on` answers False there): transformers'
    sdpa with the mask it derives from the restarting positions, not the CPU's per-document kernels; in fp32
    and bf16 each document's logits equal the document alone (bf16: to its rounding, against the same
    computation run on each document alone)."""
    from model import attention

    model = build_model(OmegaConf.to_container(compose("sft").model), dtype=dtype, seed=0).train()
    monkeypatch.setattr(attention, "splits_documents_on", lambda device: False)
    per_document = []
    monkeypatch.setattr(attention, "length_buckets", lambda *a: per_document.append(1))  # must not be reached
    docs = [encode_text(t, tokenizer) for t in ["The grass is green.", "One two three four five six.", "Hi there"]]
    b = pack_rows(docs, max_seq_len=40, pad_id=tokenizer.pad_id, kind="text").batch([0])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0].float()
        at = 0
        for ids, _ in docs:
            alone = model(input_ids=torch.tensor([ids])).logits[0].float()
            torch.testing.assert_close(packed[at:at + len(ids)], alone, atol=tol, rtol=tol)
            at += len(ids)
        wrong = model(input_ids=b["input_ids"]).logits[0].float()  # control: one document spanning the row
    n0 = len(docs[0][0])
    assert (wrong[n0:n0 + 3] - packed[n0:n0 + 3]).abs().max() > 10 * tol
    assert not per_document


@pytest.mark.parametrize("device_splits", [True, False], ids=["cpu", "gpu_path"])
def test_a_call_without_mask_keeps_packed_documents_apart_by_position(device_splits, model, tokenizer, monkeypatch):
    """What the sequence-parallel attention does (model/sequence_parallel.py): it gathers whole rows and calls the
    attention function without a mask, in training and in eval. The function then keeps the documents apart
    by their positions on every device: each document's output equals the document alone."""
    from model import attention

    monkeypatch.setattr(attention, "splits_documents_on", lambda device: device_splits)
    layer = model.model.layers[0].self_attn
    docs = [encode_text(t, tokenizer) for t in ["The grass is green.", "One two three four five six."]]
    b = pack_rows(docs, max_seq_len=40, pad_id=tokenizer.pad_id, kind="text").batch([0])
    n = sum(len(ids) for ids, _ in docs)
    pos = b["position_ids"][:, :n]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, 8, generator=g) for heads in (4, 2, 2))
    with torch.no_grad():
        packed, _ = attention.packed_sdpa_attention_forward(layer, q, k, v, None, position_ids=pos)
        at = 0
        for ids, _ in docs:
            sl = slice(at, at + len(ids))
            alone, _ = attention.sdpa_attention_forward(layer, q[:, :, sl], k[:, :, sl], v[:, :, sl], None,
                                                        is_causal=True)
            torch.testing.assert_close(packed[0, sl], alone[0], atol=1e-5, rtol=1e-5)
            at += len(ids)


def test_positions_restart_and_labels_stay_inside_documents(tokenizer):
    docs = [encode_text("a b c", tokenizer), encode_text("d e", tokenizer)]
    rows = pack_rows(docs, max_seq_len=20, pad_id=0, kind="text")
    n0, n1 = len(docs[0][0]), len(docs[1][0])
    pos = rows.position_ids[0]
    assert list(pos[:n0]) == list(range(n0)) and list(pos[n0:n0 + n1]) == list(range(n1))
    assert rows.labels[0, 0] == IGNORE_INDEX and rows.labels[0, n0] == IGNORE_INDEX  # each <s>
    assert (rows.labels[0, n0 + n1:] == IGNORE_INDEX).all() and not rows.real_mask[0, n0 + n1:].any()
    # the loss never asks the last token of document 1 to predict document 2's <s>
    assert (rows.labels[0, 1:] != IGNORE_INDEX).sum() == (n0 - 1) + (n1 - 1)


def test_overlong_policies(tokenizer):
    long_text = encode_text(" ".join(["word"] * 50), tokenizer)
    report = DataReport()
    rows = pack_rows([long_text], max_seq_len=16, pad_id=0, kind="text", report=report)
    assert report.overlong["split"] == 1 and len(rows) >= 3
    report = DataReport()
    with pytest.raises(ValueError, match="every example was dropped"):
        pack_rows([long_text], max_seq_len=16, pad_id=0, kind="text", overlong="drop", report=report)
    assert report.overlong["dropped"] == 1
    # a chat whose answer lies past the cut is dropped, not trained on prompt tokens alone
    prompt_only = ([1] * 30 + [5, 6], [IGNORE_INDEX] * 30 + [5, 6])
    report = DataReport()
    rows = pack_rows([prompt_only, ([1, 2, 3], [IGNORE_INDEX, 2, 3])], max_seq_len=16, pad_id=0, report=report)
    assert report.overlong["dropped (no answer left after truncation)"] == 1 and len(rows) == 1


def test_no_packing_gives_one_example_per_row(tokenizer):
    docs = [encode_text(t, tokenizer) for t in ["a", "b", "c"]]
    assert len(pack_rows(docs, 32, 0, packing=False, kind="text")) == 3
    assert len(pack_rows(docs, 32, 0, packing=True, kind="text")) == 1


def test_global_batches_same_rows_for_any_world_size():
    gb = GlobalBatches(num_rows=10, global_batch=4, seed=0)
    for step in range(6):  # crosses epochs
        one = sum(gb.micro_batches(step, 0, 1, 2), [])
        two = sum(gb.micro_batches(step, 0, 2, 1), []) + sum(gb.micro_batches(step, 1, 2, 1), [])
        assert one == two == gb.global_rows(step)
    # every row once per epoch (10 rows, 4 per step: steps 0-1 and half of 2 are epoch 0)
    seen = [r for s in range(5) for r in gb.global_rows(s)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
