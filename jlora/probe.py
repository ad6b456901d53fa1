"""Layout inference: trace a function of the params and see how each kernel is used.

Each target kernel enters the evaluator of ``jlora.lazy`` as a ``Probe``, a lazy kind that follows
the kernel through transposes, casts, reshapes and scans, and records at every ``dot_general``,
``ragged_dot``, ``gather`` (or a single row's ``squeeze``) or ``conv`` which of its original axes
are contracted (input), batched (batch) or kept (output); the first use gives the layout (of uses
that differ only in which axes are input and output, a lookup's, else the more frequent one's, as
a spectral norm makes), a later one that disagrees otherwise warns. Only abstract values are used: nothing is computed.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np

from jlora import _compat
from jlora.layout import Layout, reshape_groups
from jlora.lazy import Context, evaluate_closed, is_array, register
from jlora.paths import path_str
from jlora.weight import Lazy, is_param


class Probe(Lazy):
    """Stands for a kernel during inference; ``axes[j]`` lists the original axes behind axis ``j``.
    ``also``: the paths of kernels joined with this one (``jnp.concatenate``, ``jnp.stack``), whose
    axes went the same way."""

    warn_on_fallback = False

    def __init__(self, value: Any, path: str, axes: tuple, sliced: tuple = (), also: tuple = ()):
        self.value, self.path, self.axes, self.sliced, self.also = value, path, axes, sliced, also

    def tree_flatten(self):
        return (self.value,), (self.path, self.axes, self.sliced, self.also)

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: tuple) -> "Probe":
        return cls(children[0], *aux)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        return self.value.dtype

    def materialize(self) -> Any:
        return self.value

    def unstack(self):
        return (self.value,), lambda ch: self.moved(ch[0], self.axes[1:], self.axes[0])

    def describe(self) -> str:
        return f"kernel {self.path!r}"

    def part_specs(self, spec: Any) -> "Probe":
        """A probe splits as its kernel (a ``shard_map`` body sees a block of it, used the same way)."""
        return self.with_value(spec)

    def with_value(self, value: Any, axes: tuple | None = None) -> "Probe":
        return Probe(value, self.path, self.axes if axes is None else axes, self.sliced, self.also)

    def moved(self, value: Any, axes: tuple, sliced: tuple) -> "Probe":
        """This kernel as ``value``, whose axes hold ``axes``, with the original axes in ``sliced``
        now picked (a layer of a stack, an expert per token: batch axes)."""
        return Probe(value, self.path, axes, self.sliced + tuple(sliced), self.also)


jax.tree_util.register_pytree_node_class(Probe)


def _record(ctx: Context, probe: Probe, roles: dict[int, str], primitive: Any) -> None:
    """Record a use by ``primitive``: ``roles`` maps the probe's current axes to 'b'/'i'/'o'."""
    for path in (probe.path, *probe.also):
        ctx.records["used_by"].setdefault(path, set()).add(primitive)
    per_axis: dict[int, str] = {ax: "b" for ax in probe.sliced}
    for cur, role in roles.items():
        for orig in probe.axes[cur]:
            # a stack split into chunks, scanned over one part and kept in the other (lax.map's
            # batch_size): still a stack
            per_axis[orig] = "b" if orig in probe.sliced and role == "o" else role
    n = len(per_axis)
    if sorted(per_axis) != list(range(n)):
        return
    spec = "".join(per_axis[i] for i in range(n))
    for path in (probe.path, *probe.also):  # every use, in order, with what used it
        ctx.records["layouts"].setdefault(path, []).append((spec, primitive))


@register(_compat.dot_general_p, Probe)
def _dot(ctx: Context, eqn: Any, invals: list) -> Any:
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    for side, contract, batch in ((0, lc, lb), (1, rc, rb)):
        probe = invals[side]
        if isinstance(probe, Probe):
            roles = {ax: ("i" if ax in contract else "b" if ax in batch else "o") for ax in range(probe.ndim)}
            _record(ctx, probe, roles, eqn.primitive)
    return NotImplemented


