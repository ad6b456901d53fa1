"""Rules that keep a ``LoraWeight`` lazy through ops that move, cut or join kernels: each gives
a new ``LoraWeight`` whose factors went through the same op along their matching axes.

- one in, one out: ``transpose``, ``convert_element_type``, group-preserving ``reshape``,
  ``copy``, ``sharding_constraint``, ``device_put``, ``reshard`` (a mesh with Explicit axes),
  ``squeeze`` of size-1 axes, ``rev`` (a flipped conv window), ``pvary`` and ``all_gather``
  (inside ``shard_map``), ``stop_gradient``, ``neg``, and ``mul``/``div`` by a scalar (on ``b``)
  or by a per-channel scale (on the factor holding its axes),
  ``slice``/``dynamic_slice`` (layer ``i`` of a stack, rows of an embedding, one part of a fused
  kernel), ``pad`` (zeros in the factors), new axes (``w[None]``, ``jnp.broadcast_to``), and whole
  matrices picked from a stack (``W[expert_of_token]``, called by the gather rule of
  ``jlora.rules``); a single row or column (nothing to factor: made whole, as small as the result);
- any lazy kind: ``optimization_barrier`` and ``checkpoint_name`` (over its children);
- one in, several out: ``split``, ``unstack``;
- several in, one out: ``concatenate``, ``stack`` (each adapter in its own block of a larger
  rank, or the factors stacked as the kernels are).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import _compat, explicit
from jlora.layout import Layout, reshape_groups
from jlora.sharding import divides, factor_shardings, part_specs, parts_and_specs
from jlora.lazy import Context, evaluate_eqn, is_lazy, materialize, register
from jlora.weight import Lazy, LoraWeight, narrow_float


def bind(ctx: Context, eqn: Any, invals: list, owner: LoraWeight | Sequence[LoraWeight | None]) -> list:
    """``eqn`` on the base ``w`` of ``owner`` and plain values (or on several inputs, each the base
    of its ``owner`` or ``None``); a lazy ``w`` (a quantized base) goes through its own rules (a
    fallback's warning names its owner's path)."""
    if not any(is_lazy(v) for v in invals):
        return _compat.bind(eqn, invals)
    name = lambda lw: f"the base of '{lw.path}'" if lw is not None and lw.path else ""
    return evaluate_eqn(ctx, eqn, invals, name(owner) if isinstance(owner, LoraWeight) else [name(o) for o in owner])


def picked_matrices(ctx: Context, eqn: Any, lw: LoraWeight, indices: jax.Array) -> Any:
    """Whole matrices picked from a stack by index (``W[expert_of_token]``): a ``LoraWeight`` of
    the picked ``w`` and the same picks of ``a`` and ``b``, the indices' axes as batch axes."""
    dn, sizes, layout = eqn.params["dimension_numbers"], eqn.params["slice_sizes"], lw.layout
    in_a, in_b = layout.factor_axes()
    gone = set(dn.collapsed_slice_dims) | set(dn.operand_batching_dims)
    n_index = indices.ndim - 1  # lax.gather keeps the index vector in the last axis

    picked = [k for k, ax in enumerate(dn.start_index_map) if layout.axes[ax][0] == "b"]  # the others start at 0
    f_indices = indices if len(picked) == len(dn.start_index_map) else indices[..., picked]

    def pick(f: jax.Array, where: dict[int, int]) -> jax.Array | None:
        batching = tuple(where[ax] for ax in dn.operand_batching_dims)
        if list(batching) != sorted(batching):
            return None
        f_dn = lax.GatherDimensionNumbers(
            offset_dims=tuple(range(n_index, n_index + f.ndim - len(gone))),
            collapsed_slice_dims=tuple(sorted(where[ax] for ax in dn.collapsed_slice_dims)),
            start_index_map=tuple(where[dn.start_index_map[k]] for k in picked),
            operand_batching_dims=batching, start_indices_batching_dims=tuple(dn.start_indices_batching_dims),
        )
        at = {pos: ax for ax, pos in where.items()}
        f_sizes = tuple(sizes[at[pos]] if pos in at else f.shape[pos] for pos in range(f.ndim))
        fill = {"fill_value": 0} if eqn.params.get("mode") == lax.GatherScatterMode.FILL_OR_DROP else {}
        # an index out of range (fill mode): the base's fill, plus nothing
        return _compat.bind(eqn, [f, f_indices], dimension_numbers=f_dn, slice_sizes=f_sizes, **fill)[0]

    a, b = pick(lw.a, in_a), pick(lw.b, in_b)
    if a is None or b is None:
        return NotImplemented
    # the result's axes: the indices' batch axes, then w's remaining axes where gather puts them
    kept_batch = [ax for ax in layout.group("b") if ax not in gone]  # in their order in a and b
    kept = iter(ax for ax in range(lw.ndim) if ax not in gone)
    n_out = n_index + lw.ndim - len(gone)
    index_axis = iter(range(n_index))
    axes = []
    for pos in range(n_out):
        if pos not in dn.offset_dims:
            axes.append(("b", next(index_axis)))
            continue
        ax = next(kept)
        role, k = layout.axes[ax]
        axes.append(("b", n_index + kept_batch.index(ax)) if role == "b" else (role, k))
    return [lw.replace(w=bind(ctx, eqn, [lw.w, indices], lw)[0], a=a, b=b, layout=Layout(tuple(axes)))]


