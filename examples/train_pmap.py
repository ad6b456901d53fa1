"""Data-parallel LoRA training with ``jax.pmap`` (for code written before ``jax.jit`` shardings).

Each device holds a replica of the model and the adapters; adapter gradients are averaged with
``lax.pmean`` (the only traffic between devices: base weights get no gradient). A small GPT-2
learns a counting task from synthetic tokens.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/train_pmap.py
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jlora
import jlora.hf


def replicate(tree: Any, n: int) -> Any:
    """One copy per device along a new leading axis (what ``pmap`` maps over)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (n, *x.shape)), tree)


def batches(step: int, n_devices: int, per_device: int, seq: int, vocab: int) -> np.ndarray:
    """``(devices, per_device, seq)`` tokens counting up from a random start by a random stride."""
    rng = np.random.default_rng(step)
    start, stride = rng.integers(0, vocab, (n_devices * per_device, 1)), rng.integers(1, 4, (n_devices * per_device, 1))
    tokens = (start + stride * np.arange(seq)) % vocab
    return tokens.reshape(n_devices, per_device, seq).astype(np.int32)


def train(steps: int = 30, per_device: int = 2, seq: int = 16, lr: float = 3e-3, n_devices: int | None = None,
          log: bool = True) -> dict:
    """Train on ``n_devices`` (default: all local ones); return ``{"losses", "params", "devices"}``
    with ``params`` from device 0."""
    from transformers import FlaxGPT2LMHeadModel, GPT2Config

    model = FlaxGPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=seq), seed=0)
    params = jlora.hf.lora_init(jax.random.key(1), model, jlora.LoraConfig(rank=8, alpha=16, targets="all-linear"))
    trainable, frozen = jlora.split(params)
    tx = jlora.optimizer(optax.adamw(lr), trainable)
    forward = jlora.apply(model.__call__)
    n = n_devices or jax.local_device_count()

    def loss_fn(trainable: Any, frozen: Any, tokens: jax.Array) -> jax.Array:
        logits = forward(tokens, params=jlora.combine(trainable, frozen)).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    @functools.partial(jax.pmap, axis_name="data", donate_argnums=(0, 2), devices=jax.local_devices()[:n])
    def step(trainable: Any, frozen: Any, opt_state: Any, tokens: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
        grads, loss = lax.pmean((grads, loss), axis_name="data")  # adapter grads only
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable, frozen = replicate(trainable, n), replicate(frozen, n)
    opt_state = jax.pmap(tx.init, devices=jax.local_devices()[:n])(trainable)
    losses = []
    for i in range(steps):
        trainable, opt_state, loss = step(trainable, frozen, opt_state, batches(i, n, per_device, seq, 64))
        losses.append(float(loss[0]))
        if log and (i % 10 == 0 or i == steps - 1):
            print(f"step {i:3d}  loss {losses[-1]:.4f}", flush=True)
    first = jax.tree.map(lambda x: x[0], jlora.combine(trainable, frozen))
    return {"losses": losses, "params": first, "devices": n}


if __name__ == "__main__":
    result = train()
    print(f"pmap over {result['devices']} devices: loss {result['losses'][0]:.3f} -> {result['losses'][-1]:.3f}")
    print(jlora.summary(result["params"]))