@register(_compat.ragged_dot_general_p, Probe)
def _ragged_dot(ctx: Context, eqn: Any, invals: list) -> Any:
    """``ragged_dot(x, W, group_sizes)``: W's group axis is a batch axis (an expert per group of rows)."""
    probe = invals[1]
    if isinstance(probe, Probe):
        rdn = eqn.params["ragged_dot_dimension_numbers"]
        (_, rc), (_, rb) = rdn.dot_dimension_numbers
        batch = set(rb) | set(rdn.rhs_group_dimensions)
        _record(ctx, probe, {ax: "i" if ax in rc else "b" if ax in batch else "o" for ax in range(probe.ndim)},
                eqn.primitive)
    return NotImplemented


@register(_compat.gather_p, Probe)
def _gather(ctx: Context, eqn: Any, invals: list) -> Any:
    probe = invals[0]
    if isinstance(probe, Probe):
        dn = eqn.params["dimension_numbers"]
        sizes = eqn.params["slice_sizes"]
        # rows picked (collapsed, or sliced to 1 as vmap leaves them) are inputs; axes taken whole, outputs
        whole = {ax for ax in range(probe.ndim) if sizes[ax] == probe.shape[ax] and ax not in dn.collapsed_slice_dims}
        if len(whole) < 2:  # an embedding lookup: the rows are the input
            _record(ctx, probe, {ax: ("o" if ax in whole else "i") for ax in range(probe.ndim)}, eqn.primitive)
            return NotImplemented
        # matrices picked from a stack (an expert per token, W[idx]): the picked axes are batch axes,
        # and the matrices' use (a later matmul) tells their input and output axes
        batching = tuple(dn.operand_batching_dims)
        kept = [ax for ax in range(probe.ndim) if ax not in dn.collapsed_slice_dims and ax not in batching]
        axes: list[tuple] = [()] * len(eqn.outvars[0].aval.shape)
        for ax, out in zip(kept, dn.offset_dims):
            axes[out] = probe.axes[ax] if ax in whole else ()
        sliced = tuple(o for ax in range(probe.ndim) if ax not in whole for o in probe.axes[ax])
        return [probe.moved(_compat.bind(eqn, [probe.value, *invals[1:]])[0], tuple(axes), sliced)]
    return NotImplemented


@register(_compat.conv_general_dilated_p, Probe)
def _conv(ctx: Context, eqn: Any, invals: list) -> Any:
    probe = invals[1]
    if isinstance(probe, Probe):
        out_feature = eqn.params["dimension_numbers"][1][0]
        _record(ctx, probe, {ax: ("o" if ax == out_feature else "i") for ax in range(probe.ndim)}, eqn.primitive)
    return NotImplemented


@register(_compat.transpose_p, Probe)
def _transpose(ctx: Context, eqn: Any, invals: list) -> Any:
    (probe,) = invals
    perm = eqn.params["permutation"]
    return [probe.with_value(_compat.bind(eqn, [probe.value])[0], tuple(probe.axes[p] for p in perm))]


@register(_compat.convert_element_type_p, Probe)
@register(_compat.copy_p, Probe)
@register(_compat.sharding_constraint_p, Probe)
@register(_compat.slice_p, Probe)
@register(_compat.dynamic_slice_p, Probe)
@register(_compat.rev_p, Probe)
@register(_compat.pad_p, Probe)
def _same_axes(ctx: Context, eqn: Any, invals: list) -> Any:
    """A cast, a copy, a constraint, a slice (``W[i]`` before its squeeze), a flip, a pad or a
    gather of the blocks of ``shard_map`` keeps every axis in its place."""
    probe, *rest = invals
    if not isinstance(probe, Probe) or any(isinstance(v, Probe) for v in rest):
        return NotImplemented
    return [probe.with_value(_compat.bind(eqn, [probe.value, *rest])[0])]


@register(_compat.all_gather_p, Probe)
def _gathered(ctx: Context, eqn: Any, invals: list) -> Any:
    """Inside ``shard_map``, the blocks of a kernel gathered: tiled, every axis keeps its place;
    untiled, the blocks are stacked along a new axis that stands for none of the kernel's axes
    until a reshape joins it to the axis they were split along."""
    if eqn.params.get("tiled", False):
        return _same_axes(ctx, eqn, invals)
    (probe,) = invals
    axes = list(probe.axes)
    axes.insert(eqn.params["all_gather_dimension"], ())
    return [probe.with_value(_compat.bind(eqn, [probe.value])[0], tuple(axes))]


