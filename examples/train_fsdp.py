"""LoRA fine-tune of a HF Flax causal LM (Llama) on a device mesh: FSDP, tensor or data parallel,
in one process or several (``jax.distributed``), with orbax adapter checkpoints.

The same script runs on one CPU, on 8 simulated CPU devices, on a GPU or across hosts:

    python examples/train_fsdp.py                                      # all devices, FSDP
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python examples/train_fsdp.py --mesh data=2,model=4 --parallel tp
    # two processes on this machine (each with its own devices), one global mesh:
    python examples/train_fsdp.py --num-processes 2 --process-id 0 --coordinator localhost:12355 &
    python examples/train_fsdp.py --num-processes 2 --process-id 1 --coordinator localhost:12355

Base weights are created directly in their shardings (``jax.jit`` with ``out_shardings``: no
host copy of the model), the adapters take the shardings derived from their kernels, the optimizer
state shards like the adapters, and the batch is split over the data (and FSDP) axes. Synthetic
tokens make every run reproducible, whatever the mesh or the number of processes.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import sharding
from jlora.checkpoint import AdapterCheckpointer

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128, dtype="float32"),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, dtype="bfloat16"),
}
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def rules_for(parallel: str) -> list:
    """Sharding rules: ``fsdp`` shards every large weight over the ``fsdp`` axis, ``tp`` splits
    attention and MLP Megatron-style over ``model``, ``dp`` replicates the weights."""
    if parallel == "fsdp":
        return [sharding.fsdp("fsdp")]
    if parallel == "tp":
        return sharding.tensor_parallel("llama", "model")
    if parallel == "dp":
        return []
    raise ValueError(f"--parallel must be fsdp, tp or dp, got {parallel!r}")


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,fsdp=-1"`` -> ``{"data": 2, "fsdp": -1}``."""
    try:
        return {name: int(size) for name, size in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"--mesh: expected name=size pairs like data=2,fsdp=4, got {text!r}") from None


def make_model(preset: str, seq: int) -> Any:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_flax_llama import FlaxLlamaForCausalLM

    p = dict(PRESETS[preset])
    dtype = jnp.dtype(p.pop("dtype"))
    # HF's Flax rotary embedding breaks below 2 x head_dim positions
    config = LlamaConfig(**p, max_position_embeddings=max(seq, 256), tie_word_embeddings=False)
    return FlaxLlamaForCausalLM(config, dtype=dtype, _do_init=False), dtype


def init_base(model: Any, dtype: Any, mesh: Any, rules: list, seq: int, seed: int) -> Any:
    """Base params made on the devices, in their shardings."""

    def init(key: jax.Array) -> Any:
        params = model.init_weights(key, (1, seq))
        return jax.tree.map(lambda x: x.astype(dtype), params)

    key = jax.random.key(seed)
    out = sharding.shardings(jax.eval_shape(init, key), mesh, rules)
    return jax.jit(init, out_shardings=out)(key)


def global_batch(step: int, batch: int, seq: int, vocab: int, data_sharding: Any) -> jax.Array:
    """The same tokens for a step on any mesh: each process hands over only its own shards.

    Each row counts up from a random token with a random stride (mod the vocabulary): the next
    token follows from the context, so the loss has somewhere to go."""
    rng = np.random.default_rng(1000 + step)
    start, stride = rng.integers(0, vocab, (batch, 1)), rng.integers(1, 8, (batch, 1))
    tokens = ((start + stride * np.arange(seq)) % vocab).astype(np.int32)
    return jax.make_array_from_callback(tokens.shape, data_sharding, lambda index: tokens[index])


