"""Sequence parallelism (model/sequence_parallel.py): ranks that share each row's tokens train like one
rank that holds the rows whole.

Each case runs the same 3 steps (router load-balancing and z-losses on, AdamW, gradient clipping) on one
ZeRO-1 rank and with `sequence_parallel_size=2`; losses, router terms and gradient norms must agree to
1e-4 relative, and the token counts exactly (every token counted once across the shards). The packed
rows' documents straddle the shard borders; the stage's export check (live logits gathered from the
shards against the exported folder's) runs too. Two cases also run the experts in tiles (model/tiled_moe.py)
against the 1-rank untiled baseline; two train LoRA adapters (attention under ZeRO-3; attention and experts
with DPO's adapters-off reference under ZeRO-2).
"""

import json
import subprocess
import sys

import pytest

from helpers import REPO, metrics, run_stage

pytestmark = pytest.mark.distributed

COMMON = ["max_steps=3", "global_batch_size=4", "micro_batch_size=2", "router.aux_loss_coef=0.02",
          "router.z_loss_coef=0.001", "optim.grad_clip=1.0", "logging=none"]
STAGE = {
    "pretrain": ["recipe=tiny/pretrain", "data.synthetic_samples=64"],
    "sft": ["recipe=tiny/sft", "data.synthetic_samples=64"],
    "dpo": ["recipe=tiny/dpo", "allow_random_init=true", "data.synthetic_samples=16", "dpo.sft_weight=0.5"],
}
KEYS = {"pretrain": ("loss", "ce", "aux", "z", "grad_norm"), "sft": ("loss", "ce", "aux", "z", "grad_norm"),
        "dpo": ("loss", "dpo", "nll", "aux", "z", "logps/chosen", "logps/rejected", "grad_norm")}
CASES = {  # name: (stage, ranks, layout overrides, overrides the 1-rank baseline shares)
    "sft_zero2": ("sft", 2, ["deepspeed=zero2"], []),
    "sft_zero2_tiled_experts": ("sft", 2, ["deepspeed=zero2", "model.tiled_mlp_tokens=64"], []),
    "pretrain_zero3_checkpointing_tiled": ("pretrain", 2, ["deepspeed=zero3", "model.gradient_checkpointing=true",
                                                            "model.tiled_mlp_tokens=48"], []),
    "dpo_zero2": ("dpo", 2, ["deepspeed=zero2"], []),
    "dpo_zero3_live_reference": ("dpo", 2, ["deepspeed=zero3"], ["dpo.reference=live"]),
    "sft_lora_zero3": ("sft", 2, ["deepspeed=zero3"], ["lora.enabled=true"]),
    "dpo_lora_experts_adapters_off_zero2": ("dpo", 2, ["deepspeed=zero2"], ["lora.enabled=true", "lora.experts=true",
                                                                            "dpo.reference=adapters_off"]),
}
DEFAULT_CASES = {"sft_zero2", "pretrain_zero3_checkpointing_tiled", "dpo_zero3_live_reference"}  # the rest: -m extended
LAYOUT_CASES = {  # -m layouts: two data-parallel groups of two
    "sft_zero3_sp2_dp2": ("sft", 4, ["deepspeed=zero3"], []),
    "dpo_zero1_sp2_dp2": ("dpo", 4, ["deepspeed=zero1"], []),
}


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    cache = {}

    def get(stage, shared):
        key = (stage, tuple(shared))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"one_{stage}")
            run_stage(stage, out, [*STAGE[stage], *COMMON, "deepspeed=zero1", "verify_export=false", *shared], nproc=1)
            cache[key] = metrics(out)
        return cache[key]

    return get


def _check(stage, nproc, layout, shared, one_rank, tmp_path):
    out = tmp_path / "sp"
    proc = run_stage(stage, out, [*STAGE[stage], *COMMON, *layout, *shared, "sequence_parallel_size=2"], nproc=nproc)
    assert "sequence_parallel_size=2" in proc.stdout
    assert "export check" in proc.stdout  # the export's logits equal the live, sharded model's
    ref, got = one_rank(stage, shared), metrics(out)
    assert len(got) == len(ref) == 3
    for a, b in zip(ref, got):
        for k in KEYS[stage]:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k, a[k], b[k])
        assert b["tokens"] == a["tokens"]
        assert b.get("label_tokens") == a.get("label_tokens")


@pytest.mark.parametrize("name", [n if n in DEFAULT_CASES else pytest.param(n, marks=pytest.mark.extended) for n in CASES])
def test_two_ranks_sharing_rows_train_like_one(name, one_rank, tmp_path):
    _check(*CASES[name], one_rank, tmp_path)


@pytest.mark.parametrize("name", [pytest.param("sft_zero3_sp2_dp2", marks=pytest.mark.layouts),
                                  pytest.param("dpo_zero1_sp2_dp2", marks=pytest.mark.extended)])
def test_sequence_and_data_parallel_on_four_ranks(name, one_rank, tmp_path):
    _check(*LAYOUT_CASES[name], one_rank, tmp_path)


def test_documents_stay_apart_across_shards(tmp_path):
    """A packed row of 4 documents (159 tokens, padded to 160, both shard borders inside documents): the
    logits gathered from the shards equal each document run alone, in training and eval mode, and the
    sharded Σ CE equals the documents' own."""
    out = tmp_path / "iso.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "distributed" / "sp_isolation_worker.py"), str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["row_len"] == 159 and r["shard_len"] == 80
    for mode in ("train", "eval"):
        assert max(r[mode]) < 1e-4, (mode, r[mode])
    assert r["ce_packed"] == pytest.approx(r["ce_alone"], rel=1e-5)


def test_refused_combinations_say_why(tmp_path):
    cases = [
        (["expert_parallel_size=2"], "sequence_parallel_size=2 with expert_parallel_size=2: DeepSpeed's AutoEP"),
        (["model.attn_implementation=sdpa"], "use packed_sdpa (default) or flash_attention_2"),
    ]
    for extra, needle in cases:
        proc = subprocess.run([sys.executable, str(REPO / "train" / "sft.py"), "--nproc_per_node", "2", "recipe=tiny/sft",
                               f"output_dir={tmp_path / 'x'}", "sequence_parallel_size=2", *extra],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().startswith("config error: ") and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
