"""Adapters mixed into one (PEFT's ``add_weighted_adapter``): ``Σ wᵢ·Δᵢ`` exactly, their factors
side by side (PEFT's ``"cat"``), or its best approximation of a given rank, from an SVD formed
through the factors, never the whole kernel (PEFT's ``"svd"``)."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jlora import _compat
from jlora.paths import path_str
from jlora.sharding import _fits
from jlora.weight import LoraWeight, Trainable, is_param, zero_padded


def mix(adapters: Sequence[Any], weights: Sequence[Any], *, rank: int | None = None) -> Any:
    """One adapter whose update is ``Σ weights[i] · scaleᵢ · aᵢ @ bᵢ``: of the adapters' ranks
    summed (exact), or of ``rank`` (the closest of that rank, by an SVD of each kernel's sum).

    The adapters are trees of one structure, of any ranks and scales: trainable halves of
    ``jlora.split`` with adapters at the same params, or whole trees, whose other leaves are
    taken from the first. Whole trees may have adapters at other params: each param then mixes the
    adapters that have one (as PEFT's ``add_weighted_adapter``), its base from the first of those.
    A weight is a real number, one per adapter: negative for a task subtracted, or a traced array.

    With ``rank``, a param whose summed update has no more than ``rank`` directions (the ranks
    summed, or the kernel's in or out size) keeps it exactly, its factors padded with zeros to
    ``rank`` (as PEFT's ``"svd"``). The fit's gradient with respect to the weights can be NaN where
    the summed update has fewer directions than the ranks summed (a weight of zero): learn weights
    with ``rank=None``, then fit.

    The result has the first adapter's scale and dropout rate (at each param, of the first that
    has one there), so that a mix of trainable halves combines with the first's frozen half.
    Leaves trained whole (``Trainable``) are refused: mix their values as you mean to.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> lw = jlora.LoraWeight(jnp.zeros((4, 3)), jnp.ones((4, 1)), jnp.ones((1, 3)), scale=2.0)
        >>> mixed = jlora.mix([{"k": lw}, {"k": lw}], [0.5, 0.25])["k"]
        >>> mixed.rank, mixed.scale, float(mixed.delta()[0, 0])
        (2, 2.0, 1.5)
        >>> jlora.mix([{"k": lw}, {"k": lw}], [0.5, 0.25], rank=3)["k"].rank  # exact, padded
        3
    """
    if not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"jlora.mix: adapters must be a non-empty list of adapters, got {type(adapters).__name__}")
    weights = _checked_weights(weights, len(adapters))
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1):
        raise ValueError(f"jlora.mix: rank must be a positive int, or None for the ranks summed; got {rank!r}")
    flat = [jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_param) for tree in adapters]  # a lazy base: one leaf
    treedef = flat[0][1]
    for i, (leaves, other) in enumerate(flat[1:], 1):
        if other != treedef:
            paths = [{path_str(p) for p, _ in found} for found in (flat[0][0], leaves)]
            differ = sorted(paths[0] ^ paths[1])
            raise ValueError(f"jlora.mix: adapter {i} has another structure than adapter 0"
                             + (f", at '{differ[0]}'" if differ else "") + " (made with other targets, or a half of "
                             "jlora.split beside a whole tree?): mix takes adapters of one kind, made for one base; "
                             "halves of other targets mix as whole trees (jlora.combine(half, frozen))")
    bare = [i for i, (leaves, _) in enumerate(flat) if not any(isinstance(x, LoraWeight) for _, x in leaves)]
    if bare:
        raise ValueError(f"jlora.mix: adapter {bare[0]} holds no adapter (LoraWeight) at any param: the base "
                         "params, or a merged model? mix takes lora_init's trees or their trainable halves")
    out = []
    for j, (path, first) in enumerate(flat[0][0]):
        nodes = [leaves[j][1] for leaves, _ in flat]
        where = path_str(path)
        if any(isinstance(n, Trainable) for n in nodes):
            raise ValueError(f"jlora.mix: '{where}' is trained whole (Trainable), not an adapter: mix the adapters "
                             "without it (jlora.split's trainable half with it set to None), and its values as you mean to")
        holders = [i for i, n in enumerate(nodes) if isinstance(n, LoraWeight)]
        if not holders:
            out.append(first)
            continue
        fitted: list[LoraWeight] = []
        for i in holders:
            fitted.append(_checked(nodes[i], fitted[0] if fitted else None, i, holders[0], where))
        for i in sorted(set(range(len(nodes))) - set(holders)):  # whole trees of other targets: the base here
            _check_base(nodes[i], fitted[0], i, holders[0], where)
        # the first holder's layout (a stack's stays its own), scale and base
        out.append(nodes[holders[0]].replace(**_mixed(fitted, [weights[i] for i in holders], rank)))
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_base(value: Any, holder: LoraWeight, i: int, h: int, where: str) -> None:
    """Refuse ``value`` (adapter ``i``'s at ``where``, which has no adapter there) unless it is the
    base kernel of adapter ``h``'s adapter ``holder`` there: a whole tree made with other targets."""
    if not hasattr(value, "shape") or holder.w is None:
        raise ValueError(f"jlora.mix: adapter {h} has an adapter at '{where}', adapter {i} has none: mix adapters of "
                         "other targets as whole trees (jlora.combine(half, frozen)), each param mixing those that "
                         "have one")
    if tuple(value.shape) != tuple(holder.w.shape):
        raise ValueError(f"jlora.mix: at '{where}' adapter {i} has a kernel {tuple(value.shape)}, adapter {h} an "
                         f"adapter of a kernel {tuple(holder.w.shape)}: the adapters are not of one base")
    concrete = lambda x: isinstance(x, (np.ndarray, jax.Array)) and not _compat.is_tracer(x)
    if value is not holder.w and concrete(value) and concrete(holder.w) and not bool(jnp.array_equal(value, holder.w)):
        raise ValueError(f"jlora.mix: at '{where}' adapter {i}'s kernel is not the base under adapter {h}'s adapter "
                         "there (a merged model?): the adapters are not of one base")


def _checked_weights(weights: Any, n: int) -> list[Any]:
    """``weights`` as a list of ``n`` real scalars (Python numbers or 0-d arrays, traced or not),
    or a ``ValueError`` naming what is wrong."""
    what = f"jlora.mix: weights must be one real number per adapter ({n})"
    if not isinstance(weights, (list, tuple, np.ndarray, jax.Array)):
        raise ValueError(f"{what}, got {type(weights).__name__}")
    if isinstance(weights, (np.ndarray, jax.Array)) and weights.ndim != 1:
        raise ValueError(f"{what}: an array of shape ({n},), got shape {tuple(weights.shape)}")
    if len(weights) != n:
        raise ValueError(f"{what}, got {len(weights)}: {weights!r}")
    for i, c in enumerate(weights):
        real = isinstance(c, numbers.Real) and not isinstance(c, bool) or (
            isinstance(c, (np.ndarray, np.generic, jax.Array)) and np.ndim(c) == 0
            and jnp.issubdtype(c.dtype, jnp.integer) | jnp.issubdtype(c.dtype, jnp.floating))
        if not real:
            got = f"{c.dtype}{list(np.shape(c))}" if hasattr(c, "dtype") else f"{c!r} ({type(c).__name__})"
            raise ValueError(f"{what}: weights[{i}] is {got}")
    return list(weights)


def _checked(node: LoraWeight, first: LoraWeight | None, i: int, h: int, where: str) -> LoraWeight:
    """``node`` (adapter ``i``'s at ``where``) fitted to its arrays, refused where it is no adapter
    of the same kernel as ``first`` (adapter ``h``'s, fitted; ``None`` for that one itself)."""
    if node.half == "frozen":
        raise ValueError(f"jlora.mix: adapter {i} has no factors at '{where}' (the frozen half of jlora.split?)")
    node = node.fitted()
    if first is None:
        return node
    kernel = lambda lw: lw.layout.w_shape(lw.a.shape[:-1] + (1,), lw.b.shape)  # rank 1: the kernel's shape
    if node.layout != first.layout or kernel(node) != kernel(first):
        raise ValueError(f"jlora.mix: at '{where}' adapter {i} adapts a kernel {kernel(node)} with layout "
                         f"'{node.layout}', adapter {h} a kernel {kernel(first)} with layout '{first.layout}'")
    return node


def _mixed(nodes: list[LoraWeight], weights: Sequence[Any], rank: int | None) -> dict[str, Any]:
    """The mixed adapter's ``a``, ``b`` and ``scale``, of ``nodes`` fitted to their arrays."""
    first = nodes[0]
    nb = len(first.layout.group("b"))
    scale = first.scale or 1.0  # the first's: the mixed trainable half combines with its frozen half
    a = jnp.concatenate([(n.a * (c * n.scale / scale)).astype(first.a.dtype) for n, c in zip(nodes, weights)], axis=-1)
    b = jnp.concatenate([n.b.astype(first.b.dtype) for n in nodes], axis=nb)  # b's rank axis follows its batch axes
    if rank is None:
        return {"a": a, "b": b, "scale": scale}
    batch, ins, outs = a.shape[:nb], a.shape[nb:-1], b.shape[nb + 1:]
    summed, n_in, n_out = a.shape[-1], math.prod(ins), math.prod(outs)
    kept = min(rank, summed, n_in, n_out)  # a rank past what the sum has: every direction, padded
    wide = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    flat_a = a.astype(wide).reshape(*batch, n_in, summed)
    flat_b = b.astype(wide).reshape(*batch, summed, n_out)
    q_a, r_a = jnp.linalg.qr(flat_a)  # a @ b = q_a (r_a r_bᵀ) q_bᵀ: an SVD of a small matrix
    q_b, r_b = jnp.linalg.qr(jnp.swapaxes(flat_b, -1, -2))
    u, s, vt = jnp.linalg.svd(r_a @ jnp.swapaxes(r_b, -1, -2), full_matrices=False)
    root = jnp.sqrt(s[..., :kept])
    new_a = (q_a @ u[..., :kept]) * root[..., None, :]
    new_b = root[..., :, None] * (vt[..., :kept, :] @ jnp.swapaxes(q_b, -1, -2))
    new_a = new_a.reshape(*batch, *ins, kept).astype(first.a.dtype)
    new_b = new_b.reshape(*batch, kept, *outs).astype(first.b.dtype)
    return {"a": _placed_like(zero_padded(new_a, rank, -1), first.a), "b": _placed_like(zero_padded(new_b, rank, nb), first.b),
            "scale": scale}


def _placed_like(x: jax.Array, like: Any) -> jax.Array:
    """``x`` put in the sharding of ``like`` (the factor it replaces) on a mesh, where that lays it
    out: an SVD's results follow no sharding of its inputs, and would come back replicated."""
    sharding = getattr(like, "sharding", None)
    if _compat.is_tracer(x) or _compat.is_tracer(like) or not isinstance(sharding, NamedSharding):
        return x
    return jax.device_put(x, sharding) if _fits(sharding, x.shape) else x
