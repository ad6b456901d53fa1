"""Primitive rules for ``LoraWeight``: where ``w + scale·a@b`` stays factored in a product.

- ``dot_general`` (either side, any dimension numbers that contract the input axes, or the output
  axes as in a tied ``x @ E.T``, and maybe batch axes with them): ``x·w + scale·(x·a)·b``;
- ``ragged_dot_general`` (rows grouped by expert, ``lax.ragged_dot``): the same per group, the
  low-rank path as dense matmuls over all experts' factors when their ranks are few in all;
- ``gather`` (embedding lookup): ``w[i] + scale·a[i]·b``; whole matrices picked from a stack
  (``W[expert_of_token]``) are a new ``LoraWeight`` (``jlora.structural``);
- ``conv_general_dilated``: ``conv(x, w) + scale·conv(x, a)·b``; with the kernel's feature axes
  swapped (``conv_transpose(..., transpose_kernel=True)``) ``conv(x, w) + scale·conv(x·bᵀ, a)``.

Ops that move, cut or join kernels keep them lazy by ``jlora.structural``. On a mesh with
Explicit axes the ops a rule adds are sharded by ``jlora.explicit``.

Every other use materialises (see ``jlora.lazy``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import _compat, explicit, rebuild
from jlora.joint import joint_dot, joint_pays
from jlora.layout import Layout
from jlora.lazy import Context, evaluate_eqn, is_lazy, materialize, register, warn_once
from jlora.structural import bind as _bind, picked_matrices
from jlora.weight import LoraWeight, narrow_float, widest


# --- helpers ------------------------------------------------------------------------------------

def _dropout(ctx: Context, lw: LoraWeight, x: jax.Array) -> jax.Array:
    if not ctx.drops(lw):
        return x
    key = ctx.next_key()
    for axis in sorted(_compat.varying_axes(x)):  # inside shard_map: a block of x per device, a mask of its own
        key = jax.random.fold_in(key, lax.axis_index(axis))
    keep = _compat.bernoulli(key, 1.0 - lw.dropout, x.shape, explicit.mask_sharding(x))
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


def _scaled(factor: jax.Array, scale: float, dtype: Any) -> jax.Array:
    """``scale · factor`` in the path's ``dtype``: the scale goes on the second factor of the path,
    never on an activation-sized product (one op fewer per adapter on the activations, forward and
    backward), nor on the first factor: ``x @ (s·a)`` would overflow float16 where ``x @ w`` does
    not (with ``b = 0``, a fresh adapter gives ``inf · 0 = NaN``); PEFT, too, scales last. The
    product is formed in the wider of the factor's dtype and ``dtype``: bfloat16 factors on a
    float32 model are scaled in float32, not by a scale rounded to bfloat16 (4/3 as 1.336). (Wider
    by size: no promotion, which fp8 and ``jax.numpy_dtype_promotion("strict")`` refuse.)"""
    wide = factor.astype(dtype) if jnp.dtype(dtype).itemsize > jnp.dtype(factor.dtype).itemsize else factor
    return (wide if scale == 1.0 else wide * scale).astype(dtype)


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
    # the input (output) axes, and maybe batch axes summed with them (experts summed in one einsum)
    contracted, batch = set(w_contract), set(layout.group("b"))
    if set(layout.group("i")) <= contracted <= set(layout.group("i")) | batch:
        first = "a"
    elif set(layout.group("o")) <= contracted <= set(layout.group("o")) | batch:
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

    x_in, dtype = x, _path_dtype(eqn, x, eqn.invars[1 if lazy_rhs else 0].aval.dtype, lw)
    x = x.astype(dtype)
    prec = eqn.params.get("precision")
    if isinstance(prec, tuple) and not lazy_rhs:  # per operand, (w's, x's): x goes first in x@a and t@b
        prec = prec[::-1]
    pref = eqn.params.get("preferred_element_type")
    keep_out = set(out_labels)
    kept = ctx.rebuild_inputs and rebuild.kept_for_rebuild(ctx.frame, eqn.outvars[0], ctx)
    # the equation itself, with x and the weight in their places: over a lazy base (a quantized
    # kernel) by its own rules; else closing over nothing traced (joint_dot's backward, kept in
    # the traced jaxpr, would keep this trace alive)
    order = (lambda x, w: [x, w]) if lazy_rhs else (lambda x, w: [w, x])
    if is_lazy(lw.w):
        dot = lambda x, w: _bind(ctx, eqn, order(x, w), lw)[0]
    else:
        dot = lambda x, w: _compat.bind(eqn, order(x, w))[0]
    if first == "a":
        t, t_labels = _down_projection(ctx, eqn, 1 - int(lazy_rhs), x, x_labels, lw, a_labels,
                                       keep_out | set(b_labels), pref, prec)
        contracted = {w_labels[ax] for ax in w_contract}
        r_of = lambda labels: [r_label if l in contracted else l for l in labels]
        if (kept and not is_lazy(lw.w) and len(w_contract) == 1 and x_in.dtype == lw.w.dtype == dtype
                and joint_pays(x, x_contract[0])
                # one base under adapters mapped by a vmap (served, an ensemble): [w ; b] would copy w per
                # adapter; one adapter over mapped bases copies only b per base
                and _compat.vmapped_by(lw.b) <= _compat.vmapped_by(lw.w)
                and explicit.unsharded(x, x_contract[0]) and explicit.unsharded(lw.w, w_contract[0])
                and sorted(t_labels) == sorted(r_of(x_labels)) and sorted(b_labels) == sorted(r_of(w_labels))):
            # stored as itself: one matmul [x | t] @ [w ; b] (jlora.joint) instead of a sum; t and
            # b must be laid out like x and w (not so for a kernel axis that the dot does not
            # batch over, e.g. experts every token goes through)
            t = explicit.resharded_like(_to_order(t, t_labels, r_of(x_labels)), x)
            b = explicit.resharded_like(_to_order(_scaled(lw.b, lw.scale, lw.w.dtype), b_labels, r_of(w_labels)),
                                        lw.w)
            ctx.note_custom_vjp()
            # behind a barrier, as the sum below: XLA then fuses the rebuilt chain's backward into
            # one pass (measured: three passes without it, 1.8 ms a Llama-1B step)
            return [_stored(joint_dot(x, t, lw.w, b, dot, x_contract[0], w_contract[0]))]
        y, y_labels = contract(t, t_labels, _scaled(lw.b, lw.scale, dtype), b_labels, keep_out, pref, prec)
    else:
        t, t_labels = contract(_dropout(ctx, lw, x), x_labels, lw.b.astype(dtype), b_labels,
                               keep_out | set(a_labels), pref, prec)
        t = t.astype(dtype)
        y, y_labels = contract(t, t_labels, _scaled(lw.a, lw.scale, dtype), a_labels, keep_out, pref, prec)
    y = _to_order(y, y_labels, out_labels)
    base = dot(x_in, lw.w)
    out = base + explicit.resharded_like(y.astype(base.dtype), base)
    if kept:
        out = _stored(out)  # stored as itself, not as its two terms
    return [out]


@jax.custom_jvp
def _stored(y: jax.Array) -> jax.Array:
    """``y`` behind an optimisation barrier where it is differentiated (its tangent, and so its
    cotangent, behind one too: the barrier's own JVP rule), so that the backward's rebuild reads it
    as stored; as it is otherwise, so that a forward-only call (serving) fuses it with what reads it."""
    return y


@_stored.defjvp
def _stored_jvp(primals: tuple, tangents: tuple) -> tuple:
    return lax.optimization_barrier(primals[0]), lax.optimization_barrier(tangents[0])


def _path_dtype(eqn: Any, x: jax.Array, w_dtype: Any, lw: LoraWeight) -> Any:
    """The dtype the low-rank path computes in: that of ``x`` and the weight promoted together, as
    the equation computes (a bf16 ``x`` against an f32 kernel keeps ``a`` and ``b`` in f32); for an
    int or bool ``x`` (a mask, counts) the result's, never ``x``'s, which would truncate ``a`` and ``b``;
    for an 8-bit float matmul the widest of its result's and the factors' (fp8 is for the base term:
    ``a`` and ``b`` in fp8 would lose most of the update)."""
    if jnp.issubdtype(x.dtype, jnp.inexact) and jnp.issubdtype(w_dtype, jnp.inexact):
        dtype = widest(x.dtype, w_dtype)  # an fp8 kernel against a bf16 x: bf16
        if narrow_float(dtype):
            return widest(eqn.outvars[0].aval.dtype, lw.a.dtype)
        return dtype
    return eqn.outvars[0].aval.dtype


def _down_projection(ctx: Context, eqn: Any, x_pos: int, x: jax.Array, x_labels: list, lw: LoraWeight,
                     a_labels: list, keep: set, pref: Any, prec: Any) -> tuple[jax.Array, list]:
    """``x @ a`` (the scale goes on ``b``), computed once for all adapters that read the same
    ``x`` the same way.

    q, k and v (and gate and up) read one activation: a single ``x @ [a_q | a_k | a_v]`` reads it
    once instead of three times, in the forward and in the backward. Results for the later
    equations wait in the frame's ``pending``.
    """
    frame, dtype = ctx.frame, x.dtype
    if frame is not None and frame.index in frame.pending:
        return frame.pending.pop(frame.index)
    siblings = _siblings(ctx, eqn, x_pos, lw) if frame is not None and not ctx.drops(lw) else []
    group = [lw] + [other for _, other in siblings]
    a = jnp.concatenate([g.a for g in group], axis=-1) if siblings else lw.a
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
    (``W``'s group axis a batch axis): ``ragged_dot(x, W) + ragged_dot(ragged_dot(x, s·a), b)``,
    the low-rank term in the dense form of ``_all_experts`` up to ``DENSE_EXPERT_RANKS``."""
    x, lw, group_sizes, *rest = invals
    rdn = eqn.params["ragged_dot_dimension_numbers"]
    (lc, rc), (lb, rb) = rdn.dot_dimension_numbers
    layout = lw.layout if isinstance(lw, LoraWeight) else None
    if (layout is None or is_lazy(x) or is_lazy(group_sizes) or rest or lb or rb
            or eqn.params.get("group_offset") is not None or eqn.params.get("out_sharding") is not None
            or set(rdn.lhs_ragged_dimensions) & set(lc)
            or tuple(rdn.rhs_group_dimensions) != layout.group("b") or len(layout.group("b")) != 1
            or set(rc) != set(layout.group("i"))):
        return NotImplemented  # the weight as lhs, a ragged contraction (a weight's gradient), offsets, shardings
    in_a, _ = layout.factor_axes()
    (ragged,) = rdn.lhs_ragged_dimensions
    free = [ax for ax in range(x.ndim) if ax not in lc]  # t's axes: these, then the rank
    params = {k: eqn.params[k] for k in ("precision", "preferred_element_type")}

    def grouped(lhs: jax.Array, rhs: jax.Array, lhs_contract: tuple, rhs_contract: tuple, ragged_axis: int) -> jax.Array:
        dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=((lhs_contract, rhs_contract), ((), ())),
                                             lhs_ragged_dimensions=(ragged_axis,), rhs_group_dimensions=(0,))
        return lax.ragged_dot_general(lhs, rhs, group_sizes, dims, **params)

    dtype = _path_dtype(eqn, x, eqn.invars[1].aval.dtype, lw)
    x_in, a, b = _dropout(ctx, lw, x.astype(dtype)), lw.a.astype(dtype), _scaled(lw.b, lw.scale, dtype)
    a_contract = tuple(in_a[ax] for ax in rc)
    if lw.a.shape[0] * lw.rank <= DENSE_EXPERT_RANKS and explicit.sharding(x) is None:  # experts × rank
        y = _all_experts(x_in, a, b, group_sizes, lc, a_contract, ragged, params)
    else:
        t = grouped(x_in, a, tuple(lc), a_contract, ragged).astype(dtype)
        y = grouped(t, b, (t.ndim - 1,), (1,), free.index(ragged))  # x's free axes, b's outputs
    lead = list(range(-len(free), 0))  # labels: x's free axes, then the w axis each output holds
    y = _to_order(y, lead + list(layout.group("o")), lead + sorted(layout.group("o")))
    base = _bind(ctx, eqn, [x, lw.w, group_sizes], lw)[0]
    return [base + y.astype(base.dtype)]


