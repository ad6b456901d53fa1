"""Whole-tree operations: split/combine, merge/unmerge, labels, summary."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora import _compat
from jlora.paths import DELETED, deleted_path, is_deleted, leaves_with_paths, only_in, path_str, replace_leaves
from jlora.weight import (Lazy, LoraWeight, MaterializeMismatch, Trainable, check_registered, has_shape, is_node,
                          is_param, check_float, materialized, narrow_float, zero_padded)
from jlora.variables import check_unshared, has_variables, in_state, shared_paths, state_paths

FROZEN, LORA_A, LORA_B, TRAINABLE = "frozen", "lora_a", "lora_b", "trainable"


def split(tree: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)``: each has ``None`` where the other holds a value, like ``eqx.partition``.

    The trainable half holds ``LoraWeight(None, a, b)`` and ``Trainable`` leaves; the frozen half
    holds ``LoraWeight(w, None, None)``, ``Trainable(None)`` and every other leaf, a lazy one (a
    quantized kernel) whole.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0)
        >>> trainable, frozen = jlora.split({"k": lw, "bias": jnp.zeros(2)})
        >>> trainable["bias"] is None, frozen["k"].a is None
        (True, True)
    """

    seen = set()  # "node", "array": what the tree holds

    def trainable(x: Any) -> Any:
        if isinstance(x, LoraWeight):
            seen.add("node")
            return x.replace(w=None)
        if isinstance(x, Trainable):
            seen.add("node")
            return x
        if has_shape(x):
            seen.add("array")
        return None

    def frozen(x: Any) -> Any:
        if isinstance(x, LoraWeight):
            return x.replace(a=None, b=None)
        return Trainable(None) if isinstance(x, Trainable) else x

    check_unshared(tree, "jlora.split")
    half = jax.tree.map(trainable, tree, is_leaf=is_param)
    if seen == {"array"}:
        raise ValueError("jlora.split: params hold no LoraWeight or Trainable leaf, so the trainable half would be "
                         "empty and nothing would train: split the tree jlora.lora_init returns (not the base params "
                         "it was given, nor jlora.merge's result)")
    return half, jax.tree.map(frozen, tree, is_leaf=is_param)


def _is_hole_or_lazy(x: Any) -> bool:
    """``None`` (the other half's place) or a lazy value other than a ``LoraWeight`` (a quantized
    kernel, which one half holds whole where the other has ``None``)."""
    return x is None or (isinstance(x, Lazy) and not isinstance(x, LoraWeight))


def _lazy_w_as_hole(tree: Any) -> Any:
    """``None`` for every lazy ``w`` of a ``LoraWeight`` (a quantized kernel, an adapter under an
    adapter): the frozen half holds it whole where the trainable half has ``None``."""
    hole = lambda x: x.replace(w=None) if isinstance(x, LoraWeight) and isinstance(x.w, Lazy) else x
    return jax.tree.map(hole, tree, is_leaf=is_node)


def _check_same_structure(first: Any, second: Any, names: tuple[str, str], op: str) -> None:
    first, second = _lazy_w_as_hole(first), _lazy_w_as_hole(second)
    s1 = jax.tree_util.tree_structure(first, is_leaf=_is_hole_or_lazy)
    s2 = jax.tree_util.tree_structure(second, is_leaf=_is_hole_or_lazy)
    if s1 == s2:
        return
    p1 = {p: l for p, l in leaves_with_paths(first, is_leaf=_is_hole_or_lazy)}
    p2 = {p: l for p, l in leaves_with_paths(second, is_leaf=_is_hole_or_lazy)}
    only1, only2 = sorted(set(p1) - set(p2)), sorted(set(p2) - set(p1))
    nodes = [{p: l for p, l in leaves_with_paths(t, is_leaf=is_node) if is_node(l)} for t in (first, second)]
    # a node's own slots (a LoraWeight's a, b, w) named as the node
    as_node = lambda paths, held: sorted({next((n for n in held if p.startswith(n + "/")), p) for p in paths})
    only1, only2 = as_node(only1, nodes[0]), as_node(only2, nodes[1])
    detail = ""
    both = [p for p in only1 if p in only2]
    if has_variables(first) != has_variables(second):
        held, plain = names if has_variables(first) else names[::-1]
        detail = (f": {held} holds NNX variables (an nnx.State, a module), {plain} plain values "
                  "(as an optax callback, lbfgs's value_fn, is given the params): make them one kind, e.g. both "
                  "nnx.to_pure_dict(...) halves")
    elif both:
        kind = lambda held: f"a {type(held[both[0]]).__name__}" if both[0] in held else "a plain leaf"
        detail = (f": at '{both[0]}' {names[0]} has {kind(nodes[0])}, {names[1]} {kind(nodes[1])} (from lora_init "
                  "calls with other targets?)")
    elif only1 or only2:
        detail = ": " + only_in((names[0], only1), (names[1], only2))
    else:
        nodes1, nodes2 = nodes
        meta = lambda x: x.metadata() if isinstance(x, LoraWeight) else type(x).__name__
        diff = [p for p in sorted(set(nodes1) | set(nodes2)) if meta(nodes1.get(p)) != meta(nodes2.get(p))]
        container = _container_difference(s1, s2)
        meta1, meta2 = (meta(nodes.get(diff[0])) if diff else None for nodes in (nodes1, nodes2))
        scales = isinstance(meta1, dict) and isinstance(meta2, dict) and meta1["scale"] != meta2["scale"]
        detail = (f": they differ at {diff[:5]}, e.g. '{diff[0]}': {meta1} in {names[0]}, {meta2} in {names[1]}"
                  + (" (LoRA scales of another rank or alpha: from two lora_init calls, or a jlora.stack(..., "
                     "pad=True), whose frozen half is its adapter 0's? a scale folds into b, to one rounding: "
                     "lw.replace(b=lw.b * (lw.scale / s), scale=s))" if scales else "") if diff else
                  f": at '{container[0]}' {names[0]} has {container[1]}, {names[1]} {container[2]}"
                  if container else ": they differ in the node metadata")
    raise ValueError(f"{op}: {names[0]} and {names[1]} do not have the same structure{detail}")


