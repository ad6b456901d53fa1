"""``lora_init``: put ``LoraWeight`` at the matched kernels of a parameter tree."""

from __future__ import annotations

import collections
import functools
import math
import re
import warnings
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, SingleDeviceSharding

from jlora import _compat
from jlora.config import ALL_LINEAR, LoraConfig, check_key, type_name
from jlora.layout import Layout
from jlora.paths import (DELETED, LEAF, Pattern, compile_patterns, deleted_path, leaves_with_paths, nearest, pattern,
                         replace_leaves)
from jlora.sharding import factor_shardings
from jlora.variables import check_unshared, in_state, mutable_kind, state_paths
from jlora.weight import Lazy, LoraWeight, Trainable, check_registered, has_shape, is_node, is_param

# Output heads that "all-linear" leaves alone, as PEFT does: a classification head whole (PEFT
# trains it as a module to save); in an LM head, the projection (the head itself, or a kernel in it
# that changes the width: onto the vocabulary), not a square transform before it (RoBERTa's
# lm_head/dense, which PEFT adapts).
HEAD_NAMES = frozenset({"classifier", "classification_head", "score", "qa_outputs", "head", "output_head", "logits"})
LM_HEAD = "lm_head"
# Output layers known by the name of the module holding the kernel itself, not of a subtree (BERT's
# cls/predictions/transform/dense is adapted, as PEFT does): Keras's classifiers' "predictions",
# MaxText's "logits_dense".
OUTPUT_LAYER_NAMES = frozenset({"predictions", "logits_dense"})
# A module's weight leaf: Flax's ``kernel``, Equinox's (and PyTorch-style trees') ``weight``, Haiku's
# (and plain dicts') ``w``; its embedding table: Flax's ``embedding``, Haiku's ``embeddings``.
WEIGHT_NAMES = ("kernel", "weight", "w")
EMBEDDING_NAMES = ("embedding", "embeddings")


def _is_float_array(leaf: Any) -> bool:
    return hasattr(leaf, "shape") and hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating)


def _is_adaptable(leaf: Any) -> bool:
    """A leaf LoRA can adapt: a float array with 2 or more axes."""
    return _is_float_array(leaf) and leaf.ndim >= 2


def _is_trainable(leaf: Any) -> bool:
    """A leaf that can be trained in full: a float array, not a lazy one (a quantized kernel)."""
    return _is_float_array(leaf) and not isinstance(leaf, Lazy)


def _describe(leaf: Any) -> str:
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        array = f"{leaf.dtype}[{','.join(map(str, leaf.shape))}]"  # str: a PRNG key's dtype has no numpy name
        return f"lazy {type(leaf).__name__} {array}" if isinstance(leaf, Lazy) else array
    return type(leaf).__name__


def _not_adaptable_because(leaf: Any) -> str:
    """What to say of a targeted leaf that is no float array of 2 or more axes."""
    if hasattr(leaf, "shape"):
        return "biases and norms go in LoraConfig.trainable"
    if type(leaf).__name__ == "SharedNode":  # equinox.nn.Shared's, not imported for a name
        return "eqx.nn.Shared's placeholder for a weight it holds at another path: target that path"
    return "it is not an array"


def _is_linear_kernel(path: str, leaf: Any, weights: bool, wrapped: bool = False) -> bool:
    """Whether all-linear adapts ``path``: a dense ``kernel`` (Haiku: ``w``) but the heads; with
    ``weights`` (infer_layout given, to tell Equinox's linear weights from its tables), a ``weight`` too,
    or the array a ``weight`` node holds (``wrapped``: Haliax's ``weight/0``)."""
    comps = path.split("/")[:-1] if wrapped else path.split("/")
    return (
        comps[-1] in ("kernel", "w", *(("weight",) if weights else ()))
        and _is_adaptable(leaf)
        and not any(c in HEAD_NAMES for c in comps)
        and not (len(comps) > 1 and comps[-2] in OUTPUT_LAYER_NAMES)
        and not (LM_HEAD in comps[:-1] and (comps[-2] == LM_HEAD or leaf.shape[0] != leaf.shape[-1]))
    )


def outside_layers(path: str) -> bool:
    """Whether ``path`` lies outside a stack of numbered layers (``layers/3/...``): where heads are.

    Example:
        >>> from jlora.init import outside_layers
        >>> outside_layers("cls/predictions/decoder/kernel"), outside_layers("layers/3/q_proj/kernel")
        (True, False)
    """
    return not any(c.isdigit() for c in path.split("/"))


def pattern_value(path: str, table: Sequence[tuple[str, Any]], option: str, default: Any) -> Any:
    hits = [(p, v) for p, v in table if pattern(p).match(path)]
    values = {v for _, v in hits}
    if len(values) > 1:
        raise ValueError(
            f"LoraConfig.{option}: patterns {[p for p, _ in hits]} all match '{path}' with different values "
            f"{sorted(values)}; jlora does not pick one (PEFT takes the first): narrow a pattern so they do not overlap "
            "(LoraConfig's rank and alpha are the values where no pattern matches)"
        )
    return hits[0][1] if hits else default


