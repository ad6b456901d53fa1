"""Host-side operations at scale, each against a baseline measured in the same run.

- ``merge``: ``jlora.merge`` of one ``nn.scan``-stacked bf16 kernel against a hand-written
  ``jax.jit`` merge of it (time with the compile, and peak resident memory above the kernel: one
  process each).
- ``checkpoint``: ``AdapterCheckpointer.save`` into a directory already holding ``--steps`` steps
  against orbax's ``CheckpointManager.save`` of the same arrays there.
- ``peft_load``: ``jlora.peft.load_adapter`` of a ``--layers``-deep Llama adapter whose MLP has
  another rank (a ``rank_pattern`` key per module, as PEFT and jlora write it) against reading its
  safetensors file alone.
- ``eager``: calls outside ``jax.jit`` on ``--layers`` x 56 small kernels, each against what it
  wraps: ``jlora.apply(f)`` against ``jax.jit(f)`` on the merged params; ``jax.grad`` of a loss
  through ``jlora.apply(f)`` against ``jax.grad`` of ``f`` on the merged params; the same through
  ``jlora.apply(f)`` with the adapters frozen (a grad for a head on top of it only) and a ``jax.vmap``
  over inputs alone, against the eager call; ``jlora.optimizer``'s
  update against the same ``optax.adamw`` on the trainable half; ``lora_init`` with a
  ``rank_pattern`` and ``alpha_pattern`` key per kernel against ``lora_init`` without them.
- ``dispatch``: the host time of one call of a jitted LoRA train step (``jlora.apply``,
  ``jlora.optimizer(optax.adamw)``) on ``--layers`` x 56 adapters, until it returns (not until the
  device is done: the time a train loop that logs every step cannot hide) against the same step
  jitted on the flat list of its leaves (the least any tree of those arrays costs), and with
  ``optax.flatten`` inside ``jlora.optimizer`` (the moments as one vector each: fewer arrays).
- ``tokenize``: ``jlora.tokens.token_ids`` (the causal-LM job's tokenization, in windows) of a
  ``--chars`` MB text against one call of the same tokenizer (the default model's WordPiece): time
  and peak resident memory (one process each), and whether the ids are the same.

    python benchmarks/host_ops.py                       # all six, small sizes
    python benchmarks/host_ops.py --parts merge --layers 16 --width 2048
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time

MERGE_CHILD = r"""
import sys, time, jax, jax.numpy as jnp, jlora
layers, width, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
def peak_mib():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
w = jnp.ones((layers, width, 11 * width // 4), jnp.bfloat16)
cfg = jlora.LoraConfig(rank=16, targets=["mlp"], layouts={"mlp": "bio"})
lw = jlora.lora_init(jax.random.key(0), {"mlp": {"kernel": w}}, cfg)["mlp"]["kernel"]
lw = lw.replace(b=lw.b + 0.01)
hand = jax.jit(lambda w, a, b: (w.astype(jnp.float32) + lw.scale * jnp.einsum("lir,lro->lio", a, b)).astype(w.dtype))
run = (lambda: jlora.merge({"k": lw})["k"]) if how == "jlora" else (lambda: hand(lw.w, lw.a, lw.b))
open("/proc/self/clear_refs", "w").write("5")  # one call, as a user merges once: its compile counted in both
before, start = peak_mib(), time.perf_counter()
out = jax.block_until_ready(run())
print(time.perf_counter() - start, peak_mib() - before, w.nbytes / 2**20)
"""


def merge(layers: int, width: int) -> None:
    rows = {}
    for how in ("hand", "jlora"):
        out = subprocess.run([sys.executable, "-c", MERGE_CHILD, str(layers), str(width), how],
                             capture_output=True, text=True, check=True).stdout.split()
        rows[how] = [float(v) for v in out]
    (t_hand, m_hand, size), (t_jlora, m_jlora, _) = rows["hand"], rows["jlora"]
    print(f"merge of a {size:.0f} MiB stacked bf16 kernel: jlora {t_jlora:.2f} s, +{m_jlora:.0f} MiB; "
          f"hand-written jax.jit {t_hand:.2f} s, +{m_hand:.0f} MiB; x hand: time {t_jlora / t_hand:.2f}, "
          f"memory {m_jlora / max(m_hand, 1):.2f}")


def checkpoint(steps: int) -> None:
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    import jlora
    from jlora.checkpoint import AdapterCheckpointer

    base = {"layers": {str(i): {"q": {"kernel": jnp.ones((256, 256))}} for i in range(16)}}
    params = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=8, targets=["q"]))
    arrays = jlora.split(params)[0]
    times = {}
    for how in ("orbax", "jlora"):
        directory = tempfile.mkdtemp()
        AdapterCheckpointer(directory, async_save=False).save(0, params)
        for step in range(1, steps):
            shutil.copytree(f"{directory}/0", f"{directory}/{step}")
        if how == "jlora":
            saver = AdapterCheckpointer(directory, max_to_keep=None, async_save=False)
            save = lambda step: saver.save(step, params)
        else:
            manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
            save = lambda step: manager.save(step, args=ocp.args.Composite(adapters=ocp.args.StandardSave(arrays)))
        start = time.perf_counter()
        for step in range(steps, steps + 5):
            save(step)
        times[how] = (time.perf_counter() - start) / 5
        shutil.rmtree(directory)
    print(f"checkpoint save with {steps} steps kept: jlora {1e3 * times['jlora']:.0f} ms, orbax "
          f"{1e3 * times['orbax']:.0f} ms; x orbax {times['jlora'] / times['orbax']:.2f}")


def peft_load(layers: int) -> None:
    import jax
    import jax.numpy as jnp
    import safetensors.numpy
    import transformers

    import jlora
    import jlora.peft

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=4, vocab_size=128)
    def layer() -> dict:
        return {"self_attn": {n: {"kernel": jnp.ones((64, 64))} for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                "mlp": {"gate_proj": {"kernel": jnp.ones((64, 128))}, "up_proj": {"kernel": jnp.ones((64, 128))},
                        "down_proj": {"kernel": jnp.ones((128, 64))}}}

    base = {"model": {"layers": {str(i): layer() for i in range(layers)}}}
    cfg = jlora.LoraConfig(rank=16, targets=["self_attn", "mlp"], rank_pattern={"mlp": 8}, use_rslora=True)
    directory = tempfile.mkdtemp()
    jlora.peft.save_adapter(directory, jlora.lora_init(jax.random.key(0), base, cfg), config)
    start = time.perf_counter()
    safetensors.numpy.load_file(f"{directory}/adapter_model.safetensors")
    floor = time.perf_counter() - start
    start = time.perf_counter()
    jlora.peft.load_adapter(directory, base, config)
    took = time.perf_counter() - start
    shutil.rmtree(directory)
    print(f"PEFT load of a {layers}-layer adapter with a rank_pattern: jlora {took:.2f} s, the file alone "
          f"{floor:.3f} s; x file {took / floor:.0f}")


def eager(layers: int) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import jlora

    def per_call(fn, *args, calls: int = 20) -> float:
        jax.block_until_ready(fn(*args))  # traced and compiled once, as a user's loop does
        start = time.perf_counter()
        for _ in range(calls):
            jax.block_until_ready(fn(*args))
        return (time.perf_counter() - start) / calls

    n = 56 * layers
    base = {f"l{i}": {"kernel": jnp.full((16, 16), 0.01)} for i in range(n)}
    cfg = jlora.LoraConfig(rank=2, alpha=4, targets=["kernel"])
    params = jlora.lora_init(jax.random.key(0), base, cfg)

    def f(p, x):
        for i in range(n):
            x = x @ p[f"l{i}"]["kernel"]
        return x

    x = jnp.ones((2, 16))
    lazy, plain = per_call(jlora.apply(f), params, x), per_call(jax.jit(f), jlora.merge(params), x)
    print(f"eager call, {n} kernels: jlora.apply {lazy * 1e3:.2f} ms, jax.jit on merged params "
          f"{plain * 1e3:.2f} ms; x jit {lazy / plain:.1f}")
    trainable, frozen = jlora.split(params)
    forward = jlora.apply(f)
    loss = lambda t, x: forward(jlora.combine(t, frozen), x).sum()
    jax.grad(loss)(trainable, x)  # a trace's first grad runs op by op, its second compiles, as a loop's do
    lazy = per_call(jax.grad(loss), trainable, x, calls=5)
    plain = per_call(jax.grad(lambda p, x: f(p, x).sum()), jlora.merge(params), x, calls=5)
    print(f"eager grad (jax.grad, no jax.jit), {n} kernels: jlora.apply {lazy * 1e3:.1f} ms, the function on merged "
          f"params {plain * 1e3:.1f} ms; x plain {lazy / plain:.2f}")
    head = jnp.ones((16,))
    frozen_grad = jax.grad(lambda h, x: (forward(params, x) @ h).sum())  # nothing apply takes is traced
    eager_call = per_call(forward, params, x)
    through_frozen = per_call(frozen_grad, head, x, calls=5)
    print(f"eager grad of a head on a frozen adapted model, {n} kernels: {through_frozen * 1e3:.1f} ms, its eager "
          f"call {eager_call * 1e3:.1f} ms; x call {through_frozen / eager_call:.1f}")
    batched, xs = jax.vmap(forward, in_axes=(None, 0)), jnp.ones((3, 2, 16))
    batched(params, xs)  # a trace's first vmap runs op by op, its second compiles
    mapped = per_call(batched, params, xs, calls=5)
    print(f"eager vmap over inputs alone, {n} kernels: {mapped * 1e3:.1f} ms, an eager call {eager_call * 1e3:.1f} ms; "
          f"x call {mapped / eager_call:.1f}")
    grads = jax.tree.map(jnp.ones_like, trainable)
    tx, inner = jlora.optimizer(optax.adamw(1e-3), params), optax.adamw(1e-3)
    ours = per_call(tx.update, grads, tx.init(trainable), trainable, calls=5)
    theirs = per_call(inner.update, grads, inner.init(trainable), trainable, calls=5)
    print(f"eager optimizer update, {n} adapters: jlora.optimizer {ours * 1e3:.0f} ms, optax.adamw alone "
          f"{theirs * 1e3:.0f} ms; x optax {ours / theirs:.2f}")
    patterns = {f"l{i}": 2 + i % 3 for i in range(n)}
    shaped = jlora.LoraConfig(rank=2, alpha=4, targets=["kernel"], rank_pattern=patterns, alpha_pattern=patterns)
    init = lambda config: jax.eval_shape(lambda: jlora.lora_init(jax.random.key(0), base, config))
    with_patterns, without = per_call(init, shaped, calls=5), per_call(init, cfg, calls=5)
    print(f"lora_init of {n} kernels (abstract): {n} rank_pattern and alpha_pattern keys {with_patterns:.2f} s, "
          f"none {without:.2f} s; x none {with_patterns / without:.2f}")


def dispatch(layers: int) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import jlora

    n = 56 * layers
    base = {f"l{i}": {"kernel": jnp.full((16, 16), 0.01), "bias": jnp.zeros(16)} for i in range(n)}
    trainable, frozen = jlora.split(jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["kernel"])))
    tx = jlora.optimizer(optax.adamw(1e-3), trainable)
    x = jnp.ones((2, 16))

    def step(t, s, f):
        forward = jlora.apply(lambda p: sum(x @ p[f"l{i}"]["kernel"] + p[f"l{i}"]["bias"] for i in range(n)).sum())
        loss, g = jax.value_and_grad(lambda t: forward(jlora.combine(t, f)))(t)
        u, s = tx.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    args = (trainable, tx.init(trainable), frozen)
    leaves, treedef = jax.tree.flatten(args)
    flat_step = lambda *ls: jax.tree.leaves(step(*jax.tree.unflatten(treedef, ls)))

    def returns_in(fn, *args, calls: int = 50) -> float:
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            out = fn(*args)
            times.append(time.perf_counter() - start)
            jax.block_until_ready(out)
        return min(times)  # the least disturbed call: the step also runs on these cores

    tree, flat = returns_in(jax.jit(step), *args), returns_in(jax.jit(flat_step), *leaves)
    print(f"jitted train step, {n} adapters ({len(leaves)} arrays in): returns in {tree * 1e3:.2f} ms; the same "
          f"step on its flat leaves {flat * 1e3:.2f} ms; x flat {tree / flat:.2f}")
    tx = jlora.optimizer(optax.flatten(optax.adamw(1e-3)), trainable)  # step reads tx: one moment vector each
    raveled = (trainable, tx.init(trainable), frozen)
    one = returns_in(jax.jit(step), *raveled)
    print(f"  with jlora.optimizer(optax.flatten(adamw)) ({len(jax.tree.leaves(raveled))} arrays in): returns in "
          f"{one * 1e3:.2f} ms; x adamw's {one / tree:.2f}")

    def tree_work(tree, calls: int = 200) -> float:  # what jit does with a tree at each call, besides the arrays
        start = time.perf_counter()
        for _ in range(calls):
            leaves, treedef = jax.tree.flatten(tree)
            jax.tree.unflatten(treedef, leaves)
        return (time.perf_counter() - start) / calls

    is_lora = lambda x: isinstance(x, jlora.LoraWeight)
    as_dicts = jax.tree.map(lambda x: {"w": x.w, "a": x.a, "b": x.b} if is_lora(x) else x, args, is_leaf=is_lora)
    ours, dicts = tree_work(args), tree_work(as_dicts)
    print(f"  its trees flattened and unflattened once: {ours * 1e3:.2f} ms; the same arrays in dicts "
          f"(w, a, b) {dicts * 1e3:.2f} ms; x dicts {ours / dicts:.2f}")


TOKENIZE_CHILD = r"""
import sys, time, numpy as np
from transformers import AutoTokenizer
from jlora.finetune import default_model_dir
from jlora.tokens import token_ids
chars, how, out = float(sys.argv[1]), sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
tokenizer.model_max_length = 1 << 62  # no warning that the text is longer than the model takes
rng = np.random.default_rng(0)
words = np.array([f"{w}{n}" for n in range(400) for w in ("the", "word", "café", "naïve", "x")])
line = lambda: " ".join(rng.choice(words, size=40)) + ".\n"
text = "".join(line() for _ in range(int(chars * 1e6 / 300)))
peak = lambda: int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")
before, start = peak(), time.perf_counter()
ids = token_ids(tokenizer, text) if how == "jlora" else np.asarray(tokenizer(text)["input_ids"], np.int32)
np.save(out, ids)
print(time.perf_counter() - start, peak() - before, len(text) / 1e6)
"""


def tokenize(chars: float) -> None:
    import numpy as np

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for how in ("one_call", "jlora"):
            out = subprocess.run([sys.executable, "-c", TOKENIZE_CHILD, str(chars), how, f"{tmp}/{how}.npy"],
                                 capture_output=True, text=True, check=True).stdout.split()
            rows[how] = [float(v) for v in out]
        same = np.array_equal(np.load(f"{tmp}/one_call.npy"), np.load(f"{tmp}/jlora.npy"))
    (t_one, m_one, size), (t_jlora, m_jlora, _) = rows["one_call"], rows["jlora"]
    print(f"tokenize a {size:.1f} M-character text: jlora token_ids {t_jlora:.1f} s, +{m_jlora:.0f} MiB; one "
          f"tokenizer call {t_one:.1f} s, +{m_one:.0f} MiB; x one call: time {t_jlora / t_one:.2f}, memory "
          f"{m_jlora / max(m_one, 1):.2f}; same ids: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="merge,checkpoint,peft_load,eager,dispatch,tokenize")
    parser.add_argument("--layers", type=int, default=4, help="merge: layers of the stacked kernel; peft_load: model depth x 8; eager: kernels x 56")
    parser.add_argument("--width", type=int, default=1024, help="merge: the kernel's input width")
    parser.add_argument("--steps", type=int, default=100, help="checkpoint: steps already in the directory")
    parser.add_argument("--chars", type=float, default=4.0, help="tokenize: the text's size in millions of characters")
    args = parser.parse_args()
    for part in args.parts.split(","):
        if part == "merge":
            merge(args.layers, args.width)
        elif part == "checkpoint":
            checkpoint(args.steps)
        elif part == "peft_load":
            peft_load(8 * args.layers)
        elif part == "eager":
            eager(args.layers)
        elif part == "dispatch":
            dispatch(args.layers)
        elif part == "tokenize":
            tokenize(args.chars)
        else:
            raise SystemExit(f"--parts: unknown part {part!r} (merge, checkpoint, peft_load, eager, dispatch, tokenize)")


if __name__ == "__main__":
    main()
