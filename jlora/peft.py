"""Adapters in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT's format is what vLLM, TGI, LoRAX and PEFT itself load. A Flax param path maps to the
PyTorch module of the same name (``model/layers/0/self_attn/q_proj/kernel`` ↔
``model.layers.0.self_attn.q_proj``, as HF names its Flax and PyTorch modules alike);
``lora_A.weight`` is ``aᵀ`` (r, in) and ``lora_B.weight`` is ``bᵀ`` (out, r), for ``(in, out)``
kernels and GPT-2's ``(out, in)`` Conv1D alike (PEFT's ``fan_in_fan_out``, which PEFT, and so
jlora, sets by the module's type whatever the config says). Trained biases
(PEFT's ``bias="all"`` / ``"lora_only"``) are ``Trainable`` leaves, and so are the modules PEFT
trains whole (``modules_to_save``: a task head, a norm; every leaf of the module is stored, under
PyTorch's names: ``kernel`` ↔ ``weight`` transposed, ``embedding``/``scale``/``weight`` ↔ ``weight``;
a task head PEFT trains whole, as its ``classifier``, is saved as that one module). Options
jlora cannot represent are refused, never dropped.

Example:
    >>> import jlora
    >>> jlora.peft.save_adapter("out/peft", lm.params, model.config)                     # doctest: +SKIP
    >>> params = jlora.peft.load_adapter("out/peft", model.params, model.config)         # doctest: +SKIP
    >>> # in PyTorch: peft.PeftModel.from_pretrained(torch_model, "out/peft")
"""

from __future__ import annotations

import collections
import collections.abc
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapter import FORMAT as ADAPTER_FORMAT
from jlora.adapter import WEIGHTS_FILE as ADAPTER_WEIGHTS
from jlora.adapter import (check_base, check_finite, check_float_targets, check_other_format, check_saveable,
                           check_trainable_not_lazy, host_array, model_hint, size_on_disk, write_files,
                           writes_here)
from jlora.fingerprint import fingerprint, warn_other_base
from jlora.hf import LAYOUT_PRESETS
from jlora.layout import Layout
from jlora.lazy import _user_stacklevel
from jlora.paths import leaves_with_paths, replace_leaves
from jlora.sharding import follow_bases
from jlora.weight import Lazy, LoraWeight, Trainable, is_node, is_param

CONFIG_FILE, WEIGHTS_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
BASE_KEY = "jlora_base"  # the adapted kernels' fingerprints (jlora.fingerprint) in the weights' header, by Flax path
LINEAR_FACTORS, EMBEDDING_FACTORS = (".lora_A.weight", ".lora_B.weight"), (".lora_embedding_A", ".lora_embedding_B")
BASE_COPY = ".base_layer.weight"
BASE_BIAS_COPY = ".base_layer.bias"
TIED_HEADS = ("lm_head", "proj_out", "decoder")  # output heads a Flax model may tie to its input embedding
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM", "MTModel": "SEQ_2_SEQ_LM"}  # MarianMTModel
PEFT_TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")  # peft.TaskType
# Architectures of a classifier: no LM head (to tie to the input embedding).
CLASSIFIERS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering", "ForMultipleChoice")
# Flax variable collections other than params, beside them in a model's tree.
FLAX_COLLECTIONS = ("batch_stats", "cache", "intermediates", "constants")
# Models PEFT's SEQ_2_SEQ_LM model cannot run (it passes input_ids; they take speech or pixels).
NOT_TEXT_TO_TEXT = ("whisper", "speech-encoder-decoder", "vision-encoder-decoder")
# The modules PEFT's model for a task type trains whole, whatever modules_to_save says.
# (PEFT 0.22 adds "pre_classifier" to the saved config's modules_to_save too: DistilBERT's, which the
# earlier "classifier" took as a string suffix)
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}
# What a task type PEFT's model for it could not load the adapter with gives way to
AS_IT_IS = "pass task_type=None (PEFT then loads the adapter onto the model as it is)"
# The PEFT options jlora reads, and those that only describe how an adapter was made or is run
# (the saved tensors hold all the rest: which layers ``layers_to_transform`` picked is in their
# keys). Any other option must be unset: an option jlora cannot represent (DoRA, layer
# replication, aLoRA, ...), or one a newer PEFT adds, is refused, never dropped.
READ = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "fan_in_fan_out", "bias", "use_rslora",
        "modules_to_save", "rank_pattern", "alpha_pattern", "init_lora_weights", "ensure_weight_tying"}
DESCRIPTIVE = {"task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
               "exclude_modules", "megatron_core", "qalora_group_size", "runtime_config", "eva_config",
               "layers_to_transform", "layers_pattern",
               "lora_ga_config", "corda_config"}  # left by PEFT's conversion of such an init to plain LoRA
# Initialisations that change the base weights (the adapter then fits the changed base, not the
# model jlora holds): PiSSA (and its "pissa_niter_N"), OLoRA, CorDA, LoftQ, LoRA-GA. Every other
# one (gaussian, eva, orthogonal, mica, ...) only sets A and B, which the file holds.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# PEFT's EMBEDDING_LAYER_NAMES: with ensure_weight_tying, a target_modules (or modules_to_save) entry
# so named makes PEFT tie the LM head to the input embedding's adapter (or trained copy), as it
# reloads the config; GPT-2's "transformer.wte" alone leaves the head untied.
PEFT_TYING_NAMES = ("embed_tokens", "lm_head")
# Flax's names of the input embeddings an LM head is tied to (GPT-2's wte, BERT's word_embeddings).
WORD_EMBEDDINGS = ("wte", "embed_tokens", "word_embeddings", "shared", "embed_in", "word_embedding")
# The model's own modules under which Flax keeps a masked LM's head (BERT's cls.predictions.decoder,
# RoBERTa's lm_head.decoder, ...): PyTorch's tied head there is not a causal LM's ``lm_head``.
MLM_HEADS = ("cls", "lm_head", "predictions", "generator_lm_head")
# A classifier's head modules, beside its base model (BART's classification_head; DistilBERT's
# pre_classifier comes with a classifier).
CLASSIFIER_HEADS = frozenset({"classifier", "classification_head", "score", "qa_outputs"})
# transformers' auto classes (MODEL_<kind>_MAPPING_NAMES) of models with an LM head.
LM_HEAD_KINDS = ("WITH_LM_HEAD", "FOR_CAUSAL_LM", "FOR_MASKED_LM", "FOR_SEQ_TO_SEQ_CAUSAL_LM", "FOR_PRETRAINING")


def module_name(path: str) -> str:
    """PyTorch module name of a Flax kernel or embedding path (``a/b/kernel`` → ``a.b``).

    Example:
        >>> import jlora
        >>> jlora.peft.module_name("model/layers/0/self_attn/q_proj/kernel")
        'model.layers.0.self_attn.q_proj'
    """
    leaf = path.rsplit("/", 1)[-1]
    if leaf not in ("kernel", "embedding"):
        raise ValueError(f"'{path}': only kernels and embeddings (…/kernel, …/embedding) can be exported in PEFT's format")
    return path[: -len(leaf) - 1].replace("/", ".")


def _torch_style(path: str) -> str:
    """``path`` with each module of an unnamed list that a module of its own holds named as PyTorch's
    ``nn.Sequential`` names it: linen names them ``<attr>_<i>`` (HF's Flax ResNet of basic layers:
    ``layer/layer_0``), PyTorch ``<i>`` (``layer.0``). Every other path stays as it is.

    Example:
        >>> _torch_style("stages/0/layers/0/layer/layer_1/convolution/kernel")
        'stages/0/layers/0/layer/1/convolution/kernel'
    """
    parts = path.split("/")
    listed = lambda i: i > 0 and parts[i].startswith(parts[i - 1] + "_") and parts[i][len(parts[i - 1]) + 1:].isdigit()
    return "/".join(part[len(parts[i - 1]) + 1:] if listed(i) else part for i, part in enumerate(parts))


# Flax leaf name -> PyTorch parameter name inside a module; any other leaf (DINOv2's layer scale
# ``lambda1``, a ``cls_token``) has the same name in both.
TORCH_NAMES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "weight": "weight", "bias": "bias"}
BATCH_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def _kernel_to_torch(kernel: np.ndarray) -> np.ndarray:
    """A Flax kernel ``(*window, in, out)`` (a Dense's is 2-D) as PyTorch's ``(out, in, *window)``.

    Example:
        >>> _kernel_to_torch(np.zeros((3, 5, 2, 4))).shape  # a 2-D conv: HWIO -> OIHW
        (4, 2, 3, 5)
    """
    n = kernel.ndim
    return np.ascontiguousarray(kernel.transpose(n - 1, n - 2, *range(n - 2)))


def _kernel_from_torch(weight: np.ndarray) -> np.ndarray:
    """The inverse of ``_kernel_to_torch``: PyTorch's ``(out, in, *window)`` as Flax's ``(*window, in, out)``.

    Example:
        >>> _kernel_from_torch(np.zeros((4, 2, 3, 5))).shape
        (3, 5, 2, 4)
    """
    return weight.transpose(*range(2, weight.ndim), 1, 0)


def _to_torch(path: str, value: Any) -> tuple[str, np.ndarray]:
    """``(torch parameter name, array in torch's layout)`` of a Flax leaf of a saved module."""
    leaf = path.rsplit("/", 1)[-1]
    value = host_array(value, f"'{path}'")
    if leaf == "kernel":
        return "weight", _kernel_to_torch(value)
    return TORCH_NAMES.get(leaf, leaf), value


# A composite model's parts (an encoder-decoder's, a dual encoder's) and their configs.
SUBMODELS = {"encoder": "encoder", "decoder": "decoder", "vision_model": "vision_config", "text_model": "text_config"}


def _part_config(hf_config: Any, module: str) -> Any:
    """The config of the model ``module`` belongs to: a composite model's part has its own (the
    GPT-2 decoder of a ``vision-encoder-decoder``).

    Example:
        >>> from transformers import GPT2Config, ViTConfig, VisionEncoderDecoderConfig
        >>> cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(ViTConfig(), GPT2Config())
        >>> _part_config(cfg, "decoder.transformer.h.0.attn.c_attn").model_type, _part_config(cfg, "encoder.pooler.dense").model_type
        ('gpt2', 'vit')
    """
    head, _, rest = module.partition(".")
    part = getattr(hf_config, SUBMODELS.get(head, ""), None) if rest else None
    if isinstance(getattr(part, "model_type", None), str):
        return _part_config(part, rest)
    return hf_config


