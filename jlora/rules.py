"""Primitive rules for ``LoraWeight``: where ``w + scale·a@b`` stays factored.

- ``dot_general`` (either side, any dimension numbers that contract exactly the input axes, or
  exactly the output axes as in a tied ``x @ E.T``): ``x·w + scale·(x·a)·b``;
- ``gather`` (embedding lookup): ``w[i] + scale·a[i]·b``;
- ``conv_general_dilated``: ``conv(x, w) + scale·conv(x, a)·b``;
- ``transpose``, ``convert_element_type``, group-preserving ``reshape``, ``copy``,
  ``sharding_constraint``, ``reshard`` (a mesh with Explicit axes), ``squeeze`` of size-1 axes,
  ``rev`` (a flipped conv window), ``pvary`` (inside ``shard_map``), and ``slice``/``dynamic_slice``
  (layer ``i`` of a stack, rows of an embedding, one part of a fused kernel: the same slice of the
  factors' matching axes): a new ``LoraWeight``.

On a mesh with Explicit axes the ops a rule adds are sharded by ``jlora.explicit``.

Every other use materialises (see ``jlora.lazy``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import _compat, explicit, rebuild
from jlora.joint import joint_dot, joint_pays
from jlora.layout import Layout, reshape_groups
from jlora.sharding import factor_shardings
from jlora.lazy import Context, evaluate_eqn, is_lazy, materialize, register, warn_once
from jlora.weight import Lazy, LoraWeight


# --- helpers ------------------------------------------------------------------------------------

def _dropout(ctx: Context, lw: LoraWeight, x: jax.Array) -> jax.Array:
    if not ctx.drops(lw):
        return x
    keep = _compat.bernoulli(ctx.next_key(), 1.0 - lw.dropout, x.shape, explicit.mask_sharding(x))
    return jnp.where(keep, x / (1.0 - lw.dropout), jnp.zeros((), x.dtype))


def contract(
    x: jax.Array, x_labels: Sequence[int], y: jax.Array, y_labels: Sequence[int], keep: set,
    preferred: Any = None, precision: Any = None, through: Any = None,
) -> tuple[jax.Array, list[int]]:
    """Einsum of two labelled operands keeping the labels in ``keep``; returns (result, labels).

    Shared labels in ``keep`` become batch dimensions, other shared labels are contracted; a label
    in one operand only and not kept is summed out first. ``through(dot, x, y)``, if given, runs
    the contraction ``dot`` (used unless ``x`` had to be summed first).
    """
    n_x = len(x_labels)
    x, x_labels = _sum_unused(x, list(x_labels), set(y_labels) | keep)
    if len(x_labels) != n_x:
        through = None
    y, y_labels = _sum_unused(y, list(y_labels), set(x_labels) | keep)
    shared = [l for l in x_labels if l in y_labels]
    batch = [l for l in shared if l in keep]
    contracted = [l for l in shared if l not in keep]
    dims = (
        (tuple(x_labels.index(l) for l in contracted), tuple(y_labels.index(l) for l in contracted)),
        (tuple(x_labels.index(l) for l in batch), tuple(y_labels.index(l) for l in batch)),
    )
    labels = batch + [l for l in x_labels if l not in shared] + [l for l in y_labels if l not in shared]
    y, axes_of, mesh = explicit.fit_factor(x, x_labels, y, y_labels)
    dot = functools.partial(lax.dot_general, dimension_numbers=dims, precision=precision,
                            preferred_element_type=preferred, **explicit.out_sharding(axes_of, mesh, labels))
    out = dot(x, y) if through is None else through(dot, x, y)
    return out, labels


def _sum_unused(x: jax.Array, labels: list[int], needed: set) -> tuple[jax.Array, list[int]]:
    unused = [i for i, l in enumerate(labels) if l not in needed]
    if not unused:
        return x, labels
    return x.sum(axis=tuple(unused)), [l for l in labels if l not in needed]


def _bind(ctx: Context, eqn: Any, invals: list, owner: LoraWeight | Sequence[LoraWeight | None]) -> list:
    """``eqn`` on the base ``w`` of ``owner`` and plain values (or on several inputs, each the base
    of its ``owner`` or ``None``); a lazy ``w`` (a quantized base) goes through its own rules (a
    fallback's warning names its owner's path)."""
    if not any(is_lazy(v) for v in invals):
        return _compat.bind(eqn, invals)
    name = lambda lw: f"the base of '{lw.path}'" if lw is not None and lw.path else ""
    return evaluate_eqn(ctx, eqn, invals, name(owner) if isinstance(owner, LoraWeight) else [name(o) for o in owner])


def _scaled(factor: jax.Array, scale: float) -> jax.Array:
    """``scale · factor``: the scale goes on the small factor, never on an activation-sized
    product (one op fewer per adapter on the activations, forward and backward)."""
    return factor if scale == 1.0 else factor * scale


def _to_order(x: jax.Array, labels: Sequence[int], order: Sequence[int]) -> jax.Array:
    perm = tuple(labels.index(l) for l in order)
    return x if perm == tuple(range(len(perm))) else jnp.transpose(x, perm)


# --- dot_general --------------------------------------------------------------------------------

@register(_compat.dot_general_p, LoraWeight)
def dot_general_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    lhs, rhs = invals
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    if is_lazy(lhs) and is_lazy(rhs):
        lhs = materialize(lhs, "dot_general", "both operands are lazy", undropped=ctx.drops_within(lhs))
        if not isinstance(rhs, LoraWeight):  # another kind (a quantized kernel): its own rules
            return evaluate_eqn(ctx, eqn, [lhs, rhs], ctx.where(rhs))
    if isinstance(rhs, LoraWeight):
        lw, x, w_contract, x_contract, w_batch, x_batch, lazy_rhs = rhs, lhs, rc, lc, rb, lb, True
    else:
        lw, x, w_contract, x_contract, w_batch, x_batch, lazy_rhs = lhs, rhs, lc, rc, lb, rb, False
    layout = lw.layout
    if explicit.partial_sums(eqn.params.get("out_sharding")):
        warn_once("dot_general", lw, "its output is left unreduced across devices (out_sharding with unreduced "
                  "axes), which a low-rank term cannot join", undropped=ctx.drops(lw))
        return NotImplemented
    contracted = set(w_contract)
    if contracted == set(layout.group("i")):
        first = "a"
    elif contracted == set(layout.group("o")):
        first = "b"
    else:
        warn_once("dot_general", lw, f"layout '{layout}' does not match the contracted axes {tuple(w_contract)}",
                  undropped=ctx.drops(lw))
        return NotImplemented

    # Label every axis; x·ΔW is then one einsum of x, a and b.
    x_labels = list(range(x.ndim))
    w_labels: list[Any] = [None] * lw.ndim
    for xa, wa in zip(x_contract, w_contract):
        w_labels[wa] = x_labels[xa]
    for xa, wa in zip(x_batch, w_batch):
        w_labels[wa] = x_labels[xa]
    fresh = iter(range(x.ndim, x.ndim + lw.ndim + 1))
    w_labels = [l if l is not None else next(fresh) for l in w_labels]
    r_label = next(fresh)
    a_labels = [w_labels[ax] for ax in layout.group("b") + layout.group("i")] + [r_label]
    b_labels = [w_labels[ax] for ax in layout.group("b")] + [r_label] + [w_labels[ax] for ax in layout.group("o")]
    lhs_labels, rhs_labels = (x_labels, w_labels) if lazy_rhs else (w_labels, x_labels)
    out_labels = (
        [lhs_labels[ax] for ax in lb]
        + [l for i, l in enumerate(lhs_labels) if i not in lc and i not in lb]
        + [l for i, l in enumerate(rhs_labels) if i not in rc and i not in rb]
    )

    x_in, dtype = x, x.dtype
    if not jnp.issubdtype(dtype, jnp.inexact):  # an int or bool activation (a mask, counts): the
        dtype = eqn.outvars[0].aval.dtype      # low-rank path runs in the result's dtype, never
        x = x.astype(dtype)                    # in x's (that would truncate a and b)
    prec = eqn.params.get("precision")
    pref = eqn.params.get("preferred_element_type")
    keep_out = set(out_labels)
    kept = ctx.rebuild_inputs and rebuild.kept_for_rebuild(ctx.frame, eqn.outvars[0], ctx)
    # the equation itself, with x and the weight in their places
    dot = (lambda x, w: _bind(ctx, eqn, [x, w], lw)[0]) if lazy_rhs else (lambda x, w: _bind(ctx, eqn, [w, x], lw)[0])
    if first == "a":
        t, t_labels = _down_projection(ctx, eqn, 1 - int(lazy_rhs), x, x_labels, lw, a_labels,
                                       keep_out | set(b_labels), pref, prec)
        contracted = {w_labels[ax] for ax in w_contract}
        r_of = lambda labels: [r_label if l in contracted else l for l in labels]
        if (kept and not is_lazy(lw.w) and len(w_contract) == 1 and x_in.dtype == lw.w.dtype
                and joint_pays(x, x_contract[0])
                and explicit.unsharded(x, x_contract[0]) and explicit.unsharded(lw.w, w_contract[0])
                and sorted(t_labels) == sorted(r_of(x_labels)) and sorted(b_labels) == sorted(r_of(w_labels))):
            # stored as itself: one matmul [x | t] @ [w ; b] (jlora.joint) instead of a sum; t and
            # b must be laid out like x and w (not so for a kernel axis that the dot does not
            # batch over, e.g. experts every token goes through)
            t = explicit.resharded_like(_to_order(t, t_labels, r_of(x_labels)), x)
            b = explicit.resharded_like(_to_order(lw.b.astype(lw.w.dtype), b_labels, r_of(w_labels)), lw.w)
            ctx.note_custom_vjp()
            # behind a barrier, as the sum below: XLA then fuses the rebuilt chain's backward into
            # one pass (measured: three passes without it, 1.8 ms a Llama-1B step)
            return [lax.optimization_barrier(joint_dot(x, t, lw.w, b, dot, x_contract[0], w_contract[0]))]
        y, y_labels = contract(t, t_labels, lw.b.astype(dtype), b_labels, keep_out, pref, prec)
    else:
        t, t_labels = contract(_dropout(ctx, lw, x), x_labels, _scaled(lw.b, lw.scale).astype(dtype), b_labels,
                               keep_out | set(a_labels), pref, prec)
        t = t.astype(dtype)
        y, y_labels = contract(t, t_labels, lw.a.astype(dtype), a_labels, keep_out, pref, prec)
    y = _to_order(y, y_labels, out_labels)
    base = dot(x_in, lw.w)
    out = base + explicit.resharded_like(y.astype(base.dtype), base)
    if kept:
        out = lax.optimization_barrier(out)  # stored as itself, not as its two terms
    return [out]


def _down_projection(ctx: Context, eqn: Any, x_pos: int, x: jax.Array, x_labels: list, lw: LoraWeight,
                     a_labels: list, keep: set, pref: Any, prec: Any) -> tuple[jax.Array, list]:
    """``scale · x @ a``, computed once for all adapters that read the same ``x`` the same way.

    q, k and v (and gate and up) read one activation: a single ``x @ [a_q | a_k | a_v]`` reads it
    once instead of three times, in the forward and in the backward. Results for the later
    equations wait in the frame's ``pending``.
    """
    frame, dtype = ctx.frame, x.dtype
    if frame is not None and frame.index in frame.pending:
        return frame.pending.pop(frame.index)
    siblings = _siblings(ctx, eqn, x_pos, lw) if frame is not None and not ctx.drops(lw) else []
    group = [lw] + [other for _, other in siblings]
    a = jnp.concatenate([_scaled(g.a, g.scale) for g in group], axis=-1) if siblings else _scaled(lw.a, lw.scale)
    rebuilds = ctx.rebuild_inputs and not ctx.drops(lw) and x.dtype == eqn.invars[x_pos].aval.dtype  # x not cast
    chain = rebuild.find(frame, eqn.invars[x_pos]) if rebuilds else None
    leaves = [frame.env.get(v) for v in chain.leaves] if chain is not None else []
    through = None
    if chain is not None and not any(v is None or is_lazy(v) for v in leaves):
        through = lambda dot, x, a: rebuild.down_projection(x, chain, leaves, a, dot)
        ctx.note_custom_vjp()
    t, t_labels = contract(_dropout(ctx, lw, x), x_labels, a.astype(dtype), a_labels, keep, pref, prec, through)
    r_axis = t_labels.index(a_labels[-1])
    parts = jnp.split(t, np.cumsum([g.rank for g in group])[:-1].tolist(), axis=r_axis) if siblings else [t]
    for (j, _), part in zip(siblings, parts[1:]):
        frame.pending[j] = (part.astype(dtype), t_labels)
    return parts[0].astype(dtype), t_labels


def _siblings(ctx: Context, eqn: Any, x_pos: int, lw: LoraWeight) -> list[tuple[int, LoraWeight]]:
    """Later ``dot_general`` equations of this jaxpr with the same ``x``, the same dimension
    numbers and a ``LoraWeight`` whose ``a`` has the same axes."""
    frame = ctx.frame
    x_var = eqn.invars[x_pos]
    if _compat.is_literal(x_var):
        return []
    found = []
    for j in frame.users(x_var):
        other_eqn = frame.eqns[j]
        if (
            j <= frame.index or j in frame.done or j in frame.pending
            or other_eqn.primitive is not _compat.dot_general_p
            or other_eqn.invars[x_pos] is not x_var or other_eqn.params != eqn.params
        ):
            continue
        other = frame.value(other_eqn.invars[1 - x_pos], ctx)
        if (
            isinstance(other, LoraWeight) and not ctx.drops(other)
            and other.ndim == lw.ndim and other.a.shape[:-1] == lw.a.shape[:-1]
            and all(other.layout.group(r) == lw.layout.group(r) for r in ("b", "i"))
            and explicit.sharded_alike(other.a, lw.a)  # sharded alike, where types say (Explicit axes)
        ):
            found.append((j, other))
    return found


# --- ragged_dot (a mixture of experts: rows grouped by expert) ---------------------------------

@register(_compat.ragged_dot_general_p, LoraWeight)
def ragged_dot_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """``lax.ragged_dot(x, W, group_sizes)``, each group of rows through its own expert's kernel
    (``W``'s group axis a batch axis): ``ragged_dot(x, W) + ragged_dot(ragged_dot(x, s·a), b)``."""
    x, lw, group_sizes, *rest = invals
    rdn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    layout = lw.layout if isinstance(lw, LoraWeight) else None
    if (layout is None or is_lazy(x) or is_lazy(group_sizes) or rest or lb or rb
            or eqn.params.get("group_offset") is not None or set(rdn.lhs_ragged_dimensions) & set(lc)
            or tuple(rdn.rhs_group_dimensions) != layout.group("b") or len(layout.group("b")) != 1
            or set(rc) != set(layout.group("i"))):
        return NotImplemented  # the weight as lhs, a ragged contraction (a weight's gradient), offsets
    in_a, _ = layout.factor_axes()
    (ragged,) = rdn.lhs_ragged_dimensions
    free = [ax for ax in range(x.ndim) if ax not in lc]  # t's axes: these, then the rank
    params = {k: eqn.params[k] for k in ("precision", "preferred_element_type")}

    def grouped(lhs: jax.Array, rhs: jax.Array, lhs_contract: tuple, rhs_contract: tuple, ragged_axis: int) -> jax.Array:
        dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=((lhs_contract, rhs_contract), ((), ())),
                                             lhs_ragged_dimensions=(ragged_axis,), rhs_group_dimensions=(0,))
        return lax.ragged_dot_general(lhs, rhs, group_sizes, dims, **params)

    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.inexact) else eqn.outvars[0].aval.dtype
    t = grouped(_dropout(ctx, lw, x.astype(dtype)), _scaled(lw.a, lw.scale).astype(dtype), tuple(lc),
                tuple(in_a[ax] for ax in rc), ragged).astype(dtype)
    y = grouped(t, lw.b.astype(dtype), (t.ndim - 1,), (1,), free.index(ragged))  # x's free axes, b's outputs
    lead = list(range(-len(free), 0))  # labels: x's free axes, then the w axis each output holds
    y = _to_order(y, lead + list(layout.group("o")), lead + sorted(layout.group("o")))
    base = _bind(ctx, eqn, [x, lw.w, group_sizes], lw)[0]
    return [base + y.astype(base.dtype)]


