"""The serve extra's packages, imported lazily with an install hint (the base install stays small)."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import DependencyMissingError

HINT = 'pip install "transfer[serve]"'


def need(module: str, purpose: str = "transfer serve") -> ModuleType:
    """Import ``module`` or raise :class:`DependencyMissingError` naming the ``serve`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyMissingError(f"the Python package '{module.split('.')[0]}' is not installed "
                                     f"(needed for {purpose}): {exc}", hint=HINT) from exc


def prometheus() -> ModuleType:
    return need("prometheus_client")


def check_installed() -> None:
    """Every package the HTTP server needs, checked before a bundle is loaded.

    Raises:
        DependencyMissingError: with the ``pip install "transfer[serve]"`` hint.
    """
    for m in ("fastapi", "uvicorn", "prometheus_client", "python_multipart"):
        need(m)