def _model_type(hf_config: Any, module: str) -> str:
    return _part_config(hf_config, module).model_type


def _is_conv1d(hf_config: Any, module: str) -> bool:
    """Whether the PyTorch module is a ``Conv1D`` (GPT-2's ``(out, in)`` kernels, PEFT's
    ``fan_in_fan_out``): PEFT decides it by the module's type, whatever the config says.

    Example:
        >>> from transformers import GPT2Config, LlamaConfig
        >>> _is_conv1d(GPT2Config(), "transformer.h.0.attn.c_attn"), _is_conv1d(LlamaConfig(), "model.layers.0.self_attn.q_proj")
        (True, False)
    """
    return LAYOUT_PRESETS.get(_model_type(hf_config, module), {}).get(module.rsplit(".", 1)[-1]) == "oi"


def _layout_ok(lw: LoraWeight) -> bool:
    return str(lw.layout) in ("io", "oi", "iiio")


def _factors_to_torch(lw: LoraWeight) -> tuple[np.ndarray, np.ndarray]:
    """``(lora_A.weight, lora_B.weight)``: Linear ``(r, in)``, ``(out, r)``; a 2-D conv (Flax
    ``HWIO`` kernel) ``(r, in, h, w)``, ``(out, r, 1, 1)`` as PEFT's Conv2d LoRA."""
    a, b = host_array(lw.a, f"'{lw.path}' a"), host_array(lw.b, f"'{lw.path}' b")  # in their dtype (bf16 factors stay bf16, as PEFT writes them)
    if str(lw.layout) == "iiio":
        return a.transpose(3, 2, 0, 1), b.T[:, :, None, None]
    return a.T, b.T


