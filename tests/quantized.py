"""A quantized lazy kind of the tests' own (QLoRA's shape): an int8 kernel with a float scale per
output column, and its matmul rule. Importing this module registers the rule."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

import jlora


@jax.tree_util.register_pytree_node_class
class Int8Weight(jlora.Lazy):
    """``q * column_scale``: ``q`` int8, ``column_scale`` broadcast along the leading axes."""

    def __init__(self, q, column_scale):
        self.q, self.column_scale = q, column_scale

    shape = property(lambda self: self.q.shape)
    dtype = property(lambda self: self.column_scale.dtype)
    sharding = property(lambda self: getattr(self.q, "sharding", None))  # the kernel's: lora_init reads it

    def part_specs(self, spec: PartitionSpec) -> "Int8Weight":
        """``q`` shards as the kernel, the scales as the kernel's axes they span (the last ones)."""
        full = tuple(spec) + (None,) * (self.ndim - len(spec))
        return type(self)(spec, PartitionSpec(*full[self.ndim - self.column_scale.ndim:]))  # a subclass's own

    def materialize(self):
        return self.q.astype(self.column_scale.dtype) * self.column_scale

    def unstack(self):
        """Sliced per layer by ``lax.scan`` when the scales are per layer too (else ``None``:
        materialised, since shared scales must not be sliced)."""
        if self.column_scale.ndim != self.q.ndim or self.column_scale.shape[0] != self.q.shape[0]:
            return None
        return (self.q, self.column_scale), lambda parts: Int8Weight(*parts)

    def tree_flatten(self):
        return (self.q, self.column_scale), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


def quantize(w: jax.Array) -> Int8Weight:
    """Absmax int8 with one scale per index of the last axis."""
    scale = jnp.max(jnp.abs(w), axis=tuple(range(w.ndim - 1))) / 127
    scale = jnp.where(scale == 0, 1, scale).astype(w.dtype)
    return Int8Weight(jnp.round(w / scale).astype(jnp.int8), scale)


INT8_DOTS = []  # one entry per matmul the int8 rule computed


@jlora.register(jax.extend.core.primitives.dot_general_p, Int8Weight)
def _int8_dot(ctx, eqn, invals):
    """``x · w`` contracting w's first axis: the int8 matmul, then the scales of w's other axes.
    The matmul is the equation's own, bound to the int8 values cast to x's dtype
    (``evaluate_eqn``), so its other params hold (``preferred_element_type``, ``out_sharding``)."""
    x, w = invals
    (_, w_contract), (x_batch, w_batch) = eqn.params["dimension_numbers"]
    if not isinstance(w, Int8Weight) or isinstance(x, jlora.Lazy) or tuple(w_contract) != (0,) or x_batch or w_batch:
        return NotImplemented
    full = (1,) * (w.ndim - w.column_scale.ndim) + tuple(w.column_scale.shape)  # the scale's shape over w's axes
    if full[0] != 1:
        return NotImplemented
    INT8_DOTS.append(1)
    (y,) = jlora.lazy.evaluate_eqn(ctx, eqn, [x, w.q.astype(x.dtype)])
    return [(y * w.column_scale.reshape(full[1:])).astype(y.dtype)]


@jlora.register(jax.extend.core.primitives.convert_element_type_p, Int8Weight)
def _int8_convert(ctx, eqn, invals):
    """A cast of the kernel (a model computing in bf16) casts the scales: the int8 matmul still runs."""
    (w,) = invals
    new = eqn.params["new_dtype"]
    if not jnp.issubdtype(new, jnp.floating):
        return NotImplemented
    return [Int8Weight(w.q, w.column_scale.astype(new))]