def _all_linear(config: LoraConfig) -> bool:
    return config.targets in (None, ALL_LINEAR)


def _updated_state(matched: Sequence[tuple[str, Any]], state: frozenset[str]) -> str:
    """Why matches in ``state`` are neither adapted nor trained, for an error message; '' if none is."""
    updated = [p for p, _ in matched if in_state(p, state)]
    return (f" ({updated[:3]}: the forward pass updates them, not the optimizer; NNX variables other than "
            "nnx.Param and linen collections other than 'params' are state, neither adapted nor trained)"
            ) if updated else ""


def _why_untrainable(matched: Sequence[tuple[str, Any]], state: frozenset[str]) -> str:
    """Why a ``trainable`` pattern's matches gave nothing to train, for its error message."""
    if updated := _updated_state(matched, state):
        return updated
    lazy = [f"{p}: {_describe(leaf)}" for p, leaf in matched if isinstance(leaf, Lazy)]
    return f" (its leaves {lazy[:3]} are lazy: only plain float arrays can be trained in full)" if lazy else ""


def _why_unused(matched: Sequence[tuple[str, Any]], exclude: Sequence[Pattern], state: frozenset[str]) -> str:
    """Why a target pattern's matches gave nothing to adapt, for its error message."""
    excluded = [p for p, _ in matched if any(ex.match(p) for ex in exclude)]
    if excluded:
        return f" (LoraConfig.exclude leaves out {excluded[:3]})"
    if updated := _updated_state(matched, state):
        return updated
    if any(p.rsplit("/", 1)[-1] in EMBEDDING_NAMES for p, _ in matched):
        return " (an embedding table is adapted only by a pattern naming its module)"
    kernels = [f"{p}: {_describe(leaf)}" for p, leaf in matched if p.rsplit("/", 1)[-1] in WEIGHT_NAMES]
    if kernels:
        return f" (its kernels are {kernels[:3]}: only float arrays with 2 or more axes can be adapted)"
    others = [p for p, leaf in matched if _is_adaptable(leaf)]
    if others and all(p.rsplit("/", 1)[-1] in ("bias", "scale") for p in others):  # a norm stacked with its layers
        return f" (its leaves {others[:4]} are biases or a norm's scale: they go in LoraConfig.trainable)"
    if others:  # e.g. a GRU cell's weight_ih and weight_hh
        return (f" (a module is adapted at its 'kernel', 'weight' or 'w'; its leaves {others[:4]} are adapted by "
                f"patterns naming them, e.g. '{others[0]}')")
    return ""


def _is_weight(path: str, wrapped: set[str]) -> bool:
    """Whether ``path`` is a ``weight`` leaf (Equinox's, PyTorch-style: its layout not known by its
    name) or the array one holds (``wrapped``: Haliax's ``weight/0``)."""
    return path.rsplit("/", 1)[-1] == "weight" or path in wrapped


def _wrapped_weights(paths: Sequence[str]) -> set[str]:
    """Leaves that are a module's weight one level down, the only child of a ``kernel`` or
    ``weight`` node: Haliax's ``NamedArray`` holds its array at ``q_proj/weight/0``.

    Example:
        >>> sorted(_wrapped_weights(["q_proj/weight/0", "q_proj/bias/0", "gru/weight/0", "gru/weight/1"]))
        ['q_proj/weight/0']
    """
    parents = collections.Counter(p.rsplit("/", 1)[0] for p in paths if "/" in p)
    return {p for p in paths if "/" in p and p.rsplit("/", 1)[1].isdigit() and parents[p.rsplit("/", 1)[0]] == 1
            and p.rsplit("/", 2)[-2] in ("kernel", "weight")}


def _weight_modules(entries: Sequence[tuple[str, Any]]) -> list[str]:
    """The modules holding a weight a target can name (a >= 2-D float leaf of ``WEIGHT_NAMES`` or
    ``EMBEDDING_NAMES``; not a norm's, by its module's name: a stack's scales), layer indices written ``*``;
    a weight at the root (a flat dict of arrays) by its own name.

    Example:
        >>> _weight_modules([("layers/0/query/kernel", jnp.ones((2, 2))), ("layers/1/query/kernel", jnp.ones((2, 2))),
        ...                  ("layers/0/norm/scale", jnp.ones(2)), ("stack/ln/weight", jnp.ones((2, 2)))])
        ['layers/*/query']
    """
    wrapped = _wrapped_weights([p for p, _ in entries])
    owners = {path: path.split("/")[:-2 if path in wrapped else -1] for path, _ in entries}
    named = [path for path, leaf in entries
             if (path.rsplit("/", 1)[-1] in WEIGHT_NAMES + EMBEDDING_NAMES or path in wrapped) and _is_adaptable(leaf)
             and not (getattr(leaf, "ndim", 0) == 2 and owners[path] and _NORM.search(owners[path][-1]))]  # norm scales
    listed = set(named) | {path for path, leaf in entries if named and "/" not in path and _is_adaptable(leaf)}
    return list(dict.fromkeys(_module_of(path, owners[path]) for path, _ in entries if path in listed))


