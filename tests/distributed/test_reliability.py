"""Faults on 2 gloo ranks: SIGKILL at a random step then resume, a kill in the middle of writing a
checkpoint, non-finite steps, a dead peer rank. Faults are real (SIGKILL) or injected at an exact point
(train/faults.py, installed by tests/helpers.py `with_faults`)."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from helpers import ELASTIC, REPO, check_resume_elsewhere, free_port, losses, metrics, run_stage, stage_cmd, with_faults

pytestmark = pytest.mark.distributed

STAGES = {
    "sft": ["recipe=tiny/sft", "max_steps=8", "checkpoint_every=1", "deepspeed=zero3", "expert_parallel_size=2",
            "data.synthetic_samples=160", "max_seq_len=64", "verify_export=false", "precision=bf16"],
    "dpo": ["recipe=tiny/dpo", "allow_random_init=true", "max_steps=8", "checkpoint_every=1", "deepspeed=zero2", "dpo.loss_type=ipo",
            "dpo.sft_weight=0.1", "data.synthetic_samples=48", "global_batch_size=8", "micro_batch_size=2",
            "verify_export=false"],
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    done = {}

    def get(stage):
        if stage not in done:
            out = tmp_path_factory.mktemp(f"full_{stage}")
            run_stage(stage, out, STAGES[stage])
            done[stage] = metrics(out)
        return done[stage]
    return get


def _launch(stage, out, overrides, env=None):
    cmd, base_env = stage_cmd(stage, out, overrides)
    return subprocess.Popen(cmd, cwd=REPO, env={**base_env, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for_step(proc, out, step, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and any(m["step"] >= step for m in metrics(out)):
            return
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def _kill_all(proc, out) -> None:
    """SIGKILL every process of the run at once, as when its machine dies. torchrun starts each rank in a
    session of its own, so killing torchrun's process group would leave the ranks running: find them
    by the output folder on their command line."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = open(f"/proc/{entry}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if f"output_dir={out}" in cmdline.split("\0") and int(entry) != proc.pid:
                pids.append(int(entry))
    assert len(pids) == 2, pids  # the two ranks
    for pid in pids + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    for pid in pids:  # wait until the ranks are really gone
        while _alive(pid):
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "zombie" not in f.read().lower()
    except OSError:
        return False


@pytest.mark.parametrize("stage", ["sft", pytest.param("dpo", marks=pytest.mark.extended)])
def test_sigkill_at_random_step_then_resume_is_exact(stage, uninterrupted, tmp_path):
    kill_at = random.Random(os.urandom(8)).randint(2, 6)
    out = tmp_path / "run"
    proc = _launch(stage, out, STAGES[stage])
    _wait_for_step(proc, out, kill_at)
    _kill_all(proc, out)  # torchrun and both ranks, wherever they are (mid-step or mid-save)
    steps_before = [m["step"] for m in metrics(out)]
    resumed = run_stage(stage, out, [*STAGES[stage], "resume=true"])
    assert "resumed from" in resumed.stdout, (kill_at, resumed.stdout[-2000:])
    if stage == "dpo":  # the reference log-probs of the starting weights are reused, not recomputed
        assert "reference log-probs: loaded from cache" in resumed.stdout
    full, after = uninterrupted(stage), metrics(out)
    note = f"killed after step {kill_at} (metrics had steps {steps_before})"
    assert [m["step"] for m in after] == list(range(1, 9)), note
    assert [m["loss"] for m in after] == [m["loss"] for m in full], note          # bit-identical
    assert [m["rows"] for m in after] == [m["rows"] for m in full], note          # same samples, same order
    assert [m["tokens"] for m in after] == [m["tokens"] for m in full], note
    consumed = [r for m in after for r in m["rows"]]
    assert len(consumed) == 8 * len(full[0]["rows"])


def test_kill_while_saving_keeps_previous_checkpoint(uninterrupted, tmp_path):
    args = [*STAGES["sft"], "checkpoint_every=2", "keep_checkpoints=2"]
    out = tmp_path / "run"
    proc = run_stage("sft", out, args, check=False, env=with_faults(tmp_path, "kill_in_save@4"))
    assert proc.returncode != 0 and "SIGKILL at kill_in_save@4" in proc.stdout + proc.stderr
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_2"
    assert (ckpt / ".step_4.partial").is_dir() and not (ckpt / "step_4").exists()
    resumed = run_stage("sft", out, [*args, "resume=true"])
    assert "resumed from" in resumed.stdout and "step_2 at step 2" in resumed.stdout
    assert "interrupted while being written" in resumed.stdout
    assert losses(out) == [m["loss"] for m in uninterrupted("sft")]
    # keep-last-N: only the two newest complete checkpoints, no debris
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step_6", "step_8"]


