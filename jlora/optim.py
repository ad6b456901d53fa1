"""``optimizer``: train adapters only, with LoRA+ learning rates for ``b``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from jlora.tree import FROZEN, labels
from jlora.weight import LoraWeight, is_node

ADAPTER = "adapter"


class ScaleLoraBState(NamedTuple):
    pass


def scale_lora_b(ratio: float) -> optax.GradientTransformation:
    """Multiply the updates of every ``LoraWeight.b`` by ``ratio`` (LoRA+: ``lr_b = ratio·lr_a``).

    Example:
        >>> tx = optax.chain(optax.sgd(1e-3), scale_lora_b(16.0))
    """

    def init(params: Any) -> ScaleLoraBState:
        return ScaleLoraBState()

    def update(updates: Any, state: ScaleLoraBState, params: Any = None) -> Any:
        def one(x: Any) -> Any:
            if isinstance(x, LoraWeight) and hasattr(x.b, "dtype"):
                return x.replace(b=(x.b * ratio).astype(x.b.dtype))
            return x

        return jax.tree.map(one, updates, is_leaf=is_node), state

    return optax.GradientTransformation(init, update)


def _group(params: Any) -> Any:
    return jax.tree.map(lambda label: FROZEN if label == FROZEN else ADAPTER, labels(params))


def optimizer(tx: optax.GradientTransformation, params: Any = None, b_lr_ratio: float = 1.0) -> optax.GradientTransformation:
    """``optax.multi_transform`` that freezes base weights and trains adapters with ``tx``.

    Leaves labelled ``frozen`` (see ``jlora.labels``) get ``optax.set_to_zero()`` and no state.
    ``lora_a``, ``lora_b`` and ``trainable`` leaves share one ``tx`` — so a clipping or global-norm
    transform inside ``tx`` sees all adapter gradients together and nothing else — followed by a
    scale of ``b_lr_ratio`` on ``lora_b`` updates (LoRA+). Works on the full tree or on the trainable
    half of ``jlora.split``. ``params``, if given, is checked to hold at least one adapter.

    Example:
        >>> import jax.numpy as jnp
        >>> lw = LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0)
        >>> tx = optimizer(optax.adam(1e-3), {"k": lw}, b_lr_ratio=16.0)
        >>> state = tx.init({"k": lw})
    """
    if b_lr_ratio <= 0:
        raise ValueError(f"jlora.optimizer: b_lr_ratio must be > 0, got {b_lr_ratio}")
    if params is not None and not any(is_node(x) for x in jax.tree.leaves(params, is_leaf=is_node)):
        raise ValueError("jlora.optimizer: params hold no LoraWeight or Trainable leaf; call jlora.lora_init first")
    adapter = tx if b_lr_ratio == 1.0 else optax.chain(tx, scale_lora_b(b_lr_ratio))
    return optax.multi_transform({FROZEN: optax.set_to_zero(), ADAPTER: adapter}, _group)