if _compat.tile_p is not None:  # copies of the kernel along its own axes
    register(_compat.tile_p, Probe)(_same_axes)


def _record_vectors(ctx: Context, invals: list) -> None:
    """Record the probes that a layer of a stack uses elementwise as a vector (one of their
    original axes left): a stacked norm's scale, ``(layers, features)``, which no linear weight is."""
    for v in invals:
        if isinstance(v, Probe) and v.sliced and len({o for a in v.axes for o in a}) == 1:
            ctx.records["vectors"].update((v.path, *v.also))


@register(_compat.mul_p, Probe)
@register(_compat.div_p, Probe)
@register(_compat.neg_p, Probe)
@register(_compat.stop_gradient_p, Probe)
def _scaled(ctx: Context, eqn: Any, invals: list) -> Any:
    """A kernel negated, detached, or times (over) a scalar, a scale or mask (``_keeps_axes``) keeps
    every axis in its place; a vector so used is a vector still."""
    probes = [k for k, v in enumerate(invals) if isinstance(v, Probe)]
    others = [v for v in invals if not isinstance(v, Probe)]
    kernel = len(probes) == 1 and invals[probes[0]].ndim >= 2 and all(invals[probes[0]].axes)
    if (len(probes) != 1 or not all(np.ndim(v) == 0 or kernel and _keeps_axes(v, invals[probes[0]].shape) for v in others)
            or (eqn.primitive is _compat.div_p and probes != [0])):
        _record_vectors(ctx, invals)
        return NotImplemented
    probe = invals[probes[0]]
    return [probe.with_value(_compat.bind(eqn, [probe.value if k in probes else v for k, v in enumerate(invals)])[0])]


def _keeps_axes(other: Any, shape: tuple) -> bool:
    """Whether a kernel of ``shape`` times ``other`` is the kernel still: ``other`` broadcast along
    size-1 axes (a scale per channel, a weight norm's divisor) or a 0/1 mask of its shape
    (``nn.Conv(mask=...)``); other data of its shape is what the param is used with, not followed."""
    if not _broadcasts_to(np.shape(other), shape):
        return False
    if tuple(np.shape(other)) != tuple(shape):
        return True
    return not _compat.is_tracer(other) and bool(np.isin(np.asarray(other), (0, 1)).all())


def _broadcasts_to(shape: tuple, target: tuple) -> bool:
    """Whether an array of ``shape`` broadcasts to ``target`` and no further (size-1 axes grown)."""
    return len(shape) == len(target) and all(n in (1, t) for n, t in zip(shape, target))


@register(_compat.add_p, Probe)
@register(_compat.sub_p, Probe)
def _shifted(ctx: Context, eqn: Any, invals: list) -> Any:
    """A sum is no use of a kernel (it materialises), but a layer's vector so used is recorded
    (Gemma's ``x * (1 + scale)``)."""
    _record_vectors(ctx, invals)
    return NotImplemented


@register(_compat.squeeze_p, Probe)
def _squeeze(ctx: Context, eqn: Any, invals: list) -> Any:
    """Dropped size-1 axes (layer ``i`` of a stack, picked by a slice) count as batch axes; when
    only the last axis is left, the one dropped before it is an embedding's rows (``W[i]``, a
    scalar index; ``W[l, i]`` of a stack) and counts as its input, as in a ``gather``. A column
    (``W[:, j]``) records nothing: its later use says more."""
    (probe,) = invals
    dropped = {d % probe.ndim for d in eqn.params["dimensions"]}
    axes = tuple(a for ax, a in enumerate(probe.axes) if ax not in dropped)
    if len(axes) == 1 and probe.ndim - 1 not in dropped:
        rows = probe.ndim - 2
        _record(ctx, probe, {ax: "o" if ax == rows + 1 else "i" if ax == rows else "b" for ax in range(probe.ndim)},
                _compat.gather_p)  # a lookup, as a gather's: a table so used gets an embedding's init
    sliced = tuple(o for ax in sorted(dropped) for o in probe.axes[ax])
    return [probe.moved(_compat.bind(eqn, [probe.value])[0], axes, sliced)]


@register(_compat.split_p, Probe)
def _split(ctx: Context, eqn: Any, invals: list) -> Any:
    """Parts of a kernel (``jnp.split``) keep every axis in its place."""
    (probe,) = invals
    return [probe.with_value(part) for part in _compat.bind(eqn, [probe.value])]