# Up to this many ranks of all experts together, the low-rank path runs as dense matmuls over
# every expert's factors at once, each row's own expert picked by a mask; above it, as grouped
# matmuls. Measured (benchmarks/RESULTS.md, "dense form of the experts' adapters: a sweep"): the
# dense form was faster at every point from 128 to 65,536 ranks in all (8 to 256 experts, ranks 4
# to 512; H200, and CPU up to 4,096), at 36-75% of the grouped form's peak memory: JAX's
# ragged_dot there costs in proportion to the number of experts already. Set it to 0 for the
# grouped form (e.g. where ragged_dot is a true grouped GEMM; not measured).
DENSE_EXPERT_RANKS = 65536


def _all_experts(x: jax.Array, a: jax.Array, b: jax.Array, group_sizes: jax.Array, x_contract: Sequence[int],
                 a_contract: Sequence[int], ragged: int, params: dict) -> jax.Array:
    """``ragged_dot(ragged_dot(x, a), b)`` as ``((x @ [a_1 .. a_E]) · mask) @ [b_1 ; .. ; b_E]``: the
    mask keeps each row's own expert. Its gradients are dense matmuls too, where the grouped form's
    are ragged contractions over the rows. Returns x's free axes, then b's outputs."""
    n_experts = a.shape[0]
    x_labels = list(range(x.ndim))
    e_label, r_label = x.ndim, x.ndim + 1
    a_labels = [e_label] + [None] * (a.ndim - 2) + [r_label]
    for xa, aa in zip(x_contract, a_contract):
        a_labels[aa] = x_labels[xa]
    free = [l for l in x_labels if l not in x_contract]
    t, t_labels = contract(x, x_labels, a, a_labels, set(free) | {e_label, r_label}, params["preferred_element_type"],
                           params["precision"])
    expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(x.shape[ragged]), side="right")  # E: no group
    mask = (expert[:, None] == jnp.arange(n_experts)).astype(t.dtype)  # (rows, E)
    mask = _to_order(mask.reshape(mask.shape + (1,) * (t.ndim - 2)), [ragged, e_label] + [l for l in t_labels
                     if l not in (ragged, e_label)], t_labels)
    o_labels = list(range(x.ndim + 2, x.ndim + 2 + b.ndim - 2))
    y, _ = contract((t * mask).astype(x.dtype), t_labels, b, [e_label, r_label] + o_labels, set(free) | set(o_labels),
                    params["preferred_element_type"], params["precision"])
    return y


