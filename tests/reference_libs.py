"""The PyTorch reference libraries (torch, transformers, peft), imported when a test first uses them.

``pytest.importorskip`` at a test module's top imports the library while pytest collects, and
with xdist every worker collects every file: each worker paid ~8 s importing torch, transformers
and peft before its first test, even the worker that runs none of the parity tests. This module's
``importorskip`` still skips the module at collection when the library is not installed (a cheap
``find_spec``), but imports it only at the first attribute a test reads.
"""

from __future__ import annotations

import importlib
import importlib.util
import types
from typing import Any

import pytest


class LazyModule:
    """Stands for a module until a public attribute is read, then imports it (a failed import skips the test).

    Private and dunder names raise AttributeError without importing: pytest probes every name of a
    test module for fixture markers while collecting (``safe_getattr(obj, "__pytest_wrapped__")``
    and the like), and that must not import the library.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: types.ModuleType | None = None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        if self._module is None:
            try:
                self._module = importlib.import_module(self._name)
            except ImportError as e:  # installed but unusable, as importorskip would report it
                pytest.skip(f"could not import {self._name!r}: {e}")
        return getattr(self._module, attribute)


def importorskip(name: str) -> Any:
    """Skip the calling test module if ``name`` is not installed; otherwise a lazily imported ``name``."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"could not import {name!r}: not installed", allow_module_level=True)
    return LazyModule(name)