def _factors_from_torch(lora_a: np.ndarray, lora_b: np.ndarray, fan_in_fan_out: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """``(a, b, layout)`` from PEFT's ``lora_A.weight`` and ``lora_B.weight``."""
    if lora_a.ndim == 4:
        return lora_a.transpose(2, 3, 1, 0), lora_b.reshape(lora_b.shape[0], -1).T, "iiio"
    return lora_a.T, lora_b.T, "oi" if fan_in_fan_out else "io"


def save_adapter(path: str | os.PathLike, params: Any, hf_config: Any, *, base_model_name_or_path: str | None = None,
                 task_type: str | None = "infer") -> Path:
    """Write ``params``' adapters as a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained`` loads
    onto the PyTorch model with the same base weights. ``hf_config``: the HF model's config
    (``model.config``); ``base_model_name_or_path``: the base model PEFT is to load the adapter onto
    (a hub name or a directory), written into ``adapter_config.json``.

    ``task_type`` is PEFT's (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...; ``None`` writes none, and PEFT
    loads the adapter onto the model as it is). ``"infer"`` takes it from ``hf_config.architectures``
    where PEFT's model for it can load the adapter: for a classification or QA task only if the
    adapter trains the head whole (PEFT's model for the task loads the head from the adapter, and
    cannot hold a LoRA inside it), and not ``SEQ_2_SEQ_LM`` for a model of speech or images
    (PEFT's model for it passes ``input_ids``).

    An embedding the model ties to its LM head (GPT-2's ``wte``, Gemma's ``embed_tokens``; in
    Flax the head is the table), adapted or trained whole, is written in PEFT's
    ``ensure_weight_tying=True`` form, in which PEFT ties the head to it as Flax does: ``lm_head``
    in ``target_modules`` (``modules_to_save``) beside it, and the head's tensors as PEFT saves
    them (the embedding's factors transposed, or its trained copy).

    Example:
        >>> import tempfile, jax, jlora
        >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
        >>> model = FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
        >>> params = jlora.hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=4))
        >>> out = jlora.peft.save_adapter(tempfile.mkdtemp() + "/peft", params, model.config)
        >>> sorted(f.name for f in out.iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    from safetensors.numpy import save_file

    _check_hf_config("jlora.peft.save_adapter", hf_config)
    if isinstance(base_model_name_or_path, os.PathLike):
        base_model_name_or_path = os.fspath(base_model_name_or_path)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        raise ValueError(f"jlora.peft.save_adapter: base_model_name_or_path must be a hub name or a directory, got "
                         f"{type(base_model_name_or_path).__name__}")
    check_saveable("jlora.peft.save_adapter", params)
    here = writes_here("jlora.peft.save_adapter", params)
    check_other_format(path, "jlora", [ADAPTER_WEIGHTS])
    whole_tree, params = params, _module_params(params)[0]
    # every leaf, a quantized kernel as one, and the frozen half's Nones (a split tree)
    as_given = leaves_with_paths(params, is_leaf=lambda x: x is None or is_param(x))
    every = [(_torch_style(p), x) for p, x in as_given]
    entries = [(p, x) for p, x in every if x is not None]
    # a config of another model (its size) writes a file no load of these params takes
    _check_config_fits("jlora.peft.save_adapter", hf_config, {p: x for p, x in as_given if hasattr(x, "shape")}, "params'")
    nodes = [(p, x) for p, x in entries if is_node(x)]
    targets = [(p, x) for p, x in nodes if isinstance(x, LoraWeight)]
    if not targets:
        raise ValueError(f"jlora.peft.save_adapter: params hold no LoraWeight{model_hint(params)}")
    # a module with a fully trained leaf other than its bias is saved whole (modules_to_save), as
    # the task's head that PEFT saves whole for the task type where it is part of one
    trained = [p for p, x in nodes if isinstance(x, Trainable) and not p.endswith("/bias")]
    task_type = _task_type(task_type, hf_config, [p for p, _ in targets], trained)
    model_level = [p for p in trained if "/" not in p]
    if model_level:
        raise ValueError(f"jlora.peft.save_adapter: '{model_level[0]}' is a param of the "
                         "model itself, not of a module: PEFT trains whole modules only (modules_to_save), so it "
                         "cannot hold it; leave it out of trainable, or save with jlora.adapter.save_adapter")
    saved = sorted({_task_head(p.rsplit("/", 1)[0], task_type) for p in trained})
    to_save = [m.replace("/", ".") for m in saved]  # modules_to_save, PyTorch's names
    # as PEFT before 0.22 matches modules_to_save, a superset of 0.22's (_peft_names): every module
    # whose name ends with an entry (DistilBERT's "classifier" takes "pre_classifier" too), each
    # saved whole, trained or not, so that either reads the file alike
    in_saved = lambda p: "/" in p and _in_saved_module(p.rsplit("/", 1)[0].replace("/", "."), to_save, False)
    missing = [p for (p, x), (torch_path, _) in zip(as_given, every) if x is None and in_saved(torch_path)]
    if missing:
        raise ValueError(f"jlora.peft.save_adapter: '{missing[0]}' is in the frozen half of jlora.split, but its "
                         "module is saved whole (modules_to_save: PEFT loads every tensor of it); pass the whole "
                         "tree, jlora.combine(trainable, frozen)")
    normed = _batch_norms(whole_tree, sorted({p.rsplit("/", 1)[0] for p, _ in entries if in_saved(p)}), hf_config)
    if normed:
        raise ValueError(f"jlora.peft.save_adapter: '{normed[0]}' keeps running statistics (batch_stats: a batch norm), "
                         "and PEFT loads a module saved whole (modules_to_save) with them, which jlora's adapters do not "
                         "hold; leave the norm out of LoraConfig(trainable=...), or save with jlora.adapter.save_adapter")
    biases = [(p, x) for p, x in nodes if isinstance(x, Trainable) and p.endswith("/bias") and not in_saved(p)]
    shapes = {p: tuple(x.kernel_shape) if isinstance(x, LoraWeight) else np.shape(x.value if isinstance(x, Trainable) else x)
              for p, x in entries}
    tied_heads = {}  # Flax path of a tied embedding -> PyTorch's name of the LM head PEFT is to tie to it
    for p, x in nodes:  # adapted or trained whole
        what = f"jlora.peft.save_adapter: '{p}'"
        _check_not_shared(what, p, hf_config)
        if p.endswith("/embedding") and _check_untied(what, p, hf_config, shapes, peft_ties=True):
            tied_heads[p] = _tied_head(what, p, hf_config, shapes)
    clash = [p for p, _ in targets if any(p.startswith(m + "/") for m in saved)]
    if clash:
        raise ValueError(f"jlora.peft.save_adapter: '{clash[0]}' has a LoRA adapter and fully trained leaves "
                         "in the same module; PEFT trains a module either way, not both")
    ends = [p for p, _ in targets if in_saved(p)]
    if ends:
        module = module_name(ends[0])
        raise ValueError(f"jlora.peft.save_adapter: '{ends[0]}' has a LoRA adapter, and PEFT before 0.22 would train "
                         f"its module '{module}' whole too (it takes any module whose name ends with an entry of "
                         f"modules_to_save={to_save}, the modules trained whole here) and cannot load both; jlora "
                         f"writes files every PEFT reads alike: leave '{module}' out of the targets "
                         f"(LoraConfig(exclude=['{module.rsplit('.', 1)[-1]}']))")
    tensors, ranks, alphas, modules = {}, {}, {}, []
    for p, lw in targets:
        if not _layout_ok(lw):
            raise ValueError(f"'{p}': layout '{lw.layout}' has no PEFT form (2-D kernels and 2-D convs only)")
        embedding = p.endswith("/embedding")  # PEFT's Embedding: lora_embedding_A (r, vocab), _B (dim, r)
        if not embedding and str(lw.layout) != "iiio" and (str(lw.layout) == "oi") != _is_conv1d(hf_config, module_name(p)):
            want = "oi" if _is_conv1d(hf_config, module_name(p)) else "io"
            raise ValueError(f"'{p}': layout '{lw.layout}' does not match {_model_type(hf_config, module_name(p))}'s "
                             f"PyTorch layout: its Flax kernel is {'(out, in)' if want == 'oi' else '(in, out)'}, layout "
                             f"'{want}'; make the adapters with jlora.hf.lora_init, which reads the layouts off the "
                             f"model, or declare LoraConfig(layouts={{'{p.rsplit('/', 2)[-2]}': '{want}'}})")
        if embedding:
            _check_not_positions(f"jlora.peft.save_adapter: '{p}'", p)
            if str(lw.layout) != "io":
                raise ValueError(f"'{p}': an embedding adapter has layout 'io' (vocabulary, features) in PEFT's "
                                 f"form; got '{lw.layout}'")
        name = module_name(p)
        grouped = GROUPED_CONVS.get(_model_type(hf_config, name))
        groups = grouped[1](_part_config(hf_config, name), lw.kernel_shape[-1]) if grouped and name.endswith(grouped[0]) else 1
        if groups > 1:
            raise ValueError(f"jlora.peft.save_adapter: '{p}' is a grouped conv ({groups} groups): PEFT's Conv2d adapter "
                             "over it is a block per group, another function than this adapter over the kernel, and "
                             "PEFT cannot load it; leave it out of the targets, or save with jlora.adapter.save_adapter")
        modules.append(name)
        lora_a, lora_b = _factors_to_torch(lw)
        key_a, key_b = EMBEDDING_FACTORS if embedding else LINEAR_FACTORS
        tensors[f"{PREFIX}{name}{key_a}"] = np.ascontiguousarray(lora_a)
        tensors[f"{PREFIX}{name}{key_b}"] = np.ascontiguousarray(lora_b)
        ranks[name] = lw.rank
        alphas[name] = lw.scale * lw.rank  # PEFT: scaling = lora_alpha / r (rsLoRA is folded in)
        if p in tied_heads:  # as PEFT saves the head it ties: the embedding's factors transposed, at its scale
            head = tied_heads[p]
            modules.append(head)
            tensors[f"{PREFIX}{head}{LINEAR_FACTORS[0]}"] = np.ascontiguousarray(lora_b.T)
            tensors[f"{PREFIX}{head}{LINEAR_FACTORS[1]}"] = np.ascontiguousarray(lora_a.T)
            ranks[head], alphas[head] = ranks[name], alphas[name]
    lora_modules = set(modules)
    for p, x in biases:  # PEFT names the bias of a LoRA-wrapped module "<module>.base_layer.bias"
        name = _bias_module(p)
        wrapped = ".base_layer" if name in lora_modules else ""
        tensors[f"{PREFIX}{name}{wrapped}.bias"] = host_array(x.value)
    for p, x in entries:  # modules_to_save: every leaf of the module, trained or not (a quantized one as floats)
        if in_saved(p):
            name, value = _to_torch(p, x.value if isinstance(x, Trainable) else x.materialize() if isinstance(x, Lazy) else x)
            tensors[f"{PREFIX}{p.rsplit('/', 1)[0].replace('/', '.')}.{name}"] = value
            if p in tied_heads:  # PEFT saves the head it ties to a trained embedding as that same copy
                tensors[f"{PREFIX}{tied_heads[p]}.weight"] = value
    bias_mode = "none" if not biases else (
        "lora_only" if all(_bias_module(p) in lora_modules for p, _ in biases) else "all")
    _warn_wider(every, bias_mode, lora_modules, in_saved)
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    dropout = max(lw.dropout for _, lw in targets)
    lower = sorted({lw.dropout for _, lw in targets} - {dropout})
    if lower:  # PEFT's config has one rate: the outputs are the same, PEFT's further training is not
        warnings.warn(f"jlora.peft.save_adapter: PEFT's config holds one lora_dropout: saved {dropout:g}, the highest, "
                      f"though adapters here have {', '.join(f'{d:g}' for d in lower)} too (training on in PEFT "
                      "drops them all at that rate)", stacklevel=2)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": sorted(modules),
        "fan_in_fan_out": any(_is_conv1d(hf_config, m) for m in modules), "bias": bias_mode, "use_rslora": False,
        "modules_to_save": [*to_save, *sorted({h for p, h in tied_heads.items() if in_saved(p)})] or None,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        **({"ensure_weight_tying": True} if tied_heads else {}),  # PEFT ties the head to the embedding's change
        "rank_pattern": {f"^{n}$": k for n, k in ranks.items() if k != r},
        "alpha_pattern": {f"^{n}$": a for n, a in alphas.items() if a != alpha},
    }
    check_finite("jlora.peft.save_adapter", tensors, "no adapter is written")

    # the kernels' fingerprints, which jlora.peft.load_adapter checks the base against (PEFT reads none)
    base = {p: fp for p, lw in targets if (fp := fingerprint(lw.w)) is not None}
    header = {"format": "pt", **({BASE_KEY: json.dumps(base)} if base else {})}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=header)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    return write_files(path, write) if here else Path(path)


def _bias_module(path: str) -> str:
    """The PyTorch module name of a bias's path: ``"h/0/attn/c_attn/bias"`` -> ``"h.0.attn.c_attn"``."""
    return path[: -len("/bias")].replace("/", ".")


def _warn_wider(leaves: list[tuple[str, Any]], bias_mode: str, lora_modules: set[str],
                in_saved: Callable[[str], bool]) -> None:
    """Warn of the leaves PEFT will train that these adapters kept frozen: PEFT trains every bias
    (``bias="all"``), every LoRA module's (``"lora_only"``), every leaf of a module in
    ``modules_to_save``; the file holds the base's values there, so the outputs are the same."""
    frozen = [p for p, x in leaves if not isinstance(x, (LoraWeight, Trainable))]
    bias_of = lambda p: p.endswith("/bias") and (bias_mode == "all" or bias_mode == "lora_only"
                                                 and _bias_module(p) in lora_modules)
    wider = [p for p in frozen if in_saved(p) or bias_of(p)]
    if wider:
        warnings.warn(f"jlora.peft.save_adapter: PEFT trains {len(wider)} leaves these adapters kept frozen, e.g. "
                      f"{wider[:3]}: its modes are coarser (bias='{bias_mode}': "
                      f"{'every bias' if bias_mode == 'all' else 'the biases of the LoRA modules' if bias_mode == 'lora_only' else 'none'}; "
                      "modules_to_save: every leaf of each module). The file holds their base values, so the outputs "
                      "are the same; trained on in PEFT, they train too. To match, train them here too "
                      "(LoraConfig(trainable=...)), or leave their module's other leaves out", stacklevel=_user_stacklevel())


def _module_params(tree: Any) -> tuple[Any, Any]:
    """``(params, put_back)``: the tree whose paths are PyTorch's module names, and how to put a new
    one back. HF's Flax models with batch norm (ResNet, RegNet) hold ``{"params": ..., "batch_stats":
    ...}``; the module names start inside ``params``.

    Example:
        >>> inner, put_back = _module_params({"params": {"conv": 1}, "batch_stats": {"bn": 2}})
        >>> inner, put_back({"conv": 3})
        ({'conv': 1}, {'params': {'conv': 3}, 'batch_stats': {'bn': 2}})
    """
    if isinstance(tree, collections.abc.Mapping) and "params" in tree and set(tree) <= {"params", *FLAX_COLLECTIONS}:
        return tree["params"], lambda inner: {**tree, "params": inner}
    return tree, lambda inner: inner


# Convs HF's models group (feature_group_count > 1): PEFT's Conv2d adapter over one is a block
# per group, another function than jlora's one adapter over the kernel. Model type -> (the end of
# such a conv's PyTorch module name, its groups from the model's config and the conv's outputs).
GROUPED_CONVS = {"regnet": (".layer.1.convolution", lambda config, out: max(1, out // config.groups_width))}

# HF's Flax models with batch norms, and their norms' module name: where the params come without
# their batch_stats, how a saved module is told to be one.
BATCH_NORMS = {"resnet": "normalization", "regnet": "normalization"}


def _batch_norms(tree: Any, modules: Sequence[str], hf_config: Any) -> list[str]:
    """The batch norms among ``modules`` (PyTorch-style paths): those with running statistics in
    ``tree``'s ``batch_stats``, or named as ``hf_config``'s model type names its batch norms.

    Example:
        >>> from transformers import ResNetConfig
        >>> _batch_norms({"params": {}, "batch_stats": {"bn": {"mean": 0, "var": 1}}}, ["bn", "fc"], ResNetConfig())
        ['bn']
        >>> _batch_norms({}, ["embedder/embedder/normalization"], ResNetConfig())
        ['embedder/embedder/normalization']
    """
    stats = set()
    if isinstance(tree, collections.abc.Mapping) and "params" in tree and "batch_stats" in tree:
        stats = {_torch_style(p).rsplit("/", 1)[0] for p, _ in leaves_with_paths(tree["batch_stats"])}
    named = lambda m: m.rsplit("/", 1)[-1] == BATCH_NORMS.get(_model_type(hf_config, m.replace("/", ".")))
    return sorted(m for m in modules if m in stats or named(m))


def _task_type(task_type: str | None, hf_config: Any, targets: Sequence[str], trained: Sequence[str]) -> str | None:
    """The task type to write (see ``save_adapter``); a ValueError for a given one PEFT's model
    for it could not load the adapter with.

    Example:
        >>> from transformers import BertConfig
        >>> cfg = BertConfig(architectures=["BertForSequenceClassification"])
        >>> _task_type("infer", cfg, ["bert/q/kernel"], ["classifier/kernel"]), _task_type("infer", cfg, ["bert/q/kernel"], [])
        ('SEQ_CLS', None)
    """
    if task_type == "infer":
        archs = getattr(hf_config, "architectures", None) or []
        inferred = next((t for arch in archs for suffix, t in TASK_TYPES.items() if arch.endswith(suffix)), None)
        if inferred == "SEQ_2_SEQ_LM" and hf_config.model_type in NOT_TEXT_TO_TEXT:
            return None
        return None if _head_problem(inferred, targets, trained) else inferred
    if task_type is not None and task_type not in PEFT_TASK_TYPES:
        raise ValueError(f"jlora.peft.save_adapter: task_type={task_type!r} is none of PEFT's task types "
                         f"{list(PEFT_TASK_TYPES)}; pass one, 'infer' or None")
    problem = _head_problem(task_type, targets, trained)
    if problem:
        raise ValueError(f"jlora.peft.save_adapter: task_type={task_type!r}: {problem}")
    return task_type


def _head_problem(task_type: str | None, targets: Sequence[str], trained: Sequence[str]) -> str | None:
    """Why PEFT's model for ``task_type`` could not load these adapters (it trains the task's head
    whole: loads it from the adapter, and cannot wrap a LoRA inside it), and what to do, or ``None``."""
    heads = TASK_HEADS.get(task_type, ())
    if not heads:
        return None
    # the head PEFT loads from the file is the module of its name (DistilBERT's pre_classifier is
    # not its classifier); one it trains whole takes a LoRA-adapted one ending so too, before 0.22
    in_head = lambda p, dotted: _saved_prefix(p.split("/")[:-1], heads, dotted) is not None
    lora = [p for p in targets if in_head(p, False)]
    if lora:
        module = lora[0].rsplit("/", 2)[-2]
        return (f"'{lora[0]}' has a LoRA adapter inside the task head, which PEFT's model for {task_type} trains "
                f"whole: leave it out of the targets (LoraConfig(exclude=['{module}'])), or {AS_IT_IS}")
    if not any(in_head(p, True) for p in trained):
        return (f"the task head ({' or '.join(heads)}) is not trained, but PEFT's model for {task_type} loads it "
                f"from the adapter; {AS_IT_IS}")
    return None


def _task_head(module: str, task_type: str | None) -> str:
    """The module PEFT trains whole for ``task_type`` (its ``classifier``, ``score`` or
    ``qa_outputs``) that Flax module path ``module`` is in, else ``module``: saved as its parts,
    the head would be wrapped twice, and PEFT could not load it.

    Example:
        >>> _task_head("classifier/dense", "SEQ_CLS"), _task_head("classifier/dense", None)
        ('classifier', 'classifier/dense')
    """
    parts = module.split("/")
    end = _saved_prefix(parts, TASK_HEADS.get(task_type, ()), False)
    return module if end is None else "/".join(parts[:end])


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


def _check_hf_config(op: str, hf_config: Any) -> None:
    """Refuse anything but a HF config object (a model, its class, a dict), naming what was given."""
    if isinstance(hf_config, type) or not isinstance(getattr(hf_config, "model_type", None), str):
        hint = " (pass model.config)" if hasattr(hf_config, "config") else ""
        raise ValueError(f"{op}: hf_config must be the model's transformers config, e.g. model.config; got "
                         f"{hf_config.__name__ if isinstance(hf_config, type) else type(hf_config).__name__}{hint}")


def _check_config_fits(source: Any, hf_config: Any, by_path: dict[str, Any], whose: str = "base_params'") -> None:
    """Refuse an ``hf_config`` that is not the base's own (another model's), told by its vocabulary:
    it decides how factors are read (GPT-2's ``Conv1D`` is stored transposed), so a wrong one
    would load other adapters, silently."""
    if not hf_config.model_type:  # a bare PretrainedConfig: no model type, whose layouts it would decide
        raise ValueError(f"{source}: hf_config names no model_type (a bare PretrainedConfig); pass the model's own "
                         "(model.config)")
    vocab = getattr(hf_config, "vocab_size", None)
    tables = [tuple(x.shape) for p, x in by_path.items() if p.endswith("/embedding") and len(x.shape) == 2]
    rows, columns = sorted({t[0] for t in tables}), sorted({t[1] for t in tables})
    if isinstance(vocab, int) and rows and vocab not in rows:
        raise ValueError(f"{source}: hf_config ({hf_config.model_type}, vocab_size {vocab}) is not {whose} "
                         f"config: their embedding tables have {rows} rows; pass the model's own (model.config)")
    widths = {getattr(hf_config, name, None) for name in ("hidden_size", "embedding_size", "word_embed_proj_dim")}
    widths = {w for w in widths if isinstance(w, int)}  # ALBERT's, ELECTRA's tables have embedding_size columns
    if widths and columns and not widths & set(columns):
        hidden = getattr(hf_config, "hidden_size", "-")
        raise ValueError(f"{source}: hf_config ({hf_config.model_type}, hidden_size {hidden}) is not {whose} "
                         f"config: their embedding tables have {columns} columns; pass the model's own (model.config)")


def _peft_ties(config: dict) -> str | None:
    """What PEFT ties to the LM head on loading an adapter with ``config``, as its
    ``_check_tied_modules`` decides: ``"save"`` the input embedding's trained copy, ``"target"``
    its LoRA, ``None`` neither (no ``ensure_weight_tying``, or no entry named as
    ``PEFT_TYING_NAMES``). The tied head then computes with the embedding's factors, transposed,
    at the same scale, or the same copy: what Flax computes, whose head is the embedding."""
    if not config.get("ensure_weight_tying"):
        return None
    named = lambda entries: any(str(m).split(".")[-1] in PEFT_TYING_NAMES for m in entries or ())
    targets = config.get("target_modules")
    if named(config.get("modules_to_save")):
        return "save"
    if (any(re.fullmatch(targets, n) for n in PEFT_TYING_NAMES) if isinstance(targets, str) else named(targets)):
        return "target"
    return None


def _check_untied(what: str, path: str, hf_config: Any, shapes: dict[str, tuple], peft_ties: bool = False,
                  config: dict | None = None, adapted: bool = True) -> bool:
    """Whether an embedding (at Flax ``path``; adapted, or trained whole) is one the model ties to
    its LM head, refusing it unless ``peft_ties``: jlora's change reaches the head with it (the head
    is the same param), PEFT's (an Embedding LoRA, or the module in ``modules_to_save``) only the
    lookup, unless PEFT ties the head to it (``_peft_ties``). Not tied: a model whose params
    (``shapes``: every leaf's) hold an ``lm_head`` kernel of its own (Flax's Llama keeps one
    whatever ``tie_word_embeddings`` says), or one without an LM head by its ``architectures`` (a
    classifier, the model type's bare model: ``BertModel``), by the params (a classifier's head
    and no LM head's: ``architectures`` may name the checkpoint's pre-training class, or none), or
    by its model type (no class of it has an LM head: CLIP's). ``config``: the adapter's, named in
    the error."""
    from transformers.models.auto import modeling_auto as auto  # model type -> its classes

    archs = getattr(hf_config, "architectures", None) or []
    bare = auto.MODEL_MAPPING_NAMES.get(hf_config.model_type, ())
    bare = (bare,) if isinstance(bare, str) else tuple(bare)  # some types have two (funnel)
    part = _part_config(hf_config, path.replace("/", "."))  # a composite model's decoder ties its own
    with_lm_head = set().union(*(getattr(auto, f"MODEL_{kind}_MAPPING_NAMES", {}) for kind in LM_HEAD_KINDS))
    model_type = getattr(part, "model_type", hf_config.model_type)
    top = {q.split("/", 1)[0] for q in shapes}
    headless = (archs and all(a.endswith(CLASSIFIERS) or a in bare for a in archs)
                or (top & CLASSIFIER_HEADS and not top & set(MLM_HEADS))
                # a type transformers knows (not remote code, nor newer) with no LM-head class
                or model_type in auto.MODEL_MAPPING_NAMES and model_type not in with_lm_head)
    shape = tuple(shapes[path])
    own_head = len(shape) == 2 and any(q.split("/")[-2:] == ["lm_head", "kernel"] and s == shape[::-1]
                                       for q, s in shapes.items())
    tied = bool(getattr(part, "tie_word_embeddings", False) and not headless and not own_head
                and shape[:1] == (getattr(part, "vocab_size", None),))
    if tied and not peft_ties:
        ensured = "" if not (config or {}).get("ensure_weight_tying") else (
            " (this adapter sets ensure_weight_tying, but names neither embed_tokens nor lm_head in its "
            "target_modules, and PEFT reloads it untied: it saves GPT-2's 'transformer.wte' without the 'lm_head' "
            f"it tied while training; add 'lm_head' to target_modules in its {CONFIG_FILE} to read it tied)" if adapted
            else " (this adapter sets ensure_weight_tying, but PEFT tied nothing to an embedding it names otherwise "
                 "than embed_tokens in modules_to_save: it trained that copy for the lookup alone, which jlora, "
                 "whose head is the embedding, cannot represent)")
        raise ValueError(f"{what} is tied to the LM head (tie_word_embeddings, and architectures "
                         f"{archs or 'unset'}): a change to it reaches the head too in jlora but only the lookup in "
                         "PEFT, unless PEFT ties the head to it: LoraConfig(ensure_weight_tying=True) with "
                         "embed_tokens or lm_head in target_modules (modules_to_save for one trained whole), the "
                         f"form jlora reads{ensured}; else leave the embedding out of the targets "
                         "and of trainable (if the model has no LM head, set its config's architectures to its "
                         "class, e.g. ['BertForSequenceClassification'])")
    return tied


def _tied_head(what: str, path: str, hf_config: Any, shapes: dict[str, tuple]) -> str:
    """PyTorch's name of the LM head that the model ties to the embedding at Flax ``path``, for a
    PEFT adapter that ties them (ensure_weight_tying): a causal LM's ``lm_head``. Refused for
    another model (a masked LM's head, a composite model's decoder), whose head jlora cannot name."""
    if (_part_config(hf_config, path.replace("/", ".")) is not hf_config or getattr(hf_config, "is_encoder_decoder", False)
            or {q.split("/", 1)[0] for q in shapes} & set(MLM_HEADS)):
        raise ValueError(f"{what} is tied to the LM head, which jlora names for PEFT (its ensure_weight_tying) only "
                         "as a causal LM's lm_head, and this model's head has another name or place; leave the "
                         "embedding out of the targets and of trainable")
    return "lm_head"


def _check_not_positions(what: str, path: str) -> None:
    """Refuse an adapter on a learned position embedding (BART's, OPT's, Whisper's ``embed_positions``):
    PyTorch's module takes the token ids and looks the positions up itself, and PEFT's Embedding
    LoRA looks its factors up by what the module is given, the token ids, so PEFT would compute
    other outputs than jlora (and than PEFT's own merged model)."""
    if path.split("/")[-2:-1] == ["embed_positions"]:
        raise ValueError(f"{what}: an adapter on a learned position embedding (embed_positions) is looked up by "
                         "token ids in PEFT, by positions in jlora, so the two would compute different outputs; "
                         "leave it out of the targets (training it whole, in trainable, is fine)")


def _check_not_shared(what: str, path: str, hf_config: Any) -> None:
    """Refuse an adapter on (or a full fine-tune of) an encoder-decoder's ``shared`` embedding: Flax
    looks tokens up in it, but PyTorch's encoder and decoder call their own ``embed_tokens``
    modules (sharing its weight), so PEFT's adapter on ``shared`` is never run there."""
    if getattr(hf_config, "is_encoder_decoder", False) and path.split("/")[-2:-1] == ["shared"]:
        raise ValueError(f"{what}: an encoder-decoder's shared embedding, adapted or trained, changes every lookup "
                         "in jlora (Flax reads tokens from it) but none in PEFT (PyTorch's encoder and decoder call "
                         "their own embed_tokens), so the two would compute different outputs; leave it out")


def _check_base_copy(source: Path, module: str, value: np.ndarray, by_path: dict, leaf: str = "weight") -> None:
    """PEFT saves the base weight (and bias: GPT-J's head) of an adapted embedding or LM head
    beside its adapter (for a resized vocabulary): jlora reads adapters over the unchanged base,
    so the copy must be it."""
    p = _flax_leaf(module, leaf, by_path, source)
    base = by_path[p]
    shape = tuple(reversed(base.shape)) if p.endswith("/kernel") else tuple(base.shape)  # PyTorch's (out, in)
    same = shape == value.shape
    if same and not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(base)):  # abstract: shapes only
        _, want = _to_torch(p, base.materialize() if isinstance(base, Lazy) else base)
        # the copy may be coarser than the base (a PEFT model cast to bf16, over an f32 base)
        tol = 4 * max(float(jnp.finfo(d).eps) for d in (base.dtype, value.dtype))
        value, want = np.asarray(value, np.float64), np.asarray(want, np.float64)
        same = np.allclose(value, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max(initial=0))))
    if not same:
        raise ValueError(f"{source}: the adapter carries a copy of {module}'s base {leaf} (PEFT's "
                         f"save_embedding_layers, for a resized vocabulary), and it is not base_params' '{p}'; "
                         "load the adapter onto the base it was trained over")


def _pattern_lookup(table: dict, default: Any) -> Callable[[str], Any]:
    """A module's value in PEFT's ``rank_pattern`` or ``alpha_pattern``: the first key matching the
    end of its name, or all of it as a regex; ``default`` where none does. Each key is compiled
    once (an adapter of hundreds of layers has a key per module, more than ``re``'s cache holds).

    Example:
        >>> _pattern_lookup({"mlp.up_proj": 8}, 16)("model.layers.0.mlp.up_proj")
        8
    """
    hits = _pattern_hits(table)
    return lambda name: next((value for _, value in hits(name)), default)


def _pattern_hits(table: dict) -> Callable[[str], list[tuple[str, Any]]]:
    """The ``(key, value)`` pairs of PEFT's ``rank_pattern`` or ``alpha_pattern`` whose key matches
    a module's name (its end, or all of it as a regex), in the table's order."""
    compiled = [(re.compile(rf"(.*\.)?({key})$"), re.compile(key.strip("^$")), key, value) for key, value in table.items()]
    return lambda name: [(key, value) for tail, whole, key, value in compiled if tail.match(name) or whole.fullmatch(name)]


def _warn_ambiguous_alpha(source: Path, table: dict, modules: Sequence[str]) -> None:
    """Warn of a module that two ``alpha_pattern`` keys match with other values: PEFT trains with
    the first in its config's order but before 0.22 saved the keys sorted, so a reload (PEFT's, and
    jlora's, which reads as PEFT does) may scale it by another alpha than it was trained with."""
    hits = _pattern_hits(table)
    for module in modules:
        found = hits(module)
        if len({value for _, value in found}) > 1:
            warnings.warn(f"{source}: alpha_pattern keys {[k for k, _ in found]} all match {module!r}, with values "
                          f"{[v for _, v in found]}: jlora takes the first, {found[0][1]}, as PEFT's reload does, but "
                          "PEFT before 0.22 saved the keys sorted, and may have trained it with another; check the adapter's "
                          "outputs against the trained model", stacklevel=3)
            return


def _in_saved_module(module: str, saved: Sequence[str], dotted: bool) -> bool:
    """Whether PyTorch module ``module`` is one of ``modules_to_save`` or inside one: PEFT trains
    whole each module an entry names (``_peft_names``) and saves its submodules' tensors
    (``classifier.dense.weight``). ``dotted``: PEFT 0.22's rule, else the earlier one.

    Example:
        >>> _in_saved_module("classifier.dense", ["classifier"], False), _in_saved_module("layers.0.self_attn_layer_norm", ["layer_norm"], False)
        (True, True)
        >>> _in_saved_module("model.classifier_proj", ["classifier"], False), _in_saved_module("layers.0.self_attn_layer_norm", ["layer_norm"], True)
        (False, False)
    """
    return _saved_prefix(module.split("."), saved, dotted) is not None


def _saved_prefix(parts: Sequence[str], saved: Sequence[str], dotted: bool) -> int | None:
    """How many of a module path's ``parts`` name the module PEFT trains whole that it is in: the
    first prefix an entry of ``saved`` names (``_peft_names``)."""
    return next((i for i in range(1, len(parts) + 1) if any(_peft_names(".".join(parts[:i]), m, dotted) for m in saved)),
                None)


def _peft_names(module: str, entry: str, dotted: bool) -> bool:
    """Whether a PEFT list's ``entry`` names ``module``: for ``target_modules``, and from PEFT 0.22
    (``dotted``) for ``modules_to_save``, the module of that name or ``.``-suffix; before it
    ``modules_to_save`` took every module whose name ends with the entry as a string
    (``layer_norm`` took BART's ``self_attn_layer_norm``).

    Example:
        >>> _peft_names("model.classifier", "classifier", True), _peft_names("pre_classifier", "classifier", True)
        (True, False)
        >>> _peft_names("pre_classifier", "classifier", False)
        True
    """
    return module.endswith(entry) and (not dotted or len(module) == len(entry) or module.endswith("." + entry))


def _from_peft_0_22(config: dict) -> bool:
    """Whether PEFT 0.22 or later wrote an adapter (``peft_version``, written from 0.18): it matches
    ``modules_to_save`` by ``.``-suffix, and saves ``rank_pattern`` and ``alpha_pattern`` in their
    order, where earlier versions sorted them. A file without it (older, or written by jlora, which
    saves whole every module either rule takes) is read by the earlier rules; a development version
    after 0.21.0 is 0.22's (PEFT's main branch stayed on 0.21.x.dev after those changes, as PEFT
    reads its own files).

    Example:
        >>> _from_peft_0_22({"peft_version": "0.22.0"}), _from_peft_0_22({"peft_version": "0.21.2@a1b2c3"}), _from_peft_0_22({})
        (True, False, False)
        >>> _from_peft_0_22({"peft_version": "0.21.1.dev0@a1b2c3"}), _from_peft_0_22({"peft_version": "0.21.0.dev0"})
        (True, False)
    """
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(\S*)", str(config.get("peft_version") or ""))
    if found is None:
        return False
    release = (int(found[1]), int(found[2]), int(found[3] or 0))
    return release >= (0, 22) or release >= (0, 21, 1) and "dev" in found[4]


def _plain_name(key: str, tensors: Collection[str]) -> str:
    """A tensor of a module's trained copy (``modules_to_save``) by its module's own name: with
    ``bias="all"`` PEFT saves the copy's biases again under the wrapper, ``classifier.modules_to_save.bias``,
    or with its adapter's name kept, ``classifier.modules_to_save.default.dense.bias``, for a module
    of several beside ``classifier.dense.bias`` (RoBERTa's head).

    Example:
        >>> _plain_name("classifier.modules_to_save.default.dense.bias", ["classifier.dense.bias"])
        'classifier.dense.bias'
        >>> _plain_name("classifier.modules_to_save.bias", []), _plain_name("q.lora_A.weight", [])
        ('classifier.bias', 'q.lora_A.weight')
    """
    outer, wrapped, inner = key.partition(".modules_to_save.")
    if not wrapped:
        return key
    named = inner.split(".", 1)  # (the adapter's name, the rest)
    return f"{outer}.{named[1]}" if len(named) == 2 and f"{outer}.{named[1]}" in tensors else f"{outer}.{inner}"


def _tied_copy(p: str, value: np.ndarray, tuned: dict[str, np.ndarray], by_path: dict[str, Any]) -> bool:
    """Whether the saved leaf ``p``, which Flax does not have, is PyTorch's second name for one it
    does in an enclosing module (BERT's ``cls.predictions.decoder.bias`` is ``cls.predictions.bias``:
    the state dict, and so PEFT, holds a tied parameter under each name)."""
    return any(q in by_path and p.startswith(q.rsplit("/", 1)[0] + "/") and np.shape(v) == np.shape(value)
               and np.array_equal(v, value) for q, v in tuned.items() if q != p)


def _check_own_lookups(source: Path, tensors: dict, by_path: dict, hf_config: Any) -> None:
    """Refuse tensors for an encoder-decoder's ``embed_tokens`` that Flax does not have (BART, T5):
    PyTorch's encoder and decoder each look tokens up in a module of their own, sharing the
    ``shared`` weight, which Flax holds once and reads directly."""
    if not getattr(hf_config, "is_encoder_decoder", False):
        return
    keys = [k[len(PREFIX):].replace(".modules_to_save.", ".") for k in tensors if k.startswith(PREFIX)]
    names = {k.split(".lora_")[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in keys}
    for name in sorted(names):
        if name.endswith("embed_tokens") and not any(p.startswith(name.replace(".", "/") + "/") for p in by_path):
            raise ValueError(f"{source}: '{name}' is PyTorch's own lookup module over the shared embedding, which "
                             "Flax holds once (shared) and looks every token up in: jlora cannot give the encoder's "
                             "and decoder's lookups changes of their own; leave embed_tokens out of the adapter")


def _check_saved_not_nested(source: Path, tensors: dict, whole: Sequence[str], dotted: bool) -> None:
    """Refuse a file in which a module PEFT trains whole sits inside another one it trains whole
    (``whole``: the modules PEFT trains whole, its ``modules_to_save`` and the task's head):
    BigBird's ``qa_outputs`` in ``qa_classifier``, the QUESTION_ANS task type adding the inner one;
    ``"embeddings"``, which names BERT's ``embeddings`` and the tables in it. PEFT writes a file it
    cannot load back itself, holding copies its forward pass did not use."""
    for key in tensors:
        if not key.startswith(PREFIX) or "lora_" in key or ".original_module." in key:
            continue
        wrapped = ".modules_to_save." in key  # the module PEFT wrapped, then its copy's tensors
        parts = key[len(PREFIX):].split(".modules_to_save.")[0].split(".")[:None if wrapped else -1]
        ends = [i for i in range(1, len(parts) + 1) if any(_peft_names(".".join(parts[:i]), m, dotted) for m in whole)]
        if len(ends) > 1:
            outer, inner = ".".join(parts[:ends[0]]), ".".join(parts[:ends[1]])
            short = outer.rsplit(".", 1)[-1]
            # jlora before 3c1037a named a head's inner modules ('classifier.dense'), its task type adding the head
            named_inside = any(m.startswith(short + ".") and _peft_names(inner, m, dotted) for m in whole)
            raise ValueError(f"{source}: PEFT trained '{inner}' whole inside '{outer}', which it also trained whole "
                             f"(modules_to_save {list(whole)}: PEFT takes every module whose name ends with an entry"
                             f"{' after a dot' if dotted else ''}, "
                             "or a task type added one): PEFT cannot load such a file back, nor can jlora; save it "
                             "with modules_to_save naming the outer module only" + (
                                 f" (a file jlora wrote so, before 3c1037a, loads once its {CONFIG_FILE} names "
                                 f"'{short}' there in place of the modules inside it)" if named_inside else ""))


def _tied_heads(tensors: dict, by_path: dict, hf_config: Any) -> list[str]:
    """The output heads (GPT-2's and T5's ``lm_head``, Whisper's ``proj_out``, BERT's
    ``cls.predictions.decoder``) the adapter holds tensors for (adapted, trained whole or their
    base copied) that the Flax model does not have because it ties the head to its input embedding."""
    # a bias is left out: BERT's decoder.bias is its tied cls.predictions.bias (bias="all" saves both)
    names = [k[len(PREFIX):].split(".")[:-1] for k in tensors if k.startswith(PREFIX) and not k.endswith(".bias")]
    heads = {".".join(parts[: i + 1]) for parts in names for i, part in enumerate(parts) if part in TIED_HEADS}
    return sorted(head for head in heads if getattr(_part_config(hf_config, head), "tie_word_embeddings", False)
                  and not any(p.startswith(head.replace(".", "/") + "/") for p in by_path))


def _saved_tied(head_tensors: dict, heads: Sequence[str], tuned: dict) -> bool:
    """Whether PEFT saved a tied head's weight (``head_tensors``) equal to an embedding trained
    whole (``tuned``): its ``modules_to_tie`` with ``ensure_weight_tying``, whose config then names
    neither ``embed_tokens`` nor ``lm_head`` (BLOOM's ``word_embeddings``). Loaded into PyTorch's
    head, which is the base embedding's weight, it makes the head compute with the trained copy, as
    Flax's head, the embedding, does."""
    copies = [v for p, v in tuned.items() if p.endswith("/embedding")]
    return any(key in (f"{h}.weight" for h in heads) and any(np.array_equal(value, c) for c in copies)
               for key, value in head_tensors.items())


def _check_tied_head(source: Path, key: str, value: np.ndarray, heads: Sequence[str], config: dict,
                     factors: dict, tuned: dict, by_path: dict, shapes: dict[str, tuple],
                     scale_of: Callable[[str], float], hf_config: Any, ties: str | None) -> None:
    """Check a tensor PEFT saved (``key``, less ``PREFIX``) for one of the LM ``heads`` the Flax
    model ties to its input embedding, never loading it (Flax's head is the embedding): the head's
    base weight (PEFT's save_embedding_layers) must be the embedding's base; where PEFT ties them
    (``ties``: ``_peft_ties``, or ``_saved_tied``), its LoRA must be the embedding's factors
    transposed at the same scale, its trained copy the embedding's. Anything else the Flax model
    cannot hold is refused. ``shapes``: ``by_path``'s; ``scale_of``: PEFT's scale of a module's adapter."""
    head = next(h for h in heads if key.startswith(h + "."))
    leaf = key[len(head) + 1:]
    prefix = head.rsplit(".", 1)[0].replace(".", "/") + "/" if "." in head else ""
    tables = [p for p in by_path if p.startswith(prefix) and p.endswith("/embedding")
              and _check_untied("", p, hf_config, shapes, peft_ties=True)]
    if not tables:
        elsewhere = [p for p in by_path if p.endswith("/embedding") and _check_untied("", p, hf_config, shapes, True)]
        raise ValueError(f"{source}: the adapter holds {key}, for {head}, which the Flax model ties to its input "
                         "embedding (tie_word_embeddings), " + (
                             f"'{elsewhere[0]}': jlora reads a tied head's tensors only beside its embedding (a "
                             "causal LM's lm_head, a composite model's decoder); leave it out of target_modules and "
                             "modules_to_save" if elsewhere else "and base_params hold no embedding tied to it"))
    # the input embedding the head is tied to: one the adapter holds factors or a copy for, else one
    # named as word embeddings are, before another table of as many rows (GPT-2's positions, where
    # n_positions == vocab_size)
    module_of = lambda p: p.rsplit("/", 1)[0].replace("/", ".")
    table = min(tables, key=lambda p: (module_of(p) not in factors and p not in tuned,
                                       p.split("/")[-2] not in WORD_EMBEDDINGS))
    module = module_of(table)
    trained = _in_saved_module(head, config.get("modules_to_save") or (), _from_peft_0_22(config))
    if leaf in ("weight", "base_layer.weight") and not (trained and ties != "save"):
        if leaf == "weight" and ties == "save" and table in tuned:
            want, what = tuned[table], "trained copy (modules_to_save)"
        else:
            return _check_base_copy(source, module, value, by_path)
    elif leaf in ("lora_A.weight", "lora_B.weight") and ties == "target" and module in factors:
        want, what = factors[module]["B" if leaf == "lora_A.weight" else "A"].T, "LoRA factors, transposed,"
        scales = [scale_of(m) for m in (head, module)]
        if scales[0] != scales[1]:
            raise ValueError(f"{source}: PEFT scales {head}'s adapter, tied to {module}'s, by {scales[0]:g} "
                             f"(its rank_pattern and alpha_pattern), and {module}'s by {scales[1]:g}: the Flax "
                             f"model ties {head} to {module} and cannot scale the two apart")
    else:
        raise ValueError(f"{source}: the adapter holds tensors for {head}, which the Flax model ties to its input "
                         "embedding (tie_word_embeddings): it has no head of its own to load them onto (PEFT ties "
                         "the head to the embedding's adapter with LoraConfig(ensure_weight_tying=True) and "
                         "embed_tokens or lm_head in target_modules, or modules_to_save: that form jlora reads)")
    if not np.array_equal(np.asarray(value, np.float64), np.asarray(want, np.float64)):  # False for other shapes too
        raise ValueError(f"{source}: {key} is PEFT's copy of {module}'s {what} for {head}, tied to it "
                         "(ensure_weight_tying), but differs from them: the Flax model's head is that embedding "
                         "and cannot hold another; a damaged or edited adapter")


def _other_level(p: str, by_path: dict) -> str:
    """A hint for a path the base lacks that it has one level down (the adapter saved from the bare
    model, ``LlamaModel``, read onto one with a head) or up (the other way round); '' if neither."""
    inside = sorted({q[: -len(p) - 1] for q in by_path if q.endswith("/" + p)})
    if inside:
        return (f"; the base has it under '{inside[0]}': the adapter was saved from the model without its head "
                f"(PEFT on the bare model class): read it onto the params at '{inside[0]}', then put them back")
    if "/" in p and p.split("/", 1)[1] in by_path:
        return (f"; the base has '{p.split('/', 1)[1]}': the adapter was saved from a model with a head around "
                f"this one (its names start '{p.split('/', 1)[0]}.'): read it onto that model's params")
    numbered = re.sub(r"(?<=/)[a-z]+_(\d+)(?=/)", r"\1", p)  # Flax's layer_0 where PyTorch's ModuleList has 0
    if numbered != p and numbered in by_path:
        return (f"; the base has '{numbered}': the file names modules as Flax does ('layer_0'), as jlora wrote "
                "ResNet adapters before 96e5538, where PEFT and PyTorch number them ('layer.0'): rename its keys "
                "and target_modules so")
    return ""


def _plain_copy(key: str) -> bool:
    """Whether a tensor is a module's base weight under its plain name: what PEFT's
    ``save_embedding_layers`` writes for an embedding or LM head it did not adapt."""
    return (key.startswith(PREFIX) and key.endswith(".weight") and "lora_" not in key
            and ".modules_to_save." not in key and ".original_module." not in key)


def _has_weight(module: str, by_path: dict) -> bool:
    """Whether the base has the PyTorch module's ``weight``, as a kernel or an embedding table."""
    return any(f"{module.replace('.', '/')}/{name}" in by_path for name in ("kernel", "embedding"))


def _flax_leaf(module: str, torch_name: str, by_path: dict, source: Path) -> str:
    """The Flax path of a saved module's PyTorch parameter (``weight`` is a kernel, embedding or scale)."""
    prefix = module.replace(".", "/")
    if torch_name in BATCH_STATISTICS:
        raise ValueError(f"{source}: {module}.{torch_name} is a BatchNorm's running statistic: jlora's adapters hold "
                         "params, not the statistics (Flax keeps them in batch_stats); leave the norm out of "
                         "modules_to_save")
    names = [n for n, t in TORCH_NAMES.items() if t == torch_name] or [torch_name]
    found = [f"{prefix}/{n}" for n in names if f"{prefix}/{n}" in by_path]
    if not found:
        raise ValueError(f"{source}: adapter for another base model: no Flax param for {module}.{torch_name} "
                         f"(looked for {[f'{prefix}/{n}' for n in names] or torch_name})")
    return found[0]


def read_config(path: str | os.PathLike) -> dict:
    """A PEFT LoRA adapter's ``adapter_config.json``, once every option in it is one jlora reads
    (a clear error for another PEFT method or an option jlora cannot represent), and its weights
    file is one jlora reads.

    Example:
        >>> import tempfile, jax, jlora
        >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
        >>> model = FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
        >>> params = jlora.hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=4))
        >>> jlora.peft.read_config(jlora.peft.save_adapter(tempfile.mkdtemp() + "/peft", params, model.config))["r"]
        4
    """
    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except NotADirectoryError:
        raise ValueError(f"{path}: a file, not a PEFT adapter directory: pass the directory that holds "
                         f"{CONFIG_FILE} and {WEIGHTS_FILE} ({path.parent})") from None
    except FileNotFoundError:
        named = sorted(d.name for d in path.iterdir() if (d / CONFIG_FILE).is_file()) if path.is_dir() else []
        hint = f"; it holds named adapters (PEFT saves each under its name): load one of {named}" if named else ""
        raise ValueError(f"{path}: no {CONFIG_FILE}: not a PEFT adapter directory{hint}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / CONFIG_FILE}: corrupted JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_FILE}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") == ADAPTER_FORMAT:
        raise ValueError(f"{path}: a jlora adapter, not a PEFT one: read it with jlora.adapter.load_adapter")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: PEFT type {config.get('peft_type')!r}; only LORA adapters are supported")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        how = ("PEFT cannot convert LoftQ's adapter, which fits the base it quantized, to plain LoRA"
               if init.lower().startswith("loftq") else
               "convert it to plain LoRA in PEFT: model.save_pretrained(out, path_initial_model_for_weight_conversion="
               "<the directory of the adapter saved before training>)")
        raise ValueError(f"{path}: PEFT option init_lora_weights={config['init_lora_weights']!r} changes the base "
                         f"weights; jlora reads adapters over the unchanged base ({how})")
    for key, value in sorted(config.items()):
        if key not in READ | DESCRIPTIVE and not (value is None or value is False or value in ({}, [], "")):
            raise ValueError(f"{path}: PEFT option {key}={value!r} is not supported by jlora")
    for key in ("r", "lora_alpha"):
        if not _positive(config.get(key)):
            raise ValueError(f"{path / CONFIG_FILE}: '{key}' must be a number > 0, got {config.get(key)!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        table = config.get(key) or {}
        if not isinstance(table, dict) or not all(_positive(v) for v in table.values()):
            raise ValueError(f"{path / CONFIG_FILE}: '{key}' must map patterns to numbers > 0, got {config[key]!r}")
    dropout = config.get("lora_dropout") or 0.0
    if dropout != 0 and not (_positive(dropout) and dropout < 1):
        raise ValueError(f"{path / CONFIG_FILE}: 'lora_dropout' must be in [0, 1), got {config['lora_dropout']!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise ValueError(f"{path / CONFIG_FILE}: 'use_rslora' must be true or false, got {config['use_rslora']!r}")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{path}: PEFT option bias={config['bias']!r} is not supported by jlora")
    if not (path / WEIGHTS_FILE).exists() and (path / "adapter_model.bin").exists():
        raise ValueError(f"{path}: holds adapter_model.bin (PyTorch pickle); jlora reads {WEIGHTS_FILE} only: save "
                         "it again in PEFT with model.save_pretrained(path, safe_serialization=True)")
    return config


def _scale(config: dict, alpha: float, r: int) -> float:
    """PEFT's LoRA scale of a module of rank ``r``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def describe(path: str | os.PathLike) -> str:
    """What a PEFT LoRA adapter holds (``jlora info`` on one): its base model and task, each adapted
    module's rank and scale, the tensors trained whole, parameter counts, size on disk. Reads the
    weights file's header only.

    Example:
        >>> import tempfile, jax, jlora
        >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
        >>> model = FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
        >>> params = jlora.hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=4, targets=["c_attn"]))
        >>> out = jlora.peft.save_adapter(tempfile.mkdtemp() + "/peft", params, model.config)
        >>> print(jlora.peft.describe(out))  # doctest: +ELLIPSIS
        PEFT LoRA adapter: ...
        targets: 1 modules, rank 4
          transformer.h.0.attn.c_attn  32 -> 96  r=4  scale=2
        parameters: 512 LoRA + 0 fully trained; ... KiB on disk
    """
    from safetensors import SafetensorError, safe_open

    path, config = Path(path), read_config(path)
    try:
        with safe_open(str(path / WEIGHTS_FILE), "np") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path / WEIGHTS_FILE}: cannot read adapter weights ({err})") from None
    rank_of = _pattern_lookup(config.get("rank_pattern") or {}, config["r"])
    alpha_of = _pattern_lookup(config.get("alpha_pattern") or {}, config["lora_alpha"])
    factors: dict[str, dict[str, tuple]] = {}
    whole, copies = {}, {}  # copies: base weights PEFT saved beside the adapter, which load_adapter checks
    ties = _peft_ties(config)  # a head PEFT ties to a trained embedding is saved as its copy, as load_adapter reads
    dotted = _from_peft_0_22(config)
    saved = (*(config.get("modules_to_save") or ()), *TASK_HEADS.get(config.get("task_type"), ()),
             *(("lm_head",) if ties == "save" else ()))
    for key, shape in shapes.items():
        name = key.removeprefix(PREFIX)
        if key.endswith(LINEAR_FACTORS + EMBEDDING_FACTORS):
            module, part = name.rsplit(".lora_embedding_" if ".lora_embedding_" in name else ".lora_", 1)
            factors.setdefault(module, {})[part[0]] = shape
        elif (key.endswith(".bias") and config.get("bias", "none") != "none"  # trained (bias="all", "lora_only")
              and ".original_module." not in key):  # not modules_to_save's frozen original
            # a head's trained copy's bias is saved under its own name too (classifier.modules_to_save.bias)
            whole[_plain_name(key, shapes).removeprefix(PREFIX).replace(".base_layer.", ".")] = shape
        elif (key.endswith((BASE_COPY, BASE_BIAS_COPY)) or ".original_module." in key
              or _plain_copy(key) and not _in_saved_module(name.rsplit(".", 1)[0], saved, dotted)):
            copies[name] = shape
        else:
            whole[name] = shape
    lines = [f"PEFT LoRA adapter: {path}"]
    lines += [f"{key}: {config[key]}" for key in ("base_model_name_or_path", "task_type") if config.get(key)]
    if ties:
        lines.append("ensure_weight_tying: PEFT ties the LM head to the input embedding's "
                     + ("adapter" if ties == "target" else "trained copy (modules_to_save)"))
    saved_rank = lambda m: factors[m]["A"][0] if factors[m].get("A") else rank_of(m)  # what the tensors hold
    ranks = sorted({saved_rank(m) for m in factors})
    lines.append(f"targets: {len(factors)} modules, rank {', '.join(map(str, ranks)) or '-'}")
    for module, ab in sorted(factors.items()):
        a, b = ab.get("A", ()), ab.get("B", ())  # (r, in, *window) and (out, r, ...); an embedding's (r, vocab), (dim, r)
        fan_in, fan_out = a[1] if len(a) > 1 else "?", b[0] if b else "?"
        embedding = PREFIX + module + EMBEDDING_FACTORS[0] in shapes
        r = saved_rank(module)
        scale = _scale(config, alpha_of(module), r)
        other = (f"  ({CONFIG_FILE} says r={rank_of(module)}: neither PEFT nor jlora loads it)"
                 if r != rank_of(module) else "")
        lines.append(f"  {module}  {fan_in} -> {fan_out}{'  (embedding)' if embedding else ''}  r={r}  scale={scale:g}{other}")
    lines += [f"  {name}  {'x'.join(map(str, shape))}  fully trained" for name, shape in sorted(whole.items())]
    lines += [f"  {name}  {'x'.join(map(str, shape))}  the base's, saved beside the adapter (checked, not loaded)"
              for name, shape in sorted(copies.items())]
    n_lora = sum(math.prod(shape) for ab in factors.values() for shape in ab.values())
    n_whole = sum(math.prod(shape) for shape in whole.values())
    n_copies = sum(math.prod(shape) for shape in copies.values())
    lines.append(f"parameters: {n_lora:,} LoRA + {n_whole:,} fully trained"
                 + (f" (+ {n_copies:,} in copies of base weights)" if copies else "") + f"; {size_on_disk(path)} on disk")
    named = sorted(d.name for d in path.iterdir() if (d / CONFIG_FILE).is_file())
    if named:  # PEFT saves its other adapters under their names beside the default one
        lines.append(f"named adapters beside it: {', '.join(named)} (jlora info {path / named[0]})")
    return "\n".join(lines)


def load_adapter(path: str | os.PathLike, base_params: Any, hf_config: Any) -> Any:
    """Read a PEFT LoRA adapter into ``LoraWeight`` nodes over ``base_params`` (checked first).
    ``hf_config``: the HF model's config (``model.config``), which gives PyTorch's module names and
    layouts (GPT-2's ``Conv1D`` is ``(in, out)``, ``nn.Linear`` ``(out, in)``) and which embeddings are tied.
    An adapter on (or a trained copy of) an embedding the Flax model ties to its LM head is read
    where PEFT ties the head to it too (``ensure_weight_tying=True``, with ``embed_tokens`` or
    ``lm_head`` in its config's list: ``_peft_ties``), the head's tensors checked against the
    embedding's, never loaded; without it PEFT changes the lookup only, and it is refused.

    Example:
        >>> import tempfile, jax, jlora
        >>> from transformers import GPT2Config, FlaxGPT2LMHeadModel
        >>> model = FlaxGPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
        >>> params = jlora.hf.lora_init(jax.random.key(0), model, jlora.LoraConfig(rank=4))
        >>> out = jlora.peft.save_adapter(tempfile.mkdtemp() + "/peft", params, model.config)
        >>> loaded = jlora.peft.load_adapter(out, model.params, model.config)
        >>> str(loaded["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].layout)  # GPT-2's Conv1D: (out, in)
        'oi'
    """
    from safetensors import SafetensorError, safe_open

    _check_hf_config("jlora.peft.load_adapter", hf_config)
    path, config = Path(path), read_config(path)
    dropout = config.get("lora_dropout") or 0.0
    try:  # the tensors and the header's fingerprints, in one read
        with safe_open(str(path / WEIGHTS_FILE), "np") as f:
            tensors, header = {key: f.get_tensor(key) for key in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path / WEIGHTS_FILE}: cannot read adapter weights ({err})") from None
    check_finite(str(path / WEIGHTS_FILE), tensors, "nothing is loaded")
    base_params, put_back = _module_params(base_params)
    by_flax_path = check_base(path, base_params)
    flax_path = {_torch_style(p): p for p in by_flax_path}  # from PyTorch's module names, '/'-joined
    by_path = {_torch_style(p): x for p, x in by_flax_path.items()}
    _check_config_fits(path, hf_config, by_flax_path)
    factors: dict[str, dict[str, np.ndarray]] = {}
    embeddings: set[str] = set()  # modules whose factors are PEFT's lora_embedding_A/B
    base_copies: dict[str, np.ndarray] = {}  # base weights PEFT saved beside their adapters, by module
    bias_copies: dict[str, np.ndarray] = {}  # ... and their biases
    head_tensors: dict[str, np.ndarray] = {}  # those of a head the Flax model ties to its input embedding
    tuned: dict[str, np.ndarray] = {}  # fully trained leaves (biases, modules_to_save) by Flax path
    ties = _peft_ties(config)
    # PEFT saves a head it ties to a trained embedding (its modules_to_tie) beside it: onto Flax's own head
    saved = (*(config.get("modules_to_save") or ()), *(("lm_head",) if ties == "save" else ()))
    dotted = _from_peft_0_22(config)
    _check_saved_not_nested(path, tensors, [*saved, *TASK_HEADS.get(config.get("task_type"), ())], dotted)
    heads = _tied_heads(tensors, by_path, hf_config)
    _check_own_lookups(path, tensors, by_path, hf_config)
    for key, value in tensors.items():
        # with bias="all", PEFT also writes the biases inside a module it trains whole: the base's
        # copy (original_module: the base has it) and the trained one again (modules_to_save)
        if ".original_module." in key:
            continue
        key = _plain_name(key, tensors)
        module, leaf = key[len(PREFIX):].rsplit(".", 1) if key.startswith(PREFIX) else ("", "")
        # checked below; a head's bias too where it was trained whole (Flax's may be elsewhere: BERT's)
        if any(module == h or module.startswith(h + ".") for h in heads) and (
                leaf != "bias" or saved and _in_saved_module(module, saved, dotted)):
            head_tensors[key[len(PREFIX):]] = value
            continue
        if saved and "lora_" not in key and _in_saved_module(module, saved, dotted):
            p = _flax_leaf(module, leaf, by_path, path)
            tuned[p] = _kernel_from_torch(value) if p.endswith("/kernel") else value
            continue
        if key.startswith(PREFIX) and key.endswith(".bias") and config.get("bias", "none") != "none":
            name = key[len(PREFIX): -len(".bias")].removesuffix(".base_layer")
            tuned[name.replace(".", "/") + "/bias"] = value
            continue
        if key.startswith(PREFIX) and key.endswith(BASE_COPY):  # PEFT's save_embedding_layers: checked below
            base_copies[key[len(PREFIX): -len(BASE_COPY)]] = value
            continue
        if key.startswith(PREFIX) and key.endswith(BASE_BIAS_COPY):  # ... with the bias of a biased head (bias="none")
            bias_copies[key[len(PREFIX): -len(BASE_BIAS_COPY)]] = value
            continue
        if _plain_copy(key) and _has_weight(module, by_path):  # the same, of an embedding or head it did not adapt
            base_copies[module] = value
            continue
        embedding = key.endswith(EMBEDDING_FACTORS)
        if not key.startswith(PREFIX) or not (embedding or key.endswith(LINEAR_FACTORS)):
            where = "" if key.startswith(PREFIX) else f" (PEFT's keys start with {PREFIX!r})"
            if dotted and _in_saved_module(module, saved, False):
                where = (f" (its {CONFIG_FILE} says PEFT {config['peft_version']} wrote the file, which trains whole "
                         f"only the modules modules_to_save {list(saved)} names: an entry is a module's name or the "
                         "end of one after a dot, where PEFT before 0.22 took any name ending with it; if an earlier "
                         f"PEFT wrote the file, set its peft_version there)")
            raise ValueError(f"{path}: unexpected tensor {key!r} in a LoRA adapter{where}")
        name, part = key[len(PREFIX):].rsplit(".lora_embedding_" if embedding else ".lora_", 1)
        if not jnp.issubdtype(value.dtype, jnp.floating):  # numpy does not count bfloat16 as floating
            raise ValueError(f"{path}: tensor {key!r} is {value.dtype}; LoRA factors are floating point")
        factors.setdefault(name, {})[part[0]] = value
        if embedding:
            embeddings.add(name)
    for p in [p for p, v in tuned.items() if p not in by_path and _tied_copy(p, v, tuned, by_path)]:
        del tuned[p]
    if ties is None and _saved_tied(head_tensors, heads, tuned):
        ties = "save"
    for p, value in tuned.items():
        if p not in by_path:
            raise ValueError(f"{path}: adapter for another base model: no Flax param '{p}'")
        if tuple(by_path[p].shape) != value.shape:
            raise ValueError(f"{path}: '{p}' is {tuple(by_path[p].shape)} in the base, {value.shape} in the adapter")
    shapes = {p: tuple(x.shape) for p, x in by_path.items()}
    for p in tuned:
        _check_not_shared(f"{path}: '{p}'", p, hf_config)
        if p.endswith("/embedding"):
            _check_untied(f"{path}: '{p}'", p, hf_config, shapes, ties == "save", config, adapted=False)
    check_trainable_not_lazy(path, tuned, by_path)
    for name, value in base_copies.items():
        _check_base_copy(path, name, value, by_path)
    for name, value in bias_copies.items():
        _check_base_copy(path, name, value, by_path, "bias")
    if not factors and not head_tensors:  # a tied head's alone are refused below
        raise ValueError(f"{path / WEIGHTS_FILE}: holds no LoRA factors (lora_A / lora_B): an empty or damaged adapter")
    new = {}
    rank_of = _pattern_lookup(config.get("rank_pattern") or {}, config["r"])
    alpha_of = _pattern_lookup(config.get("alpha_pattern") or {}, config["lora_alpha"])
    if not dotted:  # PEFT 0.22 keeps the keys in their order
        _warn_ambiguous_alpha(path, config.get("alpha_pattern") or {}, sorted(factors))
    for name, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {name!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if ab["A"].ndim not in (2, 4):  # before the lookup: a conv Flax names otherwise (weight_g, weight_v) is this too
            raise ValueError(f"{path}: module {name!r}: lora_A {ab['A'].shape} is a {ab['A'].ndim - 2}-D conv's; "
                             "jlora reads PEFT's Linear, Embedding and Conv2d adapters")
        p = name.replace(".", "/") + ("/embedding" if name in embeddings else "/kernel")
        if p not in by_path:
            raise ValueError(f"{path}: adapter for another base model: no Flax param '{p}' for module {name!r}"
                             + _other_level(p, by_path))
        w = by_path[p]
        check_float_targets(path, [p], by_path)
        if name in embeddings:
            _check_untied(f"{path}: '{p}'", p, hf_config, shapes, ties == "target", config)
            _check_not_positions(f"{path}: '{p}'", p)
        if ab["A"].ndim == 4 and ab["B"].shape[2:] != (1, 1):
            raise ValueError(f"{path}: module {name!r}: lora_B {ab['B'].shape} is not a 1x1 conv; jlora cannot represent it")
        _check_not_shared(f"{path}: '{p}'", p, hf_config)
        a, b, layout = _factors_from_torch(ab["A"], ab["B"], name not in embeddings and _is_conv1d(hf_config, name))
        layout = Layout.parse(layout)
        r = a.shape[-1]
        if layout.ndim == 4 and w.ndim == 4 and a.shape[:2] == tuple(w.shape[:2]) and a.shape[2] != w.shape[2]:
            raise ValueError(f"{path}: module {name!r}: lora_A {ab['A'].shape} reads {a.shape[2]} input channels, "
                             f"the kernel {tuple(w.shape)} {w.shape[2]}: an adapter for another base model, or a "
                             "grouped conv's, which jlora cannot represent")
        if b.shape[0] != r:
            raise ValueError(f"{path}: module {name!r}: lora_A {ab['A'].shape} has rank {r}, lora_B {ab['B'].shape} "
                             f"rank {b.shape[0]}; a damaged adapter")
        if layout.a_shape(w.shape, r) != a.shape or layout.b_shape(w.shape, r) != b.shape:
            raise ValueError(f"{path}: adapter for another base model: '{p}' is {tuple(w.shape)} but lora_A/lora_B "
                             f"are {ab['A'].shape}/{ab['B'].shape}")
        expected_r = rank_of(name)
        if expected_r != r:
            raise ValueError(f"{path}: module {name!r} has rank {r} but the config says {expected_r}")
        alpha = alpha_of(name)
        scale = _scale(config, alpha, r)
        new[flax_path[p]] = LoraWeight(w, jnp.asarray(a), jnp.asarray(b), scale=scale, layout=layout,
                                       path=flax_path[p], dropout=float(dropout))
    for key, value in head_tensors.items():  # checked against the input embedding it is tied to
        _check_tied_head(path, key, value, heads, config, factors, tuned, by_path, shapes,
                         lambda m: _scale(config, alpha_of(m), rank_of(m)), hf_config, ties)
    for p, value in tuned.items():  # PEFT's trained biases and saved modules: fully trained leaves
        new[flax_path[p]] = Trainable(jnp.asarray(value, by_path[p].dtype))
    new = follow_bases(str(path), new, by_flax_path)  # on a sharded base: sharded alike
    try:  # written by jlora.peft.save_adapter; a hand-edited header is no fingerprint
        saved_base = json.loads(header.get(BASE_KEY, "{}"))
    except ValueError:
        saved_base = {}
    if isinstance(saved_base, dict):
        warn_other_base(str(path), {p: fp for p, fp in saved_base.items() if isinstance(new.get(p), LoraWeight)},
                        by_flax_path, stacklevel=2)
    heads_apart = [p for p in new if p.split("/")[-2:] == ["lm_head", "kernel"]]
    if ties and heads_apart and any(p.endswith("/embedding") for p in new):  # HF's Flax Llama keeps an lm_head
        warnings.warn(f"{path}: PEFT ties the LM head's {'adapter' if ties == 'target' else 'copy'} to the input "
                      f"embedding's (ensure_weight_tying), but this Flax model keeps an LM head of its own "
                      f"('{heads_apart[0]}'): read as two values, equal now, which training in jlora moves apart "
                      "(and save_adapter writes untied)", stacklevel=2)
    unloaded = _unloaded_targets(config, by_path, set(factors))
    if unloaded:
        warnings.warn(f"{path}: the config targets {len(unloaded)} module(s) the adapter holds no factors for, left "
                      f"without an adapter (PEFT warns of missing adapter keys likewise): {unloaded[:4]}", stacklevel=2)
    return put_back(replace_leaves(base_params, new, is_leaf=is_param))


def _unloaded_targets(config: dict, by_path: dict, loaded: set[str]) -> list[str]:
    """The base's modules that the config's ``target_modules`` name (as PEFT matches them: a name or
    a suffix of ``.``-parts, a regex string matched whole) but the adapter holds no factors for: a
    truncated or hand-edited file. Not checked for options that pick modules jlora does not follow
    (``layers_to_transform``, ``exclude_modules``, ``"all-linear"``)."""
    targets = config.get("target_modules")
    if not targets or targets == "all-linear" or config.get("layers_to_transform") is not None or config.get("exclude_modules"):
        return []
    if isinstance(targets, str):
        hit = lambda m: re.fullmatch(targets, m) is not None
    else:
        hit = lambda m: any(_peft_names(m, t, dotted=True) for t in targets)  # PEFT's rule for target_modules
    whole = [*(config.get("modules_to_save") or ()), *TASK_HEADS.get(config.get("task_type"), ())]
    modules = {p.rsplit("/", 1)[0].replace("/", ".") for p in by_path if p.endswith(("/kernel", "/embedding"))}
    dotted = _from_peft_0_22(config)
    return sorted(m for m in modules if hit(m) and m not in loaded and not _in_saved_module(m, whole, dotted))
