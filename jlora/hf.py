"""HuggingFace Flax models (transformers 4.x): target presets, layouts, and a small handle.

Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
    >>> model = FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    >>> lm = jlora.hf.LoraModel(model, jlora.LoraConfig(rank=4, alpha=8), jax.random.key(0))
    >>> lm(jnp.ones((1, 5), jnp.int32)).logits.shape
    (1, 5, 64)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import jlora
from jlora import _compat
from jlora.adapter import as_opened, check_config_makes, host_array, writes_here
from jlora.config import ALL_LINEAR, LoraConfig, check_key, type_name
from jlora.init import outside_layers
from jlora.lazy import _hashable, _TraceCache, _user_stacklevel
from jlora.paths import leaves_with_paths
from jlora.tree import check_whole
from jlora.weight import LoraWeight, is_node, is_param

# PEFT's default targets per model type, as Flax param-path patterns.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "gpt2": ("c_attn",),
    "llama": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "gemma": ("q_proj", "v_proj"),
    "bert": ("query", "value"),
    "roberta": ("query", "value"),
    "xlm-roberta": ("query", "value"),
    "electra": ("query", "value"),
    "t5": ("q", "v"),
    "mt5": ("q", "v"),
    "bart": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gpt_neo": ("q_proj", "v_proj"),
    "gptj": ("q_proj", "v_proj"),
    "bloom": ("query_key_value",),
    "vit": ("query", "value"),
}

# Kernels stored (out, in): declared, never guessed.
LAYOUT_PRESETS: dict[str, dict[str, str]] = {
    "gpt2": {"c_attn": "oi", "c_proj": "oi", "c_fc": "oi", "q_attn": "oi"},
}


def _check_config_type(config: Any) -> None:
    if config is not None and not isinstance(config, LoraConfig):
        raise TypeError(f"jlora.hf: config must be a jlora.LoraConfig, e.g. jlora.LoraConfig(rank=8, alpha=16, "
                        f"targets=[...]), got {type_name(config)}")


def preset_config(model_type: str, config: LoraConfig | None = None) -> LoraConfig:
    """``config`` with the model type's preset targets (when it names none) and declared layouts.

    Example:
        >>> import jlora
        >>> jlora.hf.preset_config("gpt2").targets, jlora.hf.preset_config("gpt2").to_dict()["layouts"]["c_attn"]
        (('c_attn',), 'oi')
    """
    _check_config_type(config)
    config = config or LoraConfig()
    changes: dict[str, Any] = {}
    if config.targets is None:
        if model_type not in TARGET_PRESETS:
            raise ValueError(
                f"jlora.hf: no target preset for model type {model_type!r} (presets: "
                f"{', '.join(sorted(TARGET_PRESETS))}); pass LoraConfig(targets=[...]) or targets='all-linear'"
            )
        changes["targets"] = list(TARGET_PRESETS[model_type])
    layouts = {**LAYOUT_PRESETS.get(model_type, {}), **dict(config.layouts)}
    if layouts != dict(config.layouts):
        changes["layouts"] = layouts
    return config.replace(**changes) if changes else config


def example_inputs(model: Any) -> dict[str, jax.Array]:
    """Small dummy inputs that the model's ``__call__`` accepts (to trace layouts): token ids
    (``input_ids``, and ``decoder_input_ids`` for an encoder-decoder), ``pixel_values`` (NCHW, as
    HF's Flax vision models take them), ``input_features`` (speech), ``input_values`` (audio) and
    a speech encoder-decoder's ``inputs``, each shaped like the dummy HF initialises the model with
    (``model.input_shape``); a multiple-choice model's token ids have two choices.

    Example:
        >>> import jlora
        >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
        >>> jlora.hf.example_inputs(FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2)))["input_ids"].shape
        (1, 8)
    """
    _check_model(model, "jlora.hf.example_inputs")
    args = _call_args(model)
    shapes = model.input_shape if isinstance(model.input_shape[0], tuple) else (model.input_shape,)
    of_rank = lambda n: next((tuple(s) for s in shapes if len(s) == n), None)  # HF's dummy with n axes
    inputs = {}
    if "input_ids" in args:  # at least 8 tokens; more where the model needs them (BigBird's blocks)
        multiple_choice = any(c.__name__.endswith("ForMultipleChoice") for c in type(model).__mro__)
        tokens = (multiple_choice and of_rank(3)) or of_rank(2)  # HF's multiple-choice dummy: 2-D or (1, 1, tokens)
        length = max(8, tokens[-1] if tokens else 0)
        choices = (2,) if multiple_choice else ()  # (batch, choices, tokens)
        inputs["input_ids"] = jnp.ones((1, *choices, length), jnp.int32)
    if "decoder_input_ids" in args:
        inputs["decoder_input_ids"] = jnp.ones((1, 8), jnp.int32)
    for name, rank in (("pixel_values", 4), ("input_features", 3), ("input_values", 2)):
        shape = of_rank(rank)
        if name in args and shape is not None:  # pixels: HF's dummy is NHWC, __call__ takes NCHW
            inputs[name] = jnp.zeros((shape[0], shape[3], shape[1], shape[2]) if rank == 4 else shape, jnp.float32)
    if "inputs" in args and "input_ids" not in args:  # a speech encoder-decoder: the encoder's dummy, HF's first
        inputs["inputs"] = jnp.zeros(shapes[0], jnp.float32)
    if not inputs:
        raise ValueError(f"jlora.hf: no example inputs for {type(model).__name__} (its __call__ takes "
                         f"{', '.join(args[1:6])}, ...); pass inputs={{...}}: keyword arguments for one small call")
    return inputs


def _frozen(value: Any) -> Any:
    """``value`` with its lists, tuples and dicts as (sorted) tuples, to key a cache."""
    if isinstance(value, dict):
        return tuple(sorted(((k, _frozen(v)) for k, v in value.items()), key=repr))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    return value


def _by_identity(value: Any) -> bool:
    """Whether ``value``, or an item of a list, tuple or dict in it, is an object that compares by
    identity (its class keeps ``object``'s ``__eq__``): equal keys would not say its state is the same."""
    if isinstance(value, dict):
        return any(_by_identity(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_by_identity(v) for v in value)
    return type(value).__module__ != "builtins" and type(value).__eq__ is object.__eq__


def _check_model(model: Any, who: str) -> None:
    """Refuse what is not a HF Flax model instance: its class, its params, another object."""
    if isinstance(model, type):
        name = model.__name__
        raise TypeError(f"{who}: pass a model instance, e.g. {name}(config) or {name}.from_pretrained(...), "
                        f"not the class {name}")
    if not hasattr(getattr(model, "config", None), "model_type"):
        hint = "; pass the model, and params of your own as params=..." if isinstance(model, dict) else ""
        raise TypeError(f"{who}: takes a HF Flax model (a transformers FlaxPreTrainedModel), "
                        f"got {type_name(model)}{hint}")


def _call_args(model: Any) -> tuple[str, ...]:
    import inspect

    return tuple(inspect.signature(type(model).__call__).parameters)


def lora_init(key: Any, model: Any, config: LoraConfig | None = None, params: Any = None, *,
              inputs: dict[str, Any] | None = None) -> Any:
    """``jlora.lora_init`` for a HF Flax model: preset targets and layouts, inferred n-D layouts.
    The layouts come from tracing ``model(**inputs)`` (``example_inputs(model)`` by default).

    ``config``: ``None`` for the model type's preset (``TARGET_PRESETS``); a config without targets takes
    the preset's. ``params``: the base params to adapt (``model.params`` by default: a model made
    with ``_do_init=False`` holds none). ``inputs``: keyword arguments for one small call of the
    model, where the default inputs do not suit it.

    Example:
        >>> import jax, jlora
        >>> from transformers import BertConfig, FlaxBertModel
        >>> m = FlaxBertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                              intermediate_size=64, vocab_size=50))
        >>> p = jlora.hf.lora_init(jax.random.key(0), m)  # bert preset: query, value
        >>> print(jlora.summary(p))
        param                                        shape  layout  rank  scale  trainable
        encoder/layer/0/attention/self/query/kernel  32x32  io         8      1        512
        encoder/layer/0/attention/self/value/kernel  32x32  io         8      1        512
        trainable params: 1,024 || all params: 28,736 || trainable%: 3.5635
    """
    _check_model(model, "jlora.hf.lora_init")
    config = preset_config(model.config.model_type, config)
    if params is not None:  # refused here, not by Flax inside the trace: another model's, or more than the model's
        _check_fits("jlora.hf.lora_init", model, params, whole=True,  # the trace reads every param
                    missing_hint="a task model made with _do_init=False from a base model's weights: initialise the "
                                 "missing ones first, model.init_weights(key, model.input_shape, params=params)",
                    extra_hint="params beyond the model's (a value head beside it): jlora.lora_init(key, params, "
                               "config, infer_layout=f), f a function of them that runs your whole model")
    params = model.params if params is None else params
    if config.targets == ALL_LINEAR:  # PEFT's all-linear leaves the output embeddings alone
        config = config.replace(exclude=config.exclude + tuple(output_embeddings(params, model.config)))
    inputs = example_inputs(model) if inputs is None else inputs
    if not isinstance(inputs, Mapping):  # a dict, a tokenizer's BatchEncoding, a FrozenDict
        raise ValueError(f"jlora.hf: inputs= takes the keyword arguments of one small call of the model, a dict such "
                         f"as {{'input_ids': ids}}; got {type_name(inputs)}")

    def traced(p: Any) -> Any:
        try:
            return model(**inputs, params=p)
        except Exception as err:
            if hasattr(err, "add_note"):  # Python 3.11+
                shapes = {k: tuple(v.shape) if hasattr(v, "shape") else type(v).__name__ for k, v in inputs.items()}
                err.add_note(f"jlora.hf: the call traced to infer layouts, {type(model).__name__}(**{shapes}), failed; "
                             "pass inputs={...}: keyword arguments for one small call that the model takes")
            raise

    return jlora.lora_init(key, params, config, infer_layout=traced)


def _option_value(v: Any) -> bool:
    """Whether a ``generate`` keyword is a number given as a 0-d array (``np.array(3)``), which HF
    reads as the number it holds."""
    return (isinstance(v, (np.ndarray, jax.Array)) and v.ndim == 0 and not _compat.is_tracer(v)
            and (jnp.issubdtype(v.dtype, jnp.number) or v.dtype == np.bool_))


def output_embeddings(params: Any, config: Any) -> list[str]:
    """Paths of the kernels that project onto the vocabulary outside the layer stack: a model's
    output embeddings (an LM or MLM head that is not tied to the input table), which PEFT's
    ``all-linear`` leaves alone whatever their name (``get_output_embeddings``). One is a kernel
    ``(d, V)`` where the params hold an input table ``(V, d)`` and ``V`` is a vocabulary size of
    ``config`` or of a part of it (an encoder-decoder's decoder): a layer that only happens to be as
    wide as the vocabulary (Wav2Vec2's feature projection, with a vocabulary of characters) is none.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from transformers import BertConfig
        >>> params = {"cls": {"predictions": {"decoder": {"kernel": jnp.ones((32, 50))}}},
        ...           "bert": {"embeddings": {"word_embeddings": {"embedding": jnp.ones((50, 32))}},
        ...                    "encoder": {"layer": {"0": {"output": {"dense": {"kernel": jnp.ones((64, 32))}}}}}}}
        >>> jlora.hf.output_embeddings(params, BertConfig(vocab_size=50))
        ['cls/predictions/decoder/kernel']
    """
    vocabs = _vocab_sizes(config)
    leaves = leaves_with_paths(params, is_leaf=is_param)  # a quantized table is one leaf
    is_2d = lambda leaf: len(getattr(leaf, "shape", ())) == 2
    tables = {tuple(leaf.shape) for path, leaf in leaves
              if path.endswith("embedding") and is_2d(leaf) and leaf.shape[0] in vocabs}
    return [path for path, leaf in leaves
            if path.endswith("kernel") and is_2d(leaf) and (leaf.shape[1], leaf.shape[0]) in tables
            and outside_layers(path)]  # a kernel of layer "3" is no head


def _vocab_sizes(config: Any, depth: int = 2) -> set[int]:
    """The vocabulary sizes of an HF ``config`` and of the configs it holds (an encoder-decoder's
    ``decoder``, a multimodal model's ``text_config``)."""
    found = {config.vocab_size} if isinstance(getattr(config, "vocab_size", None), int) else set()
    if depth:
        for part in vars(config).values() if hasattr(config, "__dict__") else ():
            if hasattr(part, "to_dict") and hasattr(part, "model_type"):  # a config held by the config
                found |= _vocab_sizes(part, depth - 1)
    return found


def _check_fits(op: str, model: Any, params: Any, whole: bool = False, *, missing_hint: str = "",
                extra_hint: str = "") -> dict[str, Any]:
    """Refuse ``params`` (plain, or a LoRA tree: its bases) that are not ``model``'s: leaves it
    lacks, or of other shapes; ``whole``: every leaf of it, too (a half of ``jlora.split`` may lack
    some). The hints end the message where leaves are missing, or extra. Returns the model's leaves
    (shapes and dtypes) by path."""
    model_leaves = dict(leaves_with_paths(model.params_shape_tree))
    want = {p: tuple(x.shape) for p, x in model_leaves.items()}
    given = {}
    for p, x in leaves_with_paths(params, is_leaf=is_param):
        x = x.w if isinstance(x, LoraWeight) else x.value if isinstance(x, jlora.Trainable) else x
        if hasattr(x, "shape"):
            given[p] = tuple(x.shape)
    missing = sorted(set(want) - set(given)) if whole else []
    extra = sorted(set(given) - set(want))
    wrong = [p for p in sorted(set(want) & set(given)) if given[p] != want[p]]
    if missing or wrong or extra:
        said = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"'{wrong[0]}' is {given[wrong[0]]} here but {want[wrong[0]]} in the model"] if wrong else []) + (
            [f"{extra[:3]} are no params of the model (a head of your own?)"] if extra else [])
        hints = [hint for hint, found in ((missing_hint, missing), (extra_hint, extra)) if hint and found]
        raise ValueError(f"{op}: params do not fit {type(model).__name__} (another model's?): {'; '.join(said + hints)}")
    return model_leaves