@register(_compat.transpose_p, LoraWeight)
def transpose_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    perm = tuple(eqn.params["permutation"])
    return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], layout=lw.layout.permute(perm))]


@register(_compat.rev_p, LoraWeight)
def rev_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """Axes reversed (a conv window flipped, as a transposed conv does): the same axes of the factors."""
    (lw,) = invals
    dims = tuple(eqn.params["dimensions"])
    in_a, in_b = lw.layout.factor_axes()
    a = lax.rev(lw.a, tuple(in_a[d] for d in dims if d in in_a))
    b = lax.rev(lw.b, tuple(in_b[d] for d in dims if d in in_b))
    return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], a=a, b=b)]


@register(_compat.convert_element_type_p, LoraWeight)
def convert_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    new = eqn.params["new_dtype"]
    if not jnp.issubdtype(new, jnp.floating) or any(jnp.iscomplexobj(x) for x in (lw.w, lw.a, lw.b)):
        return NotImplemented  # to a real dtype, Re(a@b) is not Re(a)@Re(b)
    w = bind(ctx, eqn, [lw.w], lw)[0]
    if narrow_float(new):  # fp8 is for the base term (see rules._path_dtype): a and b in fp8
        return [lw.replace(w=w)]  # would lose most of the update, and their gradients underflow to 0
    return [lw.replace(w=w, a=lw.a.astype(new), b=lw.b.astype(new))]


def _scaling(eqn: Any, invals: list) -> tuple[LoraWeight, Any] | None:
    """``(kernel, c)`` where ``eqn`` multiplies a kernel by a real scalar ``c`` (either side) or
    divides it by one; ``None`` for any other use (an elementwise product of arrays)."""
    lw, c = invals if isinstance(invals[0], LoraWeight) else invals[::-1]
    if eqn.primitive is _compat.div_p and lw is not invals[0]:
        return None
    if not isinstance(lw, LoraWeight) or is_lazy(c) or np.ndim(c) != 0 or jnp.iscomplexobj(c):
        return None
    return lw, c


@register(_compat.mul_p, LoraWeight)
@register(_compat.div_p, LoraWeight)
def scalar_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """A kernel times or over a scalar (an equalized learning rate, a muP multiplier):
    ``c·w + scale·a@(c·b)``; or over a per-channel scale (a quantized kernel's dequantisation,
    ``w * s[None, :]``): ``w·C + scale·a@(b·c)`` for ``c`` along output (and batch) axes,
    ``w·C + scale·(c·a)@b`` along input axes."""
    scaling = _scaling(eqn, invals)
    if scaling is None:
        return _channel_rule(ctx, eqn, invals)
    lw, c = scaling
    b = _scaled_by(lw.b, c, eqn.primitive is _compat.div_p)
    return [lw.replace(w=bind(ctx, eqn, [lw.w if v is lw else v for v in invals], lw)[0], b=b)]


def _scaled_by(x: jax.Array, c: Any, divide: bool) -> jax.Array:
    """``x·c`` (``x/c``) in ``x``'s dtype; an 8-bit float scale cast to ``x``'s first (JAX
    promotes none implicitly)."""
    if narrow_float(jnp.result_type(c)):
        c = jnp.asarray(c).astype(x.dtype)
    return (x / c if divide else x * c).astype(x.dtype)


