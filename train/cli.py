"""The command line of every stage and eval command: strict, early, one line per mistake.

`@cli.main("sft")` replaces `@hydra.main(...)`. Before Hydra runs (and so before any model loads), the
command line is composed exactly as Hydra will compose it and checked:

    an unknown recipe            config error: recipe 'tiny/sfft' not found; did you mean tiny/sft?
    an unknown key (also +key)   config error: unknown key 'optim.lrr'; did you mean optim.lr?
    a wrong type                 config error: max_steps='abc': Value 'abc' of type 'str' could not be converted to Integer
    an unknown group option      config error: deepspeed=zero5 not found; did you mean zero3? (zero0, zero1, ...)
    a value out of range, an unknown choice, a combination that cannot work: the command's own checks
                                 (train/config.py `validate`, eval/config.py `validate_eval`)

Each prints one line on stderr from rank 0 only (every rank of a torchrun job exits), with exit code 2 and no
traceback. The recipe's name is recorded in the config (`recipe_name`), so the saved config.yaml says which
recipe ran.

Training stages also launch themselves: `python train/sft.py --nproc_per_node 2 recipe=...` (any of
torchrun's flags before the overrides) checks the config once in this process, then starts the workers
through torchrun's own launcher, and answers a failed worker with one line and that worker's exit
status. (`torchrun train/sft.py ...` runs the same job; when a worker fails, torchrun adds its own
summary of the failure after our line and exits with status 1.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import os
import re
import signal
import sys
import typing
from pathlib import Path

from train import console
from train.config import CONFIG_DIR, ConfigError

RECIPE_DIR = Path(CONFIG_DIR) / "recipe"
STAGES = ("pretrain", "sft", "dpo")


def recipes() -> list[str]:
    return sorted(p.relative_to(RECIPE_DIR).with_suffix("").as_posix() for p in RECIPE_DIR.rglob("*.yaml")
                  if not p.name.startswith("_"))


def recipe_stage(recipe: str) -> str | None:
    """The stage a recipe is for: its `stage:` key (None for a recipe that does not exist)."""
    import yaml

    path = RECIPE_DIR / f"{recipe}.yaml"
    return yaml.safe_load(path.read_text()).get("stage") if path.is_file() else None


def _close(word: str, options) -> str:
    match = difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)
    return f"; did you mean {match[0]}?" if match else ""


def _schema_keys(schema) -> tuple[set[str], set[str]]:
    """(every dotted key of a dataclass schema, the keys whose values are free-form dicts)."""
    keys, free = set(), set()

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, kind = prefix + f.name, hints[f.name]
            keys.add(key)
            if dataclasses.is_dataclass(kind):
                walk(kind, key + ".")
            elif typing.get_origin(kind) is dict or kind is dict:
                free.add(key)

    walk(schema, "")
    return keys, free


def _unknown_keys(cfg, schema) -> list[str]:
    """Keys of the composed config that the schema does not declare (added with `+key=` or by a recipe)."""
    from omegaconf import DictConfig

    keys, free = _schema_keys(schema)
    found = []

    def walk(node, prefix):
        for k in node.keys():
            key = prefix + str(k)
            if key not in keys:
                found.append(key)
            elif key not in free and isinstance(node._get_node(k), DictConfig):
                walk(node[k], key + ".")

    walk(cfg, "")
    return found


def _hydra_message(e: Exception, overrides: list[str]) -> str:
    """One line for an exception raised while composing."""
    from hydra.errors import MissingConfigException

    cause = e.__cause__ or e.__context__ or e
    full_key = getattr(cause, "full_key", None) or getattr(e, "full_key", None)
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(e, MissingConfigException) or "Could not find" in str(e):
        group, _, option = str(getattr(e, "missing_cfg_file", None) or "").rpartition("/")
        options = list(getattr(e, "options", None) or [])
        if group and option:
            return f"{group}={option} not found{_close(option, options)}" + (f" ({', '.join(options)})" if options else "")
        return str(e).strip().splitlines()[0]
    name = type(cause).__name__
    if full_key and name in ("ConfigKeyError", "ConfigAttributeError", "KeyValidationError"):
        return f"unknown key '{full_key}'"
    choices = re.match(r"Invalid value '.*', expected one of \[(.*)\]$", text)
    if choices:  # a choice key (train/config.py `Choice`)
        text = f"expected one of {choices.group(1)}"
    if full_key:
        value = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == full_key), None)
        return f"{full_key}={value!r}: {text}" if value is not None else f"{full_key}: {text}"
    return text


def compose_strict(config_name: str, overrides: list[str], schema):
    """The config Hydra will run with, or ConfigError (one line) for any mistake in `overrides`."""
    from train.config import compose

    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") == "recipe" and value not in ("", "null") and value not in recipes():
            hint = _close(value, recipes()) or f" (recipes: {', '.join(recipes())})"
            raise ConfigError(f"recipe '{value}' not found{hint}")
        if key.lstrip("+~") == "recipe" and config_name in STAGES and recipe_stage(value) not in (None, config_name):
            raise ConfigError(f"recipe {value} is for {recipe_stage(value)} (its stage: key): run it with "
                              f"train/{recipe_stage(value)}.py, not train/{config_name}.py")
    try:
        cfg = compose(config_name, overrides)
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many kinds; each becomes one line
        message = _hydra_message(e, overrides)
        if message.startswith("unknown key '"):
            key = message.split("'")[1]
            message += _close(key, _schema_keys(schema)[0])
        raise ConfigError(message) from None
    unknown = _unknown_keys(cfg, schema)
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}'{_close(unknown[0], _schema_keys(schema)[0])}")
    if config_name in STAGES and cfg.stage != config_name:  # stage= on the command line
        raise ConfigError(f"stage={cfg.stage}: the stage is the command's; run train/{cfg.stage}.py instead")
    return cfg


def _overrides(argv: list[str]) -> list[str] | None:
    """The key=value overrides of a command line, or None when Hydra flags (--help, --cfg, -m) are used."""
    if any(a.startswith("-") for a in argv):
        return None
    return list(argv)


LAUNCH_FLAGS = {"--nproc_per_node", "--nproc-per-node", "--nnodes", "--node_rank", "--node-rank", "--master_addr",
                "--master-addr", "--master_port", "--master-port", "--rdzv_backend", "--rdzv-backend", "--rdzv_endpoint",
                "--rdzv-endpoint", "--rdzv_id", "--rdzv-id", "--max_restarts", "--max-restarts", "--standalone",
                "--signals-to-handle", "--signals_to_handle", "--shutdown-timeout", "--shutdown_timeout"}


def _launch_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(torchrun flags, the rest) of a command line such as `--nproc_per_node 2 recipe=tiny/sft`."""
    flags, rest, i = [], [], 0
    while i < len(argv):
        name = argv[i].split("=", 1)[0]
        if name in LAUNCH_FLAGS:
            takes_value = name != "--standalone" and "=" not in argv[i]
            flags += argv[i:i + 1 + takes_value]
            i += 1 + takes_value
        else:
            rest.append(argv[i])
            i += 1
    return flags, rest


