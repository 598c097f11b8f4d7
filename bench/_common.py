"""What the benchmarks share: a peak-RSS wrapper for child processes and the saved `small` model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
# run a script as __main__ and print the process's peak RSS when it exits
RSS_WRAPPER = ("import atexit, resource, runpy, sys; atexit.register(lambda: print('PEAK_RSS_MB', "
               "resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")


def save_model(folder: Path, preset: str = "small", seed: int = 0) -> Path:
    """A freshly initialised preset saved as an HF folder (+ tokenizer.model) that every side loads."""
    from omegaconf import OmegaConf

    from data.tokenizer import default_tokenizer_path
    from model.build import build_model
    from train.config import compose

    build_model(OmegaConf.to_container(compose("sft", [f"model={preset}"]).model), seed=seed).save_pretrained(folder)
    shutil.copy(default_tokenizer_path(), folder / "tokenizer.model")
    return folder


def demo_pairs(max_len: int, max_pairs: int | None) -> list[tuple[dict, dict]]:
    """(canonical pair, its token ids) of dpo_en_demo.json that fit `max_len`, duplicates left out."""
    from data.formats import canonical
    from data.preference import encode_pair
    from data.readers import read_records
    from data.tokenizer import load_tokenizer

    tok, out, seen = load_tokenizer(), [], set()
    for r in read_records(str(SHARED / "llama_factory_demo" / "dpo_en_demo.json")):
        c = canonical(r, "auto", "preference")
        key = json.dumps(c, sort_keys=True)
        p = encode_pair(c, tok)
        if key not in seen and len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) <= max_len:
            seen.add(key)
            out.append((c, p))
    return out[:max_pairs]


def run_stage_measured(stage: str, overrides: list[str], out: Path) -> tuple[list[dict], float, str]:
    """`python train/<stage>.py` in one process (a world of one); returns (metrics rows, peak RSS MB, stdout)."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-c", RSS_WRAPPER, str(REPO / "train" / f"{stage}.py"), f"output_dir={out}", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MASTER_PORT": str(29650 + os.getpid() % 300)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    m = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    rss = float(next(l.split()[1] for l in proc.stdout.splitlines() if l.startswith("PEAK_RSS_MB")))
    return m, rss, proc.stdout


def run_worker(script: str, spec: dict) -> dict:
    """A peer's worker script (one process, prints one JSON line last)."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), json.dumps(spec)], cwd=REPO,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trainer_clock():
    """A transformers TrainerCallback timing training from step 2 on (step 1 warms up, as in our stages)
    and collecting the logged losses and everything logged with them: `.t0`, `.losses`, `.logs`."""
    import time

    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.losses, self.logs = [], []

        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == 1 and self.t0 is None:
                self.t0 = time.time()

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])
                self.logs.append(dict(logs))

    return Clock()


def trl_sft_inputs(args: dict):
    """What a TRL SFT worker trains on: the token ids our encoder wrote (`args["data"]`, JSONL of input_ids and
    labels) as a dataset with completion masks, and the Mixtral v1 tokenizer (`args["tokenizer"]`) for padding."""
    import datasets
    from transformers import LlamaTokenizer

    rows = [json.loads(l) for l in open(args["data"])]
    ds = datasets.Dataset.from_list([{"input_ids": r["input_ids"],
                                      "completion_mask": [int(l != -100) for l in r["labels"]]} for r in rows])
    tok = LlamaTokenizer(vocab_file=args["tokenizer"], legacy=True)
    tok.pad_token = tok.unk_token
    return ds, tok


def train_timed(trainer, clock, gas: int, steps: int) -> float:
    """Run a TRL trainer counting the label tokens of every micro-batch it collates; its label tokens/s over
    steps 2..N (`clock` from `trainer_clock` starts at step 2, as our stages' timings do)."""
    import time

    seen, collate = [], trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        seen.append(int((batch["labels"][:, 1:] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    return sum(seen[gas:gas * steps]) / (time.time() - clock.t0)


def peak_above_load(stage: str, ranks: int, overrides: list[str], out: Path, phases: tuple[str, ...]) -> float:
    """`torchrun` a stage as a user does (OMP_NUM_THREADS=1 per rank, as torchrun sets it for several ranks)
    and return the largest, over ranks, of its peak RSS in `phases` minus the RSS when loading began
    (memory.json)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           str(REPO / "train" / f"{stage}.py"), f"output_dir={out}", "overwrite=true", *overrides]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    recorded = json.loads((out / "memory.json").read_text())
    base = recorded["load"]["start_rss_bytes"]
    return max(max(recorded[p]["peak_rss_bytes"][r] for p in phases) - base[r] for r in range(ranks))
