"""Run one benchmark configuration in a fresh Python process and read back its result.

Each configuration gets its own process: peak-memory figures start clean and no compilation cache
is shared. The child prints one line ``RESULT <json>``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


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