if _compat.unstack_p is not None:
    @register(_compat.unstack_p, Probe)
    def _unstack(ctx: Context, eqn: Any, invals: list) -> Any:
        """Layers of a stack (``jnp.unstack``): the unstacked axis counts as a batch axis."""
        (probe,) = invals
        axis = eqn.params["axis"] % probe.ndim
        axes = probe.axes[:axis] + probe.axes[axis + 1:]
        return [probe.moved(part, axes, probe.axes[axis]) for part in _compat.bind(eqn, [probe.value])]


@register(_compat.broadcast_in_dim_p, Probe)
def _broadcast(ctx: Context, eqn: Any, invals: list) -> Any:
    """New axes (``w[None]``, ``jnp.broadcast_to``) stand for none of the kernel's axes; a size-1
    axis grown keeps its place."""
    probe, *rest = invals
    shape, kept = eqn.params["shape"], tuple(eqn.params["broadcast_dimensions"])
    if (rest or any(n not in (shape[ax], 1) for ax, n in zip(kept, probe.shape))
            or list(kept) != sorted(kept)):
        return NotImplemented
    of = dict(zip(kept, probe.axes))
    return [probe.with_value(_compat.bind(eqn, [probe.value])[0], tuple(of.get(ax, ()) for ax in range(len(shape))))]


def _joined(eqn: Any, invals: list, axes_of: Callable[[Probe], tuple]) -> Any:
    """Kernels joined into one value: a probe for all of them, if their axes went the same way."""
    probes = [v for v in invals if isinstance(v, Probe)]
    if len({(p.axes, p.sliced) for p in probes}) > 1:
        return NotImplemented
    first = probes[0]
    also = tuple(dict.fromkeys(path for p in probes for path in (p.path, *p.also) if path != first.path))
    value = _compat.bind(eqn, [v.value if isinstance(v, Probe) else v for v in invals])[0]
    return [Probe(value, first.path, axes_of(first), first.sliced, also)]


@register(_compat.concatenate_p, Probe)
def _concatenate(ctx: Context, eqn: Any, invals: list) -> Any:
    """Kernels joined along an axis (fused gates) keep their axes in place."""
    return _joined(eqn, invals, lambda p: p.axes)


if _compat.stack_p is not None:
    @register(_compat.stack_p, Probe)
    def _stack(ctx: Context, eqn: Any, invals: list) -> Any:
        """Kernels stacked (``jnp.stack``): the new axis stands for none of theirs."""
        axis = eqn.params["axis"]
        return _joined(eqn, invals, lambda p: p.axes[:axis] + ((),) + p.axes[axis:])


@register(_compat.reshape_p, Probe)
def _reshape(ctx: Context, eqn: Any, invals: list) -> Any:
    """Size-1 axes aside: one added stands for none of the kernel's axes (as a stack's new axis);
    one removed or moved joins its neighbour's group (a single head's ``(d, 1, h)`` as ``(d, h)``,
    a depthwise ``(kh, kw, c, 1)`` as ``(kh, kw, 1, c)``), since either role fits it."""
    (probe,) = invals
    new_shape = tuple(eqn.outvars[0].aval.shape)
    old_at = [ax for ax, d in enumerate(probe.shape) if d != 1]
    new_at = [ax for ax, d in enumerate(new_shape) if d != 1]
    groups = reshape_groups([probe.shape[ax] for ax in old_at], [new_shape[ax] for ax in new_at])
    if groups is None or not old_at or eqn.params.get("dimensions") is not None:
        return NotImplemented
    joins = {ax: max((k for k in old_at if k < ax), default=old_at[0]) for ax in range(probe.ndim) if ax not in old_at}
    axes: list[tuple] = [()] * len(new_shape)
    for olds, news in groups:
        merged = tuple(o for ax in olds for a in (old_at[ax], *(k for k, to in joins.items() if to == old_at[ax]))
                       for o in probe.axes[a])
        for ax in news:
            axes[new_at[ax]] = tuple(sorted(merged))
    return [probe.with_value(_compat.bind(eqn, [probe.value])[0], tuple(axes))]


