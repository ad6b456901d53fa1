"""Several adapters served over one base: each batch row with its own adapter (multi-tenant LoRA).

A Llama MLP block, ``(silu(x@gate) * (x@up)) @ down``, with ``--adapters`` rank-``--rank``
adapters on all three kernels, one per row of a batch of ``--tokens`` tokens a row. jlora: the
adapters' trainable halves stacked (``jlora.stack``) and ``jax.vmap`` over them around
``jlora.apply``, with one frozen half. Baseline, in the same run: the same block written by hand,
``x@w + scale·(x@a_i)@b_i`` per row with the base matmul shared. Prints, for each, the compiled
call's scratch memory (``memory_analysis().temp_size_in_bytes``) and time (least of ``--calls``),
and jlora's ratios to the baseline; the outputs are checked to agree.

    python benchmarks/serve.py
    python benchmarks/serve.py --adapters 32 --tokens 256
    python benchmarks/serve.py --inner jit    # a jax.jit (or checkpoint) between the vmap and jlora.apply
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jlora

TARGETS = ("gate", "up", "down")


def mlp(p, x):
    return (jax.nn.silu(x @ p["gate"]["kernel"]) * (x @ p["up"]["kernel"])) @ p["down"]["kernel"]


def hand(halves, frozen, x):
    """The block with each row's adapter added by hand: the base matmuls shared by all rows."""
    def dense(name, h):
        lw = halves[name]["kernel"]
        return h @ frozen[name]["kernel"].w + lw.scale * jnp.einsum("ntr,nro->nto", jnp.einsum("nti,nir->ntr", h, lw.a), lw.b)
    return dense("down", jax.nn.silu(dense("gate", x)) * dense("up", x))


def measure(fn, *args, calls: int) -> tuple[float, float, jax.Array]:
    compiled = jax.jit(fn).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return compiled.memory_analysis().temp_size_in_bytes / 2**20, min(times) * 1e3, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens a row")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=2816)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--inner", choices=["none", "jit", "checkpoint"], default="none",
                        help="what stands between the vmap and jlora.apply, hiding the mapping from it")
    args = parser.parse_args()
    keys = jax.random.split(jax.random.key(0), 5)
    d, f = args.width, args.hidden
    base = {"gate": {"kernel": 0.02 * jax.random.normal(keys[0], (d, f))},
            "up": {"kernel": 0.02 * jax.random.normal(keys[1], (d, f))},
            "down": {"kernel": 0.02 * jax.random.normal(keys[2], (f, d))}}
    params = jlora.lora_init(keys[3], base, jlora.LoraConfig(rank=args.rank, targets=list(TARGETS)))
    trainable, frozen = jlora.split(params)
    halves = [jax.tree.map(lambda x: x + 0.01 * (i + 1), trainable) for i in range(args.adapters)]  # b not zero
    stacked = jlora.stack(halves)
    xs = jax.random.normal(keys[4], (args.adapters, args.tokens, d))
    inner = {"none": lambda f: f, "jit": jax.jit, "checkpoint": jax.checkpoint}[args.inner]
    served = jax.vmap(inner(lambda t, x: jlora.apply(mlp)(jlora.combine(t, frozen), x)))
    ours = measure(served, stacked, xs, calls=args.calls)
    theirs = measure(lambda t, x: hand(t, frozen, x), stacked, xs, calls=args.calls)
    np.testing.assert_allclose(ours[2], theirs[2], rtol=2e-4, atol=2e-5)
    report(f"{args.adapters} adapters (rank {args.rank}) over one {d}x{f} MLP block, {args.tokens} tokens a row"
           + ("" if args.inner == "none" else f", a jax.{args.inner} inside the vmap"), ours, theirs)


def report(title: str, ours: tuple, theirs: tuple) -> None:
    """Print jlora's and the hand-written baseline's ``(scratch MiB, ms, ...)``, and their ratios."""
    print(f"{title}; {jax.devices()[0].device_kind}, jax {jax.__version__}")
    for name, (scratch, ms, *_) in (("jlora", ours), ("hand-written", theirs)):
        print(f"{name:<14}scratch {scratch:8.1f} MiB, {ms:8.2f} ms")
    print(f"x hand: scratch {ours[0] / theirs[0]:.2f}, time {ours[1] / theirs[1]:.2f}")


if __name__ == "__main__":
    main()