def _module_of(path: str, owner: Sequence[str]) -> str:
    """The module ``owner`` (a param's path parts without its leaf name) as a message names it,
    layer indices written ``*``; a param at the root by its own ``path``."""
    return "/".join("*" if c.isdigit() else c for c in owner) or path


_NORM = re.compile(r"norm|^ln(_|\d|$)", re.IGNORECASE)  # a norm module's name: layer_norm, RMSNorm, ln_1, ln


def _no_match(option: str, text: str, paths: Sequence[str], entries: Sequence[tuple[str, Any]]) -> str:
    """The tail of a "pattern matches no param" error: what is near, and what a pattern could name."""
    return _syntax_hint(text, paths) + _near(option, text, paths, entries)


_REGEX_ONLY = re.compile(r"\.\*|\.\+|[|\\^$()]")  # in a PEFT target_modules regex, never in a glob


def _syntax_hint(text: str, paths: Sequence[str]) -> str:
    """A note for a pattern written as PEFT writes one: a regex without jlora's ``re:``, or a
    module path joined with '.'; '' for any other."""
    if text.startswith("re:"):
        return ""
    if _REGEX_ONLY.search(text):
        slashed = "re:" + text.replace("\\.", "/")
        try:
            matches = any(pattern(slashed).match(p) for p in paths)
        except ValueError:  # no valid regular expression either ('q_proj(')
            matches = False
        if matches:
            return f"; a regular expression needs the prefix 're:', over '/'-joined paths: '{slashed}' matches"
        return ("; a regular expression needs the prefix 're:' and matches a whole '/'-joined path "
                "('re:.*/(q_proj|v_proj)')")
    slashed = text.replace(".", "/")
    if slashed != text and any(pattern(slashed).match(p) for p in paths):
        return f"; paths are joined with '/', not '.': '{slashed}' matches"
    return ""


def _near(option: str, text: str, paths: Sequence[str], entries: Sequence[tuple[str, Any]]) -> str:
    if option == "trainable":  # among what can be trained: not an Equinox module's flags and rates
        paths = [p for p, leaf in entries if _is_trainable(leaf)] or list(paths)
        near = nearest(text, paths)
        if near:
            return f"; nearest paths: {near}" + _layer_of_stack(text, entries, trained=True)
        owners = list(dict.fromkeys(_module_of(p, p.split("/")[:-1]) for p in paths))
        return f"; no path is near it; modules with params: {_listed(owners)}"
    modules, kind, what = _weight_modules(entries), "modules", "modules with weights to adapt"
    if not modules:  # no kernel/weight/embedding leaf (a Keras variable list, Penzai): the leaves themselves
        modules = [p for p, leaf in entries if _is_adaptable(leaf)]
        kind, what = "leaves", "no adaptable (float, 2-D or more) leaf is named kernel, weight, w or embedding; " \
                               "leaves a target can name"
    near = nearest(text, modules, n=3)
    return (f"; nearest {kind}: {near}" if near else "") + f"; {what}: {_listed(modules)}" + _layer_of_stack(text, entries)


def _listed(names: Sequence[str], n: int = 12) -> str:
    """The first ``n`` of ``names`` for a message, with how many more."""
    return (", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")) or "none"


def _layer_of_stack(text: str, entries: Sequence[tuple[str, Any]], trained: bool = False) -> str:
    """A note for a pattern naming one layer (``layers/3/up``) of layers stacked into one param
    (``layers/up/kernel``, nn.scan's; ``trained``: a ``trainable`` pattern, which a stacked norm's
    scale or bias, 2-D, answers too), for an error message; '' for any other."""
    unindexed = "/".join(c for c in text.split("/") if not (c.isdigit() or c == "*"))
    if text.startswith("re:") or unindexed in (text, ""):
        return ""
    per_layer = lambda p: 1 if trained and p.rsplit("/", 1)[-1] not in WEIGHT_NAMES + EMBEDDING_NAMES else 2  # a vector
    stacked = [p for p, leaf in entries if getattr(leaf, "ndim", 0) > per_layer(p) and pattern(unindexed).match(p)]
    what = ("which is trained whole for all of them: to train some layers only" if trained else
            "which takes one rank, alpha and adapter shape for all of them: to set them per layer, or adapt some layers only")
    return (f" ('{text}' names layers, but they are stacked in one param ({', '.join(stacked[:3])}), {what}, unroll "
            "the layers or stack them separately)") if stacked else ""