def infer_layouts(fn: Callable[[Any], Any], params: Any, paths: Sequence[str],
                  used_by: dict[str, set] | None = None, vectors: set[str] | None = None) -> dict[str, Layout]:
    """Layouts of the kernels at ``paths``, from how ``fn(params)`` uses them. ``used_by``, if
    given, receives the primitives that use each kernel (of ``dot_general``, ``ragged_dot_general``,
    ``gather`` (a single row's ``squeeze`` too: a lookup) and ``conv_general_dilated``); ``vectors``
    the paths that a layer of a stack (a ``scan``, ``jnp.unstack``) multiplies or adds elementwise
    as a vector, as a norm's scale (a row ``W[i]`` counts as a lookup: an embedding's).

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.probe import infer_layouts
        >>> p = {"k": jnp.ones((3, 2, 4))}
        >>> str(infer_layouts(lambda p: jnp.ones((5, 3)) @ p["k"].reshape(3, 8), p, ["k"])["k"])
        'ioo'
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_param)
    leaves = [leaf for _, leaf in flat]
    # others (an Equinox activation) stay static; a lazy kernel (quantized) is traced as the array it stands for
    dynamic = [i for i, leaf in enumerate(leaves) if is_array(leaf) or isinstance(leaf, Lazy)]
    leaf_paths = [path_str(flat[i][0]) for i in dynamic]
    wanted = set(paths)
    abstract = [jax.ShapeDtypeStruct(leaves[i].shape, leaves[i].dtype) if isinstance(leaves[i], Lazy)
                else _compat.abstractify(leaves[i]) for i in dynamic]

    def call(*arrays: Any) -> Any:
        full = list(leaves)
        for i, a in zip(dynamic, arrays):
            full[i] = a
        return fn(jax.tree_util.tree_unflatten(treedef, full))

    closed = jax.make_jaxpr(call)(*abstract)
    records: dict[str, Any] = {"layouts": {}, "used_by": {}, "vectors": set()}

    def run(*arrays: Any) -> Any:
        vals = [
            Probe(v, p, tuple((i,) for i in range(v.ndim))) if p in wanted else v
            for p, v in zip(leaf_paths, arrays)
        ]
        out = evaluate_closed(closed, vals, Context(records=records))
        return [o.materialize() if isinstance(o, Lazy) else o for o in out]

    jax.make_jaxpr(run)(*abstract)
    if used_by is not None:
        used_by.update(records["used_by"])
    if vectors is not None:
        vectors.update(records["vectors"])
    ndim = {p: v.ndim for p, v in zip(leaf_paths, abstract)}
    layouts = {}
    for path, records_of_path in records["layouts"].items():
        uses = [spec for spec, _ in records_of_path]
        if not _valid(uses[0]) or len(uses[0]) != ndim[path]:  # an axis the probe lost track of
            continue
        first = Layout.parse(_chosen(records_of_path))
        for other in dict.fromkeys(uses):
            if not _compatible(first, other):
                warnings.warn(
                    f"jlora: kernel {path!r} is used with layouts '{first}' and '{other}'; "
                    f"using '{first}' (a rule may still keep the other use factored; where none does, it materialises, "
                    "and jlora.apply warns)",
                    stacklevel=2,
                )
        layouts[path] = first
    return layouts


def _chosen(uses: list[tuple[str, Any]]) -> str:
    """The layout of a kernel's uses (``(spec, primitive)``, in order): the first use's, but where
    uses differ only in which axes are input and output, a lookup's (a tied table looked up, then
    attended to, however often, is a table), else the more frequent one's, the first's on a tie (a
    spectral norm's power iteration, u @ W.T then v @ W twice, and the layer's x @ (W / sigma) make
    a Dense kernel 'io')."""
    first = Layout.parse(uses[0][0])
    transposed = [(spec, primitive) for spec, primitive in uses if _compatible(first, spec)]
    lookups = [spec for spec, primitive in transposed if primitive is _compat.gather_p]
    if lookups:
        return lookups[0]
    specs = [spec for spec, _ in transposed]
    return max(dict.fromkeys(specs), key=specs.count)


def _valid(spec: str) -> bool:
    return "i" in spec and "o" in spec


def _compatible(layout: Layout, spec: str) -> bool:
    # The same kernel used transposed (x @ E.T after E[ids]) swaps input and output roles.
    mine = str(layout)
    swapped = mine.translate(str.maketrans("io", "oi"))
    return spec in (mine, swapped)
