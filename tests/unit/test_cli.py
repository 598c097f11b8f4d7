"""The command line of every stage and eval command (train/cli.py): each mistake is one line on stderr,
exit status 2, before any model loads."""

import os
import subprocess
import sys

import pytest

from helpers import REPO

RUN = "/tmp/__no_such_run__"
MISTAKES = [  # (script, arguments, text the one line must contain)
    ("train/sft.py", ["recipe=tiny/sfft", "max_steps=2"], "recipe 'tiny/sfft' not found; did you mean tiny/sft?"),
    ("train/sft.py", ["recipe=tiny/dpo"], "recipe tiny/dpo is for dpo (its stage: key): run it with train/dpo.py, not train/sft.py"),
    ("train/sft.py", ["stage=pretrain"], "stage=pretrain: the stage is the command's; run train/pretrain.py instead"),
    ("train/sft.py", ["recipe=qqqq/zzzzzzzz"], "recipes: "),
    ("train/sft.py", ["optim.lrr=1"], "unknown key 'optim.lrr'; did you mean optim.lr?"),
    ("train/sft.py", ["+optim.lrr=1"], "unknown key 'optim.lrr'"),
    ("train/sft.py", ["+foo=1"], "unknown key 'foo'"),
    ("train/sft.py", ["max_steps=abc"], "max_steps='abc'"),
    ("train/sft.py", ["lora.enabled=maybe"], "lora.enabled='maybe'"),
    ("train/sft.py", ["deepspeed=zero5"], "deepspeed=zero5 not found; did you mean zero3?"),
    ("train/sft.py", ["model=tinny"], "model=tinny not found; did you mean tiny?"),
    ("train/sft.py", ["max_steps=0"], "max_steps=0: must be a positive integer"),
    ("train/sft.py", ["data.format=csv"], "data.format='csv': expected one of"),
    ("train/sft.py", ["optim.name=lion"], "optim.name='lion'"),
    ("train/sft.py", ["expert_parallel_size=3"], "expert_parallel_size=3 does not divide"),
    ("train/sft.py", ["model_path=/no/such/folder"], "model_path=/no/such/folder: no such folder"),
    ("train/sft.py", ["max_seq_len=100000"], "max_seq_len=100000 exceeds"),
    ("train/sft.py", ["data.on_error=ignore"], "data.on_error='ignore'"),
    ("train/sft.py", ["deepspeed=zero1", "precision=bf16", "+deepspeed.data_types.grad_accum_dtype=fp32"],
     "fp32 gradient accumulation is supported with ZeRO-2 or ZeRO-3"),
    ("train/pretrain.py", ["recipe=tiny/pretrian"], "did you mean tiny/pretrain?"),
    ("train/pretrain.py", ["optim.schedule=wsd", "optim.decay_fraction=0"], "optim.decay_fraction=0"),
    ("train/pretrain.py", ["router.aux_loss_coef=-1"], "router.aux_loss_coef"),
    ("train/dpo.py", ["recipe=tiny/dpo"], "model_path is required"),
    ("train/dpo.py", ["recipe=tiny/dpo", "allow_random_init=true", "dpo.beta=0"], "dpo.beta=0.0: must be > 0"),
    ("train/dpo.py", ["recipe=tiny/dpo", "allow_random_init=true", "dpo.loss_type=kpo"], "dpo.loss_type='kpo'"),
    ("train/dpo.py", ["recipe=tiny/dpo", "allow_random_init=true", "dpo.betta=1"], "unknown key 'dpo.betta'; did you mean dpo.beta?"),
    ("eval/passkey.py", [], "model_path is required"),
    ("eval/passkey.py", ["model_path=RUN"], "is a run folder: its export is model_path=RUN/hf"),
    ("eval/passkey.py", ["model_path=RUN/hf", "depths=[0,50,100]"], "depths=[0.0, 50.0, 100.0]: each depth is a share"),
    ("eval/passkey.py", ["model_path=RUN/hf", "mode=chatt"], "mode='chatt': expected one of completion, chat"),
    ("eval/passkey.py", ["model_path=RUN/hf", "trials=0"], "trials=0: must be >= 1"),
    ("eval/mt_bench.py", ["model_path=RUN/hf", "model_id=x"], "questions=question.jsonl: no such file"),
    ("eval/mt_bench.py", ["model_path=RUN/hf"], "model_id is required"),
    ("eval/serve.py", ["model_path=RUN/hf", "port=0"], "port=0: expected 1-65535"),
    ("eval/serve.py", ["model_path=RUN/hf", "max_new_tokens=-1"], "max_new_tokens=-1: must be >= 1"),
    ("eval/serve.py", ["model_path=RUN/hf", "modell_id=a"], "unknown key 'modell_id'; did you mean model_id?"),
    ("eval/chat.py", [], "model_path is required"),
    ("eval/chat.py", ["model_path=RUN/hf", "temperature=-1"], "temperature=-1"),
    ("eval/routing.py", ["model_path=RUN/hf", "seq_len=0"], "seq_len=0: must be >= 1"),
    ("eval/routing.py", ["model_path=RUN/hf", "dtype=fp8"], "dtype='fp8': expected one of"),
    ("train/sft.py", ["--recipe", "tiny/sft"], "'--recipe tiny/sft': settings are key=value, not flags: did you mean "
                                              "recipe=tiny/sft?"),
]