# --- gather (embedding lookup) -----------------------------------------------------------------

@register(_compat.gather_p, LoraWeight)
def gather_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """Rows of ``w`` picked along its input axes (each a slice of 1, collapsed or kept as a size-1
    axis, as ``jax.vmap`` of an embedding leaves it), its output axes whole."""
    lw, indices = invals
    if is_lazy(indices):
        return NotImplemented
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    layout = lw.layout
    matrix = set(layout.group("i") + layout.group("o"))
    if (all(sizes[ax] == lw.shape[ax] for ax in matrix) and not matrix & set(dn.collapsed_slice_dims + dn.operand_batching_dims)
            # a start on an axis taken whole is clamped to 0 (as vmap of W[i] has it), except in fill mode
            and not (matrix & set(dn.start_index_map) and eqn.params.get("mode") == lax.GatherScatterMode.FILL_OR_DROP)):
        return _picked_matrices(ctx, eqn, lw, indices)
    ins, outs = layout.group("i"), layout.group("o")
    mode = eqn.params.get("mode")
    collapsed = set(dn.collapsed_slice_dims)
    if (
        layout.group("b")
        or dn.operand_batching_dims
        or not collapsed <= set(ins) or not set(ins) <= set(dn.start_index_map)
        or any(sizes[ax] != 1 for ax in ins) or any(sizes[ax] != lw.shape[ax] for ax in outs)
        # an output axis in start_index_map starts at 0 (clamped), except in fill mode
        or (set(dn.start_index_map) != set(ins) and mode == lax.GatherScatterMode.FILL_OR_DROP)
    ):
        return NotImplemented
    base = _bind(ctx, eqn, [lw.w, indices], lw)[0]
    n_batch = indices.ndim - 1  # lax.gather keeps the index vector in the last axis
    position = {ax: k for k, ax in enumerate(dn.start_index_map)}
    a_indices = indices if tuple(dn.start_index_map) == ins else indices[..., [position[ax] for ax in ins]]
    a_dn = lax.GatherDimensionNumbers(
        offset_dims=(n_batch,), collapsed_slice_dims=tuple(range(len(ins))), start_index_map=tuple(range(len(ins))),
        operand_batching_dims=(), start_indices_batching_dims=(),
    )
    rows = lax.gather(
        lw.a, a_indices, a_dn, (1,) * len(ins) + (lw.rank,),
        indices_are_sorted=eqn.params.get("indices_are_sorted", False),
        unique_indices=eqn.params.get("unique_indices", False),
        mode=mode, fill_value=0,  # an index out of range: the base's fill, plus nothing
    )
    t = lax.dot_general(rows.astype(lw.b.dtype), _scaled(lw.b, lw.scale), (((n_batch,), (0,)), ((), ())))  # batch..., outs
    # The base's offset dims hold w's uncollapsed axes in w's order: outputs whole, inputs not
    # collapsed as size-1 axes; its other dims are the indices' batch dims.
    kept = [ax for ax in range(lw.ndim) if ax not in collapsed]
    t = jnp.transpose(t, tuple(range(n_batch)) + tuple(n_batch + outs.index(ax) for ax in kept if ax in outs))
    t = t.reshape(t.shape[:n_batch] + tuple(1 if ax in ins else lw.shape[ax] for ax in kept))
    perm, batch_i = [], 0
    for pos in range(base.ndim):
        if pos in dn.offset_dims:
            perm.append(n_batch + list(dn.offset_dims).index(pos))
        else:
            perm.append(batch_i)
            batch_i += 1
    return [base + jnp.transpose(t, perm).astype(base.dtype)]


