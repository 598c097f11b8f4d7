"""The tiny recipes run the way the README says (2 CPU ranks), with wandb offline."""

import json

import pytest

from helpers import losses, metrics, run_stage


@pytest.mark.parametrize("stage", ["pretrain", "sft"])
def test_tiny_recipe_as_documented(stage, tmp_path):
    out = tmp_path / stage
    proc = run_stage(stage, out, [f"recipe=tiny/{stage}", "logging=wandb", "logging.heatmap_every=10"])
    assert "batch: micro 4 × accumulation 1 × 2 data-parallel ranks = 8 sequences" in proc.stdout
    ls = losses(out)
    assert len(ls) == 30
    assert ls[0] == pytest.approx(10.4, abs=0.3)            # ≈ ln(32000) from scratch
    assert sum(ls[-5:]) / 5 < ls[0] - 2.0                   # it learns
    assert all(m["tokens"] > 0 and m["tokens_per_s"] > 0 for m in metrics(out))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert len(list(runs[0].rglob("heatmap_*.png"))) == 3  # steps 10, 20, 30
    assert "export check" in proc.stdout
    assert json.loads((out / "hf" / "config.json").read_text())["model_type"] == "mixtral"
