"""No hidden state in the production code: no module-level cells that functions fill in later (the
`GROUP = [None]` idiom) or `global` rebinding, no environment variable that changes what a stage does, and
fault injection only where a test installs it (train/faults.py)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from helpers import with_faults

REPO = Path(__file__).resolve().parents[2]
PRODUCTION = ("data", "model", "train", "eval")
# Variables the stages read, and why none of them changes what is computed.
ALLOWED_VARIABLES = {
    "MIXTRAL_TUNE_LAUNCH_FLAGS": "set by train/cli.py `launch` for its own workers (their resume command repeats it)",
    "MIXTRAL_TUNE_PROGRESS": "progress bars on a stderr that is not a terminal (display only)",
}


def sources():
    for layer in PRODUCTION:
        for path in sorted((REPO / layer).rglob("*.py")):
            yield path, ast.parse(path.read_text(), str(path))


def test_no_module_level_cells_or_global_rebinding():
    found = []
    for path, tree in sources():
        for node in tree.body:
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            if isinstance(value, ast.List) and len(value.elts) == 1:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: a one-item list at module level")
        found += [f"{path.relative_to(REPO)}:{n.lineno}: global {', '.join(n.names)}"
                  for n in ast.walk(tree) if isinstance(n, ast.Global)]
    assert not found, "\n".join(found)


def test_no_environment_variable_changes_what_a_stage_does():
    found = []
    for path, tree in sources():
        for n in ast.walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.startswith("MIXTRAL_TUNE_") \
                    and n.value not in ALLOWED_VARIABLES:
                found.append(f"{path.relative_to(REPO)}:{n.lineno}: {n.value}")
    assert not found, "\n".join(found)


def test_faults_are_injected_only_where_a_test_installs_them(tmp_path):
    from train import faults

    assert not faults.inject("nan_loss", 2)
    probe = "from train import faults; print(faults.inject('nan_loss', 2), faults.inject('nan_loss', 3))"
    plain = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert plain.stdout.split() == ["False", "False"]
    env = {**os.environ, **with_faults(tmp_path, "nan_loss@2")}
    installed = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                               check=True)
    assert installed.stdout.split() == ["True", "False"]
