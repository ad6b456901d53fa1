"""Place base params, adapters and optimizer state on a device mesh (jit with shardings).

*Rules* map a param path (and its shape) to the ``PartitionSpec`` of the **base** leaf; the first
rule that answers wins and unmatched leaves are replicated. An adapter never gets a rule of its
own: its factors derive their specs from the base kernel (``factor_specs``) — ``a`` takes ``w``'s
batch and input-axis specs and ``None`` for the rank, ``b`` takes ``None`` for the rank and
``w``'s batch and output-axis specs — so a train step works on sharded factors and never
gathers a full-size ``ΔW``.

Example:
    >>> import jlora
    >>> mesh = jlora.sharding.make_mesh({"data": 1, "fsdp": -1})
    >>> params = jlora.sharding.place(base_params, mesh, [jlora.sharding.fsdp()])         # doctest: +SKIP
    >>> params = jlora.lora_init(key, params, config)   # a, b created sharded            # doctest: +SKIP
    >>> opt_state = jlora.sharding.init_state(tx, params, mesh, [jlora.sharding.fsdp()])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora import _compat
from jlora.layout import Layout
from jlora.lazy import _user_stacklevel
from jlora.paths import Pattern, nearest, path_str
from jlora.variables import has_variables, without_variables
from jlora.weight import Lazy, LoraWeight, Trainable, has_shape, is_node, is_param

# A rule: (path, shape, mesh) -> the base leaf's PartitionSpec, or None to let later rules answer.
Rule = Callable[[str, tuple, Mesh], Union[PartitionSpec, None]]
RuleLike = Union[Rule, tuple]

# Megatron-style splits per HF model type: "column" shards a kernel's output axis (q, k, v, the
# MLP's up projections), "row" its input axis (the projections back to the hidden size), so each
# attention / MLP block needs one all-reduce. GPT-2's fused c_attn splits its q|k|v output as one
# axis: each device's block is not whole heads, and XLA moves them about (collective-permutes) too.
TENSOR_PARALLEL_PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {"column": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"),
              "row": ("o_proj", "down_proj")},
    "gpt2": {"column": ("attn/c_attn", "mlp/c_fc", "lm_head"), "row": ("attn/c_proj", "mlp/c_proj")},
    "bert": {"column": ("query", "key", "value", "intermediate/dense"),
             "row": ("attention/output/dense", "layer/*/output/dense")},
    "opt": {"column": ("q_proj", "k_proj", "v_proj", "fc1", "lm_head"), "row": ("out_proj", "fc2")},
}
for _alias, _of in {"mistral": "llama", "gemma": "llama", "qwen2": "llama", "roberta": "bert"}.items():
    TENSOR_PARALLEL_PRESETS[_alias] = TENSOR_PARALLEL_PRESETS[_of]


def make_mesh(axes: Mapping[str, int], *, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with named axes over ``devices`` (default: all devices of all processes).

    One size may be ``-1``: the devices left over; without one, the first ``prod(sizes)`` devices
    are used (``{"data": 1}`` is a one-device mesh). Axes are ``Auto``: sharding by ``jit`` in/out
    shardings and propagation, so a function without sharding annotations (a HF Flax model) runs
    on it. jlora works on ``Explicit`` axes too (``jax.make_mesh``'s default from JAX 0.10, see
    ``jlora.explicit``), where the function itself says how its ops are sharded.

    Example:
        >>> import jlora
        >>> mesh = jlora.sharding.make_mesh({"data": -1})
        >>> mesh.axis_names
        ('data',)
    """
    if not isinstance(axes, Mapping):
        raise TypeError(f"make_mesh: axes must map axis names to sizes, e.g. {{'data': -1}}, got {axes!r}")
    devices = list(jax.devices() if devices is None else devices)
    odd = {name: s for name, s in axes.items() if isinstance(s, bool) or not isinstance(s, (int, np.integer))}
    if odd:  # int() would take 2.7 as 2, True as 1, "4" as 4
        raise ValueError(f"make_mesh: sizes must be integers (at most one -1), got {odd}")
    names, sizes = list(axes), [int(s) for s in axes.values()]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"make_mesh: sizes must be positive with at most one -1, got {dict(axes)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"make_mesh: {len(devices)} devices do not divide into {dict(axes)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) > len(devices):
        raise ValueError(f"make_mesh: axes {dict(zip(names, sizes))} need {math.prod(sizes)} devices; there are {len(devices)}")
    auto = (jax.sharding.AxisType.Auto,) * len(names)
    return jax.make_mesh(tuple(sizes), tuple(names), axis_types=auto, devices=devices[: math.prod(sizes)])