def select(config: LoraConfig, entries: Sequence[tuple[str, Any]],
           state: frozenset[str] = frozenset(), weights: bool = False) -> tuple[list[str], list[str]]:
    """Paths to adapt and paths to fine-tune fully, with the errors a user needs. ``state``: paths
    of variables that the forward pass updates (NNX ``BatchStat``, linen ``batch_stats``), never trained;
    ``weights``: all-linear takes ``weight`` leaves of 2 or more axes too, for infer_layout to sort out.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.init import select
        >>> select(jlora.LoraConfig(targets=["q"]), [("q/kernel", jnp.ones((2, 2))), ("q/bias", jnp.ones(2))])
        (['q/kernel'], [])
    """
    paths = [p for p, _ in entries]
    exclude = compile_patterns(config.exclude)
    all_linear = _all_linear(config)
    targets = () if all_linear else compile_patterns(config.targets)
    trainable = compile_patterns(config.trainable)
    hits = {pat: 0 for pat in targets + trainable}
    wrapped = _wrapped_weights(paths)
    adapt, tune = [], []
    for path, leaf in entries:
        name = path.rsplit("/", 1)[-1]
        mutable = mutable_kind(leaf)
        if mutable and (all_linear or any(pat.match(path) for pat in targets + trainable)):
            raise ValueError(f"lora_init: '{path}' is {mutable} (mutable), not an array: jlora adapts and trains "
                             "arrays. For a Flax NNX model in ref or hijax variable mode, pass nnx.with_vars(model, "
                             "ref=False, hijax=False); for a tree of Refs, read them: jax.tree.map(lambda r: r[...], params)")
        direct = []  # the target patterns naming this leaf itself
        if any(ex.match(path) for ex in exclude) or in_state(path, state):  # state: updated by the forward pass
            chosen = False
        elif all_linear:
            chosen = _is_linear_kernel(path, leaf, weights, weights and path in wrapped)
        else:
            kinds = {pat: pat.match(path) for pat in targets}
            direct = [pat for pat, kind in kinds.items() if kind == LEAF]
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            for pat in direct:
                if not _is_adaptable(leaf):
                    kernel = any(p.rsplit("/", 1)[0] == parent and p.rsplit("/", 1)[-1] in WEIGHT_NAMES
                                 and _is_adaptable(x) for p, x in entries) and pat.text != path
                    raise ValueError(
                        f"lora_init: target {pat.text!r} matches '{path}' ({_describe(leaf)}): only float arrays "
                        f"with 2 or more axes can be adapted ({_not_adaptable_because(leaf)})"
                        + (f"; a pattern naming the module ('{parent.rsplit('/', 1)[-1]}') adapts its kernel, one "
                           "reaching into it matches its other leaves too" if kernel else "")
                    )
            # a subtree match adapts its kernels (WEIGHT_NAMES); an embedding table only where the
            # pattern names its module ("embed_tokens"), not a broader subtree
            weight = name in WEIGHT_NAMES or path in wrapped or (name in EMBEDDING_NAMES and any(
                kind and pat.match(parent) == LEAF for pat, kind in kinds.items()))
            chosen = bool(direct) or (
                any(kinds.values()) and weight and _is_adaptable(leaf)
            )
            for pat, kind in kinds.items():
                hits[pat] += bool(chosen and kind)
        # all-linear's 'weight' (Equinox's, Haliax's) is adapted only where infer_layout sees it in a matmul:
        # one that trainable names is trained whole where it is not (an Embedding's table), or named itself;
        # so is one a module target chose, where infer_layout may see a stacked norm's scale
        provisional = chosen and _is_weight(path, wrapped) and (all_linear or (weights and not direct))
        tuned = [pat for pat in trainable if pat.match(path)]
        for pat in tuned:
            if chosen and pat.match(path) == LEAF:
                if provisional:
                    chosen = provisional = False
                    continue
                raise ValueError(f"lora_init: '{path}' is both a LoRA target and LoraConfig.trainable ({pat.text!r})")
            if not _is_trainable(leaf) and pat.match(path) == LEAF and not in_state(path, state):
                raise ValueError(f"LoraConfig.trainable {pat.text!r} matches '{path}' ({_describe(leaf)}): "
                                 "only float arrays can be trained")
        # a subtree's counters, flags, quantized kernels and NNX state (batch statistics, RNG keys)
        # stay frozen; a pattern that names nothing else is refused below
        tuned = [pat for pat in tuned if _is_trainable(leaf) and not in_state(path, state)]
        for pat in tuned:
            hits[pat] += not chosen or provisional
        if chosen:
            adapt.append(path)
        if tuned and (not chosen or provisional):  # provisional: trained whole if lora_init leaves it out
            tune.append(path)
    for pat, n in hits.items():
        if n == 0:
            option = "targets" if pat in targets else "trainable"
            matched = [(p, leaf) for p, leaf in entries if pat.match(p)]
            raise ValueError(
                f"LoraConfig.{option}: pattern {pat.text!r} matches no param"
                + (" it can use" + (_why_unused(matched, exclude, state) if option == "targets" else _why_untrainable(matched, state)) if matched else "")
                + _no_match(option, pat.text, paths, entries)
            )
    if not adapt:
        raise ValueError(f"LoraConfig.targets={config.targets!r} selects no kernel; paths start {paths[:5]}"
                         + ("; 'all-linear' adapts dense kernels (leaves named 'kernel' or 'w'; 'weight' where "
                            "infer_layout sees it in a matmul, as Equinox's Linear): name the modules or leaves to "
                            "adapt in targets" + ("" if weights else ", or pass lora_init(..., infer_layout=lambda m: m(x))")
                            + _no_match("targets", "", paths, entries)
                            if all_linear else ""))
    patterns = {"rank_pattern": [text for text, _ in config.rank_pattern],
                "alpha_pattern": [text for text, _ in config.alpha_pattern], "exclude": config.exclude}
    for option, texts in patterns.items():  # (layouts may describe a whole model family)
        for text in texts:
            if not any(pattern(text).match(p) for p in paths):
                raise ValueError(f"LoraConfig.{option}: pattern {text!r} matches no param"
                                 + _no_match(option, text, paths, entries))
            if option != "exclude" and not any(pattern(text).match(p) for p in adapt):  # as PEFT, but said
                warnings.warn(f"LoraConfig.{option}: pattern {text!r} matches no kernel that targets adapt (it names "
                              f"params left out of them), so it sets nothing; adapted: {_listed(adapt, 4)}",
                              stacklevel=3)
    return adapt, tune


