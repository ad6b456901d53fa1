"""Param paths as ``"a/b/c"`` strings, and the patterns that select them.

A pattern is one of:

- a **name** (``"q_proj"``): equals one path component;
- a **sub-path** (``"attn/q_proj"``): equals a run of consecutive components;
- a **glob** (``"*_proj"``, ``"layers/*/mlp/*"``): split at ``/``, each part ``fnmatch``-ed against
  one component of a run of consecutive components; ``**`` spans any number of components;
- a **regex** (``"re:.*layers/[0-3]/.*proj"``): ``re.fullmatch`` against the whole path, or against
  any leading part of it (so it may name a module rather than its leaf).

A match that ends at the leaf names the leaf itself; a match that ends earlier names a subtree.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from functools import lru_cache
from typing import Any, Iterable, Mapping, Sequence

import jax

from jlora import _compat

LEAF, SUBTREE = "leaf", "subtree"


def key_str(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_str(keypath: Sequence[Any]) -> str:
    """``"a/b/c"`` for a JAX key path; NNX ``Variable``'s trailing ``.value`` is dropped.

    Example:
        >>> import jax
        >>> from jlora.paths import path_str
        >>> path_str((jax.tree_util.DictKey("dense"), jax.tree_util.DictKey("kernel")))
        'dense/kernel'
    """
    keys = list(keypath)
    if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey) and keys[-1].name == "value" and len(keys) > 1:
        keys = keys[:-1]
    return "/".join(key_str(k) for k in keys)


def leaves_with_paths(tree: Any, is_leaf: Any = None) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in flattening order.

    Example:
        >>> from jlora.paths import leaves_with_paths
        >>> leaves_with_paths({"a": {"b": 1}})
        [('a/b', 1)]
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [(path_str(kp), leaf) for kp, leaf in flat]


# what a deleted array's message says of it
DELETED = ("was deleted (donated: given to a jitted step to reuse, donate_argnums, or by a framework's own loop, "
           "as Keras's fit and predict donate its variables' arrays)")


def is_deleted(x: Any) -> bool:
    """Whether ``x`` is a concrete ``jax.Array`` that was deleted (donated); a tracer or a numpy array is not."""
    return isinstance(x, jax.Array) and not _compat.is_tracer(x) and x.is_deleted()


def only_in(*sides: tuple[str, Iterable[str]]) -> str:
    """``"only in A: [...]; only in B: [...]"`` for the sides that have paths (the first five, sorted).

    Example:
        >>> from jlora.paths import only_in
        >>> only_in(("trainable", []), ("frozen", {"b", "a"}))
        "only in frozen: ['a', 'b']"
    """
    return "; ".join(f"only in {name}: {sorted(paths)[:5]}" for name, paths in sides if paths)


def deleted_path(tree: Any) -> str | None:
    """The path of the first array of ``tree`` that was deleted (donated to a jitted step:
    ``donate_argnums``), or ``None``: what JAX's "Array has been deleted" does not say.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jlora.paths import deleted_path
        >>> tree = {"b": jnp.zeros(2), "w": jnp.ones(2)}
        >>> _ = jax.jit(lambda w: w * 2, donate_argnums=0)(tree["w"])  # tree["w"] given to the step to reuse
        >>> deleted_path(tree), deleted_path({"b": tree["b"]})
        ('w', None)
    """
    return next((p for p, x in leaves_with_paths(tree) if is_deleted(x)), None)


def replace_leaves(tree: Any, new: Mapping[str, Any], is_leaf: Any = None) -> Any:
    """``tree`` with the leaf at each path of ``new`` replaced by its value (the others kept).

    Example:
        >>> from jlora.paths import replace_leaves
        >>> replace_leaves({"a": {"b": 1, "c": 2}}, {"a/c": 3})
        {'a': {'b': 1, 'c': 3}}
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return jax.tree_util.tree_unflatten(treedef, [new.get(path_str(kp), leaf) for kp, leaf in flat])