def rule(pattern: str, spec: Any) -> Rule:
    """A rule giving leaves whose path matches ``pattern`` (see ``jlora.paths``) the spec ``spec``.

    Example:
        >>> import jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> r = jlora.sharding.rule("embedding", P("model", None))
        >>> tuple(r("wte/embedding", (64, 8), None))
        ('model', None)
    """
    return _PatternRule(Pattern(pattern), _as_spec(spec))


class _PatternRule:
    """``rule``'s rule; ``partition_specs`` warns of one whose pattern matches no leaf (a typo
    would leave the leaves it meant replicated)."""

    def __init__(self, pattern: Pattern, spec: PartitionSpec):
        self.pattern, self.spec = pattern, spec

    def __call__(self, path: str, shape: tuple, mesh: Mesh) -> PartitionSpec | None:
        return self.spec if self.pattern.match(path) else None

    def __repr__(self) -> str:
        return f"sharding.rule({self.pattern.text!r}, {self.spec})"


def from_specs(specs: Any) -> Rule:
    """A rule giving each base leaf the spec at its path in ``specs``, a tree of ``PartitionSpec``
    (or ``NamedSharding``) shaped like the base params: what Flax's partition metadata gives, e.g.
    ``nn.logical_to_mesh(nn.get_partition_spec(params), logical_rules)`` (MaxText's logical axes)
    or ``nnx.get_partition_spec(state)``. The factors then take specs derived from their kernel's,
    as from any rule (Flax's own specs of a LoRA tree would give the kernel's to ``a`` and ``b``;
    the specs ``partition_specs`` gives a LoRA tree are taken by their kernels', ``w``'s; a trainable
    half's, or those over a quantized kernel, hold none and are refused).
    Paths ``specs`` lacks (or holds ``None`` at) are left to later rules.

    Example:
        >>> import jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> r = jlora.sharding.from_specs({"wi": {"kernel": P("fsdp", None)}})
        >>> tuple(r("wi/kernel", (64, 32), None)), r("wo/kernel", (32, 64), None)
        (('fsdp', None), None)
    """
    is_spec = lambda x: x is None or isinstance(x, (PartitionSpec, NamedSharding))
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: is_spec(x) or is_node(x))[0]
    # a LoRA tree's own specs (partition_specs of one): a kernel's is its w's, a leaf trained whole its value's
    for kp, x in flat:
        if isinstance(x, LoraWeight) and (x.w is None or not is_spec(x.w)):
            raise ValueError(f"jlora.sharding.from_specs: the specs at '{path_str(kp)}' hold no kernel spec ("
                             + ("a trainable half's, whose w is None" if x.w is None else
                                f"its w is {type(x.w).__name__}, a quantized kernel")
                             + "): give the specs of the base params, or of a whole LoRA tree over plain kernels")
    flat = [(kp, x.w if isinstance(x, LoraWeight) else x.value if isinstance(x, Trainable) else x) for kp, x in flat]
    others = sorted({type(x).__name__ for _, x in flat if not is_spec(x)})
    if others:
        raise ValueError(f"jlora.sharding.from_specs: specs must be a tree of PartitionSpec (or NamedSharding), "
                         f"found {', '.join(others)} (the params themselves? give their specs, e.g. "
                         "nn.logical_to_mesh(nn.get_partition_spec(params), rules))")
    return _SpecsRule({path_str(kp): x.spec if isinstance(x, NamedSharding) else x for kp, x in flat if x is not None})


class _SpecsRule:
    """``from_specs``'s rule; ``partition_specs`` warns of paths in it that no param has (a typo, or
    the specs of another model, would leave the leaves they meant replicated)."""

    def __init__(self, table: dict[str, PartitionSpec]):
        self.table = table

    def __call__(self, path: str, shape: tuple, mesh: Mesh) -> PartitionSpec | None:
        return self.table.get(path)

    def __repr__(self) -> str:
        return f"sharding.from_specs(specs of {len(self.table)} param{'' if len(self.table) == 1 else 's'})"


def fsdp(axis: str = "fsdp", *, min_size: int = 2**12) -> Rule:
    """Shard each leaf's largest axis that divides evenly over the mesh axis ``axis`` (FSDP / ZeRO-3).

    Leaves smaller than ``min_size`` elements (biases, norms) stay replicated; a mesh without
    ``axis`` is an error (as for ``tensor_parallel``'s axis), not a silently replicated model.

    Example:
        >>> import jlora
        >>> mesh = jlora.sharding.make_mesh({"fsdp": -1})
        >>> tuple(jlora.sharding.fsdp(min_size=1)("w", (8 * mesh.size, 3), mesh))
        ('fsdp', None)
    """

    def fsdp_rule(path: str, shape: tuple, mesh: Mesh) -> PartitionSpec | None:
        n = mesh.shape[_axis_of("fsdp", axis, mesh)]
        if math.prod(shape) < min_size:
            return None
        fits = [ax for ax in range(len(shape)) if shape[ax] % n == 0]
        if not fits:
            return None
        best = max(fits, key=lambda ax: (shape[ax], -ax))
        return PartitionSpec(*(axis if ax == best else None for ax in range(len(shape))))

    return fsdp_rule


