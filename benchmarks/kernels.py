"""Device time per kind of kernel, from a profile of a train step and its optimised HLO.

Where did a mode's extra milliseconds go? Profile the timed steps with command buffers off (so
that each kernel carries its HLO instruction's name) and dump the optimised HLO:

    XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_dump_to=/tmp/dump_jlora --xla_dump_hlo_module_re=.*step.*" \\
        python benchmarks/train_step.py --preset llama-1b --modes jlora --steps 3 --profile /tmp/prof
    python benchmarks/kernels.py /tmp/prof/jlora /tmp/dump_jlora/*step*after_optimizations.txt --steps 3

Each kernel is classed by its instruction: opcode or fusion kind, output shape, and the main ops
fused in it (``dot``, ``reduce``, ``exponential``…), so that the 16 layers' copies add up. With
``--base TRACE HLO`` (e.g. the floor's), prints the difference per class instead.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re

_KEY_OPS = ("dot", "reduce", "exponential", "divide", "rsqrt", "logistic", "concatenate", "slice",
            "dynamic-slice", "dynamic-update-slice", "transpose", "add", "multiply", "gather", "scatter")


def _open(path: str):
    return gzip.open(path, "rt") if path.endswith(".gz") else open(path)


def device_times(trace_dir: str) -> dict[str, list]:
    """HLO instruction -> [total µs, launches] over all traced steps (GPU events only)."""
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    times: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("ph") == "X" and "/device:" in process.get(e.get("pid"), ""):
            op = e.get("args", {}).get("hlo_op") or e["name"]
            times[op][0] += e.get("dur", 0.0)
            times[op][1] += 1
    if not times:
        raise SystemExit(f"{path}: no device events (processes {sorted(set(process.values()))}): kernels.py reads "
                         "a GPU profile; a CPU trace has only host events")
    return times


def instruction_classes(hlo_path: str) -> dict[str, str]:
    """HLO instruction name -> its class (``kind | shape | fused ops``)."""
    computations: dict[str, list[str]] = {}
    current = None
    for line in _open(hlo_path):
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = header.group(1)
            computations[current] = []
        elif current and line.startswith("  "):
            computations[current].append(line)
    instr = re.compile(r"\s+(?:ROOT )?%?([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\(")

    def ops_in(name: str, depth: int = 0) -> set:
        found = set()
        for line in computations.get(name, []):
            m = instr.match(line)
            if m:
                found.add(m.group(3))
                if depth < 3:
                    for called in re.findall(r"calls=%?([\w.\-]+)", line):
                        found |= ops_in(called, depth + 1)
        return found

    classes = {}
    for lines in computations.values():
        for line in lines:
            m = instr.match(line)
            if not m:
                continue
            name, shape, op = m.groups()
            shape = re.sub(r"\{[^}]*\}", "", shape)[:60]
            if op == "fusion":
                kind = re.search(r"kind=(\w+)", line)
                called = re.search(r"calls=%?([\w.\-]+)", line)
                fused = ",".join(sorted(ops_in(called.group(1)) & set(_KEY_OPS))) if called else ""
                classes[name] = f"fusion:{kind.group(1) if kind else '?'} | {shape} | {fused}"
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]+)"', line)
                classes[name] = f"{target.group(1) if target else 'custom-call'} | {shape}"
            else:
                classes[name] = f"{op} | {shape}"
    return classes


def by_class(trace_dir: str, hlo_path: str, steps: int) -> dict[str, list]:
    """Class -> [ms per step, launches per step]."""
    classes = instruction_classes(hlo_path)
    out: dict[str, list] = collections.defaultdict(lambda: [0.0, 0.0])
    for op, (us, n) in device_times(trace_dir).items():
        cls = classes.get(op, "? | " + re.sub(r"[._]\d+$", "", op))
        out[cls][0] += us / 1e3 / steps
        out[cls][1] += n / steps
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trace", help="profile directory of one mode (train_step.py --profile DIR: DIR/MODE)")
    parser.add_argument("hlo", help="the step's *after_optimizations.txt dump (.gz allowed)")
    parser.add_argument("--steps", type=int, required=True, help="timed steps in the profile")
    parser.add_argument("--base", nargs=2, metavar=("TRACE", "HLO"), help="print the difference to this mode")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    mine = by_class(args.trace, args.hlo, args.steps)
    base = by_class(*args.base, args.steps) if args.base else {}
    total = sum(v[0] for v in mine.values())
    print(f"device busy {total:.2f} ms/step" + (f", {total - sum(v[0] for v in base.values()):+.2f} ms over base" if base else ""))
    rows = [(mine.get(k, [0, 0]), base.get(k, [0, 0]), k) for k in set(mine) | set(base)]
    rows.sort(key=lambda r: -abs(r[0][0] - r[1][0]))
    for (ms, n), (base_ms, base_n), cls in rows[:args.top]:
        diff = f"{ms - base_ms:+8.3f}  (base {base_ms:7.3f} ms x{base_n:5.0f})  " if base else ""
        print(f"{ms:8.3f} ms x{n:5.0f}  {diff}{cls}")


if __name__ == "__main__":
    main()
