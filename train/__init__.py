"""The training stages. `data`, `model`, `train` and `eval` install as top-level packages, so importing this one
checks that the other three are this project's own (siblings of this folder) and not another distribution's
packages of the same name found first on the path; README "Install" puts the project in its own venv."""

import importlib.util as _util
from pathlib import Path as _Path

_ROOT = _Path(__file__).resolve().parents[1]
for _name in ("data", "model", "eval"):
    _spec = _util.find_spec(_name)
    _origin = _spec.origin if _spec is not None else None
    if _origin is None or _Path(_origin).resolve().parents[1] != _ROOT:
        raise ImportError(f"the package {_name!r} that Python finds first is {_origin}, not {_ROOT / _name}: another "
                          f"distribution's top-level {_name!r} shadows this project's; install mixtral-tune in its own "
                          f"virtual environment")