def tensor_parallel(model_type: str, axis: str = "model") -> list[Rule]:
    """Megatron column/row rules for a HF model type (``TENSOR_PARALLEL_PRESETS``) over ``axis``.

    Column-parallel kernels shard their output axis (and their bias), row-parallel kernels their
    input axis; kernels stored ``(out, in)`` (GPT-2's Conv1D) are handled through their layout.

    Example:
        >>> import jlora
        >>> rules = jlora.sharding.tensor_parallel("llama")
        >>> tuple(rules[0]("model/layers/0/self_attn/q_proj/kernel", (64, 64), None))
        (None, 'model')
    """
    if model_type not in TENSOR_PARALLEL_PRESETS:
        raise ValueError(
            f"tensor_parallel: no preset for model type {model_type!r} (presets: "
            f"{', '.join(sorted(TENSOR_PARALLEL_PRESETS))}); write rules with jlora.sharding.rule"
        )
    from jlora.hf import LAYOUT_PRESETS

    layouts = [(Pattern(p), Layout.parse(s)) for p, s in LAYOUT_PRESETS.get(model_type, {}).items()]
    preset = TENSOR_PARALLEL_PRESETS[model_type]

    def make(pattern: str, role: str) -> Rule:
        compiled = Pattern(pattern)

        def tp_rule(path: str, shape: tuple, mesh: Any) -> PartitionSpec | None:
            if mesh is not None:
                _axis_of("tensor_parallel", axis, mesh)
            if not compiled.match(path):
                return None
            name = path.rsplit("/", 1)[-1]
            if name == "bias" and len(shape) == 1:
                return PartitionSpec(axis) if role == "o" else PartitionSpec()
            if name != "kernel" or len(shape) != 2:
                return None
            layout = next((l for pat, l in layouts if pat.match(path)), Layout.parse("io"))
            return PartitionSpec(*(axis if r == role else None for r, _ in layout.axes))

        return tp_rule

    return [make(p, "o") for p in preset["column"]] + [make(p, "i") for p in preset["row"]]


def factor_specs(w_spec: Any, layout: Layout | str) -> tuple[PartitionSpec, PartitionSpec]:
    """``(a_spec, b_spec)`` derived from the spec of the base kernel ``w``.

    Example:
        >>> import jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> [tuple(spec) for spec in jlora.sharding.factor_specs(P("fsdp", "model"), "io")]
        [('fsdp', None), (None, 'model')]
    """
    layout = Layout.parse(layout)
    w_spec = _as_spec(w_spec)
    entries = _compat.spec_partitions(w_spec)
    if len(entries) > layout.ndim:
        raise ValueError(f"jlora.sharding.factor_specs: the kernel's spec {w_spec} has {len(entries)} entries, but "
                         f"layout '{layout}' has {layout.ndim} axes")
    entries += (None,) * (layout.ndim - len(entries))
    in_a, in_b = layout.factor_axes()
    nb, ni, no = (len(layout.group(r)) for r in ("b", "i", "o"))
    a, b = [None] * (nb + ni + 1), [None] * (nb + 1 + no)
    for ax, spec in enumerate(entries):
        if ax in in_a:
            a[in_a[ax]] = spec
        if ax in in_b:
            b[in_b[ax]] = spec
    # a kernel marked reduced over mesh axes (an Explicit mesh's FSDP gather, JAX 0.10+): so are its factors
    marks = {k: v for k in ("reduced", "unreduced") if (v := getattr(w_spec, k, None))}
    return PartitionSpec(*a, **marks), PartitionSpec(*b, **marks)


def factor_shardings(w_sharding: NamedSharding, layout: Layout | str) -> tuple[NamedSharding, NamedSharding]:
    """``(a_sharding, b_sharding)`` on ``w``'s mesh, from ``factor_specs``.

    Example:
        >>> import jlora
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jlora.sharding.make_mesh({"model": -1})
        >>> tuple(jlora.sharding.factor_shardings(NamedSharding(mesh, P(None, "model")), "io")[1].spec)
        (None, 'model')
    """
    a_spec, b_spec = factor_specs(w_sharding.spec, layout)
    return NamedSharding(w_sharding.mesh, a_spec), NamedSharding(w_sharding.mesh, b_spec)


def _compile_rule(r: RuleLike) -> Rule:
    if callable(r):
        return r
    if isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str):
        return rule(*r)
    nested = isinstance(r, (tuple, list)) and r and all(callable(x) or isinstance(x, tuple) for x in r)
    raise ValueError(f"jlora.sharding: a rule is a function (path, shape, mesh) -> spec or a (pattern, spec) pair; "
                     f"got {r!r}" + ("; a list of rules inside the rules (tensor_parallel() returns one): "
                                     "pass it as the rules, or add the lists" if nested else ""))