def _refines(declared: str, inferred: str) -> bool:
    """Whether a declared layout fits the use ``infer_layout`` saw: the same, or a stack ('b')
    where the use keeps the axis as an output (members of an ensemble applied to one input)."""
    return len(declared) == len(inferred) and all(d == i or (d, i) == ("b", "o") for d, i in zip(declared, inferred))


def _init_factors(key: Any, shape: tuple, layout: Layout, rank: int, config: LoraConfig, embedding: bool):
    dtype = config.param_dtype
    a_shape, b_shape = layout.a_shape(shape, rank), layout.b_shape(shape, rank)
    if embedding:  # PEFT: A zeros, B normal for embeddings
        return jnp.zeros(a_shape, dtype), jax.random.normal(key, b_shape, dtype)
    if config.init == "gaussian":
        a = jax.random.normal(key, a_shape, dtype) / rank
    else:  # kaiming_uniform(a=sqrt(5)) as in PEFT and torch.nn.Linear: bound = 1/sqrt(fan_in)
        bound = 1.0 / math.sqrt(layout.fan_in(shape))
        a = jax.random.uniform(key, a_shape, dtype, -bound, bound)
    return a, jnp.zeros(b_shape, dtype)


@functools.lru_cache(maxsize=None)
def _sharded_factory(w_sharding: NamedSharding, layout: Layout) -> Callable:
    """``_init_factors`` made on the devices, in the shardings derived from ``w``'s."""
    return jax.jit(_init_factors, static_argnums=(1, 2, 3, 4, 5), out_shardings=factor_shardings(w_sharding, layout))


def _no_layout(paths: list[str], by_path: dict[str, Any], inferred: bool, unused: Sequence[str],
               all_linear: bool) -> str:
    """The error for n-D kernels whose axes' roles are neither declared nor inferred: every one of
    them, and the layouts of the common kinds (a guess would adapt the wrong axes, or share one
    adapter across a stack of layers); ``unused``: declared layout patterns that match no param (a typo?)."""
    listed = ", ".join(f"'{p}' {tuple(by_path[p].shape)}" for p in paths[:5]) + (", ..." if len(paths) > 5 else "")
    how = ("infer_layout saw no matmul, lookup or conv of them that it could read; declare them"
           if inferred else "pass lora_init(..., infer_layout=f), f a function of the params that runs the model once "
           "(linen: lambda p: model.apply({'params': p}, x); an NNX or Equinox module: lambda m: m(x)), which "
           "reads them off that call, or declare them")
    return (f"jlora cannot tell the input and output axes of the kernel(s) {listed}: {how} as "
            "LoraConfig(layouts={pattern: layout}), one letter per axis: b batch (a stack of layers or experts, "
            "each its own adapter), i input, o output. E.g. 'bio' for nn.scan-stacked Dense (layers, in, out), "
            "'ioo' for DenseGeneral to heads (in, heads, head_dim), 'iio' for DenseGeneral from heads "
            "(heads, head_dim, out), 'iiio' for a 2-D conv (h, w, in, out)"
            + (f". LoraConfig.layouts patterns {list(unused)[:5]} match no param" if unused else "")
            + (". targets='all-linear' adapts dense kernels only, as PEFT's, and tells a conv window from one "
               "by infer_layout: with it, convs are left alone" if all_linear and not inferred else ""))