def stack(adapters: Sequence[Any], *, pad: bool | int = False) -> Any:
    """Adapters of one structure stacked along a new leading axis, to serve them over one base:
    trainable halves of ``jlora.split`` (no base weight: each would be copied), run under
    ``jax.vmap`` over the stack with one frozen half, one adapter per batch row. Refuses, naming
    the param, adapters that differ in structure, in a ``LoraWeight``'s static fields (scale,
    dropout rate: set ``dropout=0.0`` to serve) or in a shape (another rank).

    With ``pad=True``, adapters of other ranks, alphas and targets stack too: each param's factors
    padded with zeros to the largest rank there, each scale folded into ``b`` as adapter 0's (the
    zero directions add nothing: each row's update is its own adapter's, to one rounding of ``b``;
    a fold that leaves ``b``'s float range is refused), and a zero adapter where one lacks a target
    adapter 0 has (put first the adapter with every target). Combine the stack with adapter 0's
    frozen half. Every row then computes at the largest rank, or at ``pad=k`` at least: a jitted
    server keeps one shape (and one compile) as adapters of ranks up to ``k`` come and go. Trained
    (the step under ``jax.vmap``, the optimizer's too), a padded adapter whose scale is not adapter
    0's takes other steps than its own would: the fold multiplied its ``b``. Adapter ``k`` of a
    stack: ``jax.tree.map(lambda v: v[k], stacked)``.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.zeros((2, 3)), scale=1.0)
        >>> trainable, frozen = jlora.split({"k": lw})
        >>> stacked = jlora.stack([trainable, trainable])
        >>> run = lambda t, x: jlora.apply(lambda p, x: x @ p["k"])(jlora.combine(t, frozen), x)
        >>> jax.vmap(run)(stacked, jnp.ones((2, 1, 4))).shape
        (2, 1, 3)
        >>> wider = jlora.split({"k": jlora.LoraWeight(lw.w, jnp.ones((4, 3)), jnp.ones((3, 3)), scale=0.5)})[0]
        >>> jlora.stack([trainable, wider], pad=True)["k"].b.shape  # rank 2 padded to 3; b's 0.5 folded as 1.0
        (2, 3, 3)
    """
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"jlora.stack: adapters must be a non-empty list of adapters, got {type(adapters).__name__}")
    if not isinstance(pad, (bool, int, np.integer)) or (not isinstance(pad, bool) and pad < 1):
        raise ValueError(f"jlora.stack: pad must be True, False or a rank >= 1 to pad to, got {pad!r}")
    if pad:
        adapters = _padded_alike(adapters, 0 if pad is True else int(pad))
    first = leaves_with_paths(adapters[0])
    for i, tree in enumerate(adapters):
        based = [p for p, x in leaves_with_paths(tree, is_leaf=is_node) if isinstance(x, LoraWeight) and has_shape(x.w)]
        if based:
            raise ValueError(f"jlora.stack: adapter {i} holds base weights (w at '{based[0]}'): stack the trainable "
                             "halves (jlora.split(params)[0]) and run them with one frozen half, or the base is "
                             "copied once per adapter")
        if i:
            try:
                _check_same_structure(adapters[0], tree, ("adapter 0", f"adapter {i}"), "jlora.stack")
            except ValueError as err:
                raise ValueError(f"{err}; adapters stack where their dropout rates and the leaves they train "
                                 "whole agree (to serve, set the rate to 0 in every adapter and in the frozen half: "
                                 "lw.replace(dropout=0.0))" + (
                                 "" if pad else ", and their ranks, scales and targets, or with "
                                 "jlora.stack(adapters, pad=True)")) from None
            for (path, x), (_, y) in zip(first, leaves_with_paths(tree)):
                if np.shape(x) != np.shape(y):
                    raise ValueError(f"jlora.stack: at '{path}' adapter {i} has shape {np.shape(y)}, adapter 0 "
                                     f"{np.shape(x)} (" + ("ensembles of other sizes?)" if pad else
                                     "another rank: jlora.stack(adapters, pad=True); or ensembles of other sizes?)"))
                if getattr(x, "dtype", None) != getattr(y, "dtype", None):
                    raise ValueError(f"jlora.stack: at '{path}' adapter {i} is {getattr(y, 'dtype', None)}, adapter 0 "
                                     f"{getattr(x, 'dtype', None)}: cast them alike (stacking would promote them)")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *adapters)