def _picked_matrices(ctx: Context, eqn: Any, lw: LoraWeight, indices: jax.Array) -> Any:
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
        return _compat.bind(eqn, [f, f_indices], dimension_numbers=f_dn, slice_sizes=f_sizes)[0]

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
    return [lw.replace(w=_bind(ctx, eqn, [lw.w, indices], lw)[0], a=a, b=b, layout=Layout(tuple(axes)))]


# --- conv ---------------------------------------------------------------------------------------

@register(_compat.conv_general_dilated_p, LoraWeight)
def conv_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    x, lw = invals
    if is_lazy(x):
        return NotImplemented
    p = eqn.params
    if p["feature_group_count"] != 1 or p["batch_group_count"] != 1:  # x's channel groups meet blocks of w
        warn_once("conv_general_dilated", lw, f"a grouped or depthwise conv (feature_group_count="
                  f"{p['feature_group_count']}, batch_group_count={p['batch_group_count']}) has no factored rule",
                  undropped=ctx.drops(lw))
        return NotImplemented
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    layout = lw.layout
    if layout.group("b") or set(layout.group("o")) != {rhs_spec[0]} or set(layout.group("i")) != set(rhs_spec[1:]):
        warn_once("conv_general_dilated", lw, f"layout '{layout}' does not match the kernel's conv axes",
                  undropped=ctx.drops(lw))
        return NotImplemented
    base = _bind(ctx, eqn, [x, lw.w], lw)[0]
    ins = layout.group("i")
    k_of = {ax: k for k, ax in enumerate(ins)}
    # a as a conv kernel: w's axes with the output feature axis replaced by r.
    perm = tuple(k_of[ax] if ax in k_of else len(ins) for ax in range(lw.ndim))
    kernel_a = jnp.transpose(_scaled(lw.a, lw.scale), perm).astype(x.dtype)
    feat = out_spec[1]
    # the function's out_sharding (a mesh with Explicit axes) is for out features, not for the rank
    whole_rank = explicit.whole_along(p.get("out_sharding"), feat)
    t = _compat.bind(eqn, [_dropout(ctx, lw, x), kernel_a], **({} if whole_rank is None else {"out_sharding": whole_rank}))
    t = t[0].astype(x.dtype)
    labels = list(range(t.ndim))
    y, _ = contract(t, labels, lw.b.astype(x.dtype), [feat, t.ndim], set(labels) - {feat} | {t.ndim},
                    p.get("preferred_element_type"))
    y = jnp.moveaxis(y, -1, feat)
    return [base + explicit.resharded_like(y.astype(base.dtype), base)]