# A repeated batch with a constant LR: a skipped step leaves the weights (and Adam's state) as they were,
# so the skipped step's loss repeats and the run continues as the fault-free run one step earlier.
REPEATED = ["recipe=tiny/sft", "data.synthetic_samples=8", "data.packing=false", "max_seq_len=64",
            "global_batch_size=8", "micro_batch_size=2", "optim.warmup_steps=0", "optim.schedule=constant",
            "optim.lr=3e-3", "verify_export=false", "export=false"]


@pytest.mark.parametrize("parallel", [pytest.param(["deepspeed=zero0"], id="zero0"),
                                      pytest.param(["deepspeed=zero3", "expert_parallel_size=2"], id="zero3_ep2",
                                                   marks=pytest.mark.extended)])
def test_nonfinite_steps_are_skipped_and_k_in_a_row_stop(parallel, tmp_path):
    """ZeRO-0: our optimizer's skip alone; ZeRO-3 + EP: DeepSpeed's own overflow check meets ours."""
    faulty = tmp_path / "faulty"
    # step 2 alone, then steps 4-6 in a row (K = 3): skip, skip, ..., then checkpoint and stop
    proc = run_stage("sft", faulty, [*REPEATED, *parallel, "max_steps=10", "max_bad_steps=3"], check=False,
                     env=with_faults(tmp_path, "nan_loss@2", "nan_loss@4", "nan_loss@5", "nan_loss@6"))
    f = losses(faulty)
    assert proc.returncode != 0
    assert "stopping: 3 optimizer steps in a row (up to step 6)" in proc.stdout
    assert [m["skipped"] for m in metrics(faulty)] == [False, True, False, True, True, True]
    assert metrics(faulty)[-1]["skipped_total"] == 4
    assert (faulty / "checkpoints" / "latest").read_text() == "step_6"
    # (each step shuffles the same 8 rows into other micro-batches: sums in another order, hence approx)
    assert f[2] == pytest.approx(f[1], abs=1e-5)   # step 2 skipped: step 3 still sees the step-1 weights
    assert abs(f[3] - f[2]) > 1e-3                 # step 3 was applied
    if parallel == ["deepspeed=zero0"]:
        return
    clean = tmp_path / "clean"
    run_stage("sft", clean, [*REPEATED, *parallel, "max_steps=3"])
    c = losses(clean)
    assert f[1] == pytest.approx(c[1], abs=1e-5)
    assert f[3] == pytest.approx(c[2], abs=1e-4)   # step 3's update = the clean run's step 2 (Adam state intact)
    run_stage("sft", faulty, [*REPEATED, *parallel, "max_steps=7", "resume=true"])
    f = losses(faulty)
    assert len(f) == 7 and f[6] == pytest.approx(c[2], abs=1e-4)  # the weights skipped steps 4-6 left alone


def test_a_failed_export_check_ends_every_rank_in_one_line_and_keeps_the_weights(tmp_path):
    """bf16, 2 ranks launched by the stage itself; two experts of the written export swapped (fault injection):
    status 4, one line on stderr naming the difference (no traceback from either rank), the export moved to
    hf.check_failed/ with a note, the final checkpoint written."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train/sft.py", "--nproc_per_node", "2", f"output_dir={out}", "recipe=tiny/sft",
                           "max_steps=2", "checkpoint_every=2", "precision=bf16", "deepspeed=zero2", "logging=none",
                           "data.synthetic_samples=32", "max_seq_len=64"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                                            **with_faults(tmp_path, "corrupt_export@2")})
    assert proc.returncode == 4, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    errors = [l for l in proc.stderr.strip().splitlines() if not l.startswith("[fault injection]")]
    assert len(errors) == 1 and errors[0].startswith("[sft] export check failed: "), proc.stderr[-3000:]
    assert "max |logits(export) - logits(live)|" in errors[0] and "hf.check_failed" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (out / "hf").exists() and (out / "hf.check_failed" / "EXPORT_CHECK_FAILED.txt").is_file()
    assert (out / "hf.check_failed" / "model.safetensors").is_file() and (out / "checkpoints" / "step_2").is_dir()


def test_launcher_mode_answers_in_one_line(tmp_path):
    """`python train/sft.py --nproc_per_node 2 ...` launches the workers itself: a config error is one line
    before any worker starts, and a worker's failure is its own messages plus one line with its exit
    status (here the non-finite stop, 3), without torchrun's failure report."""
    base = [sys.executable, "train/sft.py", "--nproc_per_node", "2", f"output_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([*base, "recipe=tiny/sfft"], cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "config error: recipe 'tiny/sfft' not found; did you mean tiny/sft?"
    proc = subprocess.run([*base, *REPEATED, "max_steps=3", "max_bad_steps=1"], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**env, **with_faults(tmp_path, "nan_loss@2")})
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "stopping: 1 optimizer steps in a row (up to step 2)" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "sft.py: rank 0 ended with status 3; its messages are above"
    assert "ChildFailedError" not in proc.stderr and "Traceback" not in proc.stderr and "*****" not in proc.stderr