def save_torch(model: Any, params: Any, directory: str | os.PathLike) -> Path:
    """Write ``params`` (plain arrays, e.g. ``jlora.merge``'s) for ``model``'s PyTorch class, as
    ``model.safetensors`` and ``config.json`` in ``directory``: the model directory PyTorch's
    ``from_pretrained`` loads, in transformers 4 and 5. Needs PyTorch.

    (transformers 4.57's own ``from_pretrained(..., from_flax=True)`` leaves every weight on the
    ``meta`` device; this builds the PyTorch model on the CPU and copies the weights in with
    transformers' Flax-to-PyTorch converter.)

    With several processes, call it on every process: weights that each holds whole (replicated
    over the mesh) are written by process 0 while the others return at once (read the files
    after a barrier); weights split across processes are refused (replicate them first,
    ``jlora.sharding.place(params, mesh, [])``).

    Example:
        >>> import tempfile, numpy as np, torch, transformers, jlora
        >>> model = transformers.FlaxBertModel(transformers.BertConfig(hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=16, vocab_size=16))
        >>> out = jlora.hf.save_torch(model, model.params, tempfile.mkdtemp())
        >>> torch_model = transformers.BertModel.from_pretrained(out)
        >>> bool(torch.equal(torch_model.pooler.dense.bias, torch.from_numpy(np.array(model.params["pooler"]["dense"]["bias"]))))
        True
    """
    try:
        import torch
    except ImportError:
        raise ValueError("writing PyTorch weights needs PyTorch: pip install torch") from None
    import transformers
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    given = dict(leaves_with_paths(params, is_leaf=is_param))
    lazy = [p for p, x in given.items() if is_param(x)]
    if lazy:
        raise ValueError(f"save_torch: params hold jlora nodes or lazy values (at {lazy[:3]}); pass plain arrays: "
                         "jlora.merge(params)")
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"save_torch: {directory} exists and is not a directory; a PyTorch model is a directory of files")
    # transformers' converter only logs what it misses (the PyTorch model keeps its random init there)
    want = _check_fits("save_torch", model, params, whole=True)
    other = [p for p in sorted(given) if jnp.dtype(given[p].dtype) != jnp.dtype(want[p].dtype)
             and not (jnp.issubdtype(given[p].dtype, jnp.floating) and jnp.issubdtype(want[p].dtype, jnp.floating))]
    if other:
        raise ValueError(f"save_torch: '{other[0]}' is {given[other[0]].dtype} here but {want[other[0]].dtype} in the "
                         "model; pass its float weights")
    diverged = [p for p, x in given.items() if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.isfinite(x).all())]
    if diverged:
        raise ValueError(f"save_torch: params hold NaN or inf at {diverged[:3]}" + (f" and {len(diverged) - 3} more"
                         if len(diverged) > 3 else "") + " (a diverged run?); no PyTorch model is written")
    name = type(model).__name__.removeprefix("Flax")
    torch_class = getattr(transformers, name, None)
    if torch_class is None:
        raise ValueError(f"{type(model).__name__} has no PyTorch class {name} in transformers {transformers.__version__}")
    if not writes_here("save_torch", params, parts=lambda x: (x,)):
        return Path(directory)
    torch_model = torch_class(copy.deepcopy(model.config)).eval()  # on the CPU, then every weight is overwritten
    # (a copy: saving sets its config's architectures, which jlora.peft.save_adapter reads from the Flax model's)
    # the tables the class computes itself, frozen (Marian's, Pegasus' sinusoidal positions): Flax computes them too
    computed = {key: weight.detach().clone() for key, weight in torch_model.named_parameters()
                if not weight.requires_grad}
    with torch.no_grad():  # NaN marks each weight the converter has not written (it only logs those)
        for weight in torch_model.parameters():
            weight.fill_(float("nan"))
    logger = logging.getLogger("transformers.modeling_flax_pytorch_utils")  # its notes: checked below instead
    level = logger.level
    logger.setLevel(logging.ERROR)  # (a tied head, GPT-2's, is "newly initialized" there, and is filled)
    try:
        load_flax_weights_in_pytorch_model(  # writable copies for torch
            torch_model, jax.tree.map(lambda x: np.array(host_array(x)), params))
    finally:
        logger.setLevel(level)
    floats = {jnp.dtype(x.dtype) for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating)}
    half = {jnp.dtype(jnp.bfloat16): torch.bfloat16, jnp.dtype(jnp.float16): torch.float16}
    if len(floats) == 1 and next(iter(floats)) in half:  # the converter goes through float32 (numpy has no bf16)
        torch_model = torch_model.to(half[next(iter(floats))])
    with torch.no_grad():
        for weight_name, weight in torch_model.named_parameters():
            if weight_name in computed and bool(torch.isnan(weight).all()):
                weight.copy_(computed[weight_name].to(weight.dtype))
    unfilled = [name for name, weight in torch_model.named_parameters() if bool(torch.isnan(weight).all())]
    if unfilled:  # a Flax module named unlike its PyTorch twin (ResNet's basic layer: layer/layer_0, layer.0)
        raise ValueError(f"save_torch: transformers' Flax-to-PyTorch converter fills no value into {unfilled[:3]}"
                         + (f" and {len(unfilled) - 3} more" if len(unfilled) > 3 else "") + f" of {name}: the Flax "
                         "model holds no such weights (the classes name those modules differently, or the PyTorch "
                         "class has modules the Flax one lacks), so no PyTorch model is written")
    torch_model.save_pretrained(directory, safe_serialization=True)
    for file in Path(directory).glob("model*.safetensors"):
        as_opened(file)
    return Path(directory)