# --- gather (embedding lookup) -----------------------------------------------------------------

@register(_compat.gather_p, LoraWeight)
def gather_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """Rows of ``w`` picked along its input axes (each a slice of 1, collapsed or kept as a size-1
    axis, as ``jax.vmap`` of an embedding leaves it), its output axes whole; or, the same with the
    roles swapped, columns picked along its output axes (``W[:, ids]``, label words' logits).
    Whole matrices picked along batch axes (``W[expert_of_token]``) stay a ``LoraWeight``
    (``jlora.structural``)."""
    lw, indices = invals
    if is_lazy(indices):
        return NotImplemented
    dn = eqn.params["dimension_numbers"]
    sizes = tuple(eqn.params["slice_sizes"])
    mode = eqn.params.get("mode")
    matrix = set(lw.layout.group("i") + lw.layout.group("o"))
    if (all(sizes[ax] == lw.shape[ax] for ax in matrix) and not matrix & set(dn.collapsed_slice_dims + dn.operand_batching_dims)
            # a start on an axis taken whole is clamped to 0 (as vmap of W[i] has it), except in fill mode
            and not (matrix & set(dn.start_index_map) and mode == lax.GatherScatterMode.FILL_OR_DROP)):
        return picked_matrices(ctx, eqn, lw, indices)
    if not _picks_rows(lw, dn, sizes, mode):
        # columns: the same W with its axes' roles swapped (a dropout due on x would be lost: the fallback says so)
        if lw.layout.group("b") or ctx.drops(lw):
            return NotImplemented
        lw = lw.replace(a=jnp.moveaxis(lw.b, 0, -1), b=jnp.moveaxis(lw.a, -1, 0),
                        layout=Layout(tuple(({"i": "o", "o": "i"}[r], k) for r, k in lw.layout.axes)))
        if not _picks_rows(lw, dn, sizes, mode):
            return NotImplemented
    layout = lw.layout
    ins, outs = layout.group("i"), layout.group("o")
    collapsed = set(dn.collapsed_slice_dims)
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
    wide = widest(base.dtype, lw.a.dtype, lw.b.dtype, jnp.float32)  # as materialize: rows rounded once
    t = lax.dot_general(rows.astype(wide), _scaled(lw.b, lw.scale, wide), (((n_batch,), (0,)), ((), ())))  # batch..., outs
    if mode == lax.GatherScatterMode.PROMISE_IN_BOUNDS:  # W[ids]'s: an id out of range is clamped, its gradient dropped
        inside = jnp.all((a_indices >= 0) & (a_indices < jnp.array([lw.shape[ax] for ax in ins])), axis=-1)
        t = jnp.where(inside.reshape(inside.shape + (1,) * (t.ndim - n_batch)), t, lax.stop_gradient(t))
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
    return [(base.astype(wide) + jnp.transpose(t, perm)).astype(base.dtype)]