# --- structural rules: a new LoraWeight ---------------------------------------------------------

@register(_compat.transpose_p, LoraWeight)
def transpose_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    perm = tuple(eqn.params["permutation"])
    return [lw.replace(w=_bind(ctx, eqn, [lw.w], lw)[0], layout=lw.layout.permute(perm))]


@register(_compat.rev_p, LoraWeight)
def rev_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """Axes reversed (a conv window flipped, as a transposed conv does): the same axes of the factors."""
    (lw,) = invals
    dims = tuple(eqn.params["dimensions"])
    in_a, in_b = lw.layout.factor_axes()
    a = lax.rev(lw.a, tuple(in_a[d] for d in dims if d in in_a))
    b = lax.rev(lw.b, tuple(in_b[d] for d in dims if d in in_b))
    return [lw.replace(w=_bind(ctx, eqn, [lw.w], lw)[0], a=a, b=b)]


@register(_compat.convert_element_type_p, LoraWeight)
def convert_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    new = eqn.params["new_dtype"]
    if not jnp.issubdtype(new, jnp.floating) or any(jnp.iscomplexobj(x) for x in (lw.w, lw.a, lw.b)):
        return NotImplemented  # to a real dtype, Re(a@b) is not Re(a)@Re(b)
    return [lw.replace(w=_bind(ctx, eqn, [lw.w], lw)[0], a=lw.a.astype(new), b=lw.b.astype(new))]


