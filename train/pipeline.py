"""The embedded default: pretrain a tiny Mixtral from scratch → SFT → DPO → evaluation, on CPU,
with nothing downloaded, ending in a report that shows what each stage learned.

    python train/pipeline.py                       # outputs/pipeline/report.md (+ PNGs)
    python train/pipeline.py force=true            # redo finished stages
    python train/pipeline.py mt_bench.questions=../shared/data/mt_bench/question.jsonl

Each stage is the real stage script launched as a user would (`torchrun --nproc_per_node 2
train/<stage>.py recipe=pipeline/<stage> ...`; recipes/pipeline/ holds each stage's configuration), starting from the previous stage's HF export; a stage
whose `<stage>/DONE` exists is skipped on rerun. Then `python eval/pipeline_report.py` with the same settings
loads the exports and writes the report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from train import cli
from train.config import PipelineConfig

REPO = Path(__file__).resolve().parents[1]


def run_stage(name: str, stage_cfg, model_path: Path | None, cfg, out: Path) -> float:
    """Run one stage script under torchrun unless it already finished; returns its wall time (s)."""
    stage_dir = out / name
    done = stage_dir / "DONE"
    if done.is_file() and not cfg.force:
        print(f"[pipeline] {name}: already done ({done}), skipping (force=true redoes it)", flush=True)
        return json.loads(done.read_text())["wall_s"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.nproc}",
           str(REPO / "train" / f"{name}.py"), f"recipe={stage_cfg.recipe}", f"output_dir={stage_dir}",
           f"seed={cfg.seed}", "resume=true"]
    cmd += [f"max_steps={stage_cfg.max_steps}"] if stage_cfg.max_steps is not None else []
    cmd += [f"model={cfg.model}"] if model_path is None else [f"model_path={model_path}"]
    cmd += list(stage_cfg.overrides)
    print(f"[pipeline] {name}: {' '.join(cmd[3:])}", flush=True)
    t0 = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[pipeline] {name} failed (exit {proc.returncode}); rerun to continue from its last checkpoint")
    wall = time.time() - t0
    done.write_text(json.dumps({"wall_s": wall, "command": cmd}))
    return wall


@cli.main("pipeline", PipelineConfig)
def main(cfg) -> None:
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_stage("pretrain", cfg.pretrain, None, cfg, out)
    run_stage("sft", cfg.sft, out / "pretrain" / "hf", cfg, out)
    run_stage("dpo", cfg.dpo, out / "sft" / "hf", cfg, out)
    t0 = time.time()
    # the evaluation as a user runs it, with this command's settings
    cmd = [sys.executable, str(REPO / "eval" / "pipeline_report.py"), *sys.argv[1:]]
    if subprocess.run(cmd, cwd=REPO).returncode != 0:
        raise SystemExit(f"[pipeline] evaluation failed: {' '.join(cmd[1:])} reruns it")
    print(f"[pipeline] evaluation took {time.time() - t0:.0f} s; report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