def partition_specs(tree: Any, mesh: Mesh, rules: Sequence[RuleLike]) -> Any:
    """The ``PartitionSpec`` of every leaf of ``tree`` (base params, LoRA params or either half);
    ``None`` for a leaf that is no array (an Equinox module's activation function, a Python float).
    A ``(pattern, spec)`` rule that matches no leaf is warned of (a typo would replicate what it meant).

    ``LoraWeight`` nodes get a ``LoraWeight`` of specs, with the factors' specs derived from
    ``w``'s. Each spec is checked against the leaf's shape and the mesh. A lazy leaf (a quantized
    kernel) gets the spec of the array it stands for, which its method ``part_specs(spec)`` turns
    into its parts' specs (the same pytree); a kind without it can only be replicated.

    Example:
        >>> import numpy as np, jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jlora.sharding.make_mesh({"model": 1})
        >>> tuple(jlora.sharding.partition_specs({"w": np.ones((4, 2))}, mesh, [("w", P("model"))])["w"])
        ('model',)
    """
    if not hasattr(mesh, "axis_names"):
        raise TypeError(f"jlora.sharding: mesh must be a jax.sharding.Mesh (see make_mesh), got {type(mesh).__name__}")
    if callable(rules) or isinstance(rules, (str, Mapping)) or not isinstance(rules, Iterable):
        raise TypeError(f"jlora.sharding: rules must be a list of rules, e.g. [sharding.fsdp(\"fsdp\")], got {rules!r}")
    compiled = [_compile_rule(r) for r in rules]
    seen: list[str] = []  # every leaf's path, a split half's None too
    used: set[int] = set()  # the rules that gave a spec: matched, no need to look again

    def spec_for(path: str, shape: tuple, also: str | None = None) -> PartitionSpec:
        for where in (path, also) if also and also != path else (path,):
            for r in compiled:
                spec = r(where, tuple(shape), mesh)
                if spec is not None:
                    used.add(id(r))
                    try:
                        return _checked(where, tuple(shape), _as_spec(spec), mesh)
                    except ValueError as err:  # which of several rules gave it
                        named = r if isinstance(r, (_PatternRule, _SpecsRule)) else getattr(r, "__qualname__", r)
                        raise ValueError(f"{err}; the rule: {named}") from None
        return PartitionSpec()

    def one(keypath: Any, x: Any) -> Any:
        path = path_str(keypath)
        seen.append(x.path if isinstance(x, LoraWeight) and x.path else path)
        if isinstance(x, LoraWeight):  # matched by the path lora_init gave it, else by where it is now
            if x.path and x.path != path:
                seen.append(path)
            spec = spec_for(x.path or path, x.kernel_shape, also=path)
            return _checked_parts(x.path or path, x, spec, part_specs(x, spec, x.path or path), mesh)
        if isinstance(x, Trainable):
            return Trainable(None if x.value is None else spec_for(path, np.shape(x.value)))
        if isinstance(x, Lazy):
            spec = spec_for(path, x.shape)
            return _checked_parts(path, x, spec, part_specs(x, spec, path), mesh)
        if not has_shape(x):  # an Equinox module's activation, a string: no array to place
            return None
        return spec_for(path, np.shape(x))

    out = jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: x is None or is_param(x))
    for r in compiled:
        if isinstance(r, _PatternRule) and id(r) not in used and not any(map(r.pattern.match, seen)):
            warnings.warn(f"jlora.sharding: the rule for '{r.pattern.text}' matches no param, so it shards nothing "
                          f"(nearest paths: {nearest(r.pattern.text, seen, 3)})", stacklevel=_user_stacklevel())
        if isinstance(r, _SpecsRule) and (stray := sorted(set(r.table) - set(seen))):
            warnings.warn(f"jlora.sharding: from_specs holds specs at {len(stray)} paths no param has, so they shard "
                          f"nothing: {stray[:3]} (nearest paths to '{stray[0]}': {nearest(stray[0], seen, 3)})",
                          stacklevel=_user_stacklevel())
    return out


class NoPartSpecs(ValueError):
    """A lazy kind that cannot say its parts' specs, under a spec that splits the array it stands for.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> class Packed(jlora.Lazy):  # a lazy kind without part_specs(spec)
        ...     shape, dtype = (4, 4), jnp.int8
        >>> jlora.sharding.part_specs(Packed(), P("fsdp", None), "k")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jlora.sharding.NoPartSpecs: jlora.sharding: 'k' is a lazy Packed, and the rules shard the array it stands for as ('fsdp', None): ...
    """