def first_failure(failures: dict) -> int:
    """The rank to report among torchrun's failed workers {rank: ProcessFailure}: the lowest rank that failed
    by itself (an exit status, or a signal such as SIGKILL) before the lowest one ended by SIGTERM, which is
    what torchrun sends the other workers once one has failed: they are not the cause."""
    return min(failures, key=lambda r: (failures[r].exitcode == -signal.SIGTERM, r))


STOPPED = (2, 4, 130, 143)  # statuses whose one line the worker printed itself: a config error, a failed export
                            # check, a stop on Ctrl-C or SIGTERM (train/stops.py)


def _children() -> list[int]:
    """The pids of this process's children (torchrun's workers: each in a session of its own)."""
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if stat[stat.rindex(")") + 2:].split()[1] == me:
                found.append(int(entry))
    return found


def _forward(signum, frame) -> None:
    """Ctrl-C reaches only this process (the workers run in sessions of their own): pass it on to them; they
    finish the step, checkpoint and exit 130 (a second Ctrl-C: at once), train/stops.py."""
    for pid in _children():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def launch(script: str, flags: list[str], overrides: list[str], shutdown_s: int = 300) -> None:
    """Run `script overrides` on torchrun's launcher in this process; exit with the status of the worker that
    failed first (the lowest rank that was not merely stopped by torchrun's SIGTERM). Ctrl-C is passed on to
    the workers as it comes (torchrun would stop them after 30 s); a SIGTERM is forwarded by torchrun, and the
    workers get `shutdown_s` to checkpoint before a SIGKILL."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in ("torch.distributed.elastic", "torch.distributed.run"):  # its banners and failure report: ours is below
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ["MIXTRAL_TUNE_LAUNCH_FLAGS"] = " ".join(flags)  # the workers' resume command repeats them
    given = {f.split("=", 1)[0].replace("_", "-") for f in flags}
    extra = ([] if "--signals-to-handle" in given else ["--signals-to-handle", "SIGTERM,SIGHUP,SIGQUIT"]) + \
            ([] if "--shutdown-timeout" in given else ["--shutdown-timeout", str(shutdown_s)])
    args = get_args_parser().parse_args([*flags, *extra, script, *overrides])
    signal.signal(signal.SIGINT, _forward)
    try:
        run(args)
    except ChildFailedError as e:
        rank = first_failure(e.failures)
        failure = e.failures[rank]
        status = failure.exitcode if failure.exitcode > 0 else 1
        if status not in STOPPED:
            how = f"status {failure.exitcode}" if failure.exitcode > 0 else f"signal {-failure.exitcode}"
            print(f"{Path(script).name}: rank {rank} ended with {how}; its messages are above", file=sys.stderr,
                  flush=True)
        sys.exit(status)
    except SignalException as e:  # SIGTERM (or SIGHUP, SIGQUIT): the workers were given it and have stopped
        sys.exit(128 + int(e.sigval))
    sys.exit(0)


def fail(message: str) -> None:
    """Print `config error: message` once (rank 0 of a distributed job) and exit with status 2."""
    if os.environ.get("RANK", "0") == "0":
        print(f"config error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _end_distributed(status: int, program: bool) -> None:
    """Destroy every process group, then, where this command is the process's program (`python train/sft.py`,
    a torchrun worker; not a test calling it in process), end the process here with `status`.

    Leaving through the interpreter's finalization is not safe once gloo (or NCCL) has run: process groups that
    DeepSpeed still references are freed during finalization, and their C++ worker threads, reaching for the GIL
    of an interpreter being torn down, are unwound into `std::terminate` — a rank whose work and files were all
    done then dies with `terminate called without an active exception` (SIGABRT) and torchrun reports the run
    failed. Everything a run writes is written and closed before this point (metrics, checkpoints, exports,
    wandb's finish), so the process ends with os._exit once the atexit functions have run (while the
    interpreter is whole: a wrapper's, such as bench/_common.py's peak-RSS report) and its streams are flushed."""
    import atexit
    import logging

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()
    if program:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main(config_name: str, schema, check=None):
    """Decorator for a command's `main(cfg)`: strict checks, then Hydra as usual. `check(cfg)` adds the
    command's own rules (raise ConfigError)."""
    import hydra

    def decorate(fn):
        hydra_main = hydra.main(config_path=CONFIG_DIR, config_name=config_name, version_base="1.3")

        @functools.wraps(fn)
        def with_recipe(cfg):
            recipe = next((o.split("=", 1)[1] for o in sys.argv[1:] if o.split("=", 1)[0].lstrip("+~") == "recipe"), None)
            if "recipe_name" in cfg:
                cfg.recipe_name = recipe
            from data.hub import HubUnreachable

            program = getattr(sys.modules.get("__main__"), "main", None) is run
            try:
                result = fn(cfg)
            except SystemExit as e:  # a deliberate stop (status 3 after non-finite steps): every rank is at the same point
                _end_distributed(e.code if isinstance(e.code, int) else (0 if e.code is None else 1), program)
                raise
            except (ConfigError, HubUnreachable) as e:  # found once the run has started (every rank finds it)
                if os.environ.get("RANK", "0") == "0":
                    print(f"config error: {e}", file=sys.stderr, flush=True)
                _end_distributed(2, program)
                sys.exit(2)
            _end_distributed(0, program)
            return result

        @functools.wraps(fn)
        def run():
            from train import usage

            console.setup()
            flags, argv = _launch_flags(sys.argv[1:])
            training = config_name in STAGES
            if "--help" in argv or "-h" in argv:
                print(usage.help_text(f"{Path(sys.argv[0]).parent.name}/{Path(sys.argv[0]).name}", config_name, schema,
                                      [r for r in recipes() if recipe_stage(r) == config_name] if training else [],
                                      training))
                sys.exit(0)
            hint = usage.not_key_value(argv, _schema_keys(schema)[0])
            if hint is not None:
                fail(hint)
            overrides = _overrides(argv)
            if overrides is not None:
                try:
                    cfg = compose_strict(config_name, overrides, schema)
                    if check is not None:
                        check(cfg)
                except ConfigError as e:
                    fail(str(e))
            if flags and "LOCAL_RANK" not in os.environ:
                launch(sys.argv[0], flags, argv, int(getattr(cfg, "dist_timeout_s", 300)) if overrides is not None else 300)
            sys.argv[1:] = argv
            return hydra_main(with_recipe)()

        return run

    return decorate
