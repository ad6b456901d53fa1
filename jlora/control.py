"""Higher-order primitives with lazy inputs: interpret the body, rebuild with the public API.

``jit``, ``checkpoint``, ``scan``, ``while``, ``cond``, ``custom_jvp_call``, ``custom_vjp_call``
and ``shard_map`` are rebuilt with ``jax.jit``, ``jax.checkpoint``, ``lax.scan``,
``lax.while_loop``, ``lax.switch``, ``jax.custom_jvp``, ``jax.custom_vjp`` and ``jax.shard_map`` around bodies that
this evaluator interprets. Their parameters are read, never edited, so the equations' internal
formats (which change between JAX releases) matter only through ``jlora._compat``.

These rules work for every lazy kind: lazy values are pytrees, so they cross the rebuilt
boundaries as their children.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax import lax

from jlora import _compat
from jlora.lazy import Context, evaluate, evaluate_closed, is_lazy, materialize, materialize_all, register, warn_once
from jlora.sharding import NoPartSpecs, part_specs
from jlora.weight import Lazy, LoraWeight


def _outputs(outs: list, what: str) -> list:
    # Bodies of loops and branches must return plain arrays: their output types are fixed.
    return materialize_all(outs, what=what, why="a lazy value is returned from the body")


class _Returned:
    """The outputs of a body that are its lazy inputs returned as they came (``nnx.remat`` and
    ``nnx.scan`` return the module's params), found while the rebuilt primitive traces the body.
    They leave as the outer inputs, never through the primitive, which would need them merged."""

    def __init__(self, first_in: int = 0, first_out: int = 0):
        self.first_in, self.first_out = first_in, first_out  # inputs and outputs that may pass
        self.at: dict[int, int] = {}  # output position -> input position

    def others(self, args: list, outs: list) -> list:
        """Record which of ``outs`` are lazy ``args``; return the rest."""
        position = {id(a): k for k, a in enumerate(args) if k >= self.first_in and is_lazy(a)}
        self.at = {j: position[id(o)] for j, o in enumerate(outs) if j >= self.first_out and id(o) in position}
        return [o for j, o in enumerate(outs) if j not in self.at]

    def rejoined(self, invals: list, computed: Any, n: int) -> list:
        """``n`` outputs: the returned inputs (outer values) in their places, ``computed`` between."""
        computed = iter(computed)
        return [invals[self.at[j]] if j in self.at else next(computed) for j in range(n)]


@register(_compat.jit_p, Lazy)
def jit_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    closed = eqn.params["jaxpr"]
    if _compat.inlined(eqn.params):
        return evaluate_closed(closed, invals, ctx)
    returned = _Returned()
    in_shardings, out_shardings = _compat.jit_shardings(eqn.params)

    def body(*args: Any) -> list:
        # the jit's shardings, as constraints on its plain inputs and outputs (a lazy one goes as it is)
        args = [_constrained(a, s) for a, s in zip(args, in_shardings)] if any(in_shardings) else list(args)
        outs = evaluate_closed(closed, args, ctx.renamed(invals, args))
        if any(out_shardings):
            outs = [_constrained(o, s) for o, s in zip(outs, out_shardings)]
        return returned.others(args, outs)

    body.__name__ = str(eqn.params.get("name", "jit"))
    return returned.rejoined(invals, jax.jit(body)(*invals), len(eqn.outvars))


def _constrained(x: Any, sharding: Any) -> Any:
    if sharding is None or is_lazy(x):
        return x
    if jax.sharding.AxisType.Explicit in tuple(getattr(sharding.mesh, "axis_types", ())):
        return _compat.reshard(x, sharding)  # a constraint may name Auto axes only
    return lax.with_sharding_constraint(x, sharding)


@register(_compat.remat_p, Lazy)
def checkpoint_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    jaxpr, consts = _compat.open_jaxpr(eqn.params["jaxpr"])
    returned = _Returned()

    def body(*args: Any) -> list:
        outs = evaluate(jaxpr, consts, list(args), ctx.renamed(invals, args))
        return _outputs(returned.others(list(args), outs), "checkpoint")

    policy = eqn.params.get("policy")
    computed = jax.checkpoint(body, prevent_cse=eqn.params.get("prevent_cse", True), policy=policy)(*invals)
    return returned.rejoined(invals, computed, len(eqn.outvars))


@register(_compat.scan_p, Lazy)
def scan_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    p = eqn.params
    n_consts, n_carry = _compat.scan_counts(p)
    consts = invals[:n_consts]
    init = materialize_all(invals[n_consts:n_consts + n_carry], what="scan", why="a lazy loop carry", ctx=ctx)
    xs_in = invals[n_consts + n_carry:]
    xs, rebuilds = [], []
    for x in xs_in:
        if isinstance(x, LoraWeight) and is_lazy(x.w) and x.w.unstack() is None and x.layout.batched(-1) is not None:
            # a base that cannot slice (a quantized stack with one scale for all layers): it alone is
            # materialised, the adapter stays factored
            name = f"'{x.path}'" if x.path else ctx.where(x)
            x = x.replace(w=materialize(x.w, "scan", "cannot slice its leading axis lazily (an unstack() of "
                                        f"{type(x.w).__name__} that returns its children keeps it lazy under scan)",
                                        f"the base of {name}" if name else "", ctx.drops_within(x.w)))
        spec = _unstacked(x, p["length"]) if is_lazy(x) else None
        if spec is None:
            xs.append(materialize_all([x], what="scan", why="cannot slice its leading axis lazily", ctx=ctx)[0])
            rebuilds.append(None)
        else:
            xs.append(spec[0])
            rebuilds.append(spec[1])
    keys = jax.random.split(ctx.next_key(), p["length"]) if ctx.rng is not None else None
    returned = _Returned(first_in=n_consts + n_carry, first_out=n_carry)  # a layer's slice returned as ys: xs

    def body(carry: Any, scanned: Any) -> Any:
        slices, step_key = scanned
        xs_now = [x if rebuild is None else _layer(rebuild, x, stack) for x, rebuild, stack in zip(slices, rebuilds, xs_in)]
        step_ctx = (ctx.with_rng(step_key) if step_key is not None else ctx).renamed(xs_in, xs_now)
        args = list(consts) + list(carry) + xs_now
        outs = _outputs(returned.others(args, evaluate_closed(p["jaxpr"], args, step_ctx)), "scan")
        return outs[:n_carry], outs[n_carry:]

    length = None if xs else p["length"]  # from xs where there are some: a symbolic length (jax.export) is refused
    carry, ys = lax.scan(body, init, (xs, keys), length=length, reverse=p["reverse"], unroll=p["unroll"])
    return returned.rejoined(invals, list(carry) + list(ys), len(eqn.outvars))


def _unstacked(x: Any, length: int) -> tuple | None:
    """``x.unstack()``, refused, naming the kind, where a child has not the stack's leading axis."""
    spec = x.unstack()
    if spec is not None:
        for k, child in enumerate(jax.tree.leaves(spec[0])):
            if not np.shape(child) or np.shape(child)[0] != length:
                raise ValueError(f"{type(x).__name__}.unstack(): its child {k} has shape {tuple(np.shape(child))}, "
                                 f"but lax.scan slices {length} layers off the {tuple(x.shape)} stack: each child "
                                 "needs the stack's leading axis")
    return spec


def _layer(rebuild: Callable, slices: Any, stack: Any) -> Any:
    """One layer of a lazy stack from its children's slices, refused, naming the kind, where it is
    not of the layer's shape and dtype."""
    layer = rebuild(slices)
    if (tuple(layer.shape), np.dtype(layer.dtype)) != (tuple(stack.shape[1:]), np.dtype(stack.dtype)):
        raise ValueError(f"{type(stack).__name__}.unstack(): its rebuild gave a {np.dtype(layer.dtype).name}"
                         f"{list(layer.shape)} layer of the {np.dtype(stack.dtype).name}{list(stack.shape)} stack; "
                         f"a layer is {np.dtype(stack.dtype).name}{list(stack.shape[1:])}")
    return layer


@register(_compat.while_p, Lazy)
def while_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    p = eqn.params
    nc, nb = p["cond_nconsts"], p["body_nconsts"]
    cond_consts, body_consts = invals[:nc], invals[nc:nc + nb]
    init = materialize_all(invals[nc + nb:], what="while", why="a lazy loop carry", ctx=ctx)
    ctx = ctx.forward_mode()
    # LoRA dropout draws a new mask each iteration: the key travels in the carry
    key = ctx.next_key() if ctx.rng is not None else None

    # vmap of a loop whose condition differs per example makes the condition one flag per example
    # (a prefix of every carry's shape): the loop runs while any goes on, and each step keeps the
    # carry of the examples that have stopped, as JAX lowers such a loop
    per_example = _compat.open_jaxpr(p["cond_jaxpr"])[0].outvars[0].aval.ndim > 0

    def going(carry: list) -> Any:
        return _outputs(evaluate_closed(p["cond_jaxpr"], list(cond_consts) + list(carry), ctx), "while")[0]

    def cond_fn(state: Any) -> Any:
        go = going(state[0])
        return go.any() if per_example else go

    def body_fn(state: Any) -> Any:
        carry, key = state
        step_ctx = ctx
        if key is not None:
            key, step_key = jax.random.split(key)
            step_ctx = ctx.with_rng(step_key)
        new = _outputs(evaluate_closed(p["body_jaxpr"], list(body_consts) + list(carry), step_ctx), "while")
        if per_example:
            go = going(carry)
            new = [lax.select(lax.broadcast_in_dim(go, n.shape, range(go.ndim)), n, c) for n, c in zip(new, carry)]
        return new, key

    return list(lax.while_loop(cond_fn, body_fn, (list(init), key))[0])


@register(_compat.cond_p, Lazy)
def cond_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    index, *ops = invals

    def branch(closed: Any):
        return lambda *args: _outputs(evaluate_closed(closed, list(args), ctx.renamed(ops, args)), "cond")

    branches = [branch(b) for b in eqn.params["branches"]]
    platforms = _compat.cond_platforms(eqn.params)
    if platforms is None:
        return list(lax.switch(index, branches, *ops))
    # lax.platform_dependent: lower only the branch of the platform compiled for, as JAX does (a
    # Pallas TPU kernel in one branch does not lower on CPU); its index is the platform's
    per_platform, default = {}, None
    for fn, names in zip(branches, platforms):
        if names is None:
            default = fn
        else:
            per_platform.update((name, fn) for name in names)
    return list(lax.platform_dependent(*ops, default=default, **per_platform))


def _materializer(ctx: Context, invals: list, treedef: Any, what: str, why: str) -> Any:
    """For a custom derivative rule: a function of ``invals``' flat leaves that gives them
    materialised, warning (once, named as ``ctx`` names them) when it runs, i.e. when the rule is
    differentiated. Inputs whose LoRA dropout the rule must leave out are warned of at once."""
    wheres = [ctx.where(x) for x in invals]
    for x, where in zip(invals, wheres):
        if ctx.drops_within(x):
            warn_once(what, x, why, where, undropped=True)

    def materialized(*flat: Any) -> list:
        values = jax.tree_util.tree_unflatten(treedef, list(flat))
        return [materialize(v, what, why, where) for v, where in zip(values, wheres)]

    return materialized


@register(_compat.custom_jvp_call_p, Lazy)
def custom_jvp_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """The primal is interpreted (lazy); the user's JVP rule runs on materialised inputs (a
    ``MaterializeWarning`` says so when it is differentiated). LoRA dropout is left out inside,
    differentiated or not, so that a loss and its gradient agree; a warning says so."""
    leaves, treedef = jax.tree_util.tree_flatten(invals)
    materialized = _materializer(ctx, invals, treedef, "custom_jvp_call", "its JVP rule differentiates the weight whole")
    inner = ctx.with_rng(None)

    @jax.custom_jvp
    def call(*flat: Any) -> list:
        vals = jax.tree_util.tree_unflatten(treedef, list(flat))
        return _outputs(evaluate_closed(eqn.params["call_jaxpr"], vals, inner.renamed(invals, vals)), "custom_jvp_call")

    @call.defjvp
    def call_jvp(primals: tuple, tangents: tuple) -> Any:
        mats, mat_tangents = jax.jvp(materialized, primals, tangents)
        return jax.jvp(lambda *m: _compat.bind(eqn, list(m)), tuple(mats), tuple(mat_tangents))

    return list(call(*leaves))


@register(_compat.custom_vjp_call_p, Lazy)
def custom_vjp_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """The primal is interpreted (lazy); the user's fwd/bwd run on materialised inputs (a
    ``MaterializeWarning`` says so when it is differentiated). LoRA dropout is left out inside, as
    for ``custom_jvp``."""
    leaves, treedef = jax.tree_util.tree_flatten(invals)
    materialized = _materializer(ctx, invals, treedef, "custom_vjp_call",
                                 "its fwd and bwd rules take the weight whole (a full-size gradient)")
    inner = ctx.with_rng(None)

    @jax.custom_vjp
    def call(*flat: Any) -> list:
        vals = jax.tree_util.tree_unflatten(treedef, list(flat))
        return _outputs(evaluate_closed(eqn.params["call_jaxpr"], vals, inner.renamed(invals, vals)), "custom_vjp_call")

    def fwd(*flat: Any) -> Any:
        mats, mat_vjp = jax.vjp(lambda *f: tuple(materialized(*f)), *flat)
        outs, eqn_vjp = jax.vjp(lambda *m: _compat.bind(eqn, list(m)), *mats)
        return outs, (mat_vjp, eqn_vjp)

    def bwd(res: Any, cts: Any) -> Any:
        mat_vjp, eqn_vjp = res
        return mat_vjp(tuple(eqn_vjp(cts)))

    call.defvjp(fwd, bwd)
    return list(call(*leaves))


def _splittable(ctx: Context, x: Any, spec: Any) -> Any:
    """``x`` as ``shard_map`` can split it by ``spec``: as it is, or the part whose kind says no
    ``part_specs`` materialised (a quantized base alone, its adapter staying factored), with a
    warning that says so."""
    try:
        part_specs(x, spec)
        return x
    except NoPartSpecs:
        pass
    base = x.w if isinstance(x, LoraWeight) else None
    whole = x if base is None or not is_lazy(base) else base
    why = f"{type(whole).__name__} defines no part_specs(spec) to split its parts by {tuple(spec)}"
    if whole is x:
        return materialize(x, "shard_map", why, ctx.where(x), ctx.drops_within(x))
    name = f"'{x.path}'" if x.path else ctx.where(x)
    return _splittable(ctx, x.replace(w=materialize(base, "shard_map", why, f"the base of {name}" if name else "",
                                                    ctx.drops_within(base))), spec)


@register(_compat.shard_map_p, Lazy)
def shard_map_rule(ctx: Context, eqn: Any, invals: list) -> Any:
    """Rebuilt with ``jax.shard_map``: a lazy value enters as its parts, each with the spec
    ``jlora.sharding.part_specs`` derives from the value's (a ``LoraWeight``'s ``w``, ``a`` and
    ``b``; a quantized kernel's by its kind), so the body computes with the factors' blocks and never
    forms ``ΔW``. A kind that cannot say its parts' specs is materialised. LoRA dropout inside
    draws a device's mask from the key folded with its index along each axis the input varies
    over: blocks of one activation get masks of their own, a replicated input the same mask. With
    ``check_vma=False`` JAX does not track those axes, and every device draws the same mask."""
    p = eqn.params
    invals = [_splittable(ctx, v, s) for v, s in zip(invals, p["in_specs"])]
    in_specs = tuple(part_specs(v, s) for v, s in zip(invals, p["in_specs"]))
    jaxpr, consts = _compat.open_jaxpr(p["jaxpr"])

    def body(*args: Any) -> tuple:
        return tuple(_outputs(evaluate(jaxpr, consts, list(args), ctx.renamed(invals, args)), "shard_map"))

    f = jax.shard_map(body, mesh=p["mesh"], in_specs=in_specs, out_specs=tuple(p["out_specs"]),
                      axis_names=_compat.shard_map_axes(p), check_vma=p["check_vma"])
    return list(f(*invals))
