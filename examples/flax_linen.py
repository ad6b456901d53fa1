"""LoRA on a Flax linen transformer whose layers are stacked with ``nn.scan`` and ``nn.remat``.

The model's kernels are 3-D (a leading layer axis) and its attention uses DenseGeneral, so
``lora_init`` is given ``infer_layout``: a function of the params that it traces abstractly to see
which axes of each kernel are batch, input and output. The model code is untouched.

    python examples/flax_linen.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
import flax.linen as nn

import jlora

VOCAB, DIM, HEADS, LAYERS, SEQ = 32, 64, 4, 4, 16


class Block(nn.Module):
    @nn.compact
    def __call__(self, h: jax.Array, _: None) -> tuple[jax.Array, None]:
        x = nn.LayerNorm(name="ln1")(h)
        q = nn.DenseGeneral((HEADS, DIM // HEADS), name="query")(x)
        k = nn.DenseGeneral((HEADS, DIM // HEADS), name="key")(x)
        v = nn.DenseGeneral((HEADS, DIM // HEADS), name="value")(x)
        mask = nn.make_causal_mask(jnp.ones(h.shape[:2]))
        att = nn.dot_product_attention(q, k, v, mask=mask)
        h = h + nn.DenseGeneral(DIM, axis=(-2, -1), name="out")(att)
        x = nn.LayerNorm(name="ln2")(h)
        h = h + nn.Dense(DIM, name="down")(nn.gelu(nn.Dense(4 * DIM, name="up")(x)))
        return h, None


class Transformer(nn.Module):
    @nn.compact
    def __call__(self, ids: jax.Array) -> jax.Array:
        embed = nn.Embed(VOCAB, DIM, name="embed")
        h = embed(ids) + self.param("pos", nn.initializers.normal(0.02), (SEQ, DIM))
        layers = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        h, _ = layers(name="layers")(h, None)
        return embed.attend(nn.LayerNorm(name="ln_f")(h))


def batch(key: jax.Array, offset: int, n: int = 64) -> jax.Array:
    """Sequences counting up by ``offset`` (mod VOCAB) from a random start."""
    start = jax.random.randint(key, (n, 1), 0, VOCAB)
    return (start + offset * jnp.arange(SEQ + 1)) % VOCAB


def next_token_loss(logits: jax.Array, seq: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()


def main() -> None:
    model = Transformer()
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"]  # one compile, not one per op

    def fit(loss_fn, p, frozen, tx, steps, offset):
        """Train ``p`` on ``loss_fn(p, frozen, seq)``; ``frozen`` is an argument of the step, not a constant."""
        state = tx.init(p)

        @jax.jit
        def step(p, frozen, state, key):
            loss, g = jax.value_and_grad(loss_fn)(p, frozen, batch(key, offset))
            u, state = tx.update(g, state, p)
            return optax.apply_updates(p, u), state, loss

        for i in range(steps):
            p, state, loss = step(p, frozen, state, jax.random.key(i))
        return p, float(loss)

    # A base model that counts by 1.
    base_loss = lambda p, _, seq: next_token_loss(model.apply({"params": p}, seq[:, :-1]), seq)
    params, loss = fit(base_loss, params, None, optax.adam(3e-3), 50, offset=1)
    print(f"base model (count by 1): loss {loss:.3f}")

    # LoRA teaches it to count by 3.
    example = jnp.zeros((1, SEQ), jnp.int32)
    cfg = jlora.LoraConfig(rank=8, alpha=16, targets=["query", "key", "value", "out", "up", "down"])
    lora = jlora.lora_init(jax.random.key(1), params, cfg,
                           infer_layout=lambda p: model.apply({"params": p}, example))
    print(jlora.summary(lora))
    forward = jlora.apply(model.apply)
    trainable, frozen = jlora.split(lora)
    lora_loss = lambda t, f, seq: next_token_loss(forward({"params": jlora.combine(t, f)}, seq[:, :-1]), seq)
    before = float(lora_loss(trainable, frozen, batch(jax.random.key(99), 3)))
    tx = jlora.optimizer(optax.adam(3e-3), trainable, b_lr_ratio=4.0)
    trainable, after = fit(lora_loss, trainable, frozen, tx, 50, 3)
    print(f"LoRA (count by 3): loss {before:.3f} -> {after:.3f}")

    lora = jlora.combine(trainable, frozen)
    seq = batch(jax.random.key(7), 3)[:, :-1]
    gap = jnp.abs(model.apply({"params": jlora.merge(lora)}, seq) - forward({"params": lora}, seq)).max()
    print(f"merged vs lazy max |difference|: {float(gap):.2e}")
    assert after < 0.5 * before


if __name__ == "__main__":
    main()
