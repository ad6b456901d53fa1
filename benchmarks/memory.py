"""Memory of a LoRA train step, from XLA's compile-time ``compiled.memory_analysis()`` (no timing).

For each HF Flax model (GPT-2 and Llama as causal LMs, BERT as a masked LM, small random-init
configs) it compiles the README's recommended step (``jlora.split``, ``jlora.combine`` inside the
loss, ``jlora.optimizer(optax.adamw(1e-4), trainable)``, the trainable half and the optimizer
state donated) in several modes and prints one table per model:

    python benchmarks/memory.py                                  # CPU, about a minute
    python benchmarks/memory.py --size base --dtype bfloat16 --steps 20   # GPU-sized, and timed
    python benchmarks/memory.py --forward                        # an evaluation (the loss alone)

Modes:
  floor          backward through the frozen model with no weight gradients (grad w.r.t. a zero
                 delta added to the embedding output only): what any LoRA step pays at least
  jlora(R)       ``jlora.apply(model.__call__, recompute=R)`` for R = inputs (default), False, True
  hand           the same LoRA written by hand: ``y + s·(x@A)@B`` added to each targeted module's
                 output (after its bias, as PEFT) by ``flax.linen.intercept_methods``

With ``--forward``, each mode's evaluation instead (the loss, nothing differentiated: serving an
unmerged adapter), and ``merged`` (the unmodified model on ``jlora.merge``'s params) in the
floor's place; ``jlora(inputs)`` only, as ``recompute`` changes no forward-only call.

Columns (MiB, from ``memory_analysis()``): arg = ``argument_size_in_bytes``, out =
``output_size_in_bytes``, alias = ``alias_size_in_bytes`` (outputs written into donated
arguments), temp = ``temp_size_in_bytes`` (the step's scratch: activations kept for the backward
and everything else that is neither argument nor output); x hand and x floor are temp over the
hand-written LoRA's and the floor's temp in the same run. With ``--steps N``: ms/step, the mean
of N steps run back to back (after two to warm up; a time is the device's only on a GPU), and its ratios. Under each table, the loss of jlora, of
the hand-written LoRA (checked to agree before measuring) and of the model without adapters.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import transformers as tf

import jlora
import jlora.hf

SIZES = {  # hidden, layers, heads, intermediate (Llama's), vocab, seq, batch
    "small": dict(hidden=256, layers=4, heads=4, inter=1024, llama_inter=704, vocab=2048, seq=200, batch=4),
    "base": dict(hidden=768, layers=12, heads=12, inter=3072, llama_inter=2048, vocab=32000, seq=512, batch=8),
}
EMBEDDING = {"gpt2": "wte", "bert": "word_embeddings", "llama": "embed_tokens"}  # the token-embedding module
RECOMPUTE = {"jlora(inputs)": "inputs", "jlora(False)": False, "jlora(True)": True}
FIELDS = ("argument", "output", "alias", "temp")
is_lora = lambda x: isinstance(x, jlora.LoraWeight)


def build(name: str, size: dict, dtype: Any) -> tuple[Any, Any]:
    """(HF Flax model, its random-init params in ``dtype``) for ``name`` at ``size``."""
    h, n, heads, v, seq = size["hidden"], size["layers"], size["heads"], size["vocab"], size["seq"]
    if name == "gpt2":
        config = tf.GPT2Config(n_embd=h, n_layer=n, n_head=heads, n_inner=size["inter"], vocab_size=v, n_positions=seq)
        cls = tf.FlaxGPT2LMHeadModel
    elif name == "bert":
        config = tf.BertConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads, vocab_size=v,
                               intermediate_size=size["inter"], max_position_embeddings=seq)
        cls = tf.FlaxBertForMaskedLM
    elif name == "llama":
        config = tf.LlamaConfig(hidden_size=h, num_hidden_layers=n, num_attention_heads=heads,
                                num_key_value_heads=heads, intermediate_size=size["llama_inter"], vocab_size=v,
                                max_position_embeddings=seq, tie_word_embeddings=False)
        cls = tf.FlaxLlamaForCausalLM
    else:
        raise ValueError(f"unknown model {name!r} (gpt2, bert, llama)")
    model = cls(config, dtype=dtype, _do_init=False)
    params = jax.jit(lambda k: model.init_weights(k, (1, 8)))(jax.random.key(0))
    return model, jax.tree.map(lambda x: x.astype(dtype), params)


def batch_and_loss(name: str, size: dict) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(token ids, loss of the logits): softmax cross-entropy against the next tokens for a causal LM
    (``seq + 1`` random tokens, the model seeing the first ``seq``), against the ids themselves for BERT."""
    causal = name != "bert"
    ids = jax.random.randint(jax.random.key(1), (size["batch"], size["seq"] + causal), 0, size["vocab"])
    inputs, labels = (ids[:, :-1], ids[:, 1:]) if causal else (ids, ids)

    def xent(logits: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    return inputs, xent


def oriented(lw: jlora.LoraWeight) -> tuple[jax.Array, jax.Array]:
    """(A, B) with ``x @ A @ B`` the adapter's term. jlora stores ``a`` as (in, r) and ``b`` as (r, out)
    whatever the kernel's layout (``"io"`` for Dense, ``"oi"`` for GPT-2's Conv1D): the layout says
    which axis of ``w`` is the input, so no transpose is needed; other layouts are not handled here."""
    if str(lw.layout) not in ("io", "oi"):
        raise ValueError(f"hand mode handles 2-D kernels only; {lw.path} has layout {lw.layout}")
    return lw.a, lw.b


def jlora_loss(model: Any, xent: Callable, ids: jax.Array, recompute: bool | str) -> Callable[[Any, Any], jax.Array]:
    """jlora's loss(trainable, frozen): ``jlora.apply(model.__call__, recompute=...)`` on the combined halves."""
    forward = jlora.apply(model.__call__, recompute=recompute)
    return lambda t, frozen: xent(forward(ids, params=jlora.combine(t, frozen), return_dict=False)[0])


def hand_loss(model: Any, xent: Callable, ids: jax.Array) -> Callable[[Any, Any], jax.Array]:
    """The hand-written LoRA's loss(trainable, frozen): the plain model, its targeted modules' outputs
    given ``s·(x@A)@B`` by method interception (matched by module path against the adapted params')."""
    def loss_fn(t: Any, frozen: Any) -> jax.Array:
        factors = {tuple(lw.path.split("/")[:-1]): (*oriented(lw), lw.scale)
                   for lw in jax.tree.leaves(t, is_leaf=is_lora) if is_lora(lw)}
        base = jax.tree.map(lambda x: x.w if is_lora(x) else x, frozen, is_leaf=is_lora)
        hit = set()

        def add_lora(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
            out = next_fun(*args, **kwargs)
            path = tuple(context.module.path)
            if context.method_name == "__call__" and path in factors:
                (a, b, s), x = factors[path], args[0]
                out = out + ((x @ a.astype(x.dtype)) * s) @ b.astype(x.dtype)
                hit.add(path)
            return out

        with nn.intercept_methods(add_lora):
            loss = xent(model(ids, params=base, return_dict=False)[0])
        if hit != set(factors):
            raise RuntimeError(f"hand mode: no module call for {sorted(set(factors) - hit)[:3]}")
        return loss

    return loss_fn


def adapter_step(loss_fn: Callable, opt: optax.GradientTransformation) -> Callable:
    """step(trainable, opt_state, frozen) -> (trainable, opt_state, loss): the README's LoRA step."""
    def step(t: Any, s: Any, frozen: Any) -> tuple:
        loss, g = jax.value_and_grad(loss_fn)(t, frozen)
        updates, s = opt.update(g, s, t)
        return optax.apply_updates(t, updates), s, loss

    return step


def eval_step(loss_fn: Callable) -> Callable:
    """step(first, state, rest) -> (first, state, loss): ``loss_fn(first, rest)`` alone, nothing
    differentiated (an evaluation); ``first`` and ``state`` come back as they are."""
    return lambda first, state, rest: (first, state, loss_fn(first, rest))


def floor_step(model: Any, xent: Callable, ids: jax.Array, embedding: str) -> Callable:
    """step(delta, (), params) -> (grad, (), loss): the frozen model's backward, grad w.r.t. a delta on
    the token embeddings' output only (params plain, not differentiated)."""
    def step(d: jax.Array, s: tuple, params: Any) -> tuple:
        def loss_fn(d: jax.Array) -> jax.Array:
            def add_delta(next_fun: Callable, args: tuple, kwargs: dict, context: Any) -> Any:
                out = next_fun(*args, **kwargs)  # d: loss_fn's argument, the one differentiated
                return out + d if context.module.name == embedding and context.method_name == "__call__" else out

            with nn.intercept_methods(add_delta):
                return xent(model(ids, params=params, return_dict=False)[0])

        loss, g = jax.value_and_grad(loss_fn)(d)
        return g, s, loss

    return step


def memory(step: Callable, *args: Any, steps: int = 0) -> dict[str, Any]:
    """``memory_analysis()`` bytes of ``jax.jit(step, donate_argnums=(0, 1))`` compiled for ``args``;
    with ``steps``, also the mean ms of a step over ``steps`` runs, each fed the last one's outputs
    and dispatched while the last runs (as ``train_step.py`` times them: the host's time to call a
    step is hidden behind the device's, as in a loop that does not read each loss)."""
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError(f"no memory_analysis() on {jax.devices()[0].platform}")
    out: dict[str, Any] = {f"{f}_bytes": int(getattr(mem, f"{f}_size_in_bytes")) for f in FIELDS}
    if steps:
        first, state, rest = jax.tree.map(jnp.copy, args[:2]) + (args[2],)  # the originals serve the next mode
        for _ in range(2):  # warm-up
            first, state, loss = compiled(first, state, rest)
        jax.block_until_ready((first, state, loss))
        t0 = time.perf_counter()
        for _ in range(steps):
            first, state, loss = compiled(first, state, rest)
        jax.block_until_ready((first, state, loss))
        out["ms_per_step"] = 1e3 * (time.perf_counter() - t0) / steps
    return out


def check_hand(model: Any, xent: Callable, ids: jax.Array, trainable: Any, frozen: Any, params: Any,
               tol: float) -> dict[str, float]:
    """The losses of jlora, of the hand-written LoRA and of the model without adapters, after checking
    that the first two agree to ``tol`` relative and that the adapters move the loss by more than
    their difference (else the check would prove nothing)."""
    jl = float(jax.jit(jlora_loss(model, xent, ids, "inputs"))(trainable, frozen))
    hand = float(jax.jit(hand_loss(model, xent, ids))(trainable, frozen))
    plain = float(jax.jit(lambda p: xent(model(ids, params=p, return_dict=False)[0]))(params))
    if not abs(hand - jl) <= tol * abs(jl) or not abs(hand - jl) < abs(plain - jl):
        raise RuntimeError(f"hand-written LoRA's loss {hand} != jlora's {jl} (to {tol} relative; "
                           f"without adapters {plain})")
    return dict(loss_jlora=jl, loss_hand=hand, loss_no_adapters=plain)


def run_model(name: str, size: dict, dtype: Any, targets: str, rank: int, steps: int = 0,
              forward: bool = False) -> list[dict]:
    """Every mode's memory (and, with ``steps``, time) for model ``name``: one row per mode, ratios to
    hand and floor (with ``forward``: merged) filled in."""
    model, params = build(name, size, dtype)
    ids, xent = batch_and_loss(name, size)
    config = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=None if targets == "preset" else targets)
    trainable, frozen = jlora.split(jlora.hf.lora_init(jax.random.key(2), model, config, params=params))
    lws, treedef = jax.tree.flatten(trainable, is_leaf=is_lora)  # b is zeros at init: random, for the check
    trainable = treedef.unflatten([lw.replace(b=0.1 * jax.random.normal(jax.random.key(3 + i), lw.b.shape, lw.b.dtype))
                                   for i, lw in enumerate(lws)])
    opt = jlora.optimizer(optax.adamw(1e-4), trainable)
    losses = check_hand(model, xent, ids, trainable, frozen, params, 1e-4 if dtype == jnp.float32 else 1e-3)

    if forward:
        merged = jax.jit(jlora.merge)(jlora.combine(trainable, frozen))
        plain = lambda first, p: xent(model(ids, params=p, return_dict=False)[0])
        rows = [dict(mode="merged", **memory(eval_step(plain), (), (), merged, steps=steps))]
        modes = [("jlora(inputs)", jlora_loss(model, xent, ids, "inputs")), ("hand", hand_loss(model, xent, ids))]
        for mode, fn in modes:
            rows.append(dict(mode=mode, **memory(eval_step(fn), trainable, (), frozen, steps=steps)))
    else:
        delta = jnp.zeros((size["batch"], size["seq"], size["hidden"]), dtype)
        rows = [dict(mode="floor", **memory(floor_step(model, xent, ids, EMBEDDING[name]), delta, (), params, steps=steps))]
        modes = [(m, jlora_loss(model, xent, ids, r)) for m, r in RECOMPUTE.items()]
        for mode, fn in modes + [("hand", hand_loss(model, xent, ids))]:
            rows.append(dict(mode=mode, **memory(adapter_step(fn, opt), trainable, opt.init(trainable), frozen, steps=steps)))
    temp = {r["mode"]: r["temp_bytes"] for r in rows}
    ms = {r["mode"]: r.get("ms_per_step") for r in rows}
    floor = rows[0]["mode"]  # the floor, or the merged model's evaluation
    for r in rows:
        r.update(model=name, **losses, temp_vs_hand=r["temp_bytes"] / temp["hand"],
                 temp_vs_floor=r["temp_bytes"] / temp[floor])
        if steps:
            r.update(time_vs_hand=r["ms_per_step"] / ms["hand"], time_vs_floor=r["ms_per_step"] / ms[floor])
    return rows


def print_table(name: str, rows: list[dict]) -> None:
    """One model's rows: MiB per memory_analysis field, temp over hand and over floor."""
    timed = "ms_per_step" in rows[0]
    floor = f"x {rows[0]['mode']}"
    columns = ("arg MiB", "out MiB", "alias MiB", "temp MiB", "x hand", floor) + (
        ("ms/step", "x hand", floor) if timed else ())
    print(f"\n{name:<14}" + "".join(f"{c:>10}" for c in columns))
    for r in rows:
        mib = "".join(f"{r[f + '_bytes'] / 2**20:>10.1f}" for f in FIELDS)
        time_cols = f"{r['ms_per_step']:>10.2f}{r['time_vs_hand']:>10.3f}{r['time_vs_floor']:>10.3f}" if timed else ""
        print(f"{r['mode']:<14}{mib}{r['temp_vs_hand']:>10.3f}{r['temp_vs_floor']:>10.3f}{time_cols}")
    r = rows[0]
    print(f"loss: jlora {r['loss_jlora']:.6f}, hand {r['loss_hand']:.6f}, without adapters {r['loss_no_adapters']:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="gpt2,bert,llama")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--targets", choices=("all-linear", "preset"), default="all-linear",
                        help="LoRA targets: every dense kernel, or the model type's PEFT preset (jlora.hf)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (alpha 2·rank)")
    parser.add_argument("--steps", type=int, default=0, help="also time each mode: mean ms of this many steps, run back to back")
    parser.add_argument("--forward", action="store_true", help="evaluations (the loss alone), not train steps")
    parser.add_argument("--json-out", default=None, help="also write all rows to this JSON file")
    args = parser.parse_args()
    size, dtype, rows, models = SIZES[args.size], jnp.dtype(args.dtype), [], args.models.split(",")
    if set(models) - set(EMBEDDING):
        parser.error(f"--models: {', '.join(sorted(set(models) - set(EMBEDDING)))}; known: {', '.join(EMBEDDING)}")
    print(f"size {args.size} {size}; {args.dtype}; targets {args.targets}; rank {args.rank}; "
          f"{'evaluation' if args.forward else 'train step'}; "
          f"device {jax.devices()[0].device_kind}; jax {jax.__version__}")
    for name in models:
        t0 = time.perf_counter()
        model_rows = run_model(name, size, dtype, args.targets, args.rank, args.steps, args.forward)
        print_table(name, model_rows)
        print(f"({time.perf_counter() - t0:.0f} s to build, check and compile)")
        rows += [dict(r, size=args.size, dtype=args.dtype, targets=args.targets, rank=args.rank, forward=args.forward)
                 for r in model_rows]
        if args.json_out:  # written after every model: a run cut short keeps what it measured
            with open(args.json_out, "w") as f:
                json.dump(dict(config=size, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
