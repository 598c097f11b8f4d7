"""Each benchmark runs end to end with a tiny budget (the tiny preset, 2-3 steps) and prints its
last line with a finite, positive ratio. Times are never asserted: the figures in BENCHMARKS.md
come from the full runs on a quiet machine."""

import math
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.bench

CASES = {
    "sft_vs_trl.py": (["--model", "tiny", "--steps", "3", "--repeats", "1", "--max-len", "256"], "sft tokens/s ratio vs TRL"),
    "dpo_vs_trl.py": (["--model", "tiny", "--steps", "2", "--max-len", "256", "--pairs", "16"], "dpo pairs/s ratio vs TRL"),
    "mfu.py": (["--model", "tiny", "--steps", "3", "--seq", "256"], "mfu"),
    "zero_memory.py": (["--model", "tiny", "--only", "ZeRO-0", "ZeRO-3 + EP 2"], "zero-3 / zero-0 per-rank state"),
    "generation.py": (["--model", "tiny", "--prompts", "8", "--new", "8", "--batch", "4"], "generation batched/single tokens/s"),
    "load_memory.py": (["--hidden", "128", "--ffn", "256", "--layers", "2", "--ranks", "2", "--only",
                        "ZeRO-3 + EP 2, SGD"], "largest |measured / expected - 1|"),
    "dpo_reference_memory.py": (["--model", "tiny", "--steps", "3"], "dpo live/precomputed peak RSS"),
    "long_context_memory.py": (["--model", "tiny", "--lengths", "256", "1024"], "sp2 / 1-rank activation at 1024 tokens"),
    "bf16_vs_fp32.py": (["--model", "tiny", "--steps", "3", "--stages", "sft"], "bf16 / fp32 sft tokens/s"),
    "qlora_memory.py": (["--hidden", "256", "--ffn", "512", "--layers", "2", "--steps", "2", "--max-len", "64"], "qlora peak RSS ratio vs TRL"),
    "prefs_vs_trl.py": (["--model", "tiny", "--steps", "2", "--max-len", "256", "--pairs", "8"],
                        "prefs examples/s ratio vs TRL (lowest of kto, simpo, orpo)"),
}
# the ones that read ../shared/data (dpo_en_demo's pairs, c4_demo's texts); the others run without it
NEEDS_SHARED_DATA = {"dpo_vs_trl.py", "prefs_vs_trl.py", "long_context_memory.py"}


@pytest.mark.parametrize("script", CASES)
def test_benchmark_runs_and_prints_its_ratio(script, request):
    if script in NEEDS_SHARED_DATA:
        request.getfixturevalue("shared_data")  # skips, saying why, where ../shared/data is absent
    args, label = CASES[script]
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    m = re.fullmatch(re.escape(label) + r": (\d+\.\d\d)", last)
    assert m, last
    assert math.isfinite(float(m.group(1))) and float(m.group(1)) > 0
    if script == "prefs_vs_trl.py":  # the trainer-level oracle: our stage's losses are TRL's trainers' (fp32, SGD)
        gap = re.search(r"prefs largest first-steps loss gap vs TRL: (\S+)", proc.stdout)
        assert gap and float(gap.group(1)) < 1e-5, proc.stdout[-3000:]


def test_gpu_check_says_in_one_line_that_there_is_no_gpu():
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines() == ["gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): "
                                                "nothing to check"]