def _channel_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``scalar_rule`` for a scale broadcast along some of the kernel's axes: on the factor that
    holds all of the axes it varies along (``NotImplemented`` where none does)."""
    pos = 0 if isinstance(invals[0], LoraWeight) else 1
    lw, other = invals[pos], invals[1 - pos]
    if (is_lazy(other) or (eqn.primitive is _compat.div_p and pos == 1) or ctx.frame is None
            or _compat.is_literal(eqn.invars[1 - pos])):
        return NotImplemented
    if tuple(eqn.outvars[0].aval.shape) != lw.shape:
        return NotImplemented  # the kernel itself broadcast: no longer a kernel of its shape
    # JAX broadcasts size-1 axes in the op itself (``w * s[None, :]``); older JAX spreads first
    c = other if np.shape(other) != lw.shape else _per_channel(ctx, eqn.invars[1 - pos])
    if c is None or np.ndim(c) == 0:
        return NotImplemented
    varying = {ax for ax, n in enumerate(c.shape) if n != 1}
    roles = {lw.layout.axes[ax][0] for ax in varying}
    for factor, where, allowed in (("b", lw.layout.factor_axes()[1], {"b", "o"}), ("a", lw.layout.factor_axes()[0], {"b", "i"})):
        if roles <= allowed:
            x = getattr(lw, factor)
            if jnp.iscomplexobj(c) and not jnp.iscomplexobj(x):
                return NotImplemented  # real factors would lose the scale's imaginary part
            scaled = _scaled_by(x, _on_factor(c, where, x.ndim), eqn.primitive is _compat.div_p)
            w = bind(ctx, eqn, [lw.w if v is lw else v for v in invals], lw)[0]
            return [lw.replace(w=w, **{factor: explicit.resharded_like(scaled, x)})]
    return NotImplemented


def _per_channel(ctx: Context, var: Any) -> jax.Array | None:
    """The value of ``var`` with size 1 along the axes it is constant on, where it is a
    ``broadcast_in_dim`` of a smaller array (``s[None, :]`` spread over a kernel); else ``None``."""
    i = ctx.frame.producer(var)
    if i is None:
        return None
    eqn = ctx.frame.eqns[i]
    if eqn.primitive is not _compat.broadcast_in_dim_p or len(eqn.invars) != 1:
        return None
    operand = ctx.frame.value(eqn.invars[0], ctx)
    if operand is None or is_lazy(operand):
        return None
    dims, shape = tuple(eqn.params["broadcast_dimensions"]), tuple(eqn.params["shape"])
    kept = [1] * len(shape)
    for k, ax in enumerate(dims):
        kept[ax] = np.shape(operand)[k]
    if kept == list(shape):
        return None  # varies along every axis: no factor holds it
    return lax.broadcast_in_dim(operand, tuple(kept), dims)


def _on_factor(c: jax.Array, where: dict[int, int], ndim: int) -> jax.Array:
    """``c`` (one axis per ``w`` axis, size 1 off the factor's) moved onto a factor's axes
    (``where``: ``w`` axis -> factor axis), size 1 on the rank axis."""
    c = jnp.squeeze(c, tuple(ax for ax in range(c.ndim) if ax not in where))
    on = sorted(where)  # the w axes left, in order
    c = jnp.transpose(c, sorted(range(len(on)), key=lambda k: where[on[k]]))
    rank_axis = next(k for k in range(ndim) if k not in where.values())
    return jnp.expand_dims(c, rank_axis)


@register(_compat.neg_p, LoraWeight)
def neg_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], b=-lw.b)]


@register(_compat.stop_gradient_p, LoraWeight)
def stop_gradient_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """A detached kernel (a target network's or a teacher's pass): the factors detached too."""
    (lw,) = invals
    return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], a=lax.stop_gradient(lw.a), b=lax.stop_gradient(lw.b))]


@register(_compat.copy_p, LoraWeight)
def same_shape_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0])]


def _placed(lw: LoraWeight, w: Any, target: Any, put: Callable[[Any, Any], Any]) -> LoraWeight:
    """``lw`` with its base placed as ``w`` and its factors ``put`` on the shardings derived from
    ``target`` (``jlora.sharding.factor_shardings``); a target that is no ``NamedSharding`` leaves
    the factors where they are."""
    if not isinstance(target, jax.sharding.NamedSharding):
        return lw.replace(w=w)
    a_sharding, b_sharding = factor_shardings(target, lw.layout)
    return lw.replace(w=w, a=put(lw.a, a_sharding), b=put(lw.b, b_sharding))


def _unplaceable(target: Any) -> bool:
    """A placement the factors cannot follow: host memory, or sums across devices left unreduced."""
    return (getattr(target, "memory_kind", None) == "pinned_host"  # a device's own memory is "device"
            or bool(getattr(getattr(target, "spec", None), "unreduced", None)))  # (or "unpinned_host" on CPU)


@register(_compat.sharding_constraint_p, LoraWeight)
def sharding_constraint_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """The constraint on ``w``, and the derived ones (``jlora.sharding.factor_specs``) on ``a`` and ``b``."""
    (lw,) = invals
    target = eqn.params.get("sharding")
    if _unplaceable(target):
        return NotImplemented
    return [_placed(lw, bind(ctx, eqn, [lw.w], lw)[0], target, lax.with_sharding_constraint)]


@register(_compat.device_put_p, LoraWeight)
def device_put_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``jax.device_put`` inside the function (one value or a tree of them): each kernel's ``w``
    put where asked, its ``a`` and ``b`` on the derived shardings (device memory only)."""
    targets = eqn.params.get("devices") or (None,) * len(invals)
    owners = [v if isinstance(v, LoraWeight) else None for v in invals]
    if any(lw is not None and target is not None and (not isinstance(target, jax.sharding.NamedSharding)
                                                       or _unplaceable(target))
           for lw, target in zip(owners, targets)):
        return NotImplemented  # a device, host memory: materialised
    outs = bind(ctx, eqn, [v if lw is None else lw.w for v, lw in zip(invals, owners)], owners)
    return [out if lw is None else _placed(lw, out, target, jax.device_put)
            for out, lw, target in zip(outs, owners, targets)]


@register(_compat.reshard_p, LoraWeight)
def reshard_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """On a mesh with Explicit axes (``jax.sharding.reshard``, e.g. FSDP's gather of a kernel
    before its use): ``w`` resharded, and ``a`` and ``b`` to the derived shardings."""
    (lw,) = invals
    target = eqn.params.get("dst_sharding")
    if (not isinstance(target, jax.sharding.NamedSharding) or _unplaceable(target)
            or (getattr(target.spec, "reduced", None) and not _compat.REDUCED_FACTORS)):
        return NotImplemented
    return [_placed(lw, bind(ctx, eqn, [lw.w], lw)[0], target, _compat.reshard)]


def _parts_placed(x: Lazy, target: Any, put: Callable[[Any, Any], Any]) -> Any:
    """A lazy kind's parts each ``put`` on its share of ``target`` (its method ``part_specs``), so a
    quantized kernel constrained or resharded stays lazy, moving its parts' bytes, not the float
    array's; ``NotImplemented`` (materialised) for a kind without ``part_specs``."""
    if (not isinstance(target, jax.sharding.NamedSharding) or _unplaceable(target)
            or getattr(target.spec, "reduced", None) or not callable(getattr(x, "part_specs", None))):
        return NotImplemented
    specs = part_specs(x, target.spec)
    # a part the array's spec does not divide (int4 packed two to a byte): materialised
    if any(spec is not None and not divides(np.shape(part), spec, target.mesh)
           for part, spec in parts_and_specs(x, specs)):
        return NotImplemented
    return jax.tree.map(lambda part, spec: part if spec is None else put(part, jax.sharding.NamedSharding(
        target.mesh, spec)), x, specs, is_leaf=lambda s: s is None)


@register(_compat.sharding_constraint_p, Lazy)
def lazy_sharding_constraint_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``with_sharding_constraint`` on a lazy kind (a quantized kernel): on each of its parts."""
    out = _parts_placed(invals[0], eqn.params.get("sharding"), lax.with_sharding_constraint)
    return out if out is NotImplemented else [out]


@register(_compat.reshard_p, Lazy)
def lazy_reshard_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``jax.sharding.reshard`` of a lazy kind (a quantized kernel gathered for its use): each part."""
    out = _parts_placed(invals[0], eqn.params.get("dst_sharding"), _compat.reshard)
    return out if out is NotImplemented else [out]


if _compat.pvary_p is not None:  # None where JAX traces no pvary (see _compat)
    @register(_compat.pvary_p, Lazy)
    def pvary_rule(ctx: Context, eqn: Any, invals: list) -> Any:
        """Inside ``shard_map``: mark every child varying over the axes the equation names (those it
        does not vary over already), so the factors meet varying activations like ``w`` does."""
        def one(x: Any) -> Any:
            missing = tuple(a for a in eqn.params["axes"] if a not in _compat.varying_axes(x))
            if not missing:
                return x
            out = eqn.primitive.bind(x, **{**eqn.params, "axes": missing})
            return out[0] if eqn.primitive.multiple_results else out

        return [jax.tree.map(one, v) if is_lazy(v) else _compat.bind(eqn, [v])[0] for v in invals]


@register(_compat.optimization_barrier_p, Lazy)
def optimization_barrier_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``lax.optimization_barrier`` over lazy values (a scheduling fence around the params): the
    barrier over their children, so it orders the same computation and they stay lazy."""
    leaves, treedef = jax.tree.flatten(invals)
    return jax.tree.unflatten(treedef, _compat.bind(eqn, leaves))


@register(_compat.name_p, Lazy)
def checkpoint_name_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``jax.ad_checkpoint.checkpoint_name`` of a kernel (a tag for a remat policy's
    ``save_only_these_names``): each child tagged, so the policy saves or drops them as the kernel."""
    (x,) = invals
    return [jax.tree.map(lambda leaf: _compat.bind(eqn, [leaf])[0], x)]


@register(_compat.all_gather_p, LoraWeight)
def all_gather_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """Inside ``shard_map``, a kernel gathered whole before its use (FSDP written by hand): a factor
    holding the gathered axis is split along it as ``w`` is (``jlora.sharding.factor_specs``) and is
    gathered the same way; the other factor is whole already. Untiled (the blocks stacked along a
    new axis), the factors that differ between devices are gathered: the new axis is an input axis
    where only ``a`` does, an output axis where only ``b`` does, a batch axis where both do."""
    (lw,) = invals
    axis = eqn.params["all_gather_dimension"]
    if not eqn.params.get("tiled", False):
        return _stacked_blocks(ctx, eqn, lw, axis)
    return [_gathered(ctx, eqn, lw, axis, lw.layout)]


def _stacked_blocks(ctx: Context, eqn: Any, lw: LoraWeight, axis: int) -> Any:
    """``all_gather(w, tiled=False)``: the devices' blocks stacked along a new axis at ``axis``.
    Which factors vary over the gather's mesh axes (``shard_map``'s type of each value) gives its
    role; where they do not say (``check_vma=False``), the kernel is materialised."""
    names = eqn.params["axis_name"]
    names = set(names) if isinstance(names, (tuple, list)) else {names}
    varies = lambda x: names <= _compat.varying_axes(x)
    if not varies(lw.w) and not isinstance(lw.w, Lazy):
        return NotImplemented  # no types to tell what differs between devices
    a_varies, b_varies = varies(lw.a), varies(lw.b)
    if not (a_varies or b_varies) or any(names & _compat.varying_axes(f) for f, v in
                                         ((lw.a, a_varies), (lw.b, b_varies)) if not v):
        return NotImplemented  # factors alike on every device, or varying over some of the axes only
    role = "b" if a_varies and b_varies else "i" if a_varies else "o"
    old = lw.layout.axes
    # the new axis comes before the next axis of its role in w (or after the last one)
    after = [k for role_, k in old[axis:] if role_ == role]
    new_k = min(after) if after else len(lw.layout.group(role))
    axes = [(r, k + 1 if r == role and k >= new_k else k) for r, k in old]
    axes.insert(axis, (role, new_k))
    return [_gathered(ctx, eqn, lw, axis, Layout(tuple(axes)))]


def _gathered(ctx: Context, eqn: Any, lw: LoraWeight, axis: int, layout: Layout) -> LoraWeight:
    """``lw`` with ``w`` gathered by ``eqn`` along ``axis``, and each factor that holds that axis of
    the result's ``layout`` gathered along its own axis for it."""
    in_a, in_b = layout.factor_axes()
    gather = lambda f, where: _compat.bind(eqn, [f], all_gather_dimension=where[axis])[0] if axis in where else f
    return lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], a=gather(lw.a, in_a), b=gather(lw.b, in_b), layout=layout)