@register(_compat.copy_p, LoraWeight)
def same_shape_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    return [lw.replace(w=_bind(ctx, eqn, [lw.w], lw)[0])]


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
    return [_placed(lw, _bind(ctx, eqn, [lw.w], lw)[0], target, lax.with_sharding_constraint)]


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
    outs = _bind(ctx, eqn, [v if lw is None else lw.w for v, lw in zip(invals, owners)], owners)
    return [out if lw is None else _placed(lw, out, target, jax.device_put)
            for out, lw, target in zip(outs, owners, targets)]


if _compat.reshard_p is not None:
    @register(_compat.reshard_p, LoraWeight)
    def reshard_rule(ctx: Context, eqn: Any, invals: list) -> Any:
        """On a mesh with Explicit axes (``jax.sharding.reshard``, e.g. FSDP's gather of a kernel
        before its use): ``w`` resharded, and ``a`` and ``b`` to the derived shardings."""
        (lw,) = invals
        target = eqn.params.get("dst_sharding")
        if (not isinstance(target, jax.sharding.NamedSharding) or _unplaceable(target)
                or (getattr(target.spec, "reduced", None) and not _compat.REDUCED_FACTORS)):
            return NotImplemented
        return [_placed(lw, _bind(ctx, eqn, [lw.w], lw)[0], target, _compat.reshard)]


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


