"""Rebuild an adapter's input in the backward instead of storing it.

``dA = xᵀ·dt`` needs the input ``x`` of every adapted matmul, which a frozen model's backward
never needs (``dx = dy·Wᵀ`` needs no activation). Stored, these inputs are most of LoRA's memory
over the frozen floor. But ``x`` is usually a cheap elementwise function of values that backward
keeps anyway: a norm's output of its input and statistics, ``silu(gate)·up`` of ``gate`` and
``up``. Those values are kept because the chain that makes ``x`` is itself differentiated (the
frozen matmul reading ``x`` sends its gradient back through it), and a nonlinear step's
derivative needs its operands (not so ``tanh``'s, the logistic's or ``exp``'s, formed from their
outputs: ``x = tanh(h + bias)`` is stored, as its backward keeps it anyway).

- ``find`` walks back from ``x`` through single-use elementwise equations of the jaxpr being
  evaluated, and accepts the chain when every large leaf feeds one of its nonlinear steps;
- ``down_projection`` computes ``x @ a`` with a ``custom_vjp`` that keeps the chain's leaves
  instead of ``x`` and replays the chain in the backward, tied to the cotangent (``_after``) so
  that the compiler can neither merge the replay with the forward nor schedule it early;
- ``kept_for_rebuild`` tells the matmul rule which LoRA outputs are such leaves (``gate`` and
  ``up``): their sum ``x@w + s·t@b`` is then materialised once (as one matmul where
  ``jlora.joint`` pays), else the compiler fuses the sum into its readers and keeps both terms
  alive instead.

Measured on a Llama-3.2-1B-shaped step (H200): 21.64 GiB instead of 24.15 (the frozen floor:
21.25), 1.02x the hand-written LoRA's speed (``benchmarks/RESULTS.md``).

A ``custom_vjp`` has no forward mode: ``jax.jvp`` of the wrapped function raises, while gradients
and their derivatives (a Hessian-vector product, a gradient penalty) work, the leaves being
ordinary inputs of it. ``jlora.apply(fn, recompute=False)`` stores the inputs and keeps forward
mode working.
"""

from __future__ import annotations

import heapq
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jlora import _compat, explicit
from jlora.lazy import Frame
from jlora.weight import LoraWeight

# Elementwise primitives a chain may replay (compared by object, see jlora._compat).
_LINEAR = _compat.primitives(
    "add", "sub", "neg", "convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "copy",
    "reduce_precision", "select_n",
)
_NONLINEAR = _compat.primitives(
    "mul", "div", "exp", "exp2", "log", "log1p", "expm1", "logistic", "tanh", "rsqrt", "sqrt",
    "integer_pow", "pow", "square", "max", "min", "erf", "abs", "sin", "cos",
)
# Nonlinear steps whose derivative JAX forms from their output alone (at the default accuracy):
# their backward keeps the output, not the operand, so nothing it keeps rebuilds what reads them
# (tanh(h + bias) rebuilt from h would store h beside the output tanh's backward stores anyway).
_BY_OUTPUT = _compat.primitives("tanh", "logistic", "exp", "exp2", "sqrt", "expm1")
_PASS_THROUGH = _compat.primitives("convert_element_type", "reshape", "broadcast_in_dim", "squeeze", "copy")
_OFFSET = _compat.primitives("add", "sub")  # of a large value and small ones (a bias): kept if their sum is
_MAX_CHAIN = 64


class Chain:
    """Equations (in order) that compute ``x`` from ``leaves``."""

    def __init__(self, eqns: list, leaves: list, out: Any):
        self.eqns, self.leaves, self.out = eqns, leaves, out

    def replay(self, leaf_values: Sequence[Any]) -> Any:
        env = dict(zip(self.leaves, leaf_values))
        for eqn in self.eqns:
            ins = [_compat.literal_value(v) if _compat.is_literal(v) else env[v] for v in eqn.invars]
            for var, val in zip(eqn.outvars, _compat.bind(eqn, ins)):
                env[var] = val
        return env[self.out]