@register(_compat.reshape_p, LoraWeight)
def reshape_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    if eqn.params.get("dimensions") is not None:
        return NotImplemented
    sharded = eqn.params.get("sharding")  # the reshape's out_sharding (a mesh with Explicit axes)
    if not (isinstance(sharded, jax.sharding.NamedSharding) and explicit.sharding(lw.w) is not None):
        sharded = None
    factors = _reshaped(lw, tuple(lw.shape), tuple(eqn.outvars[0].aval.shape), sharded)
    if factors is None and len({lw.layout.axes[ax][0] for ax, d in enumerate(lw.shape) if d != 1}) == 1:
        # a (d, 1) head as a vector: as squeeze's column, made whole (no larger than the result); not
        # a lookup, so a dropout due on its input is lost, and said to be
        return _made_whole(ctx, eqn, lw, row=False)
    if factors is None:
        return NotImplemented
    a, b, layout = factors
    return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], a=a, b=b, layout=layout)]


def _reshaped(lw: LoraWeight, old_shape: tuple, new_shape: tuple, sharded: Any = None) -> tuple | None:
    """``(a, b, layout)`` of ``w`` (of ``old_shape``) reshaped to ``new_shape``, or ``None`` where an
    axis group mixes roles. Size-1 axes (one KV head: ``W.reshape(d, 1, k)``) go and come apart from
    the rest: one removed leaves its role, one added is a batch axis of size 1 (both factors get it)."""
    if 0 in old_shape or 0 in new_shape:
        return None
    ones_old = {ax for ax, d in enumerate(old_shape) if d == 1}
    ones_new = [ax for ax, d in enumerate(new_shape) if d == 1]
    if not ones_old and not ones_new:
        return _regrouped(lw, old_shape, new_shape, sharded)
    if sharded is not None:
        return None
    squeezed = _squeezed(lw, ones_old) if ones_old else (lw.a, lw.b, lw.layout)
    if squeezed is None:
        return None
    core = lw.replace(a=squeezed[0], b=squeezed[1], layout=squeezed[2])
    inner = _regrouped(core, tuple(d for d in old_shape if d != 1), tuple(d for d in new_shape if d != 1))
    if inner is None:
        return None
    out = core.replace(a=inner[0], b=inner[1], layout=inner[2])
    if ones_new:
        out = _expanded(out, ones_new)
    return out.a, out.b, out.layout


