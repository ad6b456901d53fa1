"""jlora: LoRA as a pytree transform for any JAX function.

Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> base = {"dense": {"kernel": jnp.ones((8, 8)), "bias": jnp.zeros(8)}}
    >>> params = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["dense"]))
    >>> forward = jlora.apply(lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"])
    >>> forward(params, jnp.ones((1, 8))).shape
    (1, 8)
"""

from jlora import control as _control  # noqa: F401  (registers higher-order rules)
from jlora import probe as _probe  # noqa: F401  (registers layout-inference rules)
from jlora import rules as _rules  # noqa: F401  (registers LoraWeight rules)
from jlora import structural as _structural  # noqa: F401  (registers LoraWeight rules)
from jlora import serialization as _serialization  # noqa: F401  (registers jlora's nodes with flax.serialization)
from jlora.config import LoraConfig
from jlora.init import lora_init
from jlora.layout import Layout
from jlora.lazy import MaterializeWarning, apply, register
from jlora.mix import mix
from jlora.optim import optimizer, scale_lora_b
from jlora.tree import Summary, base, combine, labels, merge, split, stack, summary, unmerge
from jlora.weight import Lazy, LoraWeight, Trainable

__version__ = "0.1.0"


_ON_FIRST_USE = ("adapter", "checkpoint", "cli", "data", "finetune", "hf", "peft", "sharding", "tokens")


def __getattr__(name: str):
    # Submodules not imported with jlora (checkpoint brings in orbax; hf and peft need the "hf"
    # extra at use) load on first access: ``jlora.peft.save_adapter`` works after ``import jlora``.
    if name in _ON_FIRST_USE:
        import importlib

        return importlib.import_module(f"jlora.{name}")
    raise AttributeError(f"module 'jlora' has no attribute {name!r}")


__all__ = [
    "Layout",
    "Lazy",
    "LoraConfig",
    "LoraWeight",
    "MaterializeWarning",
    "Summary",
    "Trainable",
    "apply",
    "base",
    "combine",
    "labels",
    "lora_init",
    "merge",
    "mix",
    "optimizer",
    "register",
    "scale_lora_b",
    "split",
    "stack",
    "summary",
    "unmerge",
]