def _kind(eqn: Any) -> str | None:
    """'linear', 'nonlinear' (its backward keeps its operands), 'by_output' (its backward keeps
    its output only) or None (not elementwise) for one equation."""
    if eqn.primitive in _LINEAR:
        return "linear"
    if eqn.primitive in _BY_OUTPUT and eqn.params.get("accuracy") is None:
        return "by_output"
    if eqn.primitive in _NONLINEAR:
        return "nonlinear"
    inner = eqn.params.get("jaxpr") if eqn.primitive is _compat.jit_p else (
        eqn.params.get("call_jaxpr") if eqn.primitive is _compat.custom_jvp_call_p else None)
    if inner is None:
        return None
    kinds = [_kind(e) for e in _compat.open_jaxpr(inner)[0].eqns]
    if None in kinds:
        return None
    return next((kind for kind in ("nonlinear", "by_output") if kind in kinds), "linear")


def find(frame: Frame | None, x_var: Any) -> Chain | None:
    """The chain rebuilding the value of ``x_var`` from values its backward keeps anyway, or
    ``None`` when storing it is as good (no nonlinear step, or a large leaf that nothing in the
    chain's own backward would keep). Decided from types alone, so also ahead of evaluation."""
    if frame is None or _compat.is_literal(x_var):
        return None
    key = ("chain", x_var)
    if key not in frame.memo:
        frame.memo[key] = _find(frame, x_var)
    return frame.memo[key]


def _find(frame: Frame, x_var: Any) -> Chain | None:
    producer = frame.producer(x_var)
    if producer is None:
        return None
    chain: set[int] = set()
    kinds: dict[int, str] = {}
    heap, seen = [-producer], {producer}
    while heap:  # latest equation first: all users of a value are decided before the value
        i = -heapq.heappop(heap)
        eqn = frame.eqns[i]
        kind = _kind(eqn)
        internal = i == producer or all(u in chain for v in eqn.outvars for u in frame.users(v))
        if kind is None or not internal or len(eqn.outvars) != 1 or len(chain) >= _MAX_CHAIN:
            continue
        chain.add(i)
        kinds[i] = kind
        for v in eqn.invars:
            j = None if _compat.is_literal(v) else frame.producer(v)
            if j is not None and j not in seen:
                seen.add(j)
                heapq.heappush(heap, -j)
    produced = {frame.eqns[i].outvars[0] for i in chain}
    leaves: list = []
    for i in sorted(chain):
        for v in frame.eqns[i].invars:
            if not _compat.is_literal(v) and v not in produced and v not in leaves:
                leaves.append(v)
    # A large leaf must feed a nonlinear step (directly or through casts and reshapes, or offset by
    # a small value: a bias): then the chain's own backward keeps it, or as much, anyway.
    x_bytes = _nbytes(x_var)

    def big(v: Any) -> bool:  # a symbolic size (jax.export) counts as big
        v_bytes = _nbytes(v)
        return v_bytes is None or x_bytes is None or v_bytes * 4 >= x_bytes

    kept = {v for i in chain if kinds[i] == "nonlinear" for v in frame.eqns[i].invars if not _compat.is_literal(v)}
    for i in sorted(chain, reverse=True):
        eqn = frame.eqns[i]
        ins = [v for v in eqn.invars if not _compat.is_literal(v)]
        if eqn.outvars[0] not in kept or not ins:
            continue
        if eqn.primitive in _PASS_THROUGH:
            kept.add(ins[0])
        elif eqn.primitive in _OFFSET and sum(map(big, ins)) == 1:  # h + bias: h is as good as the sum
            kept.update(ins)

    if not kept or any(big(v) and v not in kept for v in leaves):
        return None
    return Chain([frame.eqns[i] for i in sorted(chain)], leaves, x_var)


def _nbytes(var: Any) -> int | None:
    """``var``'s size in bytes; ``None`` for a symbolic shape (``jax.export``'s shape polymorphism)."""
    if _compat.symbolic(var.aval.shape):
        return None
    return int(np.prod(var.aval.shape)) * np.dtype(var.aval.dtype).itemsize


