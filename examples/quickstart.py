"""Quickstart: LoRA fine-tuning of a plain-JAX MLP, end to end, in a few seconds on a CPU.

A base MLP is first trained on one regression task; LoRA then adapts it to a shifted task while
the base weights stay frozen. Prints the trainable-parameter summary, the loss before and after,
and checks that the merged weights run the unmodified function with the same result.

    python examples/quickstart.py
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import jlora

WIDTH, DEPTH, STEPS = 256, 4, 300


def mlp(params: dict, x: jax.Array) -> jax.Array:
    """An ordinary JAX function: it knows nothing about LoRA."""
    for i in range(DEPTH):
        layer = params[f"layer{i}"]
        x = x @ layer["kernel"] + layer["bias"]
        if i < DEPTH - 1:
            x = jax.nn.gelu(x)
    return x


def init_mlp(key: jax.Array) -> dict:
    dims = [16] + [WIDTH] * (DEPTH - 1) + [1]
    keys = jax.random.split(key, DEPTH)
    return {
        f"layer{i}": {
            "kernel": jax.random.normal(keys[i], (dims[i], dims[i + 1])) / jnp.sqrt(dims[i]),
            "bias": jnp.zeros(dims[i + 1]),
        }
        for i in range(DEPTH)
    }


def task(key: jax.Array, shift: float, n: int = 512) -> tuple[jax.Array, jax.Array]:
    x = jax.random.normal(key, (n, 16))
    y = jnp.sin(x[:, :4].sum(-1, keepdims=True) + shift) + 0.5 * x[:, 4:5] * shift
    return x, y


def train(loss_fn, params, tx, steps: int, *args):
    """``steps`` of ``tx`` on ``loss_fn(params, *args)``. ``args`` (frozen weights, data) are passed to
    the jitted step, not closed over: a closed-over array would be compiled in as a constant."""
    state = tx.init(params)

    @jax.jit
    def step(params, state, *args):
        loss, grads = jax.value_and_grad(loss_fn)(params, *args)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    for _ in range(steps):
        params, state, loss = step(params, state, *args)
    return params, float(loss)


def main() -> None:
    key = jax.random.key(0)
    base = init_mlp(key)

    # 1. A base model for task A.
    xa, ya = task(jax.random.key(1), shift=0.0)
    base, loss_a = train(lambda p, x, y: jnp.mean((mlp(p, x) - y) ** 2), base, optax.adam(1e-3), STEPS, xa, ya)
    print(f"base model, task A loss: {loss_a:.2e}")

    # 2. LoRA on task B: adapters on the hidden layers, the 1-output head fully trained.
    xb, yb = task(jax.random.key(2), shift=1.0)
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=["layer0", "layer1", "layer2"], trainable=["layer3"])
    params = jlora.lora_init(jax.random.key(3), base, cfg)
    print(jlora.summary(params))

    forward = jlora.apply(mlp)
    tx = jlora.optimizer(optax.adam(1e-3), params, b_lr_ratio=4.0)
    trainable, frozen = jlora.split(params)

    def loss_fn(trainable, frozen, x, y):
        return jnp.mean((forward(jlora.combine(trainable, frozen), x) - y) ** 2)

    before = float(loss_fn(trainable, frozen, xb, yb))
    start = time.perf_counter()
    trainable, after = train(loss_fn, trainable, tx, STEPS, frozen, xb, yb)
    print(f"task B loss: {before:.3e} -> {after:.3e} with LoRA ({STEPS} steps, {time.perf_counter() - start:.1f} s)")
    params = jlora.combine(trainable, frozen)

    # 3. Serve merged: plain arrays, the unmodified function, the same outputs.
    merged = jlora.merge(params)
    gap = float(jnp.abs(mlp(merged, xb) - forward(params, xb)).max())
    print(f"merged vs lazy max |difference|: {gap:.2e}")
    assert after < 0.5 * before and gap < 1e-4


if __name__ == "__main__":
    main()