@register(_compat.reshape_p, LoraWeight)
def reshape_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    if eqn.params.get("dimensions") is not None:
        return NotImplemented
    new_shape = tuple(eqn.outvars[0].aval.shape)
    groups = reshape_groups(lw.shape, new_shape)
    if groups is None:
        return NotImplemented
    layout = lw.layout
    new_axes: list[tuple[str, int]] = [("", 0)] * len(new_shape)
    # per role: list of (old k-range) -> new sizes, in k order
    changes: dict[str, dict[int, tuple[int, tuple[int, ...]]]] = {"b": {}, "i": {}, "o": {}}
    for olds, news in groups:
        roles = {layout.axes[ax][0] for ax in olds}
        ks = [layout.axes[ax][1] for ax in olds]
        if len(roles) != 1 or ks != list(range(ks[0], ks[0] + len(ks))):
            return NotImplemented
        role = roles.pop()
        changes[role][ks[0]] = (len(ks), tuple(new_shape[ax] for ax in news))
        for j, ax in enumerate(news):
            new_axes[ax] = (role, (ks[0], j))  # renumbered below
    # renumber k within each role: order by (old k start, position in group)
    for role in ("b", "i", "o"):
        members = sorted((k, ax) for ax, (r, k) in enumerate(new_axes) if r == role)
        for new_k, (_, ax) in enumerate(members):
            new_axes[ax] = (role, new_k)
    new_layout = Layout(tuple(new_axes))

    def regroup(shape: tuple[int, ...], role: str, offset: int) -> tuple[int, ...]:
        sizes, k = [], 0
        n = len(layout.group(role))
        while k < n:
            if k in changes[role]:
                span, news = changes[role][k]
                sizes.extend(news)
                k += span
            else:
                sizes.append(shape[offset + k])
                k += 1
        return tuple(sizes)

    nb = len(layout.group("b"))
    batch_a = regroup(lw.a.shape, "b", 0)
    a_shape = batch_a + regroup(lw.a.shape, "i", nb) + (lw.rank,)
    b_shape = batch_a + (lw.rank,) + regroup(lw.b.shape, "o", nb + 1)
    w = _bind(ctx, eqn, [lw.w], lw)[0]
    sharded = eqn.params.get("sharding")  # the reshape's out_sharding (a mesh with Explicit axes)
    if isinstance(sharded, jax.sharding.NamedSharding) and explicit.sharding(lw.w) is not None:
        a_sharding, b_sharding = factor_shardings(sharded, new_layout)
        a, b = lax.reshape(lw.a, a_shape, out_sharding=a_sharding), lax.reshape(lw.b, b_shape, out_sharding=b_sharding)
    else:
        a, b = lw.a.reshape(a_shape), lw.b.reshape(b_shape)
    return [lw.replace(w=w, a=a, b=b, layout=new_layout)]


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
    in_a, in_b = lw.layout.factor_axes()

    def cut(x: jax.Array, where: dict[int, int]) -> jax.Array:
        return lax.dynamic_slice(x, _per_factor_axis(x, where, starts, [0] * x.ndim),
                                 _per_factor_axis(x, where, sizes, x.shape))

    w = _bind(ctx, eqn, [lw.w, *starts], lw)[0]
    return [lw.replace(w=w, a=cut(lw.a, in_a), b=cut(lw.b, in_b))]