def kept_for_rebuild(frame: Frame | None, var: Any, ctx: Any) -> bool:
    """Whether ``var`` is a leaf of the chain that rebuilds a later adapted matmul's input.

    Such a value is stored for the backward; left to the compiler, a sum ``x@w + s·t@b`` that is
    only fused into its readers keeps both of its terms alive instead of itself.
    """
    if frame is None:
        return False
    frontier, seen, dots = [var], {var}, []
    while frontier and len(seen) < _MAX_CHAIN:
        v = frontier.pop()
        for j in frame.users(v):
            eqn = frame.eqns[j]
            if eqn.primitive is _compat.dot_general_p:
                dots.append(eqn)
            elif _kind(eqn) is not None and len(eqn.outvars) == 1 and eqn.outvars[0] not in seen:
                seen.add(eqn.outvars[0])
                frontier.append(eqn.outvars[0])
    for eqn in dots:
        contracting = eqn.params["dimension_numbers"][0]
        for pos in (0, 1):
            lw = frame.value(eqn.invars[1 - pos], ctx)
            # the matmul rule rebuilds x only for x @ a (the weight's input axes contracted), and
            # not under dropout
            if (isinstance(lw, LoraWeight) and set(contracting[1 - pos]) == set(lw.layout.group("i"))
                    and not ctx.drops(lw)):
                chain = find(frame, eqn.invars[pos])
                if chain is not None and var in chain.leaves:
                    return True
    return False


def down_projection(x: jax.Array, chain: Chain, leaf_values: list, a: jax.Array,
                    dot: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """``dot(x, a)``, whose backward rebuilds ``x`` from ``leaf_values`` instead of storing it."""

    @jax.custom_vjp
    def project(x: jax.Array, leaves: list, a: jax.Array) -> jax.Array:
        return dot(x, a)

    def fwd(x: jax.Array, leaves: list, a: jax.Array) -> tuple:
        return dot(x, a), (leaves, a)

    def bwd(res: tuple, dt: jax.Array) -> tuple:
        leaves, a = res
        # dx needs no x; an untied replay gives the point to linearise at (x's type, with the mesh
        # axes it varies over), and is dead code once dx is formed
        _, vjp_x = jax.vjp(lambda x: dot(x, a), chain.replay(leaves))
        dx, = vjp_x(dt)
        x_again = chain.replay(_after(dx, leaves))
        _, vjp_a = jax.vjp(lambda a: dot(x_again, a), a)
        da, = vjp_a(dt)
        return dx, [None] * len(leaves), da  # the leaves' own gradient flows through x

    project.defvjp(fwd, bwd)
    # not under stop_gradient: a second derivative (a Hessian-vector product, a gradient penalty)
    # differentiates dA through the rebuilt x
    return project(x, list(leaf_values), a)


def _after(dx: jax.Array, leaves: list) -> list:
    """``leaves`` made backward values: each floating leaf whose leading axes are those of
    ``dx[..., 0]`` (``x``'s token axes, in the usual ``x @ a``) gets ``0 · dx[..., 0]`` added.

    The replay can then not be merged with the forward's own copy of the chain (which would keep
    ``x`` alive after all), yet, unlike behind an optimisation barrier, it still fuses with the
    chain's backward that reads the same leaves. The zero is ``0 · dx``, which the compiler cannot
    fold (it is NaN for a NaN or inf), taken elementwise from a value laid out like the leaves, so
    that nothing moves between devices. A NaN or inf in ``dx`` makes ``dA`` NaN (such a step is
    lost anyway). Where no leaf has those axes (or, on a mesh with Explicit axes, none is sharded
    like ``dx``, or ``dx``'s last axis is sharded and cannot be cut to 1), an optimisation barrier
    does the job.
    """
    if not explicit.unsharded(dx, dx.ndim - 1):  # on a mesh with Explicit axes: no slice of 1 of it
        return list(lax.optimization_barrier(leaves))
    zero = dx[..., 0] * 0
    tied = [leaf + zero.reshape(zero.shape + (1,) * (leaf.ndim - zero.ndim)).astype(leaf.dtype)
            if zero.ndim and leaf.shape[:zero.ndim] == zero.shape and jnp.issubdtype(leaf.dtype, jnp.floating)
            and _laid_out_like(leaf, zero)
            else leaf for leaf in leaves]
    if all(t is leaf for t, leaf in zip(tied, leaves)):
        return list(lax.optimization_barrier(leaves))
    return tied


def _laid_out_like(leaf: jax.Array, zero: jax.Array) -> bool:
    """Whether ``leaf``'s leading axes are sharded as ``zero``'s (as types say on a mesh with
    Explicit axes; elsewhere always: the compiler lays them out alike)."""
    leaf_axes, zero_axes = explicit.entries(leaf), explicit.entries(zero)
    return leaf_axes is None or zero_axes is None or leaf_axes[:zero.ndim] == zero_axes
