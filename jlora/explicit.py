"""Meshes with ``Explicit`` axes: the ops jlora adds, sharded as the types of their operands say.

On a mesh whose axes are ``Explicit`` (``jax.make_mesh``'s default from JAX 0.10) every array's
type carries its sharding, and each op must be able to infer its result's sharding from its
operands': a matmul that contracts a sharded axis needs an ``out_sharding``, and operands that
share an axis must shard it alike. The function's own ops are written that way already; the ops
jlora adds (``x @ a``, ``t @ b``, the sum with the base term) are made so here:

- ``fit_factor``: before ``x · factor``, the factor (small) is resharded so that the axes it
  shares with ``x`` are sharded as in ``x`` and its other axes use no mesh axis that ``x`` uses;
  the product's sharding then follows, label by label (``out_sharding``);
- ``resharded_like``: the low-rank term resharded to the base term's sharding before the sum;
- ``mask_sharding``: a dropout mask drawn in its activation's sharding, a block per device.

Elsewhere (``Auto`` axes, one device, inside ``shard_map``) every function here returns its input
unchanged, so jlora builds the same program as without this module.
"""

from __future__ import annotations

from typing import Any, Sequence

from jax.sharding import NamedSharding, PartitionSpec

from jlora import _compat

Entry = tuple  # the mesh axes one array axis is sharded over, () for none

sharding = _compat.explicit_sharding  # x's NamedSharding on a mesh with Explicit axes, else None


def entries(x: Any) -> tuple[Entry, ...] | None:
    """``x``'s sharding, one entry per axis (a tuple of mesh axis names), or ``None`` off
    Explicit meshes.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.explicit import entries
        >>> entries(jnp.ones((2, 3))) is None
        True
    """
    s = sharding(x)
    if s is None:
        return None
    spec = _compat.spec_partitions(s.spec)
    spec = spec + (None,) * (x.ndim - len(spec))
    return tuple(() if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec)


def mask_sharding(x: Any) -> NamedSharding | None:
    """The sharding to draw a dropout mask of ``x`` in: ``x``'s, less any reduced or unreduced
    marks; ``None`` off Explicit meshes. A mask drawn without one has a replicated type, which
    every device would draw whole.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.explicit import mask_sharding
        >>> mask_sharding(jnp.ones((2, 3))) is None
        True
    """
    per_axis = entries(x)
    return None if per_axis is None else NamedSharding(sharding(x).mesh, _spec(per_axis))


def _spec(per_axis: Sequence[Entry]) -> PartitionSpec:
    return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else tuple(e) for e in per_axis))


def partial_sums(sharded: Any) -> bool:
    """Whether ``sharded`` (an op's ``out_sharding`` or ``dst_sharding``: a ``NamedSharding``, a
    ``PartitionSpec`` or ``None``) leaves sums across devices for later (``unreduced``) or marks
    values as such (``reduced``; both in newer JAX): a low-rank term cannot join those.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> from jlora.explicit import partial_sums
        >>> partial_sums(None), partial_sums(P("data"))
        (False, False)
    """
    spec = getattr(sharded, "spec", sharded)
    return bool(getattr(spec, "unreduced", None) or getattr(spec, "reduced", None))


def fit_factor(x: Any, x_labels: Sequence[Any], y: Any, y_labels: Sequence[Any]) -> tuple[Any, dict | None, Any]:
    """``(y, axes_of, mesh)``: the factor ``y`` resharded to meet ``x`` in an einsum over
    labelled axes.

    An axis of ``y`` that ``x`` has too (a contracted or a batch axis) takes ``x``'s sharding;
    another axis keeps its own, unless it uses a mesh axis ``x`` uses (then it is gathered: ``y``
    is small). ``axes_of`` maps each label to its mesh axes; ``None`` (and ``y`` as it is) off
    Explicit meshes.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.explicit import fit_factor
        >>> fit_factor(jnp.ones((4, 3)), [0, 1], jnp.ones((3, 2)), [1, 2])[1] is None
        True
    """
    x_axes, y_axes = entries(x), entries(y)
    if x_axes is None and y_axes is None:
        return y, None, None
    mesh = (sharding(x) or sharding(y)).mesh
    x_axes = x_axes or ((),) * x.ndim
    y_axes = y_axes or ((),) * y.ndim
    axes_of = dict(zip(x_labels, x_axes))
    used = {a for e in x_axes for a in e}
    fitted = tuple(axes_of[l] if l in axes_of else (() if set(e) & used else e) for l, e in zip(y_labels, y_axes))
    if fitted != y_axes or sharding(y) is None:
        y = _compat.reshard(y, NamedSharding(mesh, _spec(fitted)))
    for l, e in zip(y_labels, fitted):
        axes_of.setdefault(l, e)
    return y, axes_of, mesh


def out_sharding(axes_of: dict | None, mesh: Any, labels: Sequence[Any]) -> dict:
    """The keyword arguments that give an einsum's result (axes ``labels``, see ``fit_factor``)
    its sharding: ``{"out_sharding": ...}``, or ``{}`` off Explicit meshes. A contracted sharded
    axis is summed across devices.

    Example:
        >>> from jlora.explicit import out_sharding
        >>> out_sharding(None, None, [0, 1])
        {}
    """
    if axes_of is None:
        return {}
    return {"out_sharding": NamedSharding(mesh, _spec([axes_of[l] for l in labels]))}


def resharded_like(y: Any, base: Any) -> Any:
    """``y`` resharded to ``base``'s sharding where both have one and they differ.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.explicit import resharded_like
        >>> resharded_like(jnp.ones(2), jnp.zeros(2)).tolist()
        [1.0, 1.0]
    """
    target = sharding(base)
    if target is None or entries(y) == entries(base):
        return y
    return _compat.reshard(y, target)


def sharded_alike(x: Any, y: Any) -> bool:
    """Whether ``x`` and ``y`` are sharded alike (always off Explicit meshes, where types say nothing).

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.explicit import sharded_alike
        >>> sharded_alike(jnp.ones(2), jnp.ones((3, 4)))
        True
    """
    return entries(x) == entries(y)


def unsharded(x: Any, axis: int) -> bool:
    """Whether ``x``'s axis ``axis`` is whole on every device as its type says (always off
    Explicit meshes, where types say nothing).

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.explicit import unsharded
        >>> unsharded(jnp.ones((2, 3)), 1)
        True
    """
    per_axis = entries(x)
    return per_axis is None or not per_axis[axis]


def whole_along(sharded: Any, axis: int) -> NamedSharding | None:
    """``sharded`` (an op's ``out_sharding``: a ``NamedSharding``, a ``PartitionSpec`` or ``None``)
    with axis ``axis`` whole; ``None`` where there is none.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> from jlora.explicit import whole_along
        >>> tuple(whole_along(P("data", "model"), 1))
        ('data', None)
    """
    if sharded is None:
        return None
    spec = _compat.spec_partitions(getattr(sharded, "spec", sharded))
    spec = spec + (None,) * (axis + 1 - len(spec))
    spec = PartitionSpec(*spec[:axis], None, *spec[axis + 1:])
    return NamedSharding(sharded.mesh, spec) if isinstance(sharded, NamedSharding) else spec