def _regrouped(lw: LoraWeight, old_shape: tuple, new_shape: tuple, sharded: Any = None) -> tuple | None:
    """``_reshaped`` where no axis has size 1: each group of axes with equal products keeps its role."""
    groups = reshape_groups(old_shape, new_shape)
    if groups is None:
        return None
    layout = lw.layout
    new_axes: list[tuple[str, int]] = [("", 0)] * len(new_shape)
    # per role: the first old k of each group -> the group's new sizes
    changes: dict[str, dict[int, tuple[int, ...]]] = {"b": {}, "i": {}, "o": {}}
    for olds, news in groups:
        roles = {layout.axes[ax][0] for ax in olds}
        ks = [layout.axes[ax][1] for ax in olds]
        if len(roles) != 1 or ks != list(range(ks[0], ks[0] + len(ks))):
            return None
        role = roles.pop()
        changes[role][ks[0]] = tuple(new_shape[ax] for ax in news)
        for j, ax in enumerate(news):
            new_axes[ax] = (role, (ks[0], j))  # renumbered below
    # renumber k within each role: order by (old k start, position in group)
    for role in ("b", "i", "o"):
        members = sorted((k, ax) for ax, (r, k) in enumerate(new_axes) if r == role)
        for new_k, (_, ax) in enumerate(members):
            new_axes[ax] = (role, new_k)
    new_layout = Layout(tuple(new_axes))

    def regroup(role: str) -> tuple[int, ...]:  # every axis of a role is in one group
        return tuple(size for k in sorted(changes[role]) for size in changes[role][k])

    batch = regroup("b")
    a_shape = batch + regroup("i") + (lw.rank,)
    b_shape = batch + (lw.rank,) + regroup("o")
    if sharded is not None:
        a_sharding, b_sharding = factor_shardings(sharded, new_layout)
        return (lax.reshape(lw.a, a_shape, out_sharding=a_sharding), lax.reshape(lw.b, b_shape, out_sharding=b_sharding),
                new_layout)
    return lw.a.reshape(a_shape), lw.b.reshape(b_shape), new_layout