def setup(mesh_axes: dict[str, int], parallel: str = "fsdp", preset: str = "tiny", seq: int = 16,
          rank: int = 8, lr: float = 1e-2, seed: int = 0, merged: bool = False) -> dict:
    """Model, sharded params and optimizer state, and the jitted train step.

    ``merged=True`` runs the step on ``W + s·A@B`` formed each step (``jlora.merge``) instead of the
    lazy factored path: a baseline to compare the compiled programs with.
    """
    mesh = sharding.make_mesh(mesh_axes)
    rules = rules_for(parallel)
    model, dtype = make_model(preset, seq)
    base = init_base(model, dtype, mesh, rules, seq, seed)
    config = jlora.LoraConfig(rank=rank, alpha=2 * rank, targets=list(TARGETS))
    params = jlora.lora_init(jax.random.key(seed + 1), base, config)  # A/B sharded like their kernels
    trainable, frozen = jlora.split(params)
    tx = jlora.optimizer(optax.adamw(lr), trainable)
    opt_state = sharding.init_state(tx, trainable, mesh, rules)
    lazy_forward = jlora.apply(model.__call__)

    def loss_fn(trainable: Any, frozen: Any, tokens: jax.Array) -> jax.Array:
        params = jlora.combine(trainable, frozen)
        out = model(tokens, params=jlora.merge(params)) if merged else lazy_forward(tokens, params=params)
        logits = out.logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

    def step(trainable: Any, frozen: Any, opt_state: Any, tokens: jax.Array) -> tuple:
        loss, grads = jax.value_and_grad(loss_fn)(trainable, frozen, tokens)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    trainable_shardings = sharding.shardings(trainable, mesh, rules)
    state_shardings = sharding.state_shardings(tx, opt_state, trainable_shardings, mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step = jax.jit(step, out_shardings=(trainable_shardings, state_shardings, replicated), donate_argnums=(0, 2))
    return {"mesh": mesh, "model": model, "step": step, "trainable": trainable, "frozen": frozen,
            "opt_state": opt_state, "data_sharding": sharding.batch_sharding(mesh), "seq": seq}


def train(mesh_axes: dict[str, int], parallel: str = "fsdp", preset: str = "tiny", steps: int = 5,
          batch: int = 8, seq: int = 16, rank: int = 8, lr: float = 1e-2, seed: int = 0,
          checkpoint_dir: str | None = None, log: bool = True) -> dict:
    """Train and return ``{"losses", "params", "mesh", "step_time"}``."""
    shape = dict(sharding.make_mesh(mesh_axes).shape)
    splits = math.prod(shape.get(axis, 1) for axis in ("data", "fsdp"))  # batch_sharding's axes
    if batch % splits:  # refused now, not after the model is built
        raise SystemExit(f"--batch {batch} does not split over the mesh's data and fsdp axes ({splits} ways); "
                         f"pass a multiple of {splits}")
    if checkpoint_dir:  # refused now, not after training
        with AdapterCheckpointer(checkpoint_dir, async_save=False) as earlier:
            if earlier.all_steps():
                raise SystemExit(f"--checkpoint-dir {checkpoint_dir} holds an earlier run's steps; pass a new directory")
    run = setup(mesh_axes, parallel, preset, seq, rank, lr, seed)
    step, trainable, opt_state, frozen = run["step"], run["trainable"], run["opt_state"], run["frozen"]
    vocab = run["model"].config.vocab_size
    losses, times = [], []
    for i in range(steps):
        tokens = global_batch(i, batch, seq, vocab, run["data_sharding"])
        start = time.perf_counter()
        trainable, opt_state, loss = step(trainable, frozen, opt_state, tokens)
        loss = float(loss.addressable_data(0))  # replicated: every process holds it
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if log and jax.process_index() == 0:
            print(f"step {i:3d}  loss {loss:.4f}  {times[-1] * 1e3:7.1f} ms", flush=True)
    params = jlora.combine(trainable, frozen)
    if checkpoint_dir:
        ckpt = AdapterCheckpointer(checkpoint_dir, async_save=False)
        ckpt.save(steps, params, opt_state=opt_state)
        ckpt.close()
    return {"losses": losses, "params": params, "mesh": run["mesh"], "step_time": float(np.median(times[1:] or times))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mesh", default="data=1,fsdp=-1", help="mesh axes, e.g. data=2,fsdp=4 (-1: the rest)")
    ap.add_argument("--parallel", default="fsdp", choices=("fsdp", "tp", "dp"))
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=16)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--checkpoint-dir")
    ap.add_argument("--coordinator", help="host:port of process 0 (multi-process)")
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the losses as one JSON line at the end")
    args = ap.parse_args(argv)
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    result = train(parse_mesh(args.mesh), args.parallel, args.preset, args.steps, args.batch, args.seq,
                   args.rank, args.lr, checkpoint_dir=args.checkpoint_dir)
    if jax.process_index() == 0:
        mesh = result["mesh"]
        print(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices in {jax.process_count()} process(es); "
              f"median step {result['step_time'] * 1e3:.1f} ms")
        print(jlora.summary(result["params"]))
        if args.json:
            print(json.dumps({"losses": result["losses"]}))
    if args.num_processes > 1:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()
