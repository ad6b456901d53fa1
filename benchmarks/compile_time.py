"""Compile-time benchmark: how long each ``train_step.py`` mode takes to trace and compile, as the
median of several fresh processes, against the full fine-tune's in the same run; optionally where
XLA spends it, pass by pass.

    python benchmarks/compile_time.py                                   # small Llama, CPU
    python benchmarks/compile_time.py --preset llama-1b --modes full,floor,hand,jlora --repeats 3
    python benchmarks/compile_time.py --preset llama-1b --modes full,jlora --passes /tmp/passes

One compile takes 20-30 s at Llama-1B shape on a GPU and varies by several percent from process
to process, so a single figure per mode (as ``train_step.py`` gives) can move the ratio by 0.1 or
more. Here modes run round-robin, each repeat in a fresh process (no compilation cache is shared),
with abstract weights (nothing is allocated on the device); the ratio is taken of the medians.

A mode written ``MODE@DIR`` runs ``MODE`` with the ``jlora`` package found in ``DIR`` (put first on
``PYTHONPATH``): an A/B of two versions of the library in one run, e.g. the previous commit's
(``git archive HEAD jlora | tar -x -C /tmp/before``) against the working tree:

    python benchmarks/compile_time.py --preset llama-1b --modes full,jlora,jlora@/tmp/before --repeats 3

With ``--passes DIR`` each child logs XLA's pass timings (``TF_CPP_VMODULE=hlo_pass_pipeline=1``;
logs kept in DIR) and the driver prints, per pass, the seconds each mode spent in it, largest
difference to the first mode first. What no pass accounts for is code generation (LLVM, ptxas)
and JAX's own work outside the trace. Logging slows the compile a little: time without it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics

from child import child_mode, exit_if_failed, file_name, run_child  # benchmarks/child.py (this folder is on sys.path when run as a script)

STEP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_step.py")
PASS_LOG = {"TF_CPP_MIN_LOG_LEVEL": "0", "TF_CPP_VMODULE": "hlo_pass_pipeline=1"}
_MODULE = re.compile(r"Running HLO pass pipeline on module (\S+?):")
_PASS = re.compile(r"HLO pass: (\S+) time: ([\d.]+) (ns|us|ms|s)\b")
_UNIT = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
_CLOCK = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+) ")
SPAN = "(first to last pass on the step)"


def pass_seconds(log: str, module: str = "step") -> dict[str, float]:
    """Seconds per HLO pass name, summed over every pipeline run on modules whose name holds
    ``module``, from a log written with ``TF_CPP_VMODULE=hlo_pass_pipeline=1``; a pipeline run
    inside another counts as a pass too. ``SPAN`` holds the wall time from the first to the last
    of those passes (autotuning included; code generation comes after).

    Example:
        >>> pass_seconds("Running HLO pass pipeline on module jit_step: opt\\n"
        ...              "HLO pass: dce time: 1.5 ms (1 us)\\nHLO pass: dce time: 500 us (1 us)\\n")
        {'dce': 0.002}
    """
    seconds: dict[str, float] = collections.defaultdict(float)
    current, first, last = "", None, None
    for line in log.splitlines():
        m = _MODULE.search(line)
        if m:
            current = m.group(1)
        if module in current and (t := _clock(line)) is not None:
            first, last = first if first is not None else t, t
        if m:
            continue
        m = _PASS.search(line)
        if m and module in current:
            seconds[m.group(1)] += float(m.group(2)) * _UNIT[m.group(3)]
    if first is not None:
        seconds[SPAN] = last - first
    return dict(seconds)


def _clock(line: str) -> float | None:
    """Seconds since midnight of a glog/absl log line (``I1201 21:42:59.934406 ...``)."""
    m = _CLOCK.match(line)
    return None if m is None else int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", help="a train_step.py preset")
    parser.add_argument("--modes", default="full,floor,hand,jlora", help="train_step.py modes; ratios are to the first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--passes", metavar="DIR", default=None, help="log XLA's pass timings to DIR and break them down")
    parser.add_argument("--json-out", default=None)
    args = parser.parse_args()
    modes = args.modes.split(",")
    if args.passes:
        os.makedirs(args.passes, exist_ok=True)

    runs: dict[str, list[dict]] = {m: [] for m in modes}
    failed: list[str] = []
    passes: dict[str, list[dict]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:
            log = os.path.join(args.passes, file_name(mode) + f".{rep}.log") if args.passes else None
            name, env = child_mode(mode, PASS_LOG if log else {})
            result = run_child(STEP, ["--preset", args.preset, "--mode", name, "--stop", "compile"], mode,
                               env=env, log=log)
            if result is None:
                failed.append(mode)
                continue
            runs[mode].append(result)
            if log:
                with open(log) as f:
                    passes[mode].append(pass_seconds(f.read()))
            if args.json_out:  # written after every run: a call cut short keeps what it measured
                with open(args.json_out, "w") as f:
                    json.dump(dict(preset=args.preset, runs=runs, passes=passes), f, indent=2)
    print_table(args.preset, runs)
    if args.passes:
        print_passes(passes)
    exit_if_failed(failed)


def print_table(preset: str, runs: dict[str, list[dict]]) -> None:
    done = {m: r for m, r in runs.items() if r}
    if not done:
        return
    any_r = next(iter(done.values()))[0]
    print(f"\npreset {preset}; device {any_r['device']}; jax {any_r['jax']}; medians of {max(map(len, done.values()))} processes")
    base = statistics.median(r["compile_s"] for r in next(iter(done.values())))
    w = max(14, *(len(m) + 2 for m in done))
    print(f"{'mode':<{w}}{'compile s':>10}{'min-max':>14}{'trace s':>9}{'x first':>9}"
          f"{'entry ops':>11}{'fusions':>9}{'cuBLAS':>8}{'Triton':>8}")
    gpu = (lambda n: "-") if "cpu" in any_r["device"].lower() else str  # GEMM kernels exist on a GPU only
    for mode, rs in done.items():
        c = [r["compile_s"] for r in rs]
        med = statistics.median(c)
        last = rs[-1]
        print(f"{mode:<{w}}{med:>10.1f}{f'{min(c):.1f}-{max(c):.1f}':>14}{statistics.median(r['trace_s'] for r in rs):>9.1f}"
              f"{med / base:>9.2f}{last['entry_instructions']:>11}{last['fusions']:>9}{gpu(last['cublas_gemms']):>8}"
              f"{gpu(last['triton_gemms']):>8}")


def print_passes(passes: dict[str, list[dict]], top: int = 25) -> None:
    done = {m: p for m, p in passes.items() if p}
    if not done:
        return
    medians = {m: {name: statistics.median(p.get(name, 0.0) for p in ps) for name in set().union(*ps)}
               for m, ps in done.items()}
    first = next(iter(medians))
    names = sorted(set().union(*medians.values()),
                   key=lambda n: -max(abs(medians[m].get(n, 0.0) - medians[first].get(n, 0.0)) for m in medians))
    print(f"\nXLA passes, seconds (median over processes); largest difference to {first} first")
    w = max(12, *(len(m) + 2 for m in medians))
    print(f"{'pass':<44}" + "".join(f"{m:>{w}}" for m in medians))
    for name in names[:top]:
        print(f"{name[:43]:<44}" + "".join(f"{p.get(name, 0.0):>{w}.2f}" for p in medians.values()))


if __name__ == "__main__":
    main()