def _per_factor_axis(x: jax.Array, where: dict[int, int], per_w_axis: Sequence[Any], fill: Sequence[Any]) -> list:
    """``per_w_axis`` moved onto the axes of factor ``x`` (``where``: w axis -> x axis); ``fill`` elsewhere."""
    at = {pos: ax for ax, pos in where.items()}
    return [per_w_axis[at[i]] if i in at else fill[i] for i in range(x.ndim)]


@register(_compat.dynamic_slice_p, LoraWeight)
def dynamic_slice_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    lw, *starts = invals
    sizes = tuple(eqn.params["slice_sizes"])
    if any(is_lazy(s) for s in starts):
        return NotImplemented
    a, b = _each_factor(lw, lambda x, per: lax.dynamic_slice(x, per(starts, [0] * x.ndim), per(sizes, x.shape)))
    return [lw.replace(w=bind(ctx, eqn, [lw.w, *starts], lw)[0], a=a, b=b)]


def _each_factor(lw: LoraWeight, cut: Any) -> tuple:
    """``(cut(a, per), cut(b, per))``, where ``per(values, fill)`` puts per-``w``-axis ``values`` on
    the factor's matching axes and ``fill`` on its others."""
    return tuple(cut(x, functools.partial(_per_factor_axis, x, where))
                 for x, where in zip((lw.a, lw.b), lw.layout.factor_axes()))


def _cut(lw: LoraWeight, start: Sequence[int], limit: Sequence[int], strides: Sequence[int]) -> tuple:
    """``a`` and ``b`` of ``w[start:limit:strides]``: the same slice of the factors' matching axes."""
    return _each_factor(lw, lambda x, per: lax.slice(x, per(start, [0] * x.ndim), per(limit, x.shape),
                                                     per(strides, [1] * x.ndim)))


@register(_compat.slice_p, LoraWeight)
def slice_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    a, b = _cut(lw, start, limit, eqn.params.get("strides") or (1,) * lw.ndim)
    return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], a=a, b=b)]


@register(_compat.pad_p, LoraWeight)
def pad_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``jnp.pad`` / ``lax.pad`` of a kernel (a vocabulary padded to a multiple of 128): the
    factors' matching axes padded (cropped, interleaved) alike with zeros, so the new rows and
    columns are the padding value alone."""
    lw, fill = invals
    if is_lazy(fill):
        return NotImplemented
    config = eqn.params["padding_config"]
    a, b = _each_factor(lw, lambda x, per: lax.pad(x, jnp.zeros((), x.dtype), per(config, [(0, 0, 0)] * x.ndim)))
    return [lw.replace(w=bind(ctx, eqn, [lw.w, fill], lw)[0], a=a, b=b)]


def _pieces(lw: LoraWeight, axis: int, sizes: Sequence[int]) -> list[tuple]:
    """``(a, b)`` of each piece of ``w`` cut along ``axis`` into ``sizes``."""
    ends = np.cumsum(sizes).tolist()
    return [_cut(lw, [end - size if ax == axis else 0 for ax in range(lw.ndim)],
                 [end if ax == axis else lw.shape[ax] for ax in range(lw.ndim)], (1,) * lw.ndim)
            for size, end in zip(sizes, ends)]


@register(_compat.split_p, LoraWeight)
def split_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``jnp.split`` of a fused kernel (q, k and v in one): each piece a ``LoraWeight``."""
    (lw,) = invals
    ws = bind(ctx, eqn, [lw.w], lw)
    return [lw.replace(w=w, a=a, b=b) for w, (a, b) in zip(ws, _pieces(lw, eqn.params["axis"], eqn.params["sizes"]))]


def _squeezed(lw: LoraWeight, dropped: set[int]) -> tuple | None:
    """``(a, b, layout)`` of ``w`` with its size-1 axes ``dropped``, or ``None`` when no input or
    no output axis would be left."""
    kept_roles = [lw.layout.axes[ax][0] for ax in range(lw.ndim) if ax not in dropped]
    if "i" not in kept_roles or "o" not in kept_roles:
        return None
    in_a, in_b = lw.layout.factor_axes()
    a = jnp.squeeze(lw.a, tuple(in_a[ax] for ax in dropped if ax in in_a))
    b = jnp.squeeze(lw.b, tuple(in_b[ax] for ax in dropped if ax in in_b))
    kept = [lw.layout.axes[ax] for ax in range(lw.ndim) if ax not in dropped]
    renumbered = []
    for role, k in kept:  # close the gaps left in each role's k order
        renumbered.append((role, sum(1 for r, kk in kept if r == role and kk < k)))
    return a, b, Layout(tuple(renumbered))


