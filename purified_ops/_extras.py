"""Checks for the optional packages of an extra (pyproject.toml's optional-dependencies), so that a
command without them says what to install instead of failing deep inside with a traceback."""
from __future__ import annotations

import importlib

# The distribution that provides a module, where the names differ.
_DISTRIBUTIONS = {"sklearn": "scikit-learn"}


class MissingExtraError(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that installs it."""


def require_extra(extra: str, *modules: str, purpose: str) -> None:
    """Imports `modules`; if any is missing, raises MissingExtraError naming
    ``pip install 'purified-ops[<extra>]'``. `purpose` says what needs them."""
    missing = []
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError:
            missing.append(_DISTRIBUTIONS.get(module, module))
    if missing:
        raise MissingExtraError(f"{purpose} needs {', '.join(missing)}, not installed here: "
                                f"pip install 'purified-ops[{extra}]'")