def lora_init(
    key: Any,
    params: Any,
    config: LoraConfig,
    *,
    infer_layout: Callable[[Any], Any] | None = None,
) -> Any:
    """Replace the kernels ``config`` selects by ``LoraWeight(w, a, b)``; mark ``trainable`` leaves.

    ``infer_layout(params)``, if given, is traced (abstractly) to learn how each kernel is used, which
    gives the batch/input/output axes of n-D kernels (DenseGeneral, conv, ``nn.scan``-stacked layers).
    A 2-D ``kernel`` (Flax) defaults to ``(in, out)``; a 2-D ``weight`` (Equinox's Linear and PyTorch
    store ``(out, in)``, an embedding table ``(in, out)``) has no default: infer it or declare it.
    ``config.layouts`` declares layouts per pattern.

    A kernel with a ``NamedSharding`` gets factors created directly on its devices in the derived
    shardings (``jlora.sharding.factor_specs``); under ``jax.jit``, so does one whose type says how
    it is sharded (a mesh with ``Explicit`` axes). On ``Auto`` axes under ``jax.jit`` give the out
    shardings instead: ``jlora.sharding.shardings(jax.eval_shape(init, params), mesh, rules)``.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"q_proj": {"kernel": jnp.ones((16, 16)), "bias": jnp.zeros(16)}}
        >>> p = jlora.lora_init(jax.random.key(0), params, jlora.LoraConfig(rank=4, targets=["q_proj"]))
        >>> p["q_proj"]["kernel"].a.shape
        (16, 4)
    """
    if not isinstance(config, LoraConfig):
        order = (" (the arguments go lora_init(key, params, config))"
                 if any(isinstance(x, LoraConfig) for x in (key, params)) else "")
        raise ValueError(f"lora_init: config must be a jlora.LoraConfig, got {type_name(config)} "
                         f"(jlora's is jlora.LoraConfig(rank=..., alpha=..., targets=[...])){order}")
    check_key(key, "lora_init")
    if infer_layout is not None and not callable(infer_layout):
        raise ValueError(f"lora_init: infer_layout must be a function of the params that runs the model once (linen: "
                         f"lambda p: model.apply({{'params': p}}, x); an NNX or Equinox module: lambda m: m(x)), got "
                         f"{type(infer_layout).__name__}")
    check_unshared(params, "lora_init")
    if (gone := deleted_path(params)) is not None:  # JAX's error, where an array is first read, names none
        raise ValueError(f"lora_init: '{gone}' {DELETED}; pass live arrays")
    entries = leaves_with_paths(params, is_leaf=is_param)  # a quantized (lazy) kernel is one leaf
    if not any(has_shape(leaf) for _, leaf in entries):  # a model object (a Keras model has a dtype), a boxed tree
        got = type_name(params) if params is None else f"{type_name(params)} {repr(params)[:60]}"
        kinds = sorted({type_name(leaf) for _, leaf in entries})
        raise ValueError(f"lora_init: params hold no arrays (got {got}"
                         + (f", whose leaves are {', '.join(kinds[:3])} objects" if entries else "")
                         + "): pass the base model's param tree (a linen model's variables['params'], Haiku's "
                         "transformed.init(key, x), Keras's {v.path: v.value for v in model.trainable_variables}, "
                         "Penzai's pz.freeze_params(model); an NNX or Equinox module as it is)")
    clashes = sorted({p for p, n in collections.Counter(p for p, _ in entries).items() if n > 1})
    if clashes:
        raise ValueError(f"lora_init: params have several leaves at each of the paths {clashes[:5]} (a key holding '/'?): "
                         "jlora addresses params by '/'-joined paths; rename the keys")
    for path, leaf in entries:
        if is_node(leaf):
            raise ValueError(f"lora_init: params already hold {leaf!r} at '{path}'; lora_init takes the base params (a new "
                             "adapter over this one: lora_init(key, jlora.merge(params), config), whose base, "
                             "jlora.base, is then the adapted model)")
        if hasattr(type(leaf), "__jax_array__") and not isinstance(leaf, (jax.Array, Lazy)) and not mutable_kind(leaf):
            kind = f"{type(leaf).__module__.split('.')[0]}.{type(leaf).__name__}"  # keras.Variable
            raise ValueError(f"lora_init: '{path}' is a {kind}, a variable holding an array, not an array: jlora "
                             "takes the arrays (Keras: {v.path: v.value for v in model.trainable_variables}, and "
                             "model.stateless_call to run the model on them)")
        if isinstance(leaf, Lazy):
            try:
                check_registered(leaf)
            except TypeError as err:
                raise TypeError(f"lora_init: '{path}': {err}") from None
    adapt, tune = select(config, entries, state_paths(params), weights=infer_layout is not None)
    by_path = dict(entries)
    wrapped = _wrapped_weights(list(by_path))
    declared = [(pattern(p), Layout.parse(s)) for p, s in config.layouts]
    inferred, used_by, vectors = {}, {}, set()
    if infer_layout is not None:
        from jlora.probe import infer_layouts

        inferred = infer_layouts(infer_layout, params, adapt, used_by, vectors)
        if _all_linear(config):  # dense kernels only, as PEFT: no conv window
            linear = {_compat.dot_general_p, _compat.ragged_dot_general_p}
            # a 'weight' (Equinox's Linear, Embedding and norms share the name): only one seen in a matmul, never looked up
            dense = lambda p, uses: (linear & uses and _compat.gather_p not in uses if _is_weight(p, wrapped)
                                     else linear & (uses or linear))
            adapt = [p for p in adapt if dense(p, used_by.get(p, set()))]
            adapted = set(adapt)
            tune = [p for p in tune if p not in adapted]  # select's provisional weights, adapted after all
            if not adapt:
                convs = sorted({p.rsplit("/", 2)[-2] for p in used_by if "/" in p
                                and _compat.conv_general_dilated_p in used_by[p]})
                raise ValueError("LoraConfig.targets='all-linear' selects no kernel: it adapts dense kernels but for "
                                 "the output head, as PEFT's, and infer_layout saw no other kernel in a matmul (in a "
                                 "conv, a lookup, or in no use it could read); name the kernels to adapt"
                                 + (f", e.g. targets={convs[:3]}" if convs else ""))
    new, unknown, narrow, stacked_vectors = {}, [], [], []
    targets = compile_patterns(() if _all_linear(config) else config.targets)
    for path in adapt:
        w = by_path[path]
        rank = pattern_value(path, config.rank_pattern, "rank_pattern", config.rank)
        alpha = pattern_value(path, config.alpha_pattern, "alpha_pattern", config.alpha)
        layouts = {str(l): l for pat, l in declared if pat.match(path)}
        if len(layouts) > 1:
            raise ValueError(f"LoraConfig.layouts: conflicting layouts {sorted(layouts)} for '{path}'")
        layout = next(iter(layouts.values()), None) or inferred.get(path)
        if layouts and path in inferred and not _refines(str(layout), str(inferred[path])):
            warnings.warn(f"lora_init: LoraConfig.layouts declares '{layout}' for '{path}', but infer_layout saw it "
                          f"used as '{inferred[path]}': the declared layout is kept (the adapter's axes, its init "
                          "and its PEFT form follow it); jlora.apply keeps a use factored where that layout "
                          "allows, and materialises the weight, with a MaterializeWarning, where it does not",
                          stacklevel=2)
        if layout is None and w.ndim == 2 and path in vectors and path not in used_by:
            # a layer's vector, never in a matmul or lookup: a stacked norm's scale (Equinox's weight,
            # linen's and NNX's scale), left as a 1-D one is
            if any(pat.match(path) == LEAF for pat in targets):
                raise ValueError(f"lora_init: target matches '{path}' ({_describe(w)}), which each layer of its "
                                 "stack uses as a vector (a norm's scale): only kernels of 2 or more axes per layer "
                                 "can be adapted (biases and norms go in LoraConfig.trainable)")
            stacked_vectors.append(path)
            continue
        if layout is None and _is_weight(path, wrapped) and w.ndim == 2:
            how = ("infer_layout saw no matmul or lookup it could read; declare it"
                   if infer_layout is not None else
                   "pass lora_init(..., infer_layout=lambda m: m(example_input)) (which also tells a norm's scale "
                   "stacked with layers a scan runs, and leaves it alone) or declare it")
            # named by a module above it, seen in no matmul: a stacked norm's scale (layers, features) more likely
            module = path.rsplit("/", 1)[0]
            naming = [pat.text for pat in targets if pat.match(module) == LEAF  # a target naming this module alone
                      and all(p.startswith(module + "/") for p in adapt if pat.match(p))]
            other = ("" if "/" not in path or any(pat.match(path) == LEAF for pat in targets) else
                     "; if it is no linear weight (a norm's scale, stacked with its layers), "
                     + (f"take {naming[0]!r} out of targets (norms go in LoraConfig.trainable)" if naming else
                        f"leave it out: LoraConfig(exclude=['{module}'])"))
            raise ValueError(
                f"lora_init: '{path}' is a 2-D weight: jlora does not guess whether it is stored (out, in), as in "
                f"Equinox's Linear and PyTorch, or (in, out), as an embedding table: {how}, e.g. "
                f"LoraConfig(layouts={{'{path}': 'oi'}}) ('io' for (in, out)){other}"
            )
        layout = layout or Layout.default(w.ndim)
        if layout is None:
            unknown.append(path)
            continue
        if layout.ndim != w.ndim:
            raise ValueError(f"lora_init: layout '{layout}' for '{path}' has {layout.ndim} axes; the kernel has "
                             f"shape {tuple(w.shape)}")
        fan_in, fan_out = layout.fan_in(w.shape), layout.fan_out(w.shape)
        if rank > min(fan_in, fan_out):
            # a small head (NSP's 2 outputs, the classes); a stack of layers (a batch axis) is no head
            if _all_linear(config) and outside_layers(path) and not layout.group("b"):
                narrow.append(f"{path} ({fan_in}x{fan_out})")
                continue
            module, fits = path.rsplit("/", 1)[0] if "/" in path else path, min(fan_in, fan_out)
            why = "it is a stack of layers (a batch axis)" if outside_layers(path) else "it sits in a numbered list of layers"
            hint = (f"targets='all-linear' took it for a hidden layer, as {why}; "
                    f"if it is the output head, leave it out (LoraConfig(exclude=['{module}'])), else give it a rank "
                    f"that fits (LoraConfig(rank_pattern={{'{module}': {fits}}}))" if _all_linear(config) else
                    f"lower the rank, or give this kernel one that fits (LoraConfig(rank_pattern={{'{module}': {fits}}}))")
            raise ValueError(f"lora_init: rank {rank} for '{path}' exceeds min(in={fan_in}, out={fan_out}) of its "
                             f"{_describe(w)} kernel; {hint}")
        leaf_key = jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)
        traced = _compat.is_tracer(w)
        _check_says_sharding(w, path)
        make = (_sharded_factory(w.sharding, layout) if not traced and isinstance(getattr(w, "sharding", None), NamedSharding)
                else _init_factors)
        # an embedding table by its name, or by its use: looked up, never multiplied (Equinox's Embedding.weight)
        lookup_only = used_by.get(path) == {_compat.gather_p}
        a, b = make(leaf_key, tuple(w.shape), layout, rank, config, path.rsplit("/", 1)[-1] in EMBEDDING_NAMES or lookup_only)
        if traced and (typed := _compat.explicit_sharding(w)) is not None:  # under jit on a mesh with Explicit axes
            a, b = (_compat.reshard(f, s) for f, s in zip((a, b), factor_shardings(typed, layout)))
        if (isinstance(w, jax.Array) and not _compat.is_tracer(w) and w.committed
                and isinstance(w.sharding, SingleDeviceSharding)):  # w put on a device
            a, b = jax.device_put((a, b), next(iter(w.devices())))  # the device, not its memory kind
        new[path] = LoraWeight(
            w, a, b, scale=config.scale_for(rank, alpha), layout=layout, path=path, dropout=config.dropout
        )
    if unknown:
        unused = [text for text, _ in config.layouts if not any(pattern(text).match(p) for p in by_path)]
        raise ValueError(_no_layout(unknown, by_path, infer_layout is not None, unused, _all_linear(config)))
    if narrow:  # said: linen names a list of layers layers_0, layers_1, which no rule tells from a head
        warnings.warn(f"lora_init: all-linear leaves out {len(narrow)} kernel(s) narrower than rank {config.rank}, "
                      f"taken for heads: {narrow[:4]}; to adapt them, give them a rank that fits (rank_pattern)",
                      stacklevel=2)
    for pat in targets if stacked_vectors else ():
        if not any(pat.match(p) for p in new):  # a module of norms alone: as a 1-D norm, no kernel to adapt
            raise ValueError(f"LoraConfig.targets: pattern {pat.text!r} matches no kernel to adapt: "
                             f"{[p for p in stacked_vectors if pat.match(p)][:3]} are vectors per layer of a stack "
                             "(a norm's scale); name linear layers, and put norms in LoraConfig.trainable")
    if not new:
        raise ValueError(f"LoraConfig: rank {config.rank} exceeds min(in, out) of every kernel all-linear selects "
                         f"({adapt[:3]}...); lower the rank")
    for path in tune:
        if path not in new:  # select's provisional weights, adapted after all, are not also trained whole
            new[path] = Trainable(_own_copy(by_path[path]))
    return replace_leaves(params, new, is_leaf=is_param)


