"""Routing drift in the alignment stage (train/dpo.py, model/router.py `drift_sums`): the policy's router
distributions against the reference's over the answer tokens, per layer, logged in metrics.jsonl.

With LoRA the adapters start at zero, so at step 1 the policy *is* the reference: the drift must be exactly 0
there (a wrong pairing of logits, tokens or layers would not be), and positive once the adapters move. The value
itself is checked against a direct computation in tests/unit/test_router.py.
"""

import pytest

from helpers import metrics, run_stage

pytestmark = pytest.mark.distributed

COMMON = ["data.synthetic_samples=16", "max_steps=4", "lora.enabled=true", "optim.lr=1e-2", "optim.warmup_steps=0",
          "optim.schedule=constant", "global_batch_size=4", "micro_batch_size=2", "max_seq_len=64", "logging=none",
          "allow_random_init=true", "export=false"]


def test_drift_is_zero_at_the_start_then_moves_and_alarms(tmp_path):
    """DPO with the adapters-off reference: drift every step at no extra forward; the alarm line and the summary."""
    proc = run_stage("dpo", tmp_path / "dpo", ["recipe=tiny/dpo", *COMMON, "dpo.reference=adapters_off",
                                               "dpo.drift_alarm=1e-6"], nproc=1)
    m = metrics(tmp_path / "dpo")
    assert [len(r["drift/kl_layers"]) for r in m] == [2] * 4  # tiny: 2 layers
    assert m[0]["drift/kl"] == 0.0 and m[0]["drift/kl_layers"] == [0.0, 0.0] and m[0]["drift/load_shift"] == 0.0
    assert all(r["drift/kl"] > 0 for r in m[1:]), [r["drift/kl"] for r in m]
    assert "routing drift alarm at step 2" in proc.stdout and "routing drift alarm at step 1" not in proc.stdout
    assert "routing drift at step 4: mean router KL(policy ‖ reference)" in proc.stdout


def test_reference_free_loss_measures_drift_against_the_starting_model_when_asked(tmp_path):
    """SimPO has no reference pass: with dpo.drift_every=2 one extra forward (adapters off) every second step."""
    run_stage("dpo", tmp_path / "simpo", ["recipe=tiny/simpo", *COMMON, "dpo.drift_every=2"], nproc=1)
    m = metrics(tmp_path / "simpo")
    assert ["drift/kl" in r for r in m] == [False, True, False, True]
    assert m[1]["drift/kl"] > 0 and m[3]["drift/kl"] > 0
    run_stage("dpo", tmp_path / "off", ["recipe=tiny/simpo", *COMMON], nproc=1)
    assert not any("drift/kl" in r for r in metrics(tmp_path / "off"))  # off by default: no extra forward
