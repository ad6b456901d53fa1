"""Flax NNX ``Variable``s in a param tree: which hold state rather than params, which are shared.

An NNX module is a pytree (Flax 0.11+), and ``nnx.split``'s state holds its variables; both go to
``lora_init`` like any tree. Two things the flattened leaves do not say are read here:

- a ``BatchStat``, a cache or an RNG counter (any variable but an ``nnx.Param``) is state that the
  forward pass updates: not a param to fine-tune, nor to count as one;
- a module used twice (a tied layer) holds one ``Variable`` at two paths of the module, and
  flattening copies it: adapted there, each copy would get its own adapter.

``jlora.apply`` puts what a call changed in the state variables back into its arguments, and the
variables it created into their modules (``state_after_call``, ``write_back``, ``add_created``);
``jlora.optimizer`` reads through the variables to their values (``without_variables``).

Nothing here imports Flax: with ``flax.nnx`` not loaded, a tree holds no NNX variables.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Any, Callable

import jax
from flax.core import FrozenDict

from jlora import _compat
from jlora.paths import path_str


def mutable_kind(leaf: Any) -> str | None:
    """What makes a leaf a mutable container, not an array: a jax ``Ref`` (Flax NNX's ref variable
    mode makes them) or an NNX ``HijaxVariable`` (its hijax mode); ``None`` for anything else.

    Example:
        >>> import numpy as np
        >>> from jlora.variables import mutable_kind
        >>> mutable_kind(np.ones(2)) is None
        True
    """
    if isinstance(leaf, _compat.Ref):
        return "a jax Ref"
    variablelib = sys.modules.get("flax.nnx.variablelib")
    hijax = getattr(variablelib, "HijaxVariable", None)
    return "an NNX HijaxVariable" if isinstance(hijax, type) and isinstance(leaf, hijax) else None


def _variable_test(tree: Any) -> Callable[[Any], bool] | None:
    """``isinstance`` for NNX variables, or ``None`` where ``tree`` holds none (or Flax NNX is not
    loaded), found without building paths: ``apply`` asks on every call."""
    nnx = sys.modules.get("flax.nnx")
    if nnx is None:
        return None
    # VariableState is a real class in older Flax, a deprecated alias (behind __getattr__) in newer
    kinds = tuple(k for k in (vars(nnx).get("Variable"), vars(nnx).get("VariableState")) if isinstance(k, type))
    is_variable = lambda x: isinstance(x, kinds)
    return is_variable if any(is_variable(x) for x in jax.tree.leaves(tree, is_leaf=is_variable)) else None


def without_variables(tree: Any) -> Any:
    """``tree`` with each NNX variable replaced by its value (as Flax's ``nnx.as_pure``; the same
    leaves in the same order). ``nnx.Optimizer`` wraps each ``Variable`` that its ``tx.init`` returns
    in one of its own, which cannot hold a ``LoraWeight``: ``jlora.optimizer`` keeps its state free
    of them with this.

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import without_variables
        >>> without_variables(nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0))))["kernel"].shape
        (2, 3)
    """
    is_variable = _variable_test(tree)
    if is_variable is None:
        return tree
    return jax.tree.map(lambda x: value_of(x) if is_variable(x) else x, tree, is_leaf=is_variable)


def has_variables(tree: Any) -> bool:
    """Whether ``tree`` holds NNX variables (``jlora.optimizer``'s state holds none).

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import has_variables
        >>> has_variables(nnx.state(nnx.Linear(2, 3, rngs=nnx.Rngs(0)))), has_variables({"w": 1.0})
        (True, False)
    """
    return _variable_test(tree) is not None


def value_of(variable: Any) -> Any:
    """An NNX variable's value, in every Flax version.

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import value_of
        >>> value_of(nnx.BatchStat(1.0))
        1.0
    """
    for name in ("get_raw_value", "get_value"):  # Flax 0.12 (where .value is deprecated)
        if hasattr(variable, name):
            return getattr(variable, name)()
    return variable.value


def nnx_variables(tree: Any) -> list[tuple[str, Any, bool]]:
    """``[(path, variable, is_param), ...]`` for the NNX variables in ``tree``.

    ``is_param``: an ``nnx.Param`` (or a subclass). An ``nnx.split`` state of an older Flax holds
    ``VariableState``\\ s, whose ``type`` says the same.

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import nnx_variables
        >>> bn = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
        >>> sorted((p, is_param) for p, _, is_param in nnx_variables(nnx.state(bn)))
        [('bias', True), ('mean', False), ('scale', True), ('var', False)]
    """
    is_variable = _variable_test(tree)
    if is_variable is None:
        return []
    nnx = sys.modules["flax.nnx"]
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)[0]
    out = []
    for keypath, v in flat:
        if is_variable(v):
            kind = v.type if not isinstance(v, nnx.Variable) else type(v)
            out.append((path_str(keypath), v, issubclass(kind, nnx.Param)))
    return out


def state_variables(tree: Any) -> list[tuple[str, Any]]:
    """``[(path, variable), ...]`` for the NNX variables in ``tree`` that are not params: what a
    call of an NNX module updates in place (a ``BatchNorm``'s statistics, a ``Dropout``'s RNG count).

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import state_variables
        >>> [path for path, _ in state_variables(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))]
        ['mean', 'var']
    """
    return [(path, v) for path, v, is_param in nnx_variables(tree) if not is_param]


def state_after_call(tree: Any, before: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(changed, created)``: the values that a (traced) call left in the state variables of
    ``tree`` that it changed (path -> value; ``before`` holds each one's ``jax.tree.flatten``
    from ahead of the call, and a dict filled in place, as ``nnx.capture``'s, is a change); and
    the state variables the call created (path -> variable: ``sow``'s intermediates, a cache made
    in the call), for ``add_created``. A change to a value that is not an array is an error: a
    trace would replay it as a constant.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from jlora.variables import state_after_call, state_variables, value_of
        >>> bn = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
        >>> before = {path: jax.tree.flatten(value_of(v)) for path, v in state_variables(bn)}
        >>> _ = bn(jnp.ones((3, 2)))
        >>> changed, created = state_after_call(bn, before)
        >>> sorted(changed), created
        (['mean', 'var'], {})
    """
    from jlora.lazy import is_array

    after = dict(state_variables(tree))
    changed = {}
    for path, (was_leaves, was_def) in before.items():
        if path not in after:
            continue
        now = value_of(after[path])
        now_leaves, now_def = jax.tree.flatten(now)
        if now_def == was_def and all(x is y for x, y in zip(now_leaves, was_leaves)):
            continue  # what came in, passed through
        if not all(is_array(leaf) for leaf in now_leaves):
            raise ValueError(f"jlora.apply: the call changed the NNX variable at '{path}' to {now!r}, not an array: "
                             "jlora.apply traces the function once per input signature, so that change would be "
                             "lost; hold the value as an array (e.g. jnp.asarray(0))")
        changed[path] = now
    return changed, {path: after[path] for path in sorted(set(after) - set(before))}