def part_specs(x: Any, spec: PartitionSpec, path: str = "") -> Any:
    """The specs of a lazy value's parts when the array it stands for is sharded as ``spec``: a
    ``LoraWeight``'s factors as derived from it (``factor_specs``), its ``w`` (lazy too, maybe) as it;
    another lazy kind's from its method ``part_specs(spec)``. A plain array keeps ``spec``. ``path``
    names the value in errors.

    Example:
        >>> import numpy as np, jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> lw = jlora.LoraWeight(np.ones((4, 2)), np.ones((4, 1)), np.zeros((1, 2)), scale=1.0)
        >>> specs = jlora.sharding.part_specs(lw, P("fsdp", "model"))
        >>> tuple(specs.w), tuple(specs.a), tuple(specs.b)
        (('fsdp', 'model'), ('fsdp', None), (None, 'model'))
    """
    if not isinstance(x, Lazy):
        return spec
    if isinstance(x, LoraWeight):
        a_spec, b_spec = factor_specs(spec, x.fitted().layout)  # an ensemble's (jax.vmap(lora_init)) leading axis: b
        return x.replace(w=None if x.w is None else part_specs(x.w, spec, path),
                         a=None if x.a is None else a_spec, b=None if x.b is None else b_spec)
    kind_specs = getattr(x, "part_specs", None)
    if callable(kind_specs):
        specs = kind_specs(spec)
        if isinstance(specs, PartitionSpec):  # one for every part: a prefix, as shard_map's in_specs take
            return jax.tree.map(lambda _: specs, x)
        if jax.tree.structure(specs, is_leaf=_spec_or_none) != jax.tree.structure(x, is_leaf=_is_none):
            kind, n = type(x).__name__, len(jax.tree.leaves(x))
            raise ValueError(f"jlora.sharding: {f'{path!r}' if path else 'a value'} is a lazy {kind}, whose part_specs("
                             f"{spec}) gave a {type(specs).__name__}: it returns the pytree of a {kind} (the same "
                             f"structure) with a PartitionSpec (or None) for each of its {n} parts")
        return specs
    if all(s is None for s in spec):
        return jax.tree.map(lambda _: PartitionSpec(), x)
    raise NoPartSpecs(f"jlora.sharding: '{path}' is a lazy {type(x).__name__}, and the rules shard the array it "
                      f"stands for as {tuple(spec)}: give {type(x).__name__} a method part_specs(spec) that returns "
                      "its parts' PartitionSpecs (the same pytree), or a rule that replicates it")