def _padded_alike(adapters: Sequence[Any], rank: int) -> list[Any]:
    """``adapters`` with each ``LoraWeight``'s factors zero-padded to the largest rank at its path
    (``rank`` at least) and its scale folded into ``b`` as adapter 0's there, and a zero adapter
    where one has none that adapter 0 has (``jlora.stack(..., pad=True)``)."""
    hole_or_node = lambda x: x is None or is_node(x)
    nodes = [dict(leaves_with_paths(tree, is_leaf=hole_or_node)) for tree in adapters]
    factored = lambda x: isinstance(x, LoraWeight) and has_shape(x.a) and has_shape(x.b)
    ranks: dict[str, int] = {}
    for found in nodes:
        for path, x in found.items():
            if factored(x):
                ranks[path] = max(ranks.get(path, rank), x.rank)
    out = []
    for i, found in enumerate(nodes):
        new = {}
        for path, x in found.items():
            first = nodes[0].get(path)
            if x is None and factored(first):  # this adapter leaves that kernel as it is: a zero update there
                x = first.replace(a=jnp.zeros_like(first.a), b=jnp.zeros_like(first.b))
            elif path in nodes[0] and first is None and factored(x):
                raise ValueError(f"jlora.stack: adapter {i} adapts '{path}', adapter 0 does not: with pad=True, put "
                                 "first an adapter that adapts every param the others do (its frozen half serves "
                                 "all); for adapters of disjoint targets, a zero one over all their targets, "
                                 "jlora.split(jlora.lora_init(key, base, config))[0], b being zero")
            if not (factored(x) and factored(first)):
                continue  # left as it is, for the structure check to name
            nb = len(x.fitted().layout.group("b"))  # b's rank axis follows its batch axes
            new[path] = x.replace(a=zero_padded(x.a, ranks[path], -1),
                                  b=zero_padded(_folded(x, first.scale, i, path), ranks[path], nb), scale=first.scale)
        out.append(replace_leaves(adapters[i], new, is_leaf=hole_or_node))
    return out


def _folded(x: LoraWeight, scale: float, i: int, path: str) -> jax.Array:
    """``x.b`` times ``x.scale / scale`` (formed in float32 at least), in ``b``'s dtype; an error
    where that dtype cannot hold it (a float16 ``b`` past 65504, or below its normal range),
    checked on arrays (not under ``jax.jit``), or where ``scale`` is 0."""
    if x.scale == scale:
        return x.b
    if not scale:
        raise ValueError(f"jlora.stack: at '{path}' adapter 0's scale is 0, adapter {i}'s {x.scale}: an update "
                         "cannot be folded into a zero scale (put another adapter first)")
    wide = x.b.astype(jnp.promote_types(x.b.dtype, jnp.float32)) * (x.scale / scale)
    b = wide.astype(x.b.dtype)
    if not _compat.is_tracer(b):
        tiny = jnp.finfo(x.b.dtype).smallest_normal
        lost = ~jnp.isfinite(b) & jnp.isfinite(wide) | (wide != 0) & (jnp.abs(wide) < tiny)
        if bool(lost.any()):
            raise ValueError(f"jlora.stack: at '{path}' adapter {i}'s b times its scale over adapter 0's "
                             f"({x.scale:g} / {scale:g}) leaves the range of {x.b.dtype}: cast the factors to "
                             "float32, or put first an adapter of a scale nearer the others'")
    return b