def add_created(tree: Any, created: dict[str, Any]) -> list[str]:
    """Put each variable of ``created`` (path -> variable, from ``state_after_call`` on a copy of
    ``tree``) into the module of ``tree`` at its path's parent, under its last name, as the call of
    the module did to the copy, where the module has no such attribute or holds ``None`` there;
    returns the paths it could not put (no module there, or another value in the attribute).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jlora.variables import add_created
        >>> model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        >>> add_created({"args": [model]}, {"args/0/layers/0/h": nnx.Intermediate((jnp.ones(2),))})
        []
        >>> isinstance(model.layers[0].h, nnx.Intermediate)
        True
    """
    missed = []
    for path, variable in created.items():
        *parents, name = path.split("/")
        node = tree
        try:
            for part in parents:
                node = node[part] if isinstance(node, dict) else node[int(part)] if isinstance(node, (list, tuple)) \
                    else getattr(node, part) if hasattr(node, part) else node[int(part)]
        except (KeyError, IndexError, ValueError, TypeError, AttributeError):
            node = None
        nnx = sys.modules.get("flax.nnx")
        if nnx is None or not isinstance(node, nnx.Module) or getattr(node, name, None) is not None:  # None: a
            # placeholder the call fills (nnx.MultiHeadAttention's cache, nnx.data(None) until init_cache)
            missed.append(path)
        else:
            setattr(node, name, variable)
    return missed