def shardings(tree: Any, mesh: Mesh, rules: Sequence[RuleLike]) -> Any:
    """``partition_specs`` as ``NamedSharding`` on ``mesh`` (for ``jax.jit`` in/out shardings).

    Example:
        >>> import numpy as np, jlora
        >>> mesh = jlora.sharding.make_mesh({"data": -1})
        >>> tuple(jlora.sharding.shardings({"w": np.ones(2)}, mesh, [])["w"].spec)
        ()
    """
    specs = partition_specs(tree, mesh, rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def place(tree: Any, mesh: Mesh, rules: Sequence[RuleLike]) -> Any:
    """``tree`` with every array on ``mesh`` as the rules say (every process passes the same values);
    leaves that are no arrays (functions, Python numbers) stay as they are.

    Example:
        >>> import numpy as np, jlora
        >>> mesh = jlora.sharding.make_mesh({"data": -1})
        >>> tuple(jlora.sharding.place({"w": np.ones((2, 2))}, mesh, [])["w"].sharding.spec)
        ()
    """
    return jax.tree.map(lambda x, s: x if s is None else _put(x, s), tree, shardings(tree, mesh, rules))


def follow_base(node: LoraWeight | Trainable, base_leaf: Any) -> LoraWeight | Trainable:
    """``node`` (an adapter or a fully trained leaf loaded from a file) with its arrays put where
    the base leaf it goes over is, as ``lora_init`` puts new ones: factors in the shardings derived
    from its ``NamedSharding`` on a mesh of devices (an array's, or a ``jax.ShapeDtypeStruct``'s), a
    trainable leaf in that sharding; on its device where it was put on one. A base leaf left
    uncommitted, or without a placement, leaves them where they are.

    Example:
        >>> import jax, numpy as np, jlora
        >>> w = jax.device_put(np.ones((4, 2), np.float32), jax.devices()[0])
        >>> lw = jlora.sharding.follow_base(jlora.LoraWeight(w, np.ones((4, 1)), np.zeros((1, 2)), scale=1.0), w)
        >>> lw.a.devices() == w.devices()
        True
    """
    sharding = getattr(base_leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
        a_sharding, b_sharding = factor_shardings(sharding, node.fitted().layout) if isinstance(node, LoraWeight) else (None, None)
    elif (isinstance(sharding, jax.sharding.SingleDeviceSharding) and isinstance(base_leaf, jax.Array)
          and not _compat.is_tracer(base_leaf) and base_leaf.committed):
        a_sharding = b_sharding = sharding
    else:
        return node
    if isinstance(node, Trainable):
        return Trainable(_put(node.value, sharding))
    return node.replace(a=_put(node.a, a_sharding), b=_put(node.b, b_sharding))


def follow_bases(where: str, nodes: dict[str, LoraWeight | Trainable], base: dict[str, Any]) -> dict[str, Any]:
    """``follow_base`` for each of ``nodes`` (by param path) over its leaf of ``base`` (by path), each
    base leaf's sharding checked first (``check_base_sharding``: ``where`` starts the error).

    Example:
        >>> import numpy as np, jlora
        >>> lw = jlora.LoraWeight(np.ones((4, 2)), np.ones((4, 1)), np.zeros((1, 2)), scale=1.0)
        >>> list(jlora.sharding.follow_bases("load_adapter", {"k": lw}, {"k": np.ones((4, 2))}))
        ['k']
    """
    for path in nodes:
        check_base_sharding(where, path, base[path])
    return {path: follow_base(node, base[path]) for path, node in nodes.items()}


class _NotTheParams(ValueError):
    """``state_shardings``' own refusal, told apart from the tree errors of optax it explains."""


def state_shardings(tx: optax.GradientTransformation, state: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of an optimizer state: each per-param leaf (Adam's moments, ...) shards like its
    param; counts and other scalars are replicated. ``param_shardings`` is ``shardings(params, ...)``
    for the params ``state`` was made from (the full tree or the trainable half).

    Example:
        >>> import numpy as np, optax, jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> tx, params, mesh = optax.adam(1e-3), {"w": np.ones(8)}, jlora.sharding.make_mesh({"data": -1})
        >>> param_shardings = jlora.sharding.shardings(params, mesh, [("w", P("data"))])
        >>> adam, _ = jlora.sharding.state_shardings(tx, tx.init(params), param_shardings, mesh)
        >>> tuple(adam.mu["w"].spec), tuple(adam.nu["w"].spec), tuple(adam.count.spec)  # moments like w; count replicated
        (('data',), ('data',), ())
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    if not has_variables(state):  # jlora.optimizer keeps NNX variables out of its state: so do its shardings
        param_shardings = without_variables(param_shardings)

    def placeholder(x: Any) -> bool:  # where the state holds no array for a param
        return x is None or isinstance(x, optax.MaskedNode)

    def fitting(leaf: Any, sharding: Any) -> Any:  # Adafactor's factored moments have other shapes than their param
        if type(leaf) in (list, tuple):  # several arrays for one param (SM3's, one per axis)
            return jax.tree.map(lambda x: replicated, leaf)
        return sharding if _fits(sharding, np.shape(leaf)) else replicated

    def per_param(x: Any) -> bool:  # where one param's state ends, a container of arrays included
        return x is None or is_node(x) or isinstance(x, optax.MaskedNode) or type(x) in (list, tuple)

    def one(leaf: Any, sharding: Any) -> Any:
        if placeholder(leaf):
            return leaf
        if type(leaf) in (list, tuple) and type(sharding) in (list, tuple):  # a list of the params' own
            if type(sharding) is not type(leaf) or len(sharding) != len(leaf):
                raise _NotTheParams(f"jlora.sharding.state_shardings: the state holds a {type(leaf).__name__} of "
                                    f"{len(leaf)} where param_shardings has a {type(sharding).__name__} of "
                                    f"{len(sharding)}: give the shardings of the params the state was made from")
            return type(leaf)(jax.tree.map(one, x, s, is_leaf=per_param) for x, s in zip(leaf, sharding))
        if is_node(leaf) and type(sharding) is not type(leaf):
            raise _NotTheParams(f"jlora.sharding.state_shardings: the state holds a {type(leaf).__name__} where "
                             f"param_shardings has {'none' if sharding is None else type(sharding).__name__}: give "
                             "the shardings of the params the state was made from (shardings(params, mesh, rules))")
        if isinstance(leaf, LoraWeight):
            def pick(name: str) -> Any:
                mine, theirs = getattr(leaf, name), getattr(sharding, name)
                if not placeholder(mine) and theirs is None:
                    half = "frozen" if name != "w" else "trainable"
                    raise _NotTheParams(f"jlora.sharding.state_shardings: the state holds an array for the {name} of "
                                        f"'{leaf.path}', but param_shardings has none (the shardings of the {half} half of "
                                        "jlora.split?): give the shardings of the params the state was made from")
                return mine if placeholder(mine) else fitting(mine, theirs)
            return sharding.replace(w=pick("w"), a=pick("a"), b=pick("b"))
        if isinstance(leaf, Trainable):
            return leaf if placeholder(leaf.value) else Trainable(fitting(leaf.value, sharding.value))
        return fitting(leaf, sharding)

    try:
        return optax.tree_map_params(
            tx, one, state, param_shardings, transform_non_params=lambda _: replicated,
            is_leaf=per_param,
        )
    except _NotTheParams as err:  # one's own, naming the leaf
        raise ValueError(str(err)) from None
    except ValueError as err:
        raise ValueError("jlora.sharding.state_shardings: the state's per-param leaves are not shaped like the tree "
                         "of param_shardings: give the shardings of the tree the state was made from (for a tx that "
                         "takes its params wrapped, optax.lookahead's LookaheadParams, the tree its state keeps per "
                         "param: shardings(params.fast, mesh, rules)); a tx that keeps no state per param "
                         "(optax.flatten's one vector of all params) cannot be laid out like them; JAX says: "
                         f"{str(err)[:200]}") from None


def _fits(sharding: Any, shape: tuple) -> bool:
    """Whether a ``NamedSharding`` can lay out an array of ``shape`` (``_checked`` would take it)."""
    if not isinstance(sharding, NamedSharding):
        return True
    try:
        _checked("", tuple(shape), sharding.spec, sharding.mesh)
    except ValueError:
        return False
    return True


def init_state(tx: optax.GradientTransformation, params: Any, mesh: Mesh, rules: Sequence[RuleLike]) -> Any:
    """``tx.init(params)`` created directly in the shardings of ``state_shardings`` (``params`` may be
    ``optax.lookahead``'s ``LookaheadParams``, whose state mirrors its fast params).

    Example:
        >>> import numpy as np, optax, jlora
        >>> mesh = jlora.sharding.make_mesh({"data": -1}); tx = optax.adam(1e-3)
        >>> state = jlora.sharding.init_state(tx, {"w": np.ones(2)}, mesh, [])
    """
    per_param = params.fast if isinstance(params, optax.LookaheadParams) else params  # what the state mirrors
    param_shardings = shardings(per_param, mesh, rules)
    flat, treedef = jax.tree_util.tree_flatten(params)
    arrays = [x for x in flat if has_shape(x)]  # an Equinox module's functions stay out of the trace

    def init(arrays: list) -> Any:
        given = iter(arrays)
        return tx.init(treedef.unflatten([next(given) if has_shape(x) else x for x in flat]))

    out = state_shardings(tx, jax.eval_shape(init, arrays), param_shardings, mesh)
    return jax.jit(init, out_shardings=out)(arrays)


def batch_sharding(mesh: Mesh, axes: str | Sequence[str] | None = None) -> NamedSharding:
    """Shard a batch's leading axis over the mesh axes ``axes`` (one name or several); by default
    over those of ``("data", "fsdp")`` the mesh has (data and FSDP parallel). A mesh with neither
    (``{"model": 8}``: tensor parallel only) gets the batch replicated, whole on every device; a
    data-parallel axis of another name (``"batch"``, ``"dp"``) must be named in ``axes``.

    Example:
        >>> import jlora
        >>> tuple(jlora.sharding.batch_sharding(jlora.sharding.make_mesh({"data": -1})).spec)
        ('data',)
    """
    if axes is None:
        present = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    else:
        present = tuple(_axis_of("batch_sharding", a, mesh) for a in ((axes,) if isinstance(axes, str) else axes))
    return NamedSharding(mesh, PartitionSpec(present if len(present) > 1 else (present[0] if present else None)))


def _axis_of(who: str, axis: str, mesh: Mesh) -> str:
    """``axis``, checked to be one of ``mesh``'s axes."""
    if axis not in mesh.axis_names:
        raise ValueError(f"jlora.sharding.{who}: mesh has no axis {axis!r} (axes: {mesh.axis_names})")
    return axis


def _as_spec(spec: Any) -> PartitionSpec:
    if isinstance(spec, PartitionSpec):
        return spec
    if isinstance(spec, (tuple, list)):
        return PartitionSpec(*spec)
    if spec is None or isinstance(spec, str):
        return PartitionSpec(spec)
    raise ValueError(f"expected a PartitionSpec (or a tuple of mesh axis names), got {spec!r}")


def _checked_parts(path: str, x: Lazy, spec: PartitionSpec, specs: Any, mesh: Mesh) -> Any:
    """A lazy value's parts' ``specs`` (for the array it stands for sharded as ``spec``), checked
    as a leaf's spec is: one per part, each fitting its part, whose shape may differ from the
    array's (an int4 kernel packed two to a byte)."""
    if isinstance(x, LoraWeight) and not isinstance(x.w, Lazy):  # its factors' specs are derived to fit
        return specs
    kind = type(x.w if isinstance(x, LoraWeight) else x).__name__
    for i, (part, part_spec) in enumerate(parts_and_specs(x, specs)):
        if part_spec is None or not has_shape(part):
            continue
        try:
            _checked(path, tuple(np.shape(part)), part_spec, mesh)
        except ValueError as err:
            raise ValueError(f"{err}: array {i} of the lazy {kind} there, sharded as its part_specs({spec}) says; the "
                             f"rule saw the array it stands for, of shape {tuple(x.shape)}: give '{path}' a spec that "
                             "divides its parts too (a rule of its own), or replicate it") from None
    return specs


def _is_none(x: Any) -> bool:
    return x is None


def _spec_or_none(x: Any) -> bool:  # None: the spec of a part that is no array
    return x is None or isinstance(x, PartitionSpec)


def parts_and_specs(x: Any, specs: Any) -> list[tuple[Any, PartitionSpec | None]]:
    """Each part of the lazy value ``x`` (a ``None`` child too) beside its spec in ``specs``, which
    ``part_specs`` gave, of ``x``'s structure (``None`` for a part that is no array).

    Example:
        >>> import numpy as np, jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> lw = jlora.LoraWeight(np.ones((4, 2)), np.ones((4, 1)), np.zeros((1, 2)), scale=1.0)
        >>> [(np.shape(part), tuple(spec)) for part, spec in
        ...  jlora.sharding.parts_and_specs(lw, jlora.sharding.part_specs(lw, P("fsdp", None)))]
        [((4, 2), ('fsdp', None)), ((4, 1), ('fsdp', None)), ((1, 2), (None, None))]
    """
    parts, given = jax.tree.leaves(x, is_leaf=_is_none), jax.tree.leaves(specs, is_leaf=_spec_or_none)
    return list(zip(parts, given, strict=True))  # part_specs checked their structure


def divides(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> bool:
    """Whether ``spec`` splits an array of ``shape`` evenly over ``mesh`` (and names its axes once).

    Example:
        >>> import jlora
        >>> from jax.sharding import PartitionSpec as P
        >>> mesh = jlora.sharding.make_mesh({"model": 1})
        >>> jlora.sharding.divides((4, 2), P("model"), mesh), jlora.sharding.divides((4,), P(None, "model"), mesh)
        (True, False)
    """
    try:
        _checked("", tuple(shape), spec, mesh)
    except ValueError:
        return False
    return True


def check_base_sharding(where: str, path: str, leaf: Any) -> None:
    """Refuse, naming ``path``, a base leaf whose ``NamedSharding`` does not divide its shape (a
    ``jax.ShapeDtypeStruct`` may carry one that JAX refuses for an array): adapters loaded onto it,
    put alike, would fail inside JAX, naming no param.

    Example:
        >>> import jax, jlora
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> mesh = jlora.sharding.make_mesh({"fsdp": 1})
        >>> leaf = jax.ShapeDtypeStruct((4, 2), "float32", sharding=NamedSharding(mesh, P("fsdp")))
        >>> jlora.sharding.check_base_sharding("load_adapter", "dense/kernel", leaf)  # divides: no error
    """
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and hasattr(leaf, "shape"):
        try:
            _checked(path, tuple(leaf.shape), sharding.spec, sharding.mesh, f"{where}: the base's sharding")
        except ValueError as err:
            raise ValueError(f"{err}: give the base a sharding that divides it (replicate that axis, or split it "
                             "over mesh axes whose sizes divide it)") from None


def _checked(path: str, shape: tuple, spec: PartitionSpec, mesh: Mesh, what: str = "sharding rule") -> PartitionSpec:
    entries = _compat.spec_partitions(spec)  # a spec with reduced axes (an Explicit mesh's) is not iterated
    if len(entries) > len(shape):
        raise ValueError(f"{what} for '{path}': spec {spec} has {len(entries)} entries; the leaf has shape {shape}")
    per_axis = [() if names is None else (names,) if isinstance(names, str) else tuple(names) for names in entries]
    used = [n for names in per_axis for n in names]
    twice = sorted({n for n in used if used.count(n) > 1})
    if twice:
        raise ValueError(f"{what} for '{path}': spec {spec} splits two axes over mesh axis {twice[0]!r}; "
                         "a mesh axis splits one axis of a leaf")
    for ax, names in enumerate(per_axis):
        if not names:
            continue
        unknown = [n for n in names if n not in mesh.axis_names]
        if unknown:
            raise ValueError(f"{what} for '{path}': mesh has no axis {unknown[0]!r} (axes: {mesh.axis_names})")
        n = math.prod(mesh.shape[name] for name in names)
        if shape[ax] % n:
            raise ValueError(
                f"{what} for '{path}': axis {ax} of shape {shape} has size {shape[ax]}, which does not "
                f"divide over mesh axes {names} of size {n} (spec {spec})"
            )
    return spec


def _put(x: Any, sharding: NamedSharding) -> Any:
    if sharding.is_fully_addressable or isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)  # another process holds part of the mesh: each process gives its shards
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
