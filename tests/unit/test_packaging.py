"""The project's top-level packages (`data`, `model`, `train`, `eval`) refuse to run on another distribution's
package of the same name (train/__init__.py)."""

import os
import subprocess
import sys

from helpers import REPO


def _import(code: str, pythonpath: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": pythonpath})


def test_the_projects_packages_import_together():
    proc = _import("import eval.passkey, train.cli, data.chat, model.build; print('ok')", str(REPO))
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_shadowing_package_of_the_same_name_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "__init__.py").write_text("")  # e.g. another distribution's top-level `data`
    for code in ("import train", "import eval"):
        proc = _import(code, f"{tmp_path}{os.pathsep}{REPO}")
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("ImportError: the package 'data' that Python finds first is "
                               f"{tmp_path / 'data' / '__init__.py'}"), last
        assert "install mixtral-tune in its own virtual environment" in last


def test_no_script_folder_module_shadows_an_installed_package():
    """`python train/sft.py` or `python eval/serve.py` put the script's folder first on sys.path: a module there named
    like a library (eval/requests.py once) would replace that library for everything the script imports."""
    import importlib.metadata

    installed = set(sys.stdlib_module_names) | set(importlib.metadata.packages_distributions())
    for folder in ("train", "eval", "bench", "data", "model"):
        names = {p.stem for p in (REPO / folder).glob("*.py")} - {"__init__"}
        assert not names & installed, (folder, sorted(names & installed))
