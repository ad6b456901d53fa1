"""A base kernel's fingerprint: what an adapter file keeps of the kernels it was trained over, so
that loading it over another base of the same shapes (a random init where the pretrained model was
meant, another checkpoint, a base that an init such as PiSSA changed) is said, not silent.

A kernel's fingerprint is ``K`` numbers: signed sums of a strided sample of its values (about 4096
of them), each sign a fixed hash of the element's place in the sample, over the sample's norm.
Two unrelated kernels give independent standard normals; the same kernel in another precision
moves each by about its relative rounding (bf16: 0.002; an 8-bit float: 0.04), well inside
``TOLERANCE``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.weight import Lazy

K = 4
TOLERANCE = 0.25  # the mean distance of two fingerprints, above which the kernels are others
_SAMPLE = 4096


def fingerprint(w: Any) -> list[float] | None:
    """``w``'s fingerprint (``K`` numbers), or ``None`` where ``w`` holds no values (an abstract
    ``jax.ShapeDtypeStruct``, a tracer) or no floats.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jlora.fingerprint import fingerprint, same
        >>> w = jax.random.normal(jax.random.key(0), (64, 64))
        >>> same(fingerprint(w), fingerprint(w.astype(jnp.bfloat16))), same(fingerprint(w), fingerprint(w.T))
        (True, False)
    """
    if isinstance(w, Lazy):  # a quantized base: its values, dequantized
        if any(isinstance(x, jax.core.Tracer) or not hasattr(x, "__array__") for x in jax.tree.leaves(w)):
            return None
    elif (isinstance(w, jax.core.Tracer) or not hasattr(w, "__array__") or isinstance(w, jax.ShapeDtypeStruct)
          or not jnp.issubdtype(w.dtype, jnp.floating)):
        return None
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(w)):
        return None  # split over processes: no collective in a save that process 0 may make alone
    try:  # a gather JAX refuses (a mesh with Explicit axes): no fingerprint rather than no save
        return _fingerprint(w)
    except Exception:  # noqa: BLE001
        return None


def _fingerprint(w: Any) -> list[float]:
    values = w.materialize() if isinstance(w, Lazy) else w
    per_axis = max(1, round(_SAMPLE ** (1 / max(values.ndim, 1))))
    # the sample taken where w is (a numpy base is not copied to a device whole)
    sample = values[tuple(slice(None, None, -(-d // per_axis)) for d in values.shape)]
    return [round(float(z), 4) for z in np.asarray(_numbers(jnp.asarray(sample)))]


@jax.jit
def _numbers(sample: jax.Array) -> jax.Array:
    x = sample.astype(jnp.float32).reshape(-1)
    index = jax.lax.iota(jnp.uint32, x.size)
    sums = []
    for k in range(K):  # a fixed integer hash (exact on every device) gives each element's sign
        h = index * jnp.uint32(0x9E3779B1) + jnp.uint32((k + 1) * 0x85EBCA77 % 2**32)
        h = (h ^ (h >> 16)) * jnp.uint32(0x45D9F3B)
        h = h ^ (h >> 16)
        sums.append(jnp.sum(jnp.where(h & 1, -x, x)))
    norm = jnp.sqrt(jnp.sum(x * x))
    return jnp.stack(sums) / jnp.where(norm > 0, norm, 1.0)


def same(saved: Any, here: Any) -> bool:
    """Whether two fingerprints are of one kernel (up to its precision); ``True`` where either is
    missing or not a fingerprint (an older file's, an abstract base's).

    Example:
        >>> from jlora.fingerprint import same
        >>> same([0.1, -0.5, 1.2, 0.0], [0.1, -0.49, 1.21, 0.0]), same([0.1, -0.5, 1.2, 0.0], [1.4, 0.3, -0.2, 0.9])
        (True, False)
    """
    if not (isinstance(saved, list) and isinstance(here, list) and len(saved) == len(here) == K):
        return True
    if not all(isinstance(z, float) and math.isfinite(z) for z in [*saved, *here]):
        return True
    return sum(abs(a - b) for a, b in zip(saved, here)) / K <= TOLERANCE


def warn_other_base(source: str, saved: dict[str, Any], base: dict[str, Any], stacklevel: int) -> None:
    """Warn where an adapter read from ``source`` goes over kernels other than those it was saved
    over: ``saved`` their fingerprints by param path, ``base`` the kernels it is loaded onto.

    Example:
        >>> import warnings, jax, jax.numpy as jnp
        >>> from jlora.fingerprint import fingerprint, warn_other_base
        >>> w = jax.random.normal(jax.random.key(0), (8, 8))
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     warn_other_base("adapter/", {"q": fingerprint(w)}, {"q": w.T}, stacklevel=2)
        >>> "the base differs" in str(seen[0].message)
        True
    """
    other = [p for p, kept in saved.items() if p in base and not same(kept, fingerprint(base[p]))]
    if other:
        warnings.warn(f"{source}: the base differs from the one the adapter was saved over at {len(other)} of "
                      f"{len(saved)} adapted kernels ({other[:3]}): a random init where the pretrained model was "
                      "meant (from_config, not from_pretrained?), another checkpoint, or a base its init changed "
                      "(PiSSA)? The adapter is added to this base as it is", stacklevel=stacklevel + 1)