def _container_difference(first: Any, second: Any, path: str = "") -> tuple[str, str, str] | None:
    """``(path, what, what)`` of the first container that differs between two tree structures: in
    type (a ``FrozenDict`` where the other has a ``dict``, a list for a tuple) or in a static field
    (an NNX module's ``deterministic`` flag after ``.eval()``, an Equinox module's ``width_size``),
    or ``None``."""
    data1, data2 = first.node_data(), second.node_data()
    type1, type2 = (data1 or (None,))[0], (data2 or (None,))[0]
    if type1 is not type2:
        name = lambda t: "leaf" if t is None else t.__name__
        return path or "/", f"a {name(type1)}", f"a {name(type2)}"
    if type1 is LoraWeight and data1[1] != data2[1]:  # its static fields, in metadata()'s order
        for field, value1, value2 in zip(LoraWeight.STATIC_FIELDS, data1[1], data2[1]):
            if value1 != value2:
                return path or "/", f"{field}={value1!r}", f"{field}={value2!r}"
    (keys, fields1), (_, fields2) = (_node_fields(*data) if data else (None, None) for data in (data1, data2))
    if fields1 and fields2 and fields1.keys() == fields2.keys():
        for field, value in fields1.items():
            if value is not fields2[field] and _differ(value, fields2[field]):
                return path or "/", f"{field}={value!r}", f"{field}={fields2[field]!r}"
    children1, children2 = first.children(), second.children()
    keys = keys if isinstance(keys, (list, tuple)) and len(keys) == len(children1) else None
    for i, (c1, c2) in enumerate(zip(children1, children2)):
        found = _container_difference(c1, c2, f"{path}/{keys[i] if keys else i}".lstrip("/"))
        if found:
            return found
    if data1 and fields1 is None and data1[1] is not data2[1] and _differ(data1[1], data2[1]):  # no names for them
        return path or "/", f"a {type1.__name__} of static data {data1[1]!r}"[:200], f"{data2[1]!r}"[:200]
    return None


def _node_fields(node_type: type, aux: Any) -> tuple[Sequence[str] | None, dict[str, Any] | None]:
    """The names of a module node's children and its static fields by name, from its aux data, or
    ``None`` for what this cannot read. An NNX module's aux data holds its children's names, then
    the static fields: their names and their values (Flax 0.12), or ``(name, value)`` pairs (Flax
    0.11); a dict's aux data is its keys. An Equinox module's children are its dataclass fields not
    marked static; its aux data holds its wrapper fields, then the static fields' values (Equinox
    0.13.3 on), or is an object naming both (before: ``static_fields`` pairs from 0.12,
    ``static_field_names`` and ``static_field_values`` in 0.11)."""
    if isinstance(aux, tuple) and len(aux) in (2, 3) and all(isinstance(x, tuple) for x in aux):
        if len(aux) == 3 and len(aux[1]) == len(aux[2]) and all(isinstance(n, str) for n in aux[1]):
            return aux[0], dict(zip(aux[1], aux[2]))
        if len(aux) == 2 and all(isinstance(f, tuple) and len(f) == 2 and isinstance(f[0], str) for f in aux[1]):
            return aux[0], dict(aux[1])
    if type(node_type).__module__.startswith("equinox.") and dataclasses.is_dataclass(node_type):
        if hasattr(aux, "dynamic_field_names"):  # Equinox before 0.13.3
            static = (dict(aux.static_fields) if hasattr(aux, "static_fields")
                      else dict(zip(aux.static_field_names, aux.static_field_values)))
            return aux.dynamic_field_names, static
        fields = dataclasses.fields(node_type)
        static = [f.name for f in fields if f.metadata.get("static", False)]
        if isinstance(aux, tuple) and len(aux) == 1 + len(static):
            return [f.name for f in fields if not f.metadata.get("static", False)], dict(zip(static, aux[1:]))
    return aux if isinstance(aux, (list, tuple)) else None, None


def _differ(x: Any, y: Any) -> bool:
    try:
        return bool(x != y)
    except Exception:  # an array-valued field: compared elementwise, or not at all
        return True


def combine(trainable: Any, frozen: Any) -> Any:
    """Inverse of ``split``: at every leaf take the value that is not ``None``.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> tree = {"w": jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0)}
        >>> jlora.combine(*jlora.split(tree))["w"].w.shape
        (2, 2)
    """
    _check_same_structure(trainable, frozen, ("trainable", "frozen"), "jlora.combine")
    both = []

    def pick(t: Any, f: Any) -> Any:
        if t is not None and f is not None:
            both.append(True)
        return f if t is None else t

    tree = jax.tree.map(pick, trainable, frozen, is_leaf=lambda x: x is None)
    if both:  # the paths only now: combine runs at every step
        hole = lambda x: x is None
        pairs = zip(leaves_with_paths(trainable, is_leaf=hole), jax.tree.leaves(frozen, is_leaf=hole))
        held = [p for (p, t), f in pairs if t is not None and f is not None]
        raise ValueError(f"jlora.combine: both halves hold {held[:3]}{' and more' if len(held) > 3 else ''}: it takes "
                         "the halves of jlora.split, which hold each value once (a full tree passed as a half?); "
                         "one would overwrite the other")
    for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, LoraWeight)):
        if isinstance(x, LoraWeight):
            try:
                x.check_shapes(stacked=True)
            except ValueError as err:
                raise ValueError(f"jlora.combine: the halves do not fit together (from two models?): {err}") from None
    return tree


