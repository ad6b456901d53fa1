"""Scaling benchmark: the LoRA fine-tune of ``train_step.py``'s model on 1 and N devices, data
parallel and FSDP, with the global batch scaled by the device count.

Each (mode, devices) pair runs in its own process; the driver prints tokens/s (total and per
device), step time, peak memory per device and the scaling efficiency against 1 device measured
in the same call, and checks the data-parallel step's HLO: the only all-reduces must be of the
adapters' gradients (none of a full-size weight).

    python benchmarks/scaling.py                        # tiny Llama, all local devices (CPU: simulate 8
                                                        # with XLA_FLAGS=--xla_force_host_platform_device_count=8)
    python benchmarks/scaling.py --preset llama-1b      # Llama-3.2-1B shape, bf16, 4 x 1024 per device (GPUs)

Modes: ``dp`` (weights replicated, batch split) and ``fsdp`` (weights, adapters and optimizer
state sharded over the devices, batch split), both from ``examples/train_fsdp.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import re
import time

from child import run_child  # benchmarks/child.py (this folder is on sys.path when run as a script)

ROOT = pathlib.Path(__file__).resolve().parent.parent
PRESETS = {  # per-device batch; the model presets live in examples/train_fsdp.py
    "tiny": dict(batch=2, seq=64, rank=8, steps=10),
    "llama-1b": dict(batch=4, seq=1024, rank=16, steps=10),
}


def _train_fsdp():
    spec = importlib.util.spec_from_file_location("train_fsdp", ROOT / "examples" / "train_fsdp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BYTES = {"f32": 4, "bf16": 2, "f16": 2, "f64": 8, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}


def all_reduced(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
    """``(dtype, shape)`` of every array an all-reduce in ``hlo`` produces (tuple results included)."""
    arrays = []
    for line in hlo.splitlines():
        m = re.search(r"=\s*(.*?)\s+all-reduce(-start)?\(", line)
        if m:
            arrays += [(dtype, tuple(int(d) for d in dims.split(",") if d))
                       for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))]
    return arrays


def run(mode: str, n_devices: int, preset: str, batch: int, seq: int, rank: int, steps: int) -> dict:
    import jax
    import numpy as np

    import jlora

    fsdp_example = _train_fsdp()
    mesh_axes = {"data": n_devices} if mode == "dp" else {"fsdp": n_devices}
    t0 = time.perf_counter()
    r = fsdp_example.setup(mesh_axes, mode, preset, seq=seq, rank=rank, lr=1e-4)
    step, trainable, opt_state, frozen = r["step"], r["trainable"], r["opt_state"], r["frozen"]
    tokens = fsdp_example.global_batch(0, batch * n_devices, seq, r["model"].config.vocab_size, r["data_sharding"])
    compiled = step.lower(trainable, frozen, opt_state, tokens).compile()
    compile_s = time.perf_counter() - t0
    kernels = {tuple(x.shape) for x in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
               if isinstance(x, jlora.LoraWeight)}
    reduced = all_reduced(compiled.as_text())
    for _ in range(2):  # warm-up
        trainable, opt_state, loss = compiled(trainable, frozen, opt_state, tokens)
    jax.block_until_ready(loss)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainable, opt_state, loss = compiled(trainable, frozen, opt_state, tokens)
    jax.block_until_ready(loss)
    step_s = (time.perf_counter() - t0) / steps
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in r["mesh"].devices.flat]
    mem = compiled.memory_analysis()
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(trainable))
    return dict(
        mode=mode, devices=n_devices, step_ms=1e3 * step_s, tokens_per_s=batch * n_devices * seq / step_s,
        setup_and_compile_s=compile_s, peak_bytes_per_device=max(peaks) if all(peaks) else None,
        xla_bytes_per_device=(mem.argument_size_in_bytes + mem.temp_size_in_bytes) if mem else None,
        all_reduce_bytes=int(sum(BYTES.get(t, 4) * np.prod(s) for t, s in reduced)), adapter_bytes=int(adapter_bytes),
        full_size_all_reduce=sorted({s for _, s in reduced if s in kernels}), loss=float(loss.addressable_data(0)),
        device=str(jax.devices()[0].device_kind), jax=jax.__version__,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--modes", default="dp,fsdp")
    ap.add_argument("--devices", default=None, help="device counts, e.g. 1,2 (default: 1 and all)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: "mode,n"
    args = ap.parse_args()
    p = dict(PRESETS[args.preset])
    if args.steps:
        p["steps"] = args.steps
    if args.one:
        mode, n = args.one.split(",")
        print("RESULT " + json.dumps(run(mode, int(n), args.preset, p["batch"], p["seq"], p["rank"], p["steps"])), flush=True)
        return
    if args.devices:
        counts = [int(c) for c in args.devices.split(",")]
    else:
        import jax

        counts = sorted({1, jax.device_count()})
    results = []
    for mode in args.modes.split(","):
        for n in counts:
            result = run_child(__file__, ["--preset", args.preset, "--one", f"{mode},{n}"]
                               + (["--steps", str(args.steps)] if args.steps else []), f"{mode} x{n}")
            if result is None:
                continue
            results.append(result)
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(dict(preset=args.preset, config=p, results=results), f, indent=2)
    print_table(args.preset, p, results)


def print_table(preset: str, p: dict, results: list[dict]) -> None:
    if not results:
        return
    print(f"\npreset {preset}, {p['batch']} x {p['seq']} tokens per device, r={p['rank']}; "
          f"device {results[0]['device']}; jax {results[0]['jax']}")
    print(f"{'mode':<6}{'devices':>8}{'ms/step':>9}{'tokens/s':>11}{'per dev':>10}{'eff.':>7}{'peak GiB/dev':>14}"
          f"{'XLA GiB/dev':>13}{'all-reduce MiB':>16}{'adapters MiB':>14}  full-size all-reduce")
    gib = lambda b: f"{b / 2**30:.2f}" if b else "-"
    for r in results:
        one = next((o for o in results if o["mode"] == r["mode"] and o["devices"] == 1), None)
        eff = f"{r['tokens_per_s'] / (r['devices'] * one['tokens_per_s']):.3f}" if one else "-"
        print(f"{r['mode']:<6}{r['devices']:>8}{r['step_ms']:>9.1f}{r['tokens_per_s']:>11.0f}"
              f"{r['tokens_per_s'] / r['devices']:>10.0f}{eff:>7}{gib(r['peak_bytes_per_device']):>14}"
              f"{gib(r['xla_bytes_per_device']):>13}{r['all_reduce_bytes'] / 2**20:>16.2f}"
              f"{r['adapter_bytes'] / 2**20:>14.2f}  {r['full_size_all_reduce'] or 'none'}")


if __name__ == "__main__":
    main()
