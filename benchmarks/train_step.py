"""Train-step benchmark: full fine-tune, the frozen floor, jlora LoRA, hand-written LoRA and
LoRA by materialising ``W + s·A@B``, on the same HF FlaxLlama model in one run.

Each mode runs in its own process (clean peak-memory figures, no cache sharing); the driver prints
one table with ratios against the floor and the full fine-tune measured in the same run.

    python benchmarks/train_step.py                    # small Llama, runs on a CPU in a minute or two
    python benchmarks/train_step.py --preset llama-1b  # Llama-3.2-1B shape, bf16, batch 4 x 1024 (GPU)
    python benchmarks/train_step.py --preset llama-160m  # a small Llama, bf16, batch 8 x 512 (GPU)
    python benchmarks/train_step.py --preset llama-1b --mode jlora --stop lower  # trace only (a CPU will do):
        # its "program" hash is the same for two versions of jlora that give XLA the same step

Modes:
  full         grads for every weight + adamw on all of them
  floor        backward through every layer with no weight gradient (grad w.r.t. the embeddings'
               output only): what any LoRA step has to pay at least
  jlora        jlora.apply over the unmodified model, r on q,k,v,o,gate,up,down + adamw on A/B
               (default ``recompute="inputs"``: adapters' inputs rebuilt in the backward)
  jlora-store  the same with jlora.apply(..., recompute=False): the adapters' inputs are stored
  jlora-recompute  the same with jlora.apply(..., recompute=True): only matmul outputs are kept
               for the backward, the rest (the adapters' inputs among it) is recomputed
  jlora-flat   jlora with ``jlora.optimizer(optax.flatten(adamw))``: the adapters' gradients and
               optimizer state as one vector each (one Adam update, fewer arrays per call)
  hand         the same LoRA written by hand: flax method interception adds s·(x@A)@B at each
               targeted Dense (the hand-factored baseline)
  materialize  the same LoRA computed by forming W + s·A@B for each weight
  torch-full   the PyTorch peer: the same Llama trained in full (benchmarks/torch_step.py)
  peft         the PyTorch peer: the same LoRA with HF PEFT (benchmarks/torch_step.py)
  MODE@DIR     MODE run on the jlora package found in DIR (e.g. the previous commit's, from
               ``git archive HEAD jlora | tar -x -C DIR``): an A/B of two versions in one run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from typing import Any

from child import adapter_step, child_mode, exit_if_failed, file_name, run_child, timed_steps  # benchmarks/child.py (this folder is on sys.path when run as a script)
from torch_step import MODES as TORCH_MODES, run_torch_mode

PRESETS = {
    "cpu": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=2048, batch=2, seq=128, rank=8, dtype="float32", steps=5),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, batch=4, seq=1024, rank=16, dtype="bfloat16",
                     steps=10),
    # a small model (GPT-2-small-sized Llama, 0.13 B params with its untied embeddings) at a common fine-tuning batch:
    # the adapters' fixed costs (small kernels, launches) weigh most here
    "llama-160m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000, batch=8, seq=512, rank=16, dtype="bfloat16",
                       steps=20),
}
MODES = ("full", "floor", "jlora", "jlora-store", "jlora-recompute", "jlora-flat", "hand", "materialize")
RECOMPUTE = {"jlora": "inputs", "jlora-store": False, "jlora-recompute": True, "jlora-flat": "inputs"}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def program_hash(hlo: str) -> str:
    """A short hash of a lowered step's StableHLO without its source locations: two versions of
    jlora that give the same hash give XLA the same program (so the same speed and memory)."""
    text = "\n".join(line for line in hlo.splitlines() if not line.startswith("#loc"))
    text = re.sub(r" loc\([^()]*(\([^()]*\)[^()]*)*\)", "", text)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_mode(mode: str, preset: dict, stop: str = "run", profile: str | None = None) -> dict:
    """One mode's step, to ``stop``: ``"lower"`` (trace only), ``"compile"`` or ``"run"`` (timed steps).
    Lowering and compiling take abstract weights: nothing is allocated on the device."""
    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import optax
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_flax_llama import FlaxLlamaForCausalLM

    import jlora

    dtype = jnp.dtype(preset["dtype"])
    config = LlamaConfig(
        hidden_size=preset["hidden_size"], intermediate_size=preset["intermediate_size"],
        num_hidden_layers=preset["num_hidden_layers"], num_attention_heads=preset["num_attention_heads"],
        num_key_value_heads=preset["num_key_value_heads"], vocab_size=preset["vocab_size"],
        max_position_embeddings=preset["seq"], rope_theta=500000.0, tie_word_embeddings=False,
    )
    model = FlaxLlamaForCausalLM(config, dtype=dtype, _do_init=False)
    module = model.module
    batch, seq, rank = preset["batch"], preset["seq"], preset["rank"]
    key = jax.random.key(0)
    # Random weights leaf by leaf (normal(0.02), norms at 1): far quicker to compile than the model's init.
    shapes = jax.eval_shape(lambda k: model.init_weights(k, (1, 8)), key)
    fill = jax.jit(lambda k, shape: (0.02 * jax.random.normal(k, shape)).astype(dtype), static_argnums=1)
    leaves, treedef = jax.tree_util.tree_flatten(shapes)
    abstract = stop != "run"
    if abstract:
        leaves = [jax.ShapeDtypeStruct(l.shape, dtype) for l in leaves]
    else:
        leaves = [fill(jax.random.fold_in(key, i), l.shape) if len(l.shape) > 1 else jnp.ones(l.shape, dtype)
                  for i, l in enumerate(leaves)]
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, config.vocab_size)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    mask = jnp.ones_like(inputs)
    pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))

    def xent(logits: jax.Array) -> jax.Array:
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()

    def logits_of(p: Any, fn=module.apply) -> jax.Array:
        return fn({"params": p}, inputs, mask, pos, return_dict=False)[0]

    tx = optax.adamw(1e-4)
    cfg = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=list(TARGETS))

    if mode == "full":
        state = jax.eval_shape(tx.init, params) if abstract else tx.init(params)

        def step(p, s, frozen):
            loss, g = jax.value_and_grad(lambda p: xent(logits_of(p)))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        train, frozen = params, None
    elif mode == "floor":
        delta = jnp.zeros((batch, seq, config.hidden_size), dtype)

        def step(d, s, frozen):
            def loss_fn(d):
                def add_delta(next_fun, args, kwargs, context):
                    out = next_fun(*args, **kwargs)
                    if context.module.name == "embed_tokens" and context.method_name == "__call__":
                        out = out + d  # the gradient w.r.t. d runs the whole backward, no weight grads
                    return out

                with nn.intercept_methods(add_delta):
                    return xent(logits_of(frozen))

            loss, g = jax.value_and_grad(loss_fn)(d)
            return g, s, loss  # no parameters: the gradient itself is the result

        train, state, frozen = delta, (), params
    else:
        lora = jlora.lora_init(jax.random.key(2), params, cfg)
        train, frozen = jlora.split(lora)
        opt = jlora.optimizer(optax.flatten(tx) if mode == "jlora-flat" else tx, train)
        state = opt.init(train)

        if mode in RECOMPUTE:
            forward = jlora.apply(module.apply, recompute=RECOMPUTE[mode])

            def loss_fn(t, frozen):
                return xent(logits_of(jlora.combine(t, frozen), forward))
        elif mode == "materialize":
            def loss_fn(t, frozen):
                return xent(logits_of(jlora.merge(jlora.combine(t, frozen))))
        elif mode == "hand":
            is_lora = lambda x: isinstance(x, jlora.LoraWeight)

            def loss_fn(t, frozen):
                factors = {
                    tuple(lw.path.split("/")[:-1]): (lw.a, lw.b, lw.scale)
                    for lw in jax.tree.leaves(t, is_leaf=is_lora) if is_lora(lw)
                }
                base = jax.tree.map(lambda x: x.w if is_lora(x) else x, frozen, is_leaf=is_lora)

                def add_lora(next_fun, args, kwargs, context):
                    out = next_fun(*args, **kwargs)
                    path = tuple(context.module.path)
                    if context.method_name == "__call__" and path in factors:
                        a, b, s = factors[path]
                        x = args[0]
                        out = out + ((x @ a.astype(x.dtype)) * s) @ b.astype(x.dtype)
                    return out

                with nn.intercept_methods(add_lora):
                    return xent(logits_of(base))
        else:
            raise ValueError(mode)

        step = adapter_step(loss_fn, opt)

    jitted = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    lowered = jitted.lower(train, state, frozen)
    trace_s = time.perf_counter() - t0
    if stop == "lower":
        hlo = lowered.as_text()
        return dict(mode=mode, trace_s=trace_s, hlo_lines=hlo.count("\n"), dots=hlo.count("dot_general"),
                    program=program_hash(hlo))
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    if stop == "compile":
        return dict(mode=mode, trace_s=trace_s, compile_s=compile_s, **kernel_counts(compiled.as_text()),
                    device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = (cost or {}).get("flops")
    mem = compiled.memory_analysis()
    footprint = None
    if mem is not None:
        footprint = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                     - getattr(mem, "alias_size_in_bytes", 0))
    train, state, loss, step_s = timed_steps(compiled, train, state, frozen, preset["steps"], profile)
    stats = jax.local_devices()[0].memory_stats() or {}
    n_adapter = sum(x.size for x in jax.tree.leaves(train)) if mode not in ("full", "floor") else 0
    return dict(
        mode=mode, step_ms=1e3 * step_s, tokens_per_s=batch * seq / step_s, compile_s=compile_s, trace_s=trace_s,
        peak_bytes=stats.get("peak_bytes_in_use"), footprint_bytes=footprint, loss=float(loss), flops=flops,
        adapter_params=int(n_adapter), device=str(jax.devices()[0].device_kind), jax=jax.__version__,
    )


def kernel_counts(hlo: str) -> dict:
    """What the compiler made of a step: its entry computation's instructions and fusions, and its
    GEMMs (cuBLAS calls and Triton GEMM fusions), from the optimised HLO text."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    return dict(
        entry_instructions=entry.count("\n"),
        fusions=entry.count(" fusion("),
        cublas_gemms=len(re.findall(r'custom_call_target="__cublas\$(?:lt\$matmul|gemm)', hlo)),
        triton_gemms=len(re.findall(r'"kind":"__triton_(?:nested_)?gemm(?:_fusion)?"', hlo)),  # name by XLA version
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode, print JSON
    parser.add_argument("--stop", choices=("lower", "compile", "run"), default="run",
                        help=argparse.SUPPRESS)  # internal: lower or compile only (abstract weights)
    parser.add_argument("--json-out", default=None, help="also write all results to this JSON file")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write a profiler trace of each mode's timed steps to DIR/MODE")
    args = parser.parse_args()
    preset = dict(PRESETS[args.preset])
    if args.steps:
        preset["steps"] = args.steps
    if args.mode in TORCH_MODES:
        print("RESULT " + json.dumps(run_torch_mode(args.mode, preset, TARGETS)), flush=True)
        return
    if args.mode:
        print("RESULT " + json.dumps(run_mode(args.mode, preset, args.stop, args.profile)), flush=True)
        return

    modes, results = args.modes.split(","), {}
    for mode in modes:
        name, env = child_mode(mode, {})
        result = run_child(__file__, ["--preset", args.preset, "--mode", name]
                           + (["--steps", str(args.steps)] if args.steps else [])
                           + (["--profile", f"{args.profile}/{file_name(mode)}"] if args.profile else []), mode, env=env)
        if result is None:
            continue
        results[mode] = result
        if args.json_out:  # written after every mode: a run cut short keeps what it measured
            with open(args.json_out, "w") as f:
                json.dump(dict(preset=args.preset, config=preset, results=results), f, indent=2)
    print_table(args.preset, results)
    exit_if_failed([m for m in modes if m not in results])