# (layout, what w, a and b are, need_w, used_as_is) -> the fitted layout, for nodes seen to pass
# check_whole: an eager jlora.apply call checks every node of its arguments again
_PASSED: dict[tuple, Any] = {}


def _part_key(v: Any) -> Any:
    return None if v is None else (type(v), tuple(v.shape)) if has_shape(v) else type(v)


def check_whole(x: Any, path: str, op: str, need_w: bool = True, used_as_is: bool = False) -> Any:
    """Refuse a node from one half of ``split`` where ``op`` needs the whole tree (``need_w=False``:
    the trainable half will do), or one whose arrays do not fit its layout; ``x``, a
    ``LoraWeight``'s layout fitted to its arrays (``LoraWeight.fitted``: an ensemble's or a
    stack's layer). ``used_as_is``: ``op`` computes with the node (``merge``, ``apply``), so factors
    with leading axes ``w`` lacks (adapters stacked over one base, for ``jax.vmap``) are refused too.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.tree import check_whole
        >>> check_whole(jlora.Trainable(jnp.zeros(2)), "bias", "jlora.merge")
        Trainable(float32[2])
    """
    if isinstance(x, LoraWeight):
        half = None if x.half == "trainable" and not need_w else x.half
    else:
        half = "frozen" if isinstance(x, Trainable) and x.value is None else None
    if half is not None:
        alone = ("; for the base model alone (the adapters off, a reference pass) pass jlora.base(frozen)"
                 if half == "frozen" and op == "jlora.apply" and isinstance(x, LoraWeight) else "")
        raise ValueError(f"{op}: '{path}' comes from the {half} half of jlora.split; "
                         f"pass jlora.combine(trainable, frozen){alone}")
    if isinstance(x, Lazy):
        try:
            check_registered(x)
        except TypeError as err:
            raise TypeError(f"{op}: '{path}': {err}") from None
    if isinstance(x, LoraWeight):  # a hand-built or hand-edited node: say so here, not deep inside JAX
        key = (x.layout, _part_key(x.w), _part_key(x.a), _part_key(x.b), need_w, used_as_is)
        layout = _PASSED.get(key)
        if layout is not None:
            return x if layout == x.layout else x.replace(layout=layout)
        held = [name for name in ("w", "a", "b") if isinstance(getattr(x, name), _compat.Ref)]
        if held:
            raise ValueError(f"{op}: '{path}' holds a jax Ref as its {held[0]} (jax.tree.map(jax.new_ref, ...) over "
                             "a LoraWeight?): it takes arrays; read the Refs first (r[...])")
        x = x.fitted()
        try:
            x.check_shapes(stacked=True)  # leading axes of w's or the factors' own (pmap, vmap) pass
        except ValueError as err:
            inside = any(_compat.varying_axes(v) for v in (x.w, x.a, x.b) if has_shape(v))
            hint = (" (one device's blocks inside shard_map: give a LoraWeight the in_specs of "
                    "jlora.sharding.partition_specs(params, mesh, rules), which split its factors to match the kernel)"
                    if inside else "")
            raise ValueError(f"{op}: {err}{hint}") from None
        if used_as_is and all(map(has_shape, (x.w, x.a, x.b))) and len(x.w.shape) == x.layout.ndim:
            extra = len(x.a.shape) - len(x.layout.a_shape(x.w.shape, x.rank))
            if extra > 0:
                mapped = {"jlora.merge": "jax.vmap(lambda t: jlora.merge(jlora.combine(t, frozen)))(stacked)",
                          "jlora.hf.LoraModel": "build it on one adapter's params, then jax.vmap(lambda t, x: "
                                                "lm(x, params=jlora.combine(t, frozen)), in_axes=(0, None))(stacked, x)",
                          }.get(op, "jax.vmap(lambda t, *xs: f(jlora.combine(t, frozen), *xs), in_axes=(0, None))(stacked, x)")
                raise ValueError(
                    f"{op}: '{path}' has a {tuple(x.a.shape)} and b {tuple(x.b.shape)} with {extra} leading axis(es) "
                    f"that w {tuple(x.w.shape)} lacks: adapters stacked over one base are used one at a time, "
                    f"under jax.vmap over the trainable half: {mapped}")
        if len(_PASSED) < 4096:
            _PASSED[key] = x.layout
    return x


def _refuse_deleted(op: str, *trees: Any) -> None:
    """Name an array of ``trees`` that a jitted step deleted (its ``donate_argnums``)."""
    for tree in trees:
        if (path := deleted_path(tree)) is not None:
            raise ValueError(f"{op}: '{path}' {DELETED}; pass live arrays (the step's results, or copies made "
                             "before)") from None