def _cut(lw: LoraWeight, start: Sequence[int], limit: Sequence[int], strides: Sequence[int]) -> tuple:
    """``a`` and ``b`` of ``w[start:limit:strides]``: the same slice of the factors' matching axes."""
    in_a, in_b = lw.layout.factor_axes()

    def cut(x: jax.Array, where: dict[int, int]) -> jax.Array:
        return lax.slice(x, _per_factor_axis(x, where, start, [0] * x.ndim),
                         _per_factor_axis(x, where, limit, x.shape), _per_factor_axis(x, where, strides, [1] * x.ndim))

    return cut(lw.a, in_a), cut(lw.b, in_b)


@register(_compat.slice_p, LoraWeight)
def slice_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    (lw,) = invals
    start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
    a, b = _cut(lw, start, limit, eqn.params.get("strides") or (1,) * lw.ndim)
    return [lw.replace(w=_bind(ctx, eqn, [lw.w], lw)[0], a=a, b=b)]


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
    ws = _bind(ctx, eqn, [lw.w], lw)
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
    squeezed = _squeezed(lw, {d % lw.ndim for d in eqn.params["dimensions"]})
    if squeezed is None:
        return NotImplemented
    a, b, layout = squeezed
    return [lw.replace(w=_bind(ctx, eqn, [lw.w], lw)[0], a=a, b=b, layout=layout)]


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
                for w, (a, b, layout) in zip(_bind(ctx, eqn, [lw.w], lw), pieces)]


# --- kernels joined: several in, one LoraWeight out ---------------------------------------------