def test_dead_rank_is_named_and_the_survivor_exits(tmp_path):
    """Ranks started without torchrun (as on two nodes whose launcher cannot kill the survivor):
    SIGKILL rank 1; rank 0 must stop on its own within dist_timeout_s and say which rank died."""
    out, timeout_s = tmp_path / "run", 10
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    cmd = [sys.executable, str(REPO / "train" / "sft.py"), "recipe=tiny/sft", f"output_dir={out}", "max_steps=500",
           f"dist_timeout_s={timeout_s}", "export=false"]
    procs = [subprocess.Popen(cmd, cwd=REPO, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in (0, 1)]
    try:
        _wait_for_step(procs[0], out, 2)
        procs[1].kill()
        rc = procs[0].wait(timeout=timeout_s + 60)  # a hang fails here
        log = procs[0].stdout.read().decode()
        assert rc != 0
        assert "rank 0: rank 1 sent no heartbeat" in log, log[-3000:]
        assert "resume=true" in log
    finally:
        for p in procs:
            p.kill()


@pytest.mark.parametrize("stage, extra, before, after", [
    ("sft", ["recipe=tiny/sft", "precision=bf16"], (2, ["deepspeed=zero3", "expert_parallel_size=2"]), (1, ["deepspeed=zero0"])),
    pytest.param("sft", ["recipe=tiny/sft", "precision=bf16"], (1, ["deepspeed=zero0"]),
                 (2, ["deepspeed=zero2", "expert_parallel_size=2"]), marks=pytest.mark.layouts),
    pytest.param("sft", ["recipe=tiny/sft", "lora.enabled=true", "optim.lr=1e-2"], (2, ["deepspeed=zero2"]),
                 (1, ["deepspeed=zero1"]), marks=pytest.mark.layouts),
    ("dpo", ["recipe=tiny/dpo", "allow_random_init=true"], (2, ["deepspeed=zero2"]), (1, ["deepspeed=zero0"])),
    pytest.param("pretrain", ["recipe=tiny/pretrain"], (1, ["deepspeed=zero1"]), (2, ["deepspeed=zero3"]),
                 marks=pytest.mark.extended),
], ids=["sft_bf16_zero3_ep2_to_1rank_zero0", "sft_bf16_1rank_zero0_to_zero2_ep2", "sft_lora_zero2_to_1rank_zero1",
        "dpo_precomputed_reference_zero2_to_1rank_zero0", "pretrain_1rank_zero1_to_zero3"])
def test_resume_on_another_layout(stage, extra, before, after, tmp_path):
    """A checkpoint continued on another world size, EP size and ZeRO stage through the portable
    checkpoint (train/elastic.py) equals the uninterrupted runs (tests/helpers.py
    `check_resume_elsewhere`). DPO's cached reference log-probs are reused. The two ZeRO-0 cases run in bf16,
    where ZeRO-0 keeps fp32 masters inside DeepSpeed's FP16_UnfusedOptimizer (their fp32 twins: test_layouts.py, -m extended)."""
    check_resume_elsewhere(stage, [*ELASTIC, *extra], before, after, tmp_path)


def _resume_refusal(tmp_path, layout: dict, args: list[str]) -> str:
    """The one line a `resume=true` run prints (exit 2) over a checkpoint whose layout.json is `layout`."""
    import json

    out = tmp_path / "run"
    step = out / "checkpoints" / "step_2"
    step.mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_2")
    (step / "layout.json").write_text(json.dumps(layout))
    proc = subprocess.run([sys.executable, "train/sft.py", f"output_dir={out}", "recipe=tiny/sft", *ELASTIC, "max_steps=4",
                           *args, "resume=true"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_resume_refuses_a_layout_change_it_cannot_continue_exactly(tmp_path):
    """Another global batch (the data position would not map onto the samples): one line, exit 2."""
    line = _resume_refusal(tmp_path, {"world_size": 2, "expert_parallel_size": 2, "zero_stage": 2,
                                      "global_batch_size": 16, "lora": False}, ["deepspeed=zero1"])
    assert "written with global_batch_size=16, this run has 8" in line


def test_resume_refuses_another_layout_for_lora_under_expert_parallelism(tmp_path):
    """DeepSpeed's universal conversion cannot read frozen expert-parallel experts: a 16-bit LoRA checkpoint
    written under EP resumes on its own layout only, said in one line (QLoRA's resume elsewhere:
    tests/distributed/test_qlora.py)."""
    line = _resume_refusal(tmp_path, {"world_size": 2, "expert_parallel_size": 2, "zero_stage": 1, "global_batch_size": 8,
                                      "lora": True, "optimizer_steps": 2}, ["lora.enabled=true"])
    assert "written by LoRA under expert parallelism" in line


def _interrupt_at(launcher: list[str], out, args: list[str], step: int):
    """Start a run with `launcher`, press Ctrl-C (SIGINT to its process group, as a terminal does) while it waits
    after `step` (fault `pause@step`); returns the finished process and its (stdout, stderr)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **with_faults(out.parent / f"faults_{out.name}", f"pause@{step}")}
    proc = subprocess.Popen([*launcher, f"output_dir={out}", *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_step(proc, out, step)
    os.killpg(proc.pid, signal.SIGINT)
    return proc, proc.communicate(timeout=300)


@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.extended), 2])
def test_ctrl_c_checkpoints_and_the_printed_command_continues_exactly(nproc, uninterrupted, tmp_path):
    """Ctrl-C on 1 rank (`python train/sft.py`) or 2 (`python train/sft.py --nproc_per_node 2`), with no
    checkpoint_every: every rank finishes its step, a checkpoint is written, status 130, one line with the
    command that continues; that command, as printed, finishes the run with the uninterrupted run's losses."""
    import shlex

    if nproc == 2:
        args = [a for a in STAGES["sft"] if not a.startswith("checkpoint_every=")]
        full = [m["loss"] for m in uninterrupted("sft")]
    else:
        args = ["recipe=tiny/sft", "max_steps=6", "deepspeed=zero0", "data.synthetic_samples=64", "max_seq_len=64",
                "global_batch_size=4", "micro_batch_size=2", "verify_export=false"]
        run_stage("sft", tmp_path / "full", args, nproc=1)
        full = losses(tmp_path / "full")
    launcher = [sys.executable, "train/sft.py", *(["--nproc_per_node", "2"] if nproc == 2 else [])]
    out = tmp_path / "run"
    proc, (stdout, stderr) = _interrupt_at(launcher, out, args, 3)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stdout + stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    stops = [l for l in stderr.splitlines() if "continue with:" in l]
    assert len(stops) == 1 and stops[0].startswith("[sft] stopped by Ctrl-C (SIGINT) after step 3/"), stderr[-2000:]
    assert (out / "checkpoints" / "step_3").is_dir()
    command = shlex.split(stops[0].split("continue with: ", 1)[1])
    assert command[:2] == ["python", "train/sft.py"] and command[-1] == "resume=true"
    resumed = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600,
                             env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    assert losses(out) == full


def test_ctrl_c_before_the_first_step_and_a_second_ctrl_c(tmp_path):
    """Before the first step there is nothing to save: one line, status 130. A second Ctrl-C while the first is
    being honoured (here: during the pause) ends the process at once."""
    from train.stops import REPEAT_S

    args = ["recipe=tiny/sft", "max_steps=4", "deepspeed=zero0", "data.synthetic_samples=32", "max_seq_len=64",
            "global_batch_size=2", "micro_batch_size=2", "export=false"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **with_faults(tmp_path / "early_faults", "pause@0")}
    proc = subprocess.Popen([sys.executable, "train/sft.py", f"output_dir={tmp_path / 'early'}", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "early" / "config.yaml").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "before the first step: nothing to save" in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    # a second Ctrl-C, REPEAT_S after the first: no checkpoint, no waiting for the step
    env.update(with_faults(tmp_path / "twice_faults", "pause@2", "pause_in_save@2"))
    proc = subprocess.Popen([sys.executable, "train/sft.py", f"output_dir={tmp_path / 'twice'}", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_step(proc, tmp_path / "twice", 2)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(REPEAT_S + 0.5)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "continue with:" not in stderr, stderr[-2000:]
    assert not (tmp_path / "twice" / "checkpoints" / "step_2").exists()