class Pattern:
    """A compiled path pattern (see the module docstring for the syntax).

    Example:
        >>> from jlora.paths import Pattern
        >>> Pattern("q_proj").match("model/layers/0/q_proj/kernel")
        'subtree'
    """

    def __init__(self, text: str):
        if not isinstance(text, str) or not text:
            raise ValueError(f"pattern must be a non-empty string, got {text!r}")
        self.text = text
        if text.startswith("re:"):
            if not text[3:]:
                raise ValueError(f"pattern {text!r} has an empty regular expression after 're:'")
            try:
                self._regex = re.compile(text[3:])
            except re.error as err:
                raise ValueError(f"pattern {text!r} is not a valid regular expression: {err}") from None
            self._parts = None
        else:
            self._regex = None
            self._parts = tuple(p for p in text.strip("/").split("/"))
            if "" in self._parts:
                raise ValueError(f"pattern {text!r} has an empty path component ('//' or only '/'); "
                                 "paths are names joined by single '/'")

    def match(self, path: str) -> str | None:
        """``"leaf"`` if the pattern names the leaf at ``path``, ``"subtree"`` if an ancestor."""
        comps = path.split("/")
        if self._regex is not None:
            if self._regex.fullmatch(path):
                return LEAF
            for end in range(len(comps) - 1, 0, -1):
                if self._regex.fullmatch("/".join(comps[:end])):
                    return SUBTREE
            return None
        ends = _match_ends(self._parts, tuple(comps))
        if not ends:
            return None
        return LEAF if len(comps) in ends else SUBTREE

    def __repr__(self) -> str:
        return f"Pattern({self.text!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Pattern) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)


@lru_cache(maxsize=65536)
def _match_ends(parts: tuple[str, ...], comps: tuple[str, ...]) -> frozenset[int]:
    """End positions of runs of ``comps`` matched by ``parts`` (``**`` spans any number)."""
    ends: set[int] = set()
    for start in range(len(comps)):
        ends |= _ends_from(parts, comps, start)
    return frozenset(ends)


def _ends_from(parts: tuple[str, ...], comps: tuple[str, ...], start: int) -> set[int]:
    if not parts:
        return {start}
    head, rest = parts[0], parts[1:]
    if head == "**":
        out: set[int] = set()
        for nxt in range(start, len(comps) + 1):
            out |= _ends_from(rest, comps, nxt)
        return out
    if start < len(comps) and fnmatch.fnmatchcase(comps[start], head):
        return _ends_from(rest, comps, start + 1)
    return set()


def pattern(text: str) -> Pattern:
    """``Pattern(text)``, compiled once per text: a config's patterns are matched against every path.

    Example:
        >>> from jlora.paths import pattern
        >>> pattern("q_proj") is pattern("q_proj")
        True
    """
    return _compiled(text) if isinstance(text, str) else Pattern(text)  # Pattern refuses a non-string


@lru_cache(maxsize=4096)
def _compiled(text: str) -> Pattern:
    return Pattern(text)


def compile_patterns(patterns: Iterable[str]) -> tuple[Pattern, ...]:
    return tuple(pattern(p) for p in patterns)


def nearest(text: str, paths: Sequence[str], n: int = 5) -> list[str]:
    """The paths closest to ``text`` (none when nothing is close), to suggest in an error message.

    Example:
        >>> from jlora.paths import nearest
        >>> nearest("q_prj", ["model/q_proj/kernel", "model/mlp/kernel"])
        ['model/q_proj/kernel']
    """
    by_comp: dict[str, str] = {}
    for p in paths:
        for c in p.split("/"):
            by_comp.setdefault(c, p)
    close = difflib.get_close_matches(text, list(by_comp), n=n, cutoff=0.5)
    out = list(dict.fromkeys(by_comp[c] for c in close))
    out += [p for p in difflib.get_close_matches(text, list(paths), n=n, cutoff=0.3) if p not in out]
    return out[:n]
