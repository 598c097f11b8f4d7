"""train/plan.py: the planner's table for Mixtral-8x7B full fine-tuning (bf16, AdamW) on 8 × 80 GB."""

import re
import subprocess
import sys

import pytest

from helpers import REPO
from model.build import mixtral_config
from model.memory import parameter_counts
from train.config import compose
from train.plan import plan


def _rows(text):
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(\d+ GPUs [^\d].*?)\s{2,}([\d.\s]+?)\s+(yes|no)$", line)
        if m:
            numbers = [float(x) for x in m.group(2).split()]
            out[m.group(1).replace(" (recipe)", "")] = (numbers, m.group(3) == "yes")
    return out


def test_8x7b_full_fine_tuning_on_8_gpus():
    from omegaconf import OmegaConf

    cfg = compose("sft", ["recipe=mixtral_8x7b/sft", "model_path=null"])
    text = plan(cfg, gpus=8, gpu_memory_gb=80, host_memory_gb=1024, nodes=1)
    rows = _rows(text)
    p = parameter_counts(mixtral_config(OmegaConf.to_container(cfg.model)))["total"]
    weights, grads, optim = rows["8 GPUs ZeRO-3"][0][:3]
    head = (2 + 4) * 32000 * 4096 / 1e9  # the LM head's gradient, whole in the forward, and its fp32 accumulator
    assert weights + grads + optim == pytest.approx(16 * p / 8 / 1e9 + head, rel=0.01)  # ~16 bytes per parameter
    assert rows["8 GPUs ZeRO-3"][1] is False and rows["8 GPUs ZeRO-3 + EP 8"][1] is False  # ZeRO-3 alone: no
    assert rows["8 GPUs ZeRO-3 + offload"][1] and rows["16 GPUs ZeRO-3"][1]  # offload, or twice the GPUs: yes
    assert "does NOT fit 8 × 80 GB" in text and "16 GPUs ZeRO-3" in text.splitlines()[-1]
    # activations: checkpointing keeps far less than the whole forward
    ckpt, full = rows["8 GPUs ZeRO-3"][0][6:8]
    assert 0 < ckpt < full / 5


def test_command_line():
    proc = subprocess.run([sys.executable, "train/plan.py", "recipe=tiny/sft", "gpus=2", "gpu_memory_gb=8"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 GPUs ZeRO-2 (recipe)" in proc.stdout and "the recipe's layout fits 2 × 8 GB" in proc.stdout
    bad = subprocess.run([sys.executable, "train/plan.py", "recipe=tiny/sfft"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip() == "config error: recipe 'tiny/sfft' not found; did you mean tiny/sft?"


def test_recipe_headers_quote_the_planner():
    """Each 8x7B (and the 8x22B LoRA) recipe's header quotes train/plan.py for the hardware it names; a change to the planner or
    the recipe that moves the figures fails here until the header is updated."""
    from train.plan import recipe_line

    paths = sorted((REPO / "recipes").glob("mixtral_8x*b/*.yaml"))
    assert any(p.parent.name == "mixtral_8x22b" for p in paths)
    for path in paths:
        lines = [l[2:] for l in path.read_text().splitlines() if l.startswith("# plan (")]
        assert lines, f"{path.name}: no '# plan (...)' line in the header"
        for line in lines:
            m = re.match(r"plan \(python train/plan.py recipe=(\S+) gpus=(\d+) nodes=(\d+)(?: gpu_memory_gb=(\d+))?\)", line)
            assert m and m.group(1) == f"{path.parent.name}/{path.stem}", line
            memory = float(m.group(4) or 80)
            assert line == recipe_line(m.group(1), int(m.group(2)), int(m.group(3)), memory), path.name
            assert line.endswith(f"fits {memory:g} GB"), line


def test_qlora_8x7b_fits_one_80_gb_gpu():
    """4-bit attention and experts: the 8x7B base is ~24 GB (46.7 B parameters at ~0.52 bytes, the embeddings and
    LM head in bf16), where 16-bit LoRA on one GPU needs its 93 GB."""
    cfg = compose("sft", ["recipe=mixtral_8x7b/qlora", "model_path=null"])
    rows = _rows(plan(cfg, gpus=1, gpu_memory_gb=80, host_memory_gb=256, nodes=1))
    weights = rows["1 GPUs ZeRO-0"][0][0]
    assert 23 < weights < 26 and rows["1 GPUs ZeRO-0"][1]
    lora = _rows(plan(compose("sft", ["recipe=mixtral_8x7b/sft_lora", "model_path=null"]), gpus=1, gpu_memory_gb=80,
                      host_memory_gb=256, nodes=1))
    assert lora["1 GPUs ZeRO-2"][0][0] > 90 and not lora["1 GPUs ZeRO-2"][1]