@jax.tree_util.register_pytree_node_class
class _EveryKey:
    """A HF ``ModelOutput`` as a pytree of every key it holds. HF sets some keys after building the
    output (``outputs["past_key_values"] = ...`` in Llama, Mistral, Gemma, OPT, ...), and its
    pytree registration flattens the class's fields only, so a traced call would drop them.

    Example:
        >>> from transformers.modeling_flax_outputs import FlaxCausalLMOutput
        >>> out = FlaxCausalLMOutput(logits=jnp.ones(2)); out["past_key_values"] = {"k": jnp.ones(1)}
        >>> list(_EveryKey.unwrap(jax.tree.map(lambda x: x, _EveryKey.wrap(out))).keys())
        ['logits', 'past_key_values']
    """

    def __init__(self, output_type: type, items: dict[str, Any]):
        self.output_type, self.items = output_type, items

    @classmethod
    def wrap(cls, output: Any) -> Any:
        if isinstance(output, dict) and dataclasses.is_dataclass(output) and (
                set(output) - {f.name for f in dataclasses.fields(output)}):
            return cls(type(output), dict(output))
        return output

    @staticmethod
    def unwrap(output: Any) -> Any:
        if not isinstance(output, _EveryKey):
            return output
        fields = {f.name for f in dataclasses.fields(output.output_type)}
        rebuilt = output.output_type(**{k: v for k, v in output.items.items() if k in fields})
        for key, value in output.items.items():
            if key not in fields:
                rebuilt[key] = value
        return rebuilt

    def tree_flatten(self) -> tuple[tuple, tuple]:
        return tuple(self.items.values()), (self.output_type, tuple(self.items))

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: Any) -> "_EveryKey":
        return cls(aux[0], dict(zip(aux[1], children)))


