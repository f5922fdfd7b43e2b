"""Parameter paths as strings: the one naming that freezing, weight decay, PEFT targets and ``init_from`` share.

A path is the ``/``-joined keys from the root of a parameter tree to a leaf, e.g.
``blocks/layer_0/attn/query/kernel`` (``scan_layers`` stacks: ``blocks/layers/block/attn/...``).
Patterns are Python regular expressions searched anywhere in that string
(``attn/(query|value)`` matches every layer's query and value projections).

This lives at the bottom layer so that ``optim`` and ``peft`` (siblings that must not import
each other) and the programs all use the same function.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import jax


def key_str(key: Any) -> str:
    """One path element (a dict key, attribute name or sequence index) as a string."""
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(path: Iterable[Any]) -> str:
    """A ``jax.tree_util`` key path as ``a/b/c``."""
    return "/".join(key_str(k) for k in path)


def flatten(tree: Any) -> dict[str, Any]:
    """``{path string: leaf}`` of a pytree, in tree order."""
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def map_with_path(fn: Any, tree: Any) -> Any:
    """``jax.tree.map`` whose function also receives the leaf's path string: ``fn(path, leaf)``."""
    return jax.tree_util.tree_map_with_path(lambda p, leaf: fn(path_str(p), leaf), tree)


def compile_patterns(patterns: str | Iterable[str]) -> list[re.Pattern[str]]:
    """Regexes from a comma-separated string or a list (empty entries dropped)."""
    items = patterns.split(",") if isinstance(patterns, str) else list(patterns)
    return [re.compile(p.strip()) for p in items if p.strip()]


def matches(path: str, patterns: Iterable[re.Pattern[str]]) -> bool:
    """Whether any pattern is found in ``path``."""
    return any(p.search(path) for p in patterns)
