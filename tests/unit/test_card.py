"""The export's model card (model/card.py): Hub front matter, and the chain of stages carried from the
card of the `model_path` a stage starts from."""

from train.config import compose

from model.card import front_matter, model_card


def _cfg(stage, out, model_path=None, data="synthetic"):
    overrides = [f"recipe=tiny/{stage}", f"output_dir={out}", f"data.path={data}", "max_steps=7"]
    if model_path:
        overrides.append(f"model_path={model_path}")
    return compose(stage, overrides)


def test_card_carries_the_stages_of_its_base(tmp_path):
    sft_hf = tmp_path / "sft" / "hf"
    sft_hf.mkdir(parents=True)
    data = {"records": 400, "rows": 41, "real_tokens": 10147, "label_tokens": 5000}
    card = model_card(_cfg("sft", tmp_path / "sft", "mistralai/Mixtral-8x7B-v0.1", "chats.jsonl"), data,
                      {"loss": 1.25, "ce": 1.2, "aux": 1.0, "step": 7}, 46_700_000_000, "mixtral_8x7b/sft")
    (sft_hf / "README.md").write_text(card)
    meta = front_matter(card)
    assert meta["base_model"] == "mistralai/Mixtral-8x7B-v0.1" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["chats.jsonl"]
    assert meta["mixtral_tune_stages"] == [{"stage": "sft", "data": "chats.jsonl", "records": 400, "rows": 41,
                                            "tokens": 10147, "steps": 7, "lora": False, "recipe": "mixtral_8x7b/sft", "tokenizer": "v1",
                                            "final": {"loss": 1.25, "ce": 1.2, "aux": 1.0}}]
    assert "46.7 B parameters" in card and "fine-tuned from `mistralai/Mixtral-8x7B-v0.1`" in card

    dpo = model_card(_cfg("dpo", tmp_path / "dpo", str(sft_hf), "pairs.jsonl"), {"records": 8, "rows": 8},
                     {"loss": 0.5, "dpo": 0.4, "rewards/accuracy": 1.0}, 46_700_000_000, None)
    meta = front_matter(dpo)
    assert meta["base_model"] == "mistralai/Mixtral-8x7B-v0.1"  # the root, not the intermediate folder
    assert [s["stage"] for s in meta["mixtral_tune_stages"]] == ["sft", "dpo"]
    assert meta["datasets"] == ["chats.jsonl", "pairs.jsonl"]
    assert meta["mixtral_tune_stages"][1]["final"] == {"loss": 0.5, "dpo": 0.4, "rewards/accuracy": 1.0}
    assert "| 2 | dpo | `pairs.jsonl` |" in dpo


def test_card_of_a_preset_has_no_base(tmp_path):
    card = model_card(_cfg("pretrain", tmp_path / "p"), {}, {}, 4_500_000, "tiny/pretrain")
    meta = front_matter(card)
    assert "base_model" not in meta and "datasets" not in meta
    assert "randomly initialised `tiny` preset" in card and "4.5 M parameters" in card


def test_hub_push_without_network_is_one_line(tmp_path):
    """hub.repo_id=...: offline (or no route to the Hub) the stage says so in one line and goes on."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import REPO

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    code = ("from pathlib import Path; from train.finish import push_to_hub\n"
            "class Run:\n    def print(self, *a): print(*a)\n"
            f"push_to_hub(Path({str(tmp_path / 'hf')!r}), 'someone/mixtral-test', True, Run(), 'sft')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"[sft] hub: could not push {tmp_path / 'hf'} to someone/mixtral-test")
    assert "the export is complete on disk" in lines[0]
    # the hint is a command of the installed huggingface_hub (its old `huggingface-cli` no longer works)
    assert f"`hf upload someone/mixtral-test {tmp_path / 'hf'}`" in lines[0]
    assert (Path(sys.executable).parent / "hf").is_file()
