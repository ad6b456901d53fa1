"""A LoRA training step over a quantized base that the model dequantises itself.

``--layers`` Llama MLP blocks, ``(silu(x@gate) * (x@up)) @ down``, whose kernels are stored in
float8 (e4m3) with a per-output-channel scale, and which the model dequantises before each matmul:
``x @ (w.astype(bf16) * s)``, the usual recipe of an fp8 or int8 checkpoint. Rank-``--rank``
adapters on all three kernels, bf16 activations, Adam on the adapters. jlora: the model as it
is, under ``jlora.apply``. Baseline, in the same run: the same step written by hand with the scale
folded into the adapter, ``x @ (w·C) + scale·(x@a)@(b·c)``. Prints, for each, the compiled step's
scratch memory (``memory_analysis().temp_size_in_bytes``) and time (least of ``--steps``), and
jlora's ratios to the baseline; the first losses are checked to agree.

    python benchmarks/quantized.py
    python benchmarks/quantized.py --layers 8 --tokens 4096
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from serve import report  # benchmarks/serve.py (this folder is on sys.path when run as a script)

TARGETS = ("gate", "up", "down")
FP8, BF16 = jnp.float8_e4m3fn, jnp.bfloat16


def dequantised(layer: dict, name: str) -> jax.Array:
    return layer[name]["kernel"].astype(BF16) * layer[name]["scale"].astype(BF16)


def model(params: dict, x: jax.Array) -> jax.Array:
    for layer in params["layers"]:
        dense = lambda h, name: h @ dequantised(layer, name)
        x = x + dense(jax.nn.silu(dense(x, "gate")) * dense(x, "up"), "down")
    return x


def hand(trainable: dict, frozen: dict, x: jax.Array) -> jax.Array:
    """The model with each adapter added by hand, the scale folded into ``b``."""
    for adapters, layer in zip(trainable["layers"], frozen["layers"]):
        def dense(h, name):
            lw, scale = adapters[name]["kernel"], layer[name]["scale"].astype(BF16)
            w = layer[name]["kernel"].w.astype(BF16) * scale
            b = (lw.scale * lw.b).astype(BF16) * scale
            return h @ w + (h @ lw.a.astype(BF16)) @ b
        x = x + dense(jax.nn.silu(dense(x, "gate")) * dense(x, "up"), "down")
    return x


def step_of(forward, tx):
    def loss(trainable, frozen, x):
        return jnp.mean(forward(trainable, frozen, x).astype(jnp.float32) ** 2)

    def step(trainable, state, frozen, x):
        value, grads = jax.value_and_grad(loss)(trainable, frozen, x)
        updates, state = tx.update(grads, state, trainable)
        return optax.apply_updates(trainable, updates), state, value

    return step


def measure(step, args: tuple, steps: int) -> tuple[float, float, float]:
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    trainable, state, frozen, x = args
    trainable, state, first = compiled(jax.tree.map(jnp.copy, trainable), jax.tree.map(jnp.copy, state), frozen, x)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainable, state, value = compiled(trainable, state, frozen, x)
        jax.block_until_ready(value)
        times.append(time.perf_counter() - start)
    return compiled.memory_analysis().temp_size_in_bytes / 2**20, min(times) * 1e3, float(first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    d, f = args.width, args.hidden
    keys = iter(jax.random.split(jax.random.key(0), 3 * args.layers + 2))

    def quantized(shape):
        w = 0.02 * jax.random.normal(next(keys), shape)
        scale = jnp.max(jnp.abs(w), axis=0) / 448.0  # per output channel, fp8 e4m3's range
        return {"kernel": (w / scale).astype(FP8), "scale": scale}

    base = {"layers": [{"gate": quantized((d, f)), "up": quantized((d, f)), "down": quantized((f, d))}
                       for _ in range(args.layers)]}
    params = jlora.lora_init(next(keys), base, jlora.LoraConfig(rank=args.rank, targets=list(TARGETS)))
    params = jax.tree.map(lambda x: x.replace(b=jnp.full_like(x.b, 0.01)) if isinstance(x, jlora.LoraWeight) else x,
                          params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))  # b not zero
    trainable, frozen = jlora.split(params)
    tx = jlora.optimizer(optax.adam(1e-3), trainable)
    x = jax.random.normal(next(keys), (args.tokens, d)).astype(BF16)
    lazy = jlora.apply(model)
    ours = measure(step_of(lambda t, f, x: lazy(jlora.combine(t, f), x), tx), (trainable, tx.init(trainable), frozen, x),
                   args.steps)
    theirs = measure(step_of(hand, tx), (trainable, tx.init(trainable), frozen, x), args.steps)
    np.testing.assert_allclose(ours[2], theirs[2], rtol=2e-2)
    report(f"{args.layers} MLP blocks {d}x{f}, fp8 kernels with per-channel scales, rank {args.rank}, {args.tokens} tokens",
           ours, theirs)


if __name__ == "__main__":
    main()