def print_table(preset: str, results: dict) -> None:
    if not results:
        return
    any_r = next(iter(results.values()))
    versions = "; ".join(f"{lib} {r[lib]}" for lib in ("jax", "torch")
                         for r in [next((r for r in results.values() if lib in r), None)] if r)
    print(f"\npreset {preset}; device {any_r['device']}; {versions}")
    floor = results.get("floor", {}).get("tokens_per_s")
    full_compile_s = results.get("full", {}).get("compile_s")
    hand = results.get("hand", {}).get("tokens_per_s")
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"
    num = lambda x, spec: "-" if x is None else format(x, spec)
    w = max(12, *(len(m) + 2 for m in results))
    print(f"{'mode':<{w}}{'ms/step':>9}{'tokens/s':>11}{'x floor':>9}{'x hand':>8}{'peak GiB':>10}"
          f"{'XLA GiB':>9}{'compile s':>11}{'(trace)':>9}{'x full c':>9}{'TFLOP':>8}")
    for mode, r in results.items():
        xf = f"{r['tokens_per_s'] / floor:.3f}" if floor else "-"
        xh = f"{r['tokens_per_s'] / hand:.3f}" if hand else "-"
        xc = f"{r['compile_s'] / full_compile_s:.2f}" if full_compile_s and r["compile_s"] else "-"
        tflop = None if r["flops"] is None else r["flops"] / 1e12
        print(f"{mode:<{w}}{r['step_ms']:>9.1f}{r['tokens_per_s']:>11.0f}{xf:>9}{xh:>8}{gib(r['peak_bytes']):>10}"
              f"{gib(r['footprint_bytes']):>9}{num(r['compile_s'], '.1f'):>11}{num(r['trace_s'], '.1f'):>9}{xc:>8}"
              f"{num(tflop, '.3g'):>8}")


if __name__ == "__main__":
    main()