def write_back(state: list[tuple[str, Any]], changed: dict[str, Any]) -> None:
    """Give each variable of ``state`` (``state_variables`` of a call's arguments) the value the
    call left in it, where it changed one (``changed``: path -> value, from ``state_after_call``).
    One variable changed at two places of the arguments (a module passed twice, or a module and a
    part of it) is an error: each place started from the same value, so no order of the two
    changes is the call's.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from jlora.variables import state_variables, value_of, write_back
        >>> bn = nnx.BatchNorm(2, rngs=nnx.Rngs(0))
        >>> write_back(state_variables(bn), {"var": jnp.full(2, 2.0, jnp.float32)})
        >>> value_of(bn.mean), value_of(bn.var)
        (Array([0., 0.], dtype=float32), Array([2., 2.], dtype=float32))
    """
    writes: dict[int, list[tuple[str, Any, Any]]] = defaultdict(list)
    for path, variable in state:
        if path in changed:
            writes[id(variable)].append((path, variable, changed[path]))
    for found in writes.values():
        if len(found) > 1:
            raise ValueError(f"jlora.apply: the NNX variable at {' and '.join(repr(p) for p, _, _ in found)} is one "
                             "variable (a module passed twice, a module and a part of it, a module used twice in "
                             "another, or an nnx.Rngs kept by two modules), changed at each place from the same value. "
                             "Pass each module once, and a module that holds a variable twice as nnx.split's state, "
                             "which holds it once: graphdef, state = nnx.split(model); run nnx.merge(graphdef, "
                             "state)(x) under jlora.apply")
    for ((_, variable, value),) in writes.values():
        set_value(variable, value)


def set_value(variable: Any, value: Any) -> None:
    """Give an NNX variable a new value (as a call of its module would).

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import set_value, value_of
        >>> count = nnx.BatchStat(0)
        >>> set_value(count, 1)
        >>> value_of(count)
        1
    """
    if hasattr(variable, "set_value"):  # Flax 0.12, where .value is deprecated
        variable.set_value(value)
    else:
        variable.value = value


def state_paths(tree: Any) -> frozenset[str]:
    """Paths of the variables in ``tree`` that are not params: NNX variables of other kinds (batch
    statistics, caches, RNG state), and a linen variables dict's collections beside ``params``
    (``batch_stats``, ``cache``: a plain dict or ``FrozenDict`` with a ``params`` key, not an NNX
    state, whose ``params`` would be a submodule). The forward pass updates them, never the optimizer.

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import state_paths
        >>> sorted(state_paths(nnx.state(nnx.BatchNorm(2, rngs=nnx.Rngs(0)))))
        ['mean', 'var']
        >>> sorted(state_paths({"params": {"w": 1.0}, "batch_stats": {"mean": 0.0}}))
        ['batch_stats']
    """
    linen = [str(k) for k in tree if k != "params"] if type(tree) in (dict, FrozenDict) and "params" in tree else []
    return frozenset(path for path, _ in state_variables(tree)) | frozenset(linen)


def in_state(path: str, state: frozenset[str]) -> bool:
    """Whether the leaf at ``path`` is in one of the ``state`` variables (whose value may be a
    tuple or dict: ``sow``'s ``nnx.Intermediate``).

    Example:
        >>> from jlora.variables import in_state
        >>> in_state("feat/value/0", frozenset({"feat"})), in_state("feature", frozenset({"feat"}))
        (True, False)
    """
    return any(path == s or path.startswith(s + "/") for s in state)


def shared_paths(tree: Any) -> list[list[str]]:
    """The paths of each NNX variable that ``tree`` holds at more than one path (a module used
    twice, seen through flattening).

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import shared_paths
        >>> class Tied(nnx.Module):
        ...     def __init__(self):
        ...         self.a = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        ...         self.b = self.a
        >>> shared_paths(Tied())
        [['a/bias', 'b/bias'], ['a/kernel', 'b/kernel']]
    """
    where: dict[int, list[str]] = defaultdict(list)
    for path, v, _ in nnx_variables(tree):
        where[id(v)].append(path)
    return [paths for paths in where.values() if len(paths) > 1]


def check_unshared(tree: Any, op: str) -> None:
    """Refuse a tree holding an NNX variable at more than one path (a module used twice, an
    ``nnx.Rngs`` kept by two modules): flattened, as ``op`` sees a tree, the variable becomes
    separate copies, each adapted, trained, advanced or donated on its own. ``nnx.split``'s state
    holds it once.

    Example:
        >>> from flax import nnx
        >>> from jlora.variables import check_unshared
        >>> layer = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        >>> check_unshared({"a": layer, "b": layer}, "jlora.split")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: jlora.split: 'a/bias' and 'b/bias' are one NNX variable (a module used twice, ...
    """
    how = {"lora_init": "lora = jlora.lora_init(key, state, config), and run nnx.merge(graphdef, lora)(x) under "
                        "jlora.apply",
           "jlora.split": "trainable, frozen = jlora.split(state)"}.get(op, f"{op}(state)")
    for paths in shared_paths(tree):
        raise ValueError(
            f"{op}: {' and '.join(repr(p) for p in paths)} are one NNX variable (a module used twice, or an "
            "nnx.Rngs kept by two modules); flattened as a pytree, the module holds it as separate copies, each "
            "adapted, trained or advanced on its own. Pass nnx.split's state, which holds it once: graphdef, state "
            f"= nnx.split(model); {how}"
        )
