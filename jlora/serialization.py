"""jlora's nodes in Flax's state dicts: ``flax.serialization`` (``to_bytes``/``from_bytes``,
``to_state_dict``/``from_state_dict``) takes trees that hold ``LoraWeight`` and ``Trainable``, as
in a ``flax.training.train_state.TrainState`` with adapter params and their optimizer state.

A ``LoraWeight`` is stored as ``{"w": ..., "a": ..., "b": ...}`` (``None`` for a part that the
half of ``jlora.split`` leaves out); its scale, layout and path come from the target, as a
``flax.struct`` field marked static would. A ``Trainable`` is stored as the array it wraps.
Restoring checks each factor's shape against the target's, since the scale that goes with it is
the target's: a rank-16 state restored onto a rank-8 target is an error, not a wrong scale; a
``Trainable``'s too (a value of another shape would broadcast). A tree holding a lazy kind of
your own (a quantized kernel) needs that kind registered with
``flax.serialization.register_serialization_state``, or save the trainable half, which holds none.

A function exported with ``jax.export`` that takes such trees serializes too
(``Exported.serialize()``; JAX needs the ``flatbuffers`` package for it): a ``LoraWeight``'s
scale, layout, path and dropout rate are kept as JSON.

Example:
    >>> import jax, jax.numpy as jnp, flax, jlora
    >>> base = {"dense": {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}}
    >>> cfg = jlora.LoraConfig(rank=2, targets=["dense"], trainable=["bias"])
    >>> trainable, _ = jlora.split(jlora.lora_init(jax.random.key(0), base, cfg))
    >>> data = flax.serialization.to_bytes(trainable)
    >>> restored = flax.serialization.from_bytes(trainable, data)
    >>> restored["dense"]["kernel"].a.shape, type(restored["dense"]["bias"]).__name__
    ((4, 2), 'Trainable')
"""

from __future__ import annotations

import json
from typing import Any

from flax import serialization
from jax import export

from jlora.layout import Layout
from jlora.weight import LoraWeight, Trainable

_PARTS = ("w", "a", "b")


def _lora_to_state_dict(x: LoraWeight) -> dict[str, Any]:
    return {part: serialization.to_state_dict(getattr(x, part)) for part in _PARTS}


def _lora_from_state_dict(target: LoraWeight, state: Any) -> LoraWeight:
    where = f"LoraWeight {target.path or serialization.current_path()!r}"
    if not isinstance(state, dict) or set(state) != set(_PARTS):
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{where}: the state must be a dict with keys {list(_PARTS)}, got {got}")
    parts = {}
    for part in _PARTS:
        want, got = getattr(target, part), state[part]
        if (want is None) != (got is None):
            has, lacks = ("the state", "the target") if want is None else ("the target", "the state")
            raise ValueError(f"{where}: {has} has {part} and {lacks} has none; restore onto the same half of "
                             "jlora.split (the trainable half has no w) that was saved")
        parts[part] = _same_shape(want, serialization.from_state_dict(want, got, name=part), f"{where}: {part}")
    return target.replace(**parts)


def _same_shape(want: Any, restored: Any, what: str) -> Any:
    """``restored``, unless its shape is not the target's: another rank, or another model's leaf,
    would broadcast silently."""
    shape = tuple(getattr(restored, "shape", ()))
    if hasattr(want, "shape") and tuple(want.shape) != shape:
        raise ValueError(f"{what} has shape {shape} in the state but {tuple(want.shape)} in the target (another "
                         "rank or base model?)")
    return restored


def _trainable_to_state_dict(x: Trainable) -> Any:
    return serialization.to_state_dict(x.value)


def _trainable_from_state_dict(target: Trainable, state: Any) -> Trainable:
    restored = serialization.from_state_dict(target.value, state)
    return Trainable(_same_shape(target.value, restored, f"Trainable {serialization.current_path()!r}"))


serialization.register_serialization_state(LoraWeight, _lora_to_state_dict, _lora_from_state_dict)
serialization.register_serialization_state(Trainable, _trainable_to_state_dict, _trainable_from_state_dict)


def _lora_aux_to_bytes(aux: tuple) -> bytes:
    scale, layout, path, dropout = aux  # the layout's (role, k) per axis: its string leaves k out
    return json.dumps([scale, [list(axis) for axis in layout.axes], path, dropout]).encode()


def _lora_aux_from_bytes(data: bytes) -> tuple:
    scale, axes, path, dropout = json.loads(data)
    return scale, Layout(tuple(tuple(axis) for axis in axes)), path, dropout


export.register_pytree_node_serialization(LoraWeight, serialized_name="jlora.LoraWeight",
                                          serialize_auxdata=_lora_aux_to_bytes,
                                          deserialize_auxdata=_lora_aux_from_bytes)
export.register_pytree_node_serialization(Trainable, serialized_name="jlora.Trainable",
                                          serialize_auxdata=lambda aux: b"", deserialize_auxdata=lambda data: None)
