"""Train-step benchmark of a mixture-of-experts stack whose experts run as one grouped matmul
(``lax.ragged_dot``, tokens sorted by expert): LoRA on every expert's kernels, in one run.

Each mode runs in its own process; the driver prints one table with ratios against the frozen
floor and the full fine-tune measured in the same run.

    python benchmarks/moe_step.py                  # small, runs on a CPU in a minute
    python benchmarks/moe_step.py --preset gpu     # 8 experts of 2048 -> 5632, bf16, 8192 tokens
    python benchmarks/moe_step.py --preset gpu --set experts=64 --set rank=8 --modes jlora-dense,jlora-grouped

Modes:
  full         grads for every expert kernel + adamw on all of them
  floor        backward through every layer with no weight gradient (grad w.r.t. the input only)
  jlora        jlora.apply over the unmodified step: each expert's own rank-r adapter (``bio``);
               with 8 experts of rank 16 (128 ranks in all, up to ``jlora.rules.DENSE_EXPERT_RANKS``)
               the low-rank path runs as dense matmuls over all experts' factors, masked per row
  jlora-grouped  the same with the low-rank path as grouped matmuls,
               ``ragged_dot(x, w) + ragged_dot(ragged_dot(x, s·a), b)``
  jlora-dense  the same in the dense form, whatever the experts' ranks in all
  hand         the same sum written by hand (the factored baseline)
  hand-dense   the same adapters by dense matmuls over all experts' factors at once, masked per
               row (``(x @ [a_1 .. a_E]) * onehot @ [b_1 ; .. ; b_E]``): no ragged contraction in
               the backward, E times the low-rank FLOPs
  materialize  the same LoRA computed by forming ``W + s·A@B`` for every expert
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from child import adapter_step, exit_if_failed, run_child, timed_steps  # benchmarks/child.py (this folder is on sys.path when run as a script)

PRESETS = {
    "cpu": dict(hidden=64, ffn=128, experts=4, layers=2, tokens=256, rank=4, dtype="float32", steps=5),
    "gpu": dict(hidden=2048, ffn=5632, experts=8, layers=4, tokens=8192, rank=16, dtype="bfloat16", steps=10),
}
MODES = ("full", "floor", "jlora", "jlora-grouped", "jlora-dense", "hand", "hand-dense", "materialize")
KERNELS = ("w_gate", "w_up", "w_down")


def moe_layer(p: dict, x: Any, grouped: Any) -> Any:
    """Top-1 routing: tokens sorted by expert, gate and up, SiLU, down, back in token order,
    weighed by the router's probability. ``grouped(x, name, sizes)`` is ``x @ W_name`` per group."""
    import jax
    import jax.numpy as jnp

    h = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + 1e-6).astype(x.dtype)
    probs = jax.nn.softmax((h @ p["router"]).astype(jnp.float32), -1)
    expert = jnp.argmax(probs, -1)
    order = jnp.argsort(expert)
    sizes = jnp.bincount(expert, length=p["router"].shape[-1]).astype(jnp.int32)
    hs = h[order]
    act = jax.nn.silu(grouped(hs, "w_gate", sizes)) * grouped(hs, "w_up", sizes)
    y = jnp.zeros_like(x).at[order].set(grouped(act, "w_down", sizes))
    return x + y * jnp.take_along_axis(probs, expert[:, None], -1).astype(x.dtype)


