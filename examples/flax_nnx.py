"""LoRA on a Flax NNX model: ``nnx.split`` gives a state pytree, jlora adapts it, ``nnx.merge``
inside the wrapped function rebuilds the module on every call (under jit this costs nothing).

    python examples/flax_nnx.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jlora


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(8, 128, rngs=rngs)
        self.mid = nnx.Linear(128, 128, rngs=rngs)
        self.head = nnx.Linear(128, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.head(nnx.relu(self.mid(nnx.relu(self.up(x)))))


def main() -> None:
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))

    def run(state, x):
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.key(1), (256, 8))
    y = jnp.cos(x[:, :1] * 2) + x[:, 1:2]

    cfg = jlora.LoraConfig(rank=4, alpha=8, targets=["up", "mid"], trainable=["head"])
    params = jlora.lora_init(jax.random.key(2), state, cfg)
    print(jlora.summary(params))
    forward = jlora.apply(run)
    trainable, frozen = jlora.split(params)
    tx = jlora.optimizer(optax.adam(1e-2), trainable, b_lr_ratio=8.0)
    opt_state = tx.init(trainable)

    @jax.jit
    def step(trainable, frozen, opt_state, x, y):  # arguments, not closed over: no baked-in constants
        loss, g = jax.value_and_grad(lambda t: jnp.mean((forward(jlora.combine(t, frozen), x) - y) ** 2))(trainable)
        updates, opt_state = tx.update(g, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    first = None
    for _ in range(200):
        trainable, opt_state, loss = step(trainable, frozen, opt_state, x, y)
        first = float(loss) if first is None else first
    print(f"loss {first:.4f} -> {float(loss):.4f}")

    # Put the merged weights back into a plain NNX module.
    model = nnx.merge(graphdef, jlora.merge(jlora.combine(trainable, frozen)))
    gap = float(jnp.abs(model(x) - forward(jlora.combine(trainable, frozen), x)).max())
    print(f"merged NNX module vs lazy max |difference|: {gap:.2e}")
    assert float(loss) < 0.5 * first and gap < 1e-4


if __name__ == "__main__":
    main()