def _check_says_sharding(w: Any, path: str) -> None:
    """Warn of a lazy kernel whose parts are sharded over devices, but whose kind has no
    ``sharding`` property to say the array's: its factors would be made on one device."""
    if not isinstance(w, Lazy) or isinstance(w, LoraWeight) or getattr(w, "sharding", None) is not None:
        return
    spread = [x for x in jax.tree.leaves(w) if isinstance(x, jax.Array) and not _compat.is_tracer(x)
              and len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated]
    if spread:
        devices = len(spread[0].sharding.device_set)
        kind = type(w).__name__
        warnings.warn(f"lora_init: '{path}' is a lazy {kind} whose arrays are split over {devices} devices, but {kind} "
                      "has no sharding property (the array it stands for's), so the factors of its adapter are made "
                      "on one device, and a restore replicates them: give the kind one, e.g. "
                      "sharding = property(lambda self: self.q.sharding)", stacklevel=3)


def _own_copy(x: Any) -> Any:
    """A leaf trained whole, copied: a step that donates the trainable half (``donate_argnums``)
    deletes it, and the base's array (``model.params``' head) must stay the caller's, as PEFT's
    ``modules_to_save`` trains a copy. Placed as ``x`` was."""
    if not isinstance(x, jax.Array) or _compat.is_tracer(x):
        return x
    return jax.device_put(x, x.sharding, may_alias=False) if x.committed else jnp.copy(x)