def _picks_rows(lw: LoraWeight, dn: Any, sizes: tuple, mode: Any) -> bool:
    """Whether a gather picks rows of ``lw`` along all its input axes, its output axes whole."""
    ins, outs = lw.layout.group("i"), lw.layout.group("o")
    return not (
        lw.layout.group("b")
        or dn.operand_batching_dims
        or not set(dn.collapsed_slice_dims) <= set(ins) or not set(ins) <= set(dn.start_index_map)
        or any(sizes[ax] != 1 for ax in ins) or any(sizes[ax] != lw.shape[ax] for ax in outs)
        # an output axis in start_index_map starts at 0 (clamped), except in fill mode
        or (set(dn.start_index_map) != set(ins) and mode == lax.GatherScatterMode.FILL_OR_DROP)
    )


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
    ins, outs = set(layout.group("i")), set(layout.group("o"))
    # conv_transpose(transpose_kernel=True) swaps the kernel's feature axes: the conv reads w's
    # output features as its input ones, so b runs first (x's features to the rank), then a's conv
    swapped = outs == {rhs_spec[1]} and ins == {rhs_spec[0], *rhs_spec[2:]}
    if layout.group("b") or not (swapped or (outs == {rhs_spec[0]} and ins == set(rhs_spec[1:]))):
        why = (f"its layout '{layout}' has a batch axis 'b' (a stack, or a vmap over the adapter), which a conv "
               "cannot keep factored" if layout.group("b") else f"its layout '{layout}' does not match the conv's "
               f"kernel axes (output features: axis {rhs_spec[0]}, input features: axis {rhs_spec[1]}, window: "
               f"{list(rhs_spec[2:])})")
        warn_once("conv_general_dilated", lw, why, undropped=ctx.drops(lw))
        return NotImplemented
    base = _bind(ctx, eqn, [x, lw.w], lw)[0]
    k_of = {ax: k for k, ax in enumerate(layout.group("i"))}
    # a as a conv kernel: w's axes with the output feature axis replaced by r.
    perm = tuple(k_of.get(ax, len(k_of)) for ax in range(lw.ndim))
    dtype = _path_dtype(eqn, x, eqn.invars[1].aval.dtype, lw)
    x = _dropout(ctx, lw, x.astype(dtype))
    if swapped:  # b first, then a's conv: the scale on a
        kernel_a = jnp.transpose(_scaled(lw.a, lw.scale, dtype), perm)
        b = lw.b.astype(dtype)
        feat = lhs_spec[1]
        labels = list(range(x.ndim))
        t, _ = contract(x, labels, b, [x.ndim, feat], set(labels) - {feat} | {x.ndim})
        y = _compat.bind(eqn, [jnp.moveaxis(t.astype(dtype), -1, feat), kernel_a])[0]
        return [base + explicit.resharded_like(y.astype(base.dtype), base)]
    kernel_a = jnp.transpose(lw.a, perm).astype(dtype)
    b = _scaled(lw.b, lw.scale, dtype)
    feat = out_spec[1]
    # the function's out_sharding (a mesh with Explicit axes) is for out features, not for the rank
    whole_rank = explicit.whole_along(p.get("out_sharding"), feat)
    t = _compat.bind(eqn, [x, kernel_a], **({} if whole_rank is None else {"out_sharding": whole_rank}))
    t = t[0].astype(dtype)
    labels = list(range(t.ndim))
    y, _ = contract(t, labels, b, [feat, t.ndim], set(labels) - {feat} | {t.ndim}, p.get("preferred_element_type"))
    y = jnp.moveaxis(y, -1, feat)
    return [base + explicit.resharded_like(y.astype(base.dtype), base)]