class LoraModel:
    """A HF Flax model with LoRA adapters: call it like the model, generate, merge, summarise.

    ``model``, ``config``, ``params``, ``inputs``: as for ``jlora.hf.lora_init``; ``key`` makes the
    adapters (``jax.random.key(0)`` by default). ``lm.params`` holds the LoRA tree. ``params`` that
    hold adapters already (a saved adapter, ``jlora.adapter.load_adapter(path, model.params)``) are
    taken as they are (with the ``config``'s LoRA dropout, where one is given); ``lm.config`` is then
    the ``config`` given, or ``None`` (the adapter's own config is ``jlora.adapter.read_config(path)``).
    ``cache_size``: the input signatures (shapes: prompt lengths) whose compiled calls are kept, as
    ``jlora.apply``'s, for the calls and for ``generate`` with each set of options;
    ``generate_cache_size``: the sets of options (``max_new_tokens``, ``temperature``...) whose
    compiled decoding loops ``generate`` keeps (``GENERATE_CACHE_SIZE`` unless given; it warns once
    when calls cycle through more, each then compiled anew).

    ``lm(...)`` takes the model's arguments and runs the lazy (unmerged) adapters, on ``lm.params``
    or on ``params=`` (a tree the training step updated), with LoRA dropout where ``lora_rng=`` is given;
    ``lm.generate(...)`` is HF's ``generate`` on the adapted model, unmerged (``merged=False``,
    the lazy path) or merged; ``lm.merge()`` gives plain params for the unmodified model.

    Example:
        >>> import jlora
        >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
        >>> lm = jlora.hf.LoraModel(FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)))
        >>> print(lm.summary())  # doctest: +ELLIPSIS
        param ...
    """

    GENERATE_CACHE_SIZE = 32  # generate's compiled calls kept, the least recently used dropped first

    def __init__(self, model: Any, config: LoraConfig | None = None, key: Any = None, *, params: Any = None,
                 inputs: dict[str, Any] | None = None, cache_size: int = 32, generate_cache_size: int | None = None):
        _check_model(model, "jlora.hf.LoraModel")
        generate_cache_size = self.GENERATE_CACHE_SIZE if generate_cache_size is None else generate_cache_size
        if isinstance(generate_cache_size, bool) or not isinstance(generate_cache_size, int) or generate_cache_size < 1:
            raise ValueError(f"jlora.hf.LoraModel: generate_cache_size must be a positive int, got {generate_cache_size!r}")
        self.model = model
        loaded = params is not None and any(isinstance(x, LoraWeight) for x in jax.tree.leaves(params, is_leaf=is_node))
        # loaded adapters were made with a config this model does not know: the one given, or none
        if loaded:
            _check_fits("jlora.hf.LoraModel", model, params)
            for path, x in leaves_with_paths(params, is_leaf=is_param):  # a half, a stack: refused now, not at the call
                check_whole(x, path, "jlora.hf.LoraModel", used_as_is=True)
        if loaded and config is not None:
            _check_config_type(config)
            # LoRA dropout is the config's (it only starts a step: inference loads without restating it)
            params = jax.tree.map(lambda x: x.replace(dropout=config.dropout) if isinstance(x, LoraWeight) else x,
                                  params, is_leaf=is_param)
            check_config_makes("jlora.hf.LoraModel", config, params)
        self.config = config if loaded else preset_config(model.config.model_type, config)
        key = jax.random.key(0) if key is None else key
        check_key(key, "jlora.hf.LoraModel")
        self.params = params if loaded else lora_init(key, model, self.config, params, inputs=inputs)

        def forward(*args: Any, model_state: tuple, **kwargs: Any) -> Any:  # model_state: a static key, unused
            return _EveryKey.wrap(model(*args, **kwargs))

        self._forward = jlora.apply(forward, cache_size=cache_size)
        self._cache_size = cache_size
        self._generate = _TraceCache()  # generate's loops by set of options, as apply's traces by signature
        self._generate_cache_size = generate_cache_size
        self._fitting: set = set()  # the structures and shapes of params checked to fit the model

    def _fitted(self, op: str, params: Any) -> Any:
        """``params`` (``lm.params``, or a call's ``params=``) once checked to fit the model, as the
        constructor checks them: another model's adapters refused by name, not run with the layers
        this model lacks ignored. A tree of a structure and shapes already checked is not read again."""
        leaves, treedef = jax.tree.flatten(params, is_leaf=is_param)
        shape = lambda x: tuple(x.kernel_shape) if isinstance(x, LoraWeight) else np.shape(
            x.value if isinstance(x, jlora.Trainable) else x)
        key = (treedef, tuple(shape(x) for x in leaves))
        if key not in self._fitting:
            _check_fits(op, self.model, params)
            if len(self._fitting) >= 64:  # a server's few adapters, not every tree ever passed
                self._fitting.clear()
            self._fitting.add(key)
        return params

    def __call__(self, *args: Any, params: Any = None, lora_rng: Any = None, **kwargs: Any) -> Any:
        """The model's call with the adapters unmerged, on ``lm.params`` or ``params=``; LoRA
        dropout where ``lora_rng=`` is given."""
        params = self._fitted("LoraModel", self.params if params is None else params)
        return _EveryKey.unwrap(self._forward(*args, params=params, lora_rng=lora_rng, model_state=self._model_state(),
                                              **kwargs))

    def _model_state(self) -> tuple:
        """What the model's calls read besides their arguments: its config, its generation config and
        its module (``enable_gradient_checkpointing`` swaps it). Part of each trace's key, so that a
        change (``eos_token_id``, ``output_hidden_states``, in place in a nested dict too) is traced anew,
        as the model itself sees it. The ``repr`` of their attributes: 15 µs a call, where the configs'
        JSON took 450 µs (most of a small model's eager call)."""
        generation = getattr(self.model, "generation_config", None)
        return (repr(vars(self.model.config)), None if generation is None else repr(vars(generation)),
                id(self.model.module))

    def generate(self, *inputs: Any, params: Any = None, merged: bool = False, **kwargs: Any) -> Any:
        """HF ``generate`` (greedy, sampling, beams: whatever the model supports) with the adapters;
        the inputs as the model's ``generate`` takes them (``input_ids``, or ``input_features=`` for
        Whisper; a vision encoder-decoder's pixels go first, by position, as HF's Flax ``generate``
        takes them: ``lm.generate(pixel_values, ...)``). Compiled once per prompt shape and set of
        options (the ``generate_cache_size`` used last kept, 32 by default), as ``jlora.apply``; an option that
        compares by identity (a logits processor, whose state may change) is traced anew at each
        call. ``merged=True`` runs HF's ``generate`` as it is on ``jlora.merge(params)``: merged at
        every call, its loop compiled anew each time (about 90× slower a call on a small model), for
        what the lazy path cannot do (``trace=False``).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
            >>> lm = jlora.hf.LoraModel(FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)))
            >>> lm.generate(jnp.ones((1, 3), jnp.int32), max_new_tokens=2, pad_token_id=0).sequences.shape
            (1, 5)
        """
        params = self._fitted("LoraModel.generate", self.params if params is None else params)
        if "lora_rng" in kwargs:
            raise ValueError("LoraModel.generate runs the adapters without LoRA dropout, as HF generates in eval "
                             "mode; lora_rng is for training calls, lm(..., lora_rng=key)")
        if merged:
            return self.model.generate(*inputs, params=jlora.merge(params), **kwargs)
        if kwargs.get("trace", True) is False:
            raise ValueError("LoraModel.generate: trace=False runs HF's decoding loop in Python on the tokens' "
                             "values, which jlora.apply's trace cannot give; generate with merged=True for it")
        # a tokenizer's attention_mask is numpy; a 0-d number is an option's value (max_new_tokens), a
        # PRNG key (prng_key) is traced
        kwargs = {k: v.item() if _option_value(v) else v for k, v in kwargs.items()}
        is_array = lambda v: isinstance(v, (jax.Array, np.ndarray))
        static = {k: v for k, v in kwargs.items() if not is_array(v)}
        dynamic = {k: jnp.asarray(v) for k, v in kwargs.items() if is_array(v)}
        # lists (suppress_tokens) as tuples; a value still unhashable, or one that compares by identity
        # (a logits processor, whose state may change between calls): no cached trace
        key = (len(inputs), _frozen(static), self._model_state())
        cacheable = _hashable(key) and not _by_identity(static)
        fn = self._cached_generate(key) if cacheable else None
        if fn is None:
            static = copy.deepcopy(static)  # a retrace (a new prompt length) must not see the caller's list changed
            model = self.model  # not self: a cached fn holding the LoraModel would keep it (and its params) in a cycle
            fn = jlora.apply(lambda inputs, dyn, params: model.generate(*inputs, params=params, **static, **dyn),
                             cache_size=self._cache_size)
            if cacheable:
                fn = self._keep_generate(key, fn)
        return fn(inputs, dynamic, params=params)  # a keyword: an error names it as the caller passed it

    def _cached_generate(self, key: tuple) -> Callable | None:
        """``generate``'s compiled loop for ``key`` (a set of options), now the last used; ``None``
        where none is kept."""
        with self._generate.lock:
            fn = self._generate.get(key)
            if fn is not None:
                self._generate.move_to_end(key)
            return fn

    def _keep_generate(self, key: tuple, fn: Callable) -> Callable:
        """Keep ``fn`` for ``key`` (another thread's, if one came first), the least recently used
        dropped past ``generate_cache_size``; warns once where ``key``'s was dropped before."""
        with self._generate.lock:
            fn = self._generate.setdefault(key, fn)
            again = self._generate.dropped_before(key)
            while len(self._generate) > self._generate_cache_size:
                self._generate.drop_oldest()
        if again:
            warnings.warn(f"LoraModel.generate: a set of options whose decoding loop was compiled, then dropped, is "
                          f"compiled again: calls cycle through more than {self._generate_cache_size} sets of options "
                          "(max_new_tokens, temperature, ...), each compiled anew; raise "
                          "jlora.hf.LoraModel(..., generate_cache_size=N)", stacklevel=_user_stacklevel())
        return fn

    def merge(self) -> Any:
        """Plain params for the unmodified HF model (``model(..., params=lm.merge())``).

        Example:
            >>> import jax, jax.numpy as jnp, jlora
            >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
            >>> lm = jlora.hf.LoraModel(FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64)))
            >>> is_lw = lambda x: isinstance(x, jlora.LoraWeight)
            >>> lm.params = jax.tree.map(lambda x: x.replace(b=x.b + 0.1) if is_lw(x) else x, lm.params,
            ...                          is_leaf=is_lw)  # as if trained: b is no longer 0
            >>> ids = jnp.ones((1, 3), jnp.int32)
            >>> bool(jnp.allclose(lm.model(ids, params=lm.merge()).logits, lm(ids).logits, atol=1e-5))
            True
            >>> bool(jnp.allclose(lm.model(ids).logits, lm(ids).logits, atol=1e-5))  # the base alone differs
            False
        """
        return jlora.merge(self.params)

    def summary(self) -> jlora.Summary:
        """``jlora.summary`` of the adapted params (see the class example)."""
        return jlora.summary(self.params)
