"""Run one benchmark configuration in a fresh Python process and read back its result.

Each configuration gets its own process: peak-memory figures start clean and no compilation cache
is shared. The child prints one line ``RESULT <json>``. A configuration may name another copy of
the library to import (``child_mode``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from typing import Any


def run_child(script: str, args: list[str], label: str, env: dict | None = None,
              log: str | None = None) -> dict | None:
    """``python script *args`` -> the JSON of its last ``RESULT`` line, or ``None`` (reported) if it
    failed. ``env`` adds to the environment; ``log`` names a file for the child's stderr."""
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    if log:
        with open(log, "w") as f:
            f.write(proc.stderr)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode or not lines:
        print(f"[{label}] failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    print(lines[-1], flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def exit_if_failed(failed: list[str]) -> None:
    """End a driver's run (after its table) with an error naming the modes that failed: a mode
    missing from the table must not look like a clean run.

    Example:
        >>> exit_if_failed([])
    """
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (their errors are above)")


def child_mode(spec: str, env: dict) -> tuple[str, dict]:
    """``MODE`` or ``MODE@DIR`` -> (the train_step.py mode, the child's added environment): with
    ``DIR``, its ``jlora`` package is imported instead of the installed one.

    Example:
        >>> child_mode("jlora@/tmp/before", {})[1]["PYTHONPATH"].split(os.pathsep)[0]
        '/tmp/before'
    """
    mode, _, tree = spec.partition("@")
    if not tree:
        return mode, env
    path = os.pathsep.join(p for p in (os.path.abspath(tree), os.environ.get("PYTHONPATH")) if p)
    return mode, {**env, "PYTHONPATH": path}


def file_name(spec: str) -> str:
    """A configuration's name, made safe for a file or folder name (``jlora@/tmp/x`` -> ``jlora__tmp_x``)."""
    return re.sub(r"[^\w.-]", "_", spec)


def timed_steps(compiled: Any, train: Any, state: Any, frozen: Any, steps: int,
                profile: str | None = None) -> tuple[Any, Any, Any, float]:
    """Two warm-up steps, then ``steps`` timed ones of ``compiled(train, state, frozen) -> (train,
    state, loss)`` (under a profiler trace written to ``profile``, if given): ``(train, state, loss,
    seconds per step)``."""
    import jax

    for _ in range(2):
        train, state, loss = compiled(train, state, frozen)
    jax.block_until_ready((train, state, loss))
    with jax.profiler.trace(profile, create_perfetto_trace=True) if profile else contextlib.nullcontext():
        t0 = time.perf_counter()
        for _ in range(steps):
            train, state, loss = compiled(train, state, frozen)
        jax.block_until_ready((train, state, loss))
    return train, state, loss, (time.perf_counter() - t0) / steps


def adapter_step(loss_fn: Any, opt: Any) -> Any:
    """The train step of an adapter mode: ``step(train, opt_state, frozen) -> (train, opt_state,
    loss)`` for ``loss_fn(train, frozen)`` and the optax transformation ``opt``."""
    import jax
    import optax

    def step(t: Any, s: Any, frozen: Any) -> Any:
        loss, g = jax.value_and_grad(loss_fn)(t, frozen)
        u, s = opt.update(g, s, t)
        return optax.apply_updates(t, u), s, loss

    return step