def merge(tree: Any) -> Any:
    """Plain arrays for the unmodified model: ``w + scale·a@b`` in ``w``'s dtype, ``Trainable`` unwrapped,
    every other lazy value (a quantized kernel) materialised.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=0.5)
        >>> jlora.merge({"k": lw})["k"]
        Array([[1.5, 1.5],
               [1.5, 1.5]], dtype=float32)
    """

    narrow: list[str] = []  # adapted kernels in fp8 or narrower: w + Δ rounded there loses most of Δ
    overflows: list[tuple[str, jax.Array]] = []  # float16 or fp8 kernels: (path, entries w + Δ made non-finite)

    def one(path: Any, x: Any) -> Any:
        x = check_whole(x, path_str(path), "jlora.merge", used_as_is=True)
        if isinstance(x, LoraWeight):
            check_float("w", x.w, path_str(path))  # an integer w (put there by a tree map) would drop the adapter
            if has_shape(x.w) and narrow_float(x.w.dtype):
                narrow.append(f"{path_str(path)} ({jnp.dtype(x.w.dtype).name})")
        if isinstance(x, Lazy) and any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(x)):
            raise ValueError(f"jlora.merge: '{path_str(path)}' holds abstract values (jax.ShapeDtypeStruct, as "
                             "jax.eval_shape gives), not arrays: merge needs the weights themselves")
        if isinstance(x, Lazy):
            count = isinstance(x, LoraWeight) and jnp.issubdtype(x.w.dtype, jnp.floating) and float(
                jnp.finfo(x.w.dtype).max) <= float(jnp.finfo(jnp.float16).max)  # no wider range overflows
            try:
                out, overflowed = _merged(x.replace(path=None) if isinstance(x, LoraWeight) else x, count=count)
            except MaterializeMismatch as err:  # a kind's materialize() of another shape or dtype
                raise MaterializeMismatch(f"jlora.merge: '{path_str(path)}': {err}") from None
            except Exception as err:  # JAX's names _merged's argument (factors on other devices than w, say)
                _refuse_deleted("jlora.merge", {path_str(path): x})  # JAX's names no param
                if hasattr(err, "add_note"):  # Python 3.11+
                    err.add_note(f"jlora.merge: at '{path_str(path)}'")
                raise
            if count and not _compat.is_tracer(out):  # under jax.jit nothing can be counted
                overflows.append((path_str(path), overflowed))
            return out
        value = x.value if isinstance(x, Trainable) else x
        if is_deleted(value):  # returned as it is, it would fail in the model, naming no param
            _refuse_deleted("jlora.merge", {path_str(path): value})
        return value

    merged = jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_param)
    counts = jax.device_get([n for _, n in overflows])  # one wait for them all
    overflowed = [(p, n) for (p, _), n in zip(overflows, counts) if n]
    if not (overflowed or narrow):
        return merged
    from jlora.lazy import _user_stacklevel  # lazy imports this module

    if overflowed:
        p, n = overflowed[0]
        warnings.warn(f"jlora.merge: w + scale·a@b is not finite in {len(overflowed)} kernel(s) where w is, e.g. {p} "
                      f"({n} entries; past the range of w's dtype, or an adapter that is not finite itself): the "
                      "merged model computes inf or nan there; serve the adapters unmerged (jlora.apply), or merge "
                      "over w cast to a wider dtype (lw.replace(w=lw.w.astype(jnp.float32)))",
                      stacklevel=_user_stacklevel())
    if narrow:
        warnings.warn(f"jlora.merge: {len(narrow)} adapted kernel(s) in floats of 8 bits or fewer, e.g. {narrow[0]}: w + scale·a@b "
                      "rounded to w's dtype keeps little of the adapter, which jlora.apply ran in a wider dtype; "
                      "serve the adapters unmerged (jlora.apply), or merge over w cast to a wider dtype "
                      "(lw.replace(w=lw.w.astype(jnp.bfloat16)))", stacklevel=_user_stacklevel())
    return merged


def base(tree: Any) -> Any:
    """The base model's params under a LoRA tree, nothing copied: each ``LoraWeight``'s ``w``,
    each ``Trainable``'s value. The reference pass of DPO or a KL penalty (the adapters off), in the
    same step as the adapted one: ``model.apply(base(params), x)``; through ``jlora.apply`` where a
    ``w`` is lazy itself (a quantized kernel, or an adapter under the one taken off). The frozen
    half does too, where nothing is trained whole: ``LoraConfig(trainable=...)`` leaves hold their
    current values, so keep ``base(params)`` from before training for their first ones.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=0.5)
        >>> jlora.base({"k": lw, "bias": jlora.Trainable(jnp.zeros(2))})["k"]
        Array([[1., 1.],
               [1., 1.]], dtype=float32)
    """

    def one(path: Any, x: Any) -> Any:
        if isinstance(x, Trainable) and x.value is None:
            raise ValueError(f"jlora.base: '{path_str(path)}' is trained whole (LoraConfig.trainable), and the frozen half "
                             "of jlora.split holds no value for it: pass jlora.combine(trainable, frozen) for its "
                             "current value, or keep jlora.base(params) from before training for its first one")
        if isinstance(x, LoraWeight) and x.half == "trainable":
            raise ValueError(f"jlora.base: '{path_str(path)}' comes from the trainable half of jlora.split, which holds "
                             "no base weight: pass the frozen half, or jlora.combine(trainable, frozen)")
        return x.w if isinstance(x, LoraWeight) else x.value if isinstance(x, Trainable) else x

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=is_param)