@register(_compat.squeeze_p, LoraWeight)
def squeeze_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    dropped = {d % lw.ndim for d in eqn.params["dimensions"]}
    squeezed = _squeezed(lw, dropped)
    if squeezed is None:  # a row (``W[i]``, a scalar index: no input axis left) or a column (no output axis left)
        return _made_whole(ctx, eqn, lw, row=all(lw.layout.axes[ax][0] != "i" for ax in range(lw.ndim) if ax not in dropped))
    a, b, layout = squeezed
    return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], a=a, b=b, layout=layout)]


def _made_whole(ctx: Context, eqn: Any, lw: LoraWeight, row: bool) -> list:
    """``eqn`` of ``w + scale·a@b`` made whole, without a warning: a row or a column of a kernel costs
    no more than the result itself. A row is an embedding lookup (no dropout, as in ``gather``); a
    column's matmul loses its dropout, and says so."""
    undropped = not row and ctx.drops(lw)
    whole = materialize(lw, eqn.primitive.name if undropped else None, "a column of a kernel", undropped=undropped)
    return _compat.bind(eqn, [whole])


if _compat.unstack_p is not None:
    @register(_compat.unstack_p, LoraWeight)
    def unstack_rule(ctx: Context, eqn: Any, invals: list) -> Any:
        """``jnp.unstack`` (``for w in W`` unrolled): each layer of a stack a ``LoraWeight``."""
        (lw,) = invals
        axis = eqn.params["axis"] % lw.ndim
        pieces = [_squeezed(lw.replace(a=a, b=b), {axis}) for a, b in _pieces(lw, axis, (1,) * lw.shape[axis])]
        if not pieces or pieces[0] is None:
            return NotImplemented
        return [lw.replace(w=w, a=a, b=b, layout=layout)
                for w, (a, b, layout) in zip(bind(ctx, eqn, [lw.w], lw), pieces)]


if _compat.tile_p is not None:
    @register(_compat.tile_p, LoraWeight)
    def tile_rule(ctx: Context, eqn: Any, invals: list) -> Any:
        """``jnp.tile`` (copies of a layer for each of a batch): each factor tiled along its
        matching axes, so every copy is ``w + scale·a@b`` again."""
        (lw,) = invals
        reps = tuple(eqn.params["reps"])
        a, b = _each_factor(lw, lambda x, per: jnp.tile(x, per(reps, [1] * x.ndim)))
        return [lw.replace(w=bind(ctx, eqn, [lw.w], lw)[0], a=a, b=b)]


# --- kernels joined: several in, one LoraWeight out ---------------------------------------------

def _expanded(lw: LoraWeight, new_axes: Sequence[int], sizes: Sequence[int] | None = None) -> LoraWeight:
    """``lw`` (factors and layout; ``w`` untouched) with batch axes of ``sizes`` (default 1)
    inserted at ``new_axes`` of the result. Batch axes numbered in position order stay so (a
    stack's axis 0 stays the one a scan takes); otherwise the new axes come first."""
    ndim = lw.layout.ndim + len(new_axes)
    old = iter(lw.layout.axes)
    axes: list = [("b", None) if ax in new_axes else next(old) for ax in range(ndim)]
    old_ks = [k for role, k in axes if role == "b" and k is not None]
    if old_ks == sorted(old_ks):
        count = iter(range(ndim))
        axes = [(role, next(count)) if role == "b" else (role, k) for role, k in axes]
    else:
        axes = [("b", new_axes.index(ax)) if ax in new_axes else (role, k + len(new_axes) if role == "b" else k)
                for ax, (role, k) in enumerate(axes)]
    size_at = {axes[ax][1]: (sizes[j] if sizes is not None else 1) for j, ax in enumerate(new_axes)}

    def spread(f: jax.Array) -> jax.Array:
        f = jnp.expand_dims(f, sorted(size_at))
        return jnp.broadcast_to(f, tuple(size_at.get(k, d) for k, d in enumerate(f.shape)))

    return lw.replace(a=spread(lw.a), b=spread(lw.b), layout=Layout(tuple(axes)))


@register(_compat.broadcast_in_dim_p, LoraWeight)
def broadcast_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """New axes (``w[None]``, as ``jnp.stack`` makes before it joins kernels, or a kernel
    broadcast over a batch for a batched matmul): batch axes, the factors broadcast alike; a
    size-1 axis of ``w`` grown (``jnp.broadcast_to(w[None], (n, ...))``): the factors' matching
    axes grown alike."""
    lw, *dyn = invals
    shape, kept = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    new_axes = [ax for ax in range(len(shape)) if ax not in kept]
    sizes = tuple(shape[ax] for ax in kept)
    if (dyn or eqn.params.get("sharding") is not None or list(kept) != sorted(kept)
            or any(n not in (size, 1) for size, n in zip(sizes, lw.shape))):
        return NotImplemented  # w's axes reordered, or one of size > 1 changed
    a, b = _each_factor(lw, lambda x, per: jnp.broadcast_to(x, per(sizes, x.shape)))
    grown = lw.replace(a=a, b=b)
    return [_expanded(grown, new_axes, [shape[ax] for ax in new_axes]).replace(w=bind(ctx, eqn, [lw.w], lw)[0])]


