"""`--help` of every command, from the config schema itself, and the one-line hints for arguments that are not
`key=value` (train/cli.py).

A key's description is its comment in the schema's source (train/config.py, eval/config.py): the comment on its
line, else the comment block right above it. Defaults are those of the composed config, so a preset's values
(model.hidden_size of the default model) show as the command would run them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from pathlib import Path

from train.config import CONFIG_DIR

LAUNCHER = [("--nproc_per_node N", "ranks on this machine (python train/<stage>.py launches them itself)"),
            ("--nnodes N --node_rank R", "several machines, with --master_addr / --master_port or --rdzv_endpoint"),
            ("--standalone", "one machine, a free port"),
            ("--shutdown-timeout S", "seconds a SIGTERM'd worker gets to checkpoint (default: dist_timeout_s)")]


def descriptions(schema) -> dict[str, str]:
    """{dotted key: one-line description} of a dataclass schema, from its source comments."""
    out: dict[str, str] = {}

    def comments_of(cls) -> dict[str, str]:
        found: dict[str, str] = {}
        for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):  # a subclass's own win
            above: list[str] = []
            last, column = None, -1  # the field with a trailing comment, and where that comment starts
            for line in inspect.getsource(klass).splitlines():
                stripped = line.strip()
                if stripped.startswith("#"):
                    if last is not None and line.index("#") == column:  # the trailing comment goes on
                        found[last] += " " + stripped.lstrip("# ").strip()
                    else:
                        above.append(stripped.lstrip("# ").strip())
                    continue
                m = re.match(r"(\w+): [^=]+=", stripped)
                last, column = None, -1
                if m:
                    trailing = re.split(r"\s#\s", line, maxsplit=1)
                    first = re.split(r"(?<=\.)\s", " ".join(above), maxsplit=1)[0].rstrip(".")
                    if len(trailing) == 2:
                        found[m.group(1)] = trailing[1].strip()
                        last, column = m.group(1), len(trailing[0]) + 1
                    elif first or m.group(1) not in found:
                        found[m.group(1)] = first
                above = []
        return found

    def walk(cls, prefix):
        comments = comments_of(cls)
        for f in dataclasses.fields(cls):
            kind = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = comments.get(f.name, "")

    walk(schema, "")
    return out


def group_defaults(config_name: str) -> dict[str, str]:
    """{group: default option} from the `defaults` list of configs/<config_name>.yaml."""
    import yaml

    data = yaml.safe_load((Path(CONFIG_DIR) / f"{config_name}.yaml").read_text()) or {}
    return {k: v for d in data.get("defaults", []) if isinstance(d, dict) for k, v in d.items()
            if isinstance(v, str) and not k.startswith("override")}


def group_options() -> dict[str, list[str]]:
    """{group: its options} of configs/ (model=, deepspeed=, ...; recipes are listed apart)."""
    root = Path(CONFIG_DIR)
    return {d.name: sorted(p.stem for p in d.glob("*.yaml")) for d in sorted(root.iterdir())
            if d.is_dir() and d.name != "recipe" and any(d.glob("*.yaml"))}


def _value(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v).replace(" ", "")


def help_text(script: str, config_name: str, schema, recipes: list[str], training: bool) -> str:
    """What `python <script> --help` prints."""
    from omegaconf import OmegaConf

    from train.config import compose

    cfg = OmegaConf.to_container(compose(config_name), resolve=False, enum_to_str=True)
    flat: dict[str, object] = {}

    def walk(node, prefix):
        for k, v in node.items():
            if f"{prefix}{k}" == "deepspeed":  # a group: its options are listed above
                continue
            if isinstance(v, dict) and v:
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(cfg, "")
    desc = descriptions(schema)
    if training:
        lines = [f"usage: python {script} [recipe=<name>] [key=value ...]",
                 f"       python {script} --nproc_per_node N [key=value ...]      (launches N ranks itself)",
                 f"       torchrun --nproc_per_node N {script} [key=value ...]",
                 "", f"Every setting is key=value (Hydra): e.g. recipe=tiny/{config_name} max_steps=50 optim.lr=1e-4."]
    else:
        required = " ".join(f"{k}=<...>" for k, v in flat.items() if v == "???")
        lines = [f"usage: python {script} {required + ' ' if required else ''}[key=value ...]",
                 "", "Every setting is key=value (Hydra); the keys without a default are required."]
    if recipes:
        lines += ["", "recipes (recipe=...): " + ", ".join(recipes)]
    groups = group_options()
    used = [g for g in groups if g in cfg]
    defaults = group_defaults(config_name)
    if used:
        lines += ["", "groups (pick an option: group=option):"]
        lines += [f"  {g}=<{'|'.join(groups[g])}>" + (f"  (default {defaults[g]})" if g in defaults else "")
                  for g in used]
    if training:
        lines += ["", "launcher flags (before the keys):"] + [f"  {a:<28}{b}" for a, b in LAUNCHER]
    lines += ["", "keys (default, then what it does):"]
    for key, value in flat.items():
        if key == "recipe_name":
            continue
        shown = f"{key}={_value(value) if value != '???' else '<required>'}"
        lines.append(f"  {shown:<44} {desc.get(key, '')}".rstrip() if len(shown) < 44 else
                     f"  {shown}\n  {'':<44} {desc.get(key, '')}".rstrip())
    return "\n".join(lines)


def not_key_value(argv: list[str], keys: set[str]) -> str | None:
    """A one-line hint for the first argument that is not key=value (`recipe tiny/sft`, `--recipe tiny/sft`,
    `--max_steps=5`), or None. Hydra's own flags (--cfg, --info, -m, ...) are left alone."""
    known = keys | {"recipe"}

    def after(i):  # the value a flag or a bare key was probably meant to take
        return argv[i + 1] if i + 1 < len(argv) and "=" not in argv[i + 1] and not argv[i + 1].startswith("-") else None

    for i, arg in enumerate(argv):
        if arg.startswith("--") and arg[2:].split("=", 1)[0] in known:
            key, _, value = arg[2:].partition("=")
            shown = arg if value or after(i) is None else f"{arg} {after(i)}"
            return f"'{shown}': settings are key=value, not flags: did you mean {key}={value or after(i) or '<value>'}?"
    if any(a.startswith("-") for a in argv):  # Hydra's own flags (--cfg job, -m, ...): Hydra reads the rest
        return None
    for i, arg in enumerate(argv):
        if "=" not in arg:
            if arg in known:
                shown = arg if after(i) is None else f"{arg} {after(i)}"
                return f"'{shown}': settings are key=value: did you mean {arg}={after(i) or '<value>'}?"
            return f"'{arg}': settings are key=value (e.g. recipe=tiny/sft max_steps=50); --help lists the keys"
    return None