@functools.partial(jax.jit, static_argnames="count")
def _merged(x: Lazy, count: bool = False) -> tuple[jax.Array, jax.Array | None]:
    """``x.materialize()`` compiled (once per shape, dtype, scale and layout: ``path`` is left out):
    one fused pass, where op by op each step's full-size copy (a bf16 kernel cast to f32, the
    product, the sum) stayed alive, peaking at several times the kernel; with ``count`` (a
    ``LoraWeight``), also how many of its entries are inf or nan where ``w`` is finite."""
    out = materialized(x)
    if not count:
        return out, None
    w = materialized(x.w) if isinstance(x.w, Lazy) else x.w  # a quantized base: the same pass's (CSE)
    return out, jnp.sum(jnp.isfinite(w) & ~jnp.isfinite(out))


@jax.jit
def _unmerged(merged: LoraWeight) -> jax.Array:
    """The base of an adapter whose ``w`` is the merged weight: ``w - scale·a@b``, formed as
    ``merge`` formed the sum, and compiled as ``_merged``."""
    delta = merged.delta(over=merged.w.dtype)
    return (merged.w.astype(delta.dtype) - delta).astype(merged.w.dtype)


def unmerge(merged: Any, adapters: Any) -> Any:
    """Recover the LoRA tree from merged params and the adapters (a LoRA tree or its trainable half).

    ``LoraWeight`` leaves get ``w = merged - scale·a@b`` (the base back to its dtype's rounding,
    not bit for bit: keep the base where exact bits matter); ``Trainable`` leaves take the merged value.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=0.5)
        >>> jlora.unmerge(jlora.merge({"k": lw}), {"k": lw})["k"].w
        Array([[1., 1.],
               [1., 1.]], dtype=float32)
    """
    nodes = [path_str(p) for p, x in jax.tree_util.tree_flatten_with_path(merged, is_leaf=is_node)[0] if is_node(x)]
    if nodes:
        raise ValueError(f"jlora.unmerge: merged holds jlora nodes (at {nodes[:3]}): pass the merged params "
                         "(jlora.merge's result) first, the adapters second")
    # a lazy leaf no adapter is on (a quantized kernel left untargeted) is one leaf, as merged holds it
    adapter_leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters, is_leaf=lambda x: x is None or is_param(x))
    merged_leaves, _ = jax.tree_util.tree_flatten_with_path(merged, is_leaf=lambda x: x is None)
    if [path_str(p) for p, _ in adapter_leaves] != [path_str(p) for p, _ in merged_leaves]:
        a_paths = {path_str(p) for p, _ in adapter_leaves}
        m_paths = {path_str(p) for p, _ in merged_leaves}
        raise ValueError("jlora.unmerge: merged params and adapters do not match: "
                         + only_in(("merged", m_paths - a_paths), ("adapters", a_paths - m_paths)))
    out = []
    for (path, node), (_, value) in zip(adapter_leaves, merged_leaves):
        fitted = check_whole(node, path_str(path), "jlora.unmerge", need_w=False)
        if isinstance(node, LoraWeight):
            shape, layout = tuple(value.shape), fitted.layout
            fits = len(shape) == layout.ndim and (
                layout.a_shape(shape, node.rank) == tuple(node.a.shape)
                and layout.b_shape(shape, node.rank) == tuple(node.b.shape)
            )
            if not fits:
                stacked = len(shape) < layout.ndim  # the adapter has axes the kernel lacks
                raise ValueError(
                    f"jlora.unmerge: merged '{path_str(path)}' has shape {shape}, which does not fit the "
                    f"adapter's a {tuple(node.a.shape)} and b {tuple(node.b.shape)} (layout '{layout}')"
                    + ("; a stack of adapters (jlora.stack) has one merged model per adapter: unmerge each "
                       "with its own" if stacked else "")
                )
            if not jnp.issubdtype(value.dtype, jnp.inexact):  # float, or complex as a complex w merges
                raise ValueError(f"jlora.unmerge: merged '{path_str(path)}' is {value.dtype}; a merged kernel is float "
                                 "(jlora.merge's result)")
            try:
                out.append(node.replace(w=_unmerged(fitted.replace(w=value, path=None))))
            except Exception:
                _refuse_deleted("jlora.unmerge", {"merged": merged, "adapters": adapters})  # JAX's names no param
                raise
        elif isinstance(node, Trainable):
            out.append(Trainable(value))
        else:  # a frozen lazy leaf (a quantized kernel) is the base itself
            out.append(node if isinstance(node, Lazy) else value)
    return jax.tree_util.tree_unflatten(treedef, out)