def run_mode(mode: str, preset: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jlora

    dtype = jnp.dtype(preset["dtype"])
    d, f, e, n = preset["hidden"], preset["ffn"], preset["experts"], preset["tokens"]
    key = jax.random.key(0)
    shapes = {"router": (d, e), "w_gate": (e, d, f), "w_up": (e, d, f), "w_down": (e, f, d)}
    params = [{name: (0.02 * jax.random.normal(jax.random.fold_in(key, 10 * i + j), s)).astype(dtype)
               for j, (name, s) in enumerate(shapes.items())} for i in range(preset["layers"])]
    x = jax.random.normal(jax.random.key(1), (n, d), dtype)
    target = jax.random.normal(jax.random.key(2), (n, d), dtype)

    def plain(p: dict) -> Any:
        return lambda h, name, sizes: jax.lax.ragged_dot(h, p[name], sizes)

    def run_plain(layers: list, x: Any, grouped: Any = plain) -> Any:
        out = x
        for p in layers:
            out = moe_layer(p, out, grouped(p))
        return jnp.mean(jnp.square((out - target).astype(jnp.float32)))

    tx = optax.adamw(1e-4)
    cfg = jlora.LoraConfig(rank=preset["rank"], alpha=2 * preset["rank"], targets=list(KERNELS),
                           layouts={name: "bio" for name in KERNELS})
    if mode == "full":
        train, frozen, state = params, None, tx.init(params)

        def step(t, s, frozen):
            loss, g = jax.value_and_grad(run_plain)(t, x)
            u, s = tx.update(g, s, t)
            return optax.apply_updates(t, u), s, loss
    elif mode == "floor":
        train, frozen, state = jnp.zeros_like(x), params, ()

        def step(t, s, frozen):
            loss, g = jax.value_and_grad(lambda d: run_plain(frozen, x + d))(t)
            return g, s, loss
    else:
        lora = jlora.lora_init(jax.random.key(3), params, cfg)
        lora = jax.tree.map(lambda v: v.replace(b=jnp.full_like(v.b, 0.01)) if isinstance(v, jlora.LoraWeight) else v,
                            lora, is_leaf=lambda v: isinstance(v, jlora.LoraWeight))
        train, frozen = jlora.split(lora)
        opt = jlora.optimizer(tx, train)
        state = opt.init(train)
        if mode in ("jlora", "jlora-grouped", "jlora-dense"):
            if mode != "jlora":
                jlora.rules.DENSE_EXPERT_RANKS = 0 if mode == "jlora-grouped" else e * preset["rank"]
            forward = jlora.apply(run_plain)
            loss_fn = lambda t, frozen: forward(jlora.combine(t, frozen), x)
        elif mode == "materialize":
            loss_fn = lambda t, frozen: run_plain(jlora.merge(jlora.combine(t, frozen)), x)
        elif mode == "hand":
            def factored(p: dict) -> Any:
                def grouped(h, name, sizes):
                    lw = p[name]
                    low = jax.lax.ragged_dot(h, (lw.scale * lw.a).astype(h.dtype), sizes)
                    return (jax.lax.ragged_dot(h, jax.lax.stop_gradient(lw.w), sizes)
                            + jax.lax.ragged_dot(low, lw.b.astype(h.dtype), sizes))
                return grouped

            loss_fn = lambda t, frozen: run_plain(jlora.combine(t, frozen), x, factored)
        elif mode == "hand-dense":
            def dense(p: dict) -> Any:
                def grouped(h, name, sizes):
                    lw = p[name]
                    rows = jnp.arange(h.shape[0])
                    expert = jnp.searchsorted(jnp.cumsum(sizes), rows, side="right")  # E: in no group
                    onehot = (expert[:, None] == jnp.arange(e)).astype(h.dtype)
                    n_in, r = lw.a.shape[1], lw.a.shape[2]
                    a_all = jnp.moveaxis((lw.scale * lw.a).astype(h.dtype), 0, 1).reshape(n_in, e * r)
                    t = (h @ a_all).reshape(-1, e, r) * onehot[:, :, None]
                    low = t.reshape(-1, e * r) @ lw.b.astype(h.dtype).reshape(e * r, -1)
                    return jax.lax.ragged_dot(h, jax.lax.stop_gradient(lw.w), sizes) + low
                return grouped

            loss_fn = lambda t, frozen: run_plain(jlora.combine(t, frozen), x, dense)
        else:
            raise ValueError(mode)

        step = adapter_step(loss_fn, opt)

    jitted = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = jitted.lower(train, state, frozen).compile()
    compile_s = time.perf_counter() - t0
    train, state, loss, step_s = timed_steps(compiled, train, state, frozen, preset["steps"])
    stats = jax.local_devices()[0].memory_stats() or {}
    return dict(mode=mode, step_ms=1e3 * step_s, tokens_per_s=n / step_s, compile_s=compile_s,
                peak_bytes=stats.get("peak_bytes_in_use"), loss=float(loss),
                device=str(jax.devices()[0].device_kind), jax=jax.__version__)


def with_overrides(preset: dict, settings: list[str]) -> dict:
    """The preset with ``KEY=VALUE`` entries replaced, each value of the type it replaces.

    Example:
        >>> with_overrides(PRESETS["cpu"], ["experts=8", "dtype=bfloat16"])["experts"]
        8
    """
    out = dict(preset)
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in out:
            raise SystemExit(f"--set {setting!r}: expected KEY=VALUE with KEY one of {sorted(out)}")
        out[key] = type(out[key])(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one of the preset's entries, e.g. --set experts=32 (repeatable)")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    parser.add_argument("--json-out", default=None, help="also write all results to this JSON file")
    args = parser.parse_args()
    preset = with_overrides(PRESETS[args.preset], args.set)
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args.mode, preset)), flush=True)
        return
    modes, results = args.modes.split(","), {}
    for mode in modes:
        result = run_child(__file__, ["--preset", args.preset, *(f"--set={kv}" for kv in args.set), "--mode", mode], mode)
        if result is not None:
            results[mode] = result
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(dict(preset=args.preset, config=preset, results=results), f, indent=2)
    if results:
        print_table(args.preset, preset, results)
    exit_if_failed([m for m in modes if m not in results])


def print_table(preset_name: str, preset: dict, results: dict) -> None:
    any_r = next(iter(results.values()))
    print(f"\npreset {preset_name} {preset}; device {any_r['device']}; jax {any_r['jax']}")
    floor = results.get("floor", {}).get("tokens_per_s")
    full = results.get("full", {})
    print(f"{'mode':<13}{'ms/step':>9}{'tokens/s':>11}{'x floor':>9}{'x full':>8}{'peak GiB':>10}{'compile s':>11}")
    for mode, r in results.items():
        xf = f"{r['tokens_per_s'] / floor:.3f}" if floor else "-"
        xu = f"{r['tokens_per_s'] / full['tokens_per_s']:.3f}" if full else "-"
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r["peak_bytes"] else "-"
        print(f"{mode:<13}{r['step_ms']:>9.1f}{r['tokens_per_s']:>11.0f}{xf:>9}{xu:>8}{peak:>10}{r['compile_s']:>11.1f}")


if __name__ == "__main__":
    main()
