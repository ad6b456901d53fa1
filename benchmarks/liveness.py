"""What is alive at the peak of a compiled step: read from XLA's optimised, scheduled HLO dump.

XLA's own memory report lists allocation slots, not values; this walks the ENTRY computation in
its schedule order, gives each value a lifetime (definition to last reader; bitcasts and
get-tuple-elements alias their operand, a tuple-shaped result is one value per element) and
prints the values alive at the peak, grouped by shape and the JAX op that made them. Parameters
and constants are left out, so the total is below the device's peak (use it to compare two modes,
not as an absolute).

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*step.*" \\
        python benchmarks/train_step.py --preset llama-1b --modes jlora
    python benchmarks/liveness.py /tmp/dump/*step*after_optimizations.txt
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

_ARRAY = r"(bf16|f16|f32|f64|s8|u8|s16|u16|s32|u32|s64|u64|pred)\[([0-9,]*)\]"
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
          "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ALIASES = {"bitcast", "get-tuple-element", "tuple", "copy-done"}


def nbytes(shape: str) -> int:
    """Bytes of every array type written in ``shape`` (``bf16[4,8]`` or a tuple of them)."""
    total = 0
    for dtype, dims in re.findall(_ARRAY, shape):
        count = 1
        for d in filter(None, dims.split(",")):
            count *= int(d)
        total += count * _BYTES[dtype]
    return total


def parse_entry(text: str) -> list[tuple[str, str, str, list[str], str, int | None]]:
    """(name, shape, opcode, operands, JAX op name, tuple index) per ENTRY instruction, in order."""
    body = text[text.index("\nENTRY "):].split("\n")[1:]
    out = []
    for line in body:
        if line.startswith("}"):
            break
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([a-z\-]+)\((.*)$", line)
        if not m:
            continue
        name, shape, op, tail = m.groups()
        depth, end = 1, 0
        while depth and end < len(tail):
            depth += {"(": 1, ")": -1}.get(tail[end], 0)
            end += 1
        operands = re.findall(r"%([\w.\-]+(?:#\d+)?)", tail[:end])
        meta = re.search(r'op_name="([^"]*)"', line)
        index = re.search(r"index=(\d+)", line) if op == "get-tuple-element" else None
        out.append((name, shape, op, operands, meta.group(1) if meta else "", int(index.group(1)) if index else None))
    return out


def live_at_peak(text: str) -> tuple[int, list[tuple[str, int, str]]]:
    """(peak bytes, [(shape, bytes, JAX op name)] of the values alive there)."""
    instrs = parse_entry(text)
    elements = {name: [a[0] + "[" + a[1] + "]" for a in re.findall(_ARRAY, shape)]
                for name, shape, op, *_ in instrs if shape.startswith("(") and op not in ("tuple", "parameter")}
    alias: dict[str, str] = {}
    for name, _, op, operands, _, index in instrs:
        if op == "get-tuple-element" and operands and operands[0] in elements:
            alias[name] = f"{operands[0]}#{index or 0}"
        elif op in _ALIASES and operands:
            alias[name] = operands[0]

    def root(name: str) -> str:
        while name in alias:
            name = alias[name]
        return name

    last: dict[str, int] = {}
    for i, (_, _, op, operands, _, _) in enumerate(instrs):
        for o in operands:
            last[root(o)] = i
    values = []  # (defined at, name, bytes, shape, JAX op)
    for i, (name, shape, op, _, meta, _) in enumerate(instrs):
        if name in alias or op in ("parameter", "constant"):
            continue
        parts = elements.get(name)
        for k, part in enumerate(parts) if parts else [(None, shape)]:
            values.append((i, name if k is None else f"{name}#{k}", nbytes(part), part, meta))
    delta: dict[int, int] = collections.defaultdict(int)
    for i, name, size, _, _ in values:
        delta[i] += size
        delta[max(last.get(name, i), i) + 1] -= size
    current, peak, at = 0, 0, 0
    for i in range(len(instrs) + 1):
        current += delta[i]
        if current > peak:
            peak, at = current, i
    alive = [(re.sub(r"\{[^}]*\}", "", shape), size, meta) for i, name, size, shape, meta in values
             if i <= at <= max(last.get(name, i), i)]
    return peak, alive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dumps", nargs="+", help="*after_optimizations.txt files (or .gz)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    for path in args.dumps:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt") as f:
            peak, alive = live_at_peak(f.read())
        print(f"{path}: {peak / 2**30:.2f} GiB alive at the peak (parameters and constants excluded)")
        groups: dict[tuple[str, str], list[int]] = collections.defaultdict(lambda: [0, 0])
        for shape, size, meta in alive:
            group = groups[(shape, re.sub(r"\d+", "#", meta))]
            group[0] += size
            group[1] += 1
        for (shape, meta), (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:args.top]:
            print(f"  {size / 2**20:9.1f} MiB  x{count:<4d} {shape:28s} {meta[:100]}")


if __name__ == "__main__":
    main()