def labels(tree: Any) -> Any:
    """The tree with each leaf replaced by ``"frozen"``, ``"lora_a"``, ``"lora_b"`` or ``"trainable"``.

    Works on a full LoRA tree and on either half of ``split``.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0)
        >>> jax.tree.leaves(jlora.labels({"k": lw, "bias": jnp.zeros(2)}))
        ['frozen', 'frozen', 'lora_a', 'lora_b']
    """

    def one(x: Any) -> Any:
        if isinstance(x, LoraWeight):
            return x.replace(
                w=None if x.w is None else FROZEN,
                a=None if x.a is None else LORA_A,
                b=None if x.b is None else LORA_B,
            )
        if isinstance(x, Trainable):
            return Trainable(None if x.value is None else TRAINABLE)
        return FROZEN

    return jax.tree.map(one, tree, is_leaf=is_node)


@dataclasses.dataclass(frozen=True)
class Summary:
    """Parameter counts of a LoRA tree; ``str()`` prints a table like PEFT's summary.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> base = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
        >>> s = jlora.summary(jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["dense"])))
        >>> s.trainable, s.total, round(s.percent, 1)
        (32, 104, 30.8)
    """

    trainable: int
    total: int
    targets: tuple[tuple[str, str, str, int, float, int], ...]  # path, shape, layout, rank, scale, params
    fully_trained: tuple[tuple[str, str, int], ...]  # path, shape, params

    @property
    def percent(self) -> float:
        """Trainable parameters as a percentage of all of them."""
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        rows = [(p, shape, layout, str(rank), f"{scale:g}", f"{n:,}") for p, shape, layout, rank, scale, n in self.targets]
        rows += [(p, shape, "full", "-", "-", f"{n:,}") for p, shape, n in self.fully_trained]
        lines = []
        if rows:
            header = ("param", "shape", "layout", "rank", "scale", "trainable")
            widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
            for row in [header] + rows:
                lines.append("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        lines.append(
            f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"
        )
        return "\n".join(lines)


def _size(x: Any) -> int:
    return int(getattr(x, "size", 0) or 0) if x is not None else 0


def summary(tree: Any) -> Summary:
    """Trainable / total parameter counts, overall and per target (like PEFT's
    ``print_trainable_parameters``). NNX variables other than params (batch statistics, RNG state),
    a linen variables dict's collections beside ``params``, integer arrays and PRNG keys are not
    counted, as PyTorch buffers are not; an NNX variable a module holds twice (a layer used twice) counts once. A half of ``split``
    is refused (the frozen half has no factors, the trainable half no base): pass the whole tree.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 1)), jnp.zeros((1, 4)), scale=1.0, path="k")
        >>> s = jlora.summary({"k": lw}); (s.trainable, s.total)
        (8, 24)
    """
    trainable = total = 0
    targets, fully = [], []
    state = state_paths(tree)  # NNX batch statistics, caches, RNG state: not params
    copies = frozenset(p for paths in shared_paths(tree) for p in paths[1:])  # a module used twice: counted once
    for path, x in leaves_with_paths(tree, is_leaf=is_param):
        check_whole(x, path, "jlora.summary")
        if in_state(path, state) or in_state(path, copies):
            continue
        if isinstance(x, LoraWeight):
            n = _size(x.a) + _size(x.b)
            trainable += n
            total += n + _size(x.w)
            shape = "x".join(map(str, x.w.shape))
            layout = x.fitted().layout  # an ensemble's 'bio'
            stacked = len(x.a.shape) - len(layout.a_shape(x.kernel_shape, x.rank))
            # adapters stacked over one base (jlora.stack, combined): their sum
            named = f"{layout}, {math.prod(x.a.shape[:stacked])} adapters" if stacked > 0 else str(layout)
            targets.append((path, shape, named, x.rank, x.scale, n))
        elif isinstance(x, Trainable):
            n = _size(x.value)
            trainable += n
            total += n
            fully.append((path, "x".join(map(str, x.value.shape)), n))
        elif isinstance(x, Lazy) or jnp.issubdtype(getattr(x, "dtype", jnp.int32), jnp.inexact):
            total += _size(x)  # not an integer array or a PRNG key: an index table, a counter, RNG state
    return Summary(trainable, total, tuple(targets), tuple(fully))