COMMANDS = [("train/pretrain.py", "pretrain"), ("train/sft.py", "sft"), ("train/dpo.py", "dpo"),
            ("eval/passkey.py", "passkey"), ("eval/mt_bench.py", "mt_bench"), ("eval/serve.py", "serve"),
            ("eval/chat.py", "chat"), ("eval/routing.py", "routing"), ("train/pipeline.py", "pipeline"),
            ("eval/pipeline_report.py", "pipeline")]


@pytest.mark.parametrize("script, config_name", COMMANDS)
def test_help_lists_every_key_with_its_default_and_a_description(script, config_name):
    """Every key of every command's schema is in its --help with a default and a one-line description (a key
    added without a comment in the schema fails here); training stages list their recipes and launcher flags."""
    import eval.config as ec
    import train.config as tc
    from train.cli import _schema_keys, recipe_stage, recipes
    from train.usage import descriptions, help_text

    schema = {"pretrain": tc.PretrainConfig, "sft": tc.SFTConfig, "dpo": tc.DPOStageConfig, "pipeline": tc.PipelineConfig,
              "passkey": ec.PasskeyConfig, "mt_bench": ec.MTBenchConfig, "serve": ec.ServeConfig, "chat": ec.ChatConfig,
              "routing": ec.RoutingConfig}[config_name]
    training = config_name in ("pretrain", "sft", "dpo")
    text = help_text(script, config_name, schema, [r for r in recipes() if recipe_stage(r) == config_name], training)
    desc = descriptions(schema)
    keys = [k for k in _schema_keys(schema)[0] if k in desc and k not in ("recipe_name", "deepspeed")]
    for key in keys:
        line = next((l for l in text.splitlines() if l.strip().startswith(f"{key}=")), None)
        assert line is not None, f"{key} missing from --help"
        assert desc[key], f"{key} has no description: add a comment to it in the schema"
    if training:
        assert "--nproc_per_node N" in text and f"recipe=tiny/{config_name}" in text
        assert "deepspeed=<zero0|zero1|zero2|zero3|zero3_offload>" in text