def _expanded(lw: LoraWeight, new_axes: Sequence[int]) -> LoraWeight:
    """``lw`` (factors and layout; ``w`` untouched) with size-1 batch axes inserted at ``new_axes``
    of the result, first in the batch order."""
    ndim = lw.ndim + len(new_axes)
    old = iter(lw.layout.axes)
    axes = [("b", new_axes.index(ax)) if ax in new_axes else next(old) for ax in range(ndim)]
    axes = [(role, k + len(new_axes)) if role == "b" and ax not in new_axes else (role, k)
            for ax, (role, k) in enumerate(axes)]
    lead = (1,) * len(new_axes)
    return lw.replace(a=lw.a.reshape(lead + lw.a.shape), b=lw.b.reshape(lead + lw.b.shape), layout=Layout(tuple(axes)))


@register(_compat.broadcast_in_dim_p, LoraWeight)
def expand_dims_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """New size-1 axes (``w[None]``, as ``jnp.stack`` makes before it joins kernels): batch axes."""
    lw, *dyn = invals
    shape, kept = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
    new_axes = [ax for ax in range(len(shape)) if ax not in kept]
    if dyn or eqn.params.get("sharding") is not None or tuple(shape[ax] for ax in kept) != lw.shape \
            or any(shape[ax] != 1 for ax in new_axes) or list(kept) != sorted(kept):
        return NotImplemented
    return [_expanded(lw, new_axes).replace(w=_bind(ctx, eqn, [lw.w], lw)[0])]


@register(_compat.concatenate_p, LoraWeight)
def concatenate_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """Kernels joined along one axis (linen's ``OptimizedLSTMCell`` joins its gates' kernels):
    one ``LoraWeight`` (see ``_joined``)."""
    return _joined(ctx, eqn, invals, invals, eqn.params["dimension"])


if _compat.stack_p is not None:
    @register(_compat.stack_p, LoraWeight)
    def stack_rule(ctx: Context, eqn: Any, invals: list) -> Any:
        """Kernels stacked along a new batch axis (layers stacked for a scan): one ``LoraWeight``."""
        axis = eqn.params["axis"]
        parts = [_expanded(v, [axis]) if isinstance(v, LoraWeight) else jnp.expand_dims(v, axis) for v in invals]
        return _joined(ctx, eqn, invals, parts, axis)


def _joined(ctx: Context, eqn: Any, invals: list, parts: list, axis: int) -> Any:
    """``eqn`` joining ``invals`` (``parts``: each as joined along ``axis``) as one ``LoraWeight``.

    Along an input (output) axis the adapters' ``a`` (``b``) sit in their own blocks of the rank
    axis, zero elsewhere, and the other factors are concatenated along it: the rank is the sum of
    theirs, and a plain kernel joins with zero factors. Along a batch axis the factors are joined
    as ``w`` is, each padded with zeros to the largest rank. Scales that differ go into ``b``.
    """
    adapters = [p for p in parts if isinstance(p, LoraWeight)]
    dropouts = {lw.dropout if ctx.drops(lw) else 0.0 for lw in adapters}  # one rate, or none drawn
    if (any(is_lazy(p) and not isinstance(p, LoraWeight) for p in parts)
            or len({lw.layout for lw in adapters}) > 1 or len(dropouts) > 1
            or any(explicit.sharding(x) is not None for lw in adapters for x in (lw.a, lw.b))):
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
        offsets = dict(zip(map(id, adapters), np.cumsum([0] + [lw.rank for lw in adapters]).tolist()))
        if role == "i":  # a in blocks along the joined input axis, b stacked along the rank
            a = jnp.concatenate([padded(p.a.astype(a_dtype), r_a, offsets[id(p)], rank) if isinstance(p, LoraWeight)
                                 else jnp.zeros(layout.a_shape(p.shape, rank), a_dtype) for p in parts], in_a[axis])
            b = jnp.concatenate([b_of(lw) for lw in adapters], r_b)
        else:
            a = jnp.concatenate([lw.a.astype(a_dtype) for lw in adapters], r_a)
            b = jnp.concatenate([padded(b_of(p), r_b, offsets[id(p)], rank) if isinstance(p, LoraWeight)
                                 else jnp.zeros(layout.b_shape(p.shape, rank), b_dtype) for p in parts], in_b[axis])
    owners = [v if isinstance(v, LoraWeight) else None for v in invals]
    w = _bind(ctx, eqn, [v.w if isinstance(v, LoraWeight) else v for v in invals], owners)[0]
    path = " + ".join(lw.path for lw in adapters if lw.path)
    return [first.replace(w=w, a=a, b=b, scale=scale, layout=layout, path=path, dropout=dropouts.pop())]