@register(_compat.concatenate_p, LoraWeight)
def concatenate_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """Kernels joined along one axis (linen's ``OptimizedLSTMCell`` joins its gates' kernels):
    one ``LoraWeight`` (see ``_joined``)."""
    return _joined(ctx, eqn, invals, eqn.params["dimension"])


if _compat.stack_p is not None:
    @register(_compat.stack_p, LoraWeight)
    def stack_rule(ctx: Context, eqn: Any, invals: list) -> Any:
        """Kernels stacked along a new batch axis (layers stacked for a scan): one ``LoraWeight``."""
        axis = eqn.params["axis"]
        if any(is_lazy(v) and not isinstance(v, LoraWeight) for v in invals):
            return NotImplemented
        parts = [_expanded(v, [axis]) if isinstance(v, LoraWeight) else jnp.expand_dims(v, axis) for v in invals]
        return _joined(ctx, eqn, invals, axis, parts)


def _joined(ctx: Context, eqn: Any, invals: list, axis: int, parts: list | None = None) -> Any:
    """``eqn`` joining ``invals`` (``parts``, if given: each as joined along ``axis``) as one ``LoraWeight``.

    Along an input (output) axis the adapters' ``a`` (``b``) sit in their own blocks of the rank
    axis, zero elsewhere, and the other factors are concatenated along it: the rank is the sum of
    theirs, and a plain kernel joins with zero factors. Along a batch axis the factors are joined
    as ``w`` is, each padded with zeros to the largest rank. Scales that differ go into ``b``.
    """
    parts = invals if parts is None else parts
    adapters = [p for p in parts if isinstance(p, LoraWeight)]
    if (any(is_lazy(p) and not isinstance(p, LoraWeight) for p in parts) or len({lw.layout for lw in adapters}) > 1
            or any(explicit.sharding(x) is not None for lw in adapters for x in (lw.a, lw.b))):
        return NotImplemented
    dropouts = {lw.dropout if ctx.drops(lw) else 0.0 for lw in adapters}  # one rate, or none drawn
    if len(dropouts) > 1:
        return NotImplemented
    layout, first = adapters[0].layout, adapters[0]
    axis %= layout.ndim
    role = layout.axes[axis][0]
    in_a, in_b = layout.factor_axes()
    r_a, r_b = layout.ndim - len(layout.group("o")), len(layout.group("b"))  # the rank axis of a, of b
    scales = {lw.scale for lw in adapters}
    scale = scales.pop() if len(scales) == 1 else 1.0
    a_dtype = jnp.result_type(*(lw.a for lw in adapters))
    b_dtype = jnp.result_type(*(lw.b for lw in adapters))
    b_of = lambda lw: (lw.b if lw.scale == scale else lw.b * (lw.scale / scale)).astype(b_dtype)

    def padded(x: jax.Array, rank_axis: int, before: int, total: int) -> jax.Array:
        pad = [(0, 0)] * x.ndim
        pad[rank_axis] = (before, total - before - x.shape[rank_axis])
        return jnp.pad(x, pad)

    if role == "b":
        rank = max(lw.rank for lw in adapters)
        a = [padded(p.a.astype(a_dtype), r_a, 0, rank) if isinstance(p, LoraWeight)
             else jnp.zeros(layout.a_shape(p.shape, rank), a_dtype) for p in parts]
        b = [padded(b_of(p), r_b, 0, rank) if isinstance(p, LoraWeight)
             else jnp.zeros(layout.b_shape(p.shape, rank), b_dtype) for p in parts]
        a, b = jnp.concatenate(a, in_a[axis]), jnp.concatenate(b, in_b[axis])
    else:
        rank = sum(lw.rank for lw in adapters)
        ranks = [p.rank if isinstance(p, LoraWeight) else 0 for p in parts]
        offsets = np.cumsum([0] + ranks).tolist()  # part j's block of the rank axis starts at offsets[j]
        if role == "i":  # a in blocks along the joined input axis, b stacked along the rank
            a = jnp.concatenate([padded(p.a.astype(a_dtype), r_a, offsets[j], rank) if isinstance(p, LoraWeight)
                                 else jnp.zeros(layout.a_shape(p.shape, rank), a_dtype) for j, p in enumerate(parts)],
                                in_a[axis])
            b = jnp.concatenate([b_of(lw) for lw in adapters], r_b)
        else:
            a = jnp.concatenate([lw.a.astype(a_dtype) for lw in adapters], r_a)
            b = jnp.concatenate([padded(b_of(p), r_b, offsets[j], rank) if isinstance(p, LoraWeight)
                                 else jnp.zeros(layout.b_shape(p.shape, rank), b_dtype) for j, p in enumerate(parts)],
                                in_b[axis])
    owners = [v if isinstance(v, LoraWeight) else None for v in invals]
    w = bind(ctx, eqn, [v.w if isinstance(v, LoraWeight) else v for v in invals], owners)[0]
    path = " + ".join(lw.path for lw in adapters if lw.path)
    return [first.replace(w=w, a=a, b=b, scale=scale, path=path, dropout=dropouts.pop())]