def test_help_exits_0_and_positional_mistakes_get_a_key_value_hint():
    from train.usage import not_key_value

    proc = subprocess.run([sys.executable, "train/sft.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python train/sft.py") and "optim.lr=" in proc.stdout
    keys = {"max_steps", "optim.lr"}
    assert not_key_value(["recipe", "tiny/sft"], keys).endswith("did you mean recipe=tiny/sft?")
    assert not_key_value(["--recipe=tiny/sft"], keys).endswith("did you mean recipe=tiny/sft?")
    assert not_key_value(["--max_steps", "5"], keys).endswith("did you mean max_steps=5?")
    assert "settings are key=value" in not_key_value(["tiny/sft"], keys)
    assert not_key_value(["recipe=tiny/sft", "max_steps=5"], keys) is None
    assert not_key_value(["--cfg", "job"], keys) is None  # Hydra's own flags are Hydra's


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A folder shaped like a stage's output: <run>/hf/config.json."""
    run = tmp_path_factory.mktemp("cli") / "run"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "config.json").write_text('{"model_type": "mixtral"}')
    return run


def _in_process(script: str, args: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python <script> <args>` run in this process: the command's own `main`,
    with sys.argv set as Python sets it. Every mistake is caught before any model loads, so nothing starts."""
    import contextlib
    import importlib
    import io

    module = importlib.import_module(script[:-3].replace("/", "."))
    argv, out, err, status = sys.argv, io.StringIO(), io.StringIO(), 0
    sys.argv = [script, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            module.main()
    except SystemExit as e:
        status = e.code
    finally:
        sys.argv = argv
    return status, out.getvalue(), err.getvalue()


SUBPROCESS = {0, 24, len(MISTAKES) - 1}  # also as real processes: a stage, an eval command, a positional mistake


def test_every_mistake_is_one_line_and_exit_2(run_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    failures = []
    for i, (script, args, needle) in enumerate(MISTAKES):
        args = [a.replace("RUN", str(run_folder)) for a in args]
        if script.startswith("train/"):
            args.append(f"output_dir={tmp_path / 'fresh'}")
        needle = needle.replace("RUN", str(run_folder))
        runs = [_in_process(script, args)]
        if i in SUBPROCESS:
            proc = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=300)
            runs.append((proc.returncode, proc.stdout, proc.stderr))
        for status, stdout, stderr in runs:
            lines = stderr.strip().splitlines()
            if not (status == 2 and len(lines) == 1 and lines[0].startswith("config error: ") and needle in lines[0]
                    and "Traceback" not in stdout):
                failures.append((script, args, status, stderr[-1500:]))
    assert len(MISTAKES) >= 25
    assert not failures, failures
    assert not (tmp_path / "fresh").exists()  # nothing was started


def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    proc = subprocess.run([sys.executable, "train/sft.py", "recipe=tiny/sft", f"output_dir={out}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"config error: output_dir={out} holds an earlier run (metrics.jsonl): it has no "
                                   f"checkpoint to resume from (checkpoint_every), so overwrite=true replaces it, or "
                                   f"choose another output_dir")
    from train.checks import check_output_dir, start_afresh
    from train.config import compose

    (out / "cache").mkdir()
    for ok in (["resume=true"], ["overwrite=true"]):
        check_output_dir(compose("sft", [f"output_dir={out}", *ok]))  # accepted
    start_afresh(compose("sft", [f"output_dir={out}", "overwrite=true"]))
    assert sorted(p.name for p in out.iterdir()) == ["cache"]  # the tokenization cache is kept


def test_the_launcher_names_the_worker_that_failed_not_the_ones_torchrun_stopped(tmp_path):
    """Once a worker fails, torchrun sends SIGTERM to the others; the one to report is the cause, whatever its
    rank, and among causes the lowest rank."""
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from train.cli import first_failure

    def failed(rank, exitcode):
        return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode, error_file=str(tmp_path / "none"))

    term, kill = -signal.SIGTERM, -signal.SIGKILL
    assert first_failure({0: failed(0, term), 1: failed(1, 3)}) == 1
    assert first_failure({0: failed(0, term), 1: failed(1, term), 2: failed(2, kill), 3: failed(3, 3)}) == 2
    assert first_failure({0: failed(0, 3), 1: failed(1, 3)}) == 0
    assert first_failure({0: failed(0, term), 1: failed(1, term)}) == 0
