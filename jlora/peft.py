"""Adapters in HF PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

PEFT's format is what vLLM, TGI, LoRAX and PEFT itself load. A Flax param path maps to the
PyTorch module of the same name (``model/layers/0/self_attn/q_proj/kernel`` ↔
``model.layers.0.self_attn.q_proj``, as HF names its Flax and PyTorch modules alike);
``lora_A.weight`` is ``aᵀ`` (r, in) and ``lora_B.weight`` is ``bᵀ`` (out, r), for ``(in, out)``
kernels and GPT-2's ``(out, in)`` Conv1D alike (PEFT's ``fan_in_fan_out``). Trained biases
(PEFT's ``bias="all"`` / ``"lora_only"``) are ``Trainable`` leaves. Options jlora cannot
represent are refused, never dropped.

Example:
    >>> save_adapter("out/peft", lm.params, model.config)                          # doctest: +SKIP
    >>> params = load_adapter("out/peft", model.params, model.config)              # doctest: +SKIP
"""

from __future__ import annotations

import collections
import json
import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora.adapter import write_directory
from jlora.hf import LAYOUT_PRESETS
from jlora.layout import Layout
from jlora.paths import leaves_with_paths, path_str
from jlora.weight import LoraWeight, Trainable, is_node

CONFIG_FILE, WEIGHTS_FILE, PREFIX = "adapter_config.json", "adapter_model.safetensors", "base_model.model."
TASK_TYPES = {"ForCausalLM": "CAUSAL_LM", "LMHeadModel": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
              "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS",
              "ForConditionalGeneration": "SEQ_2_SEQ_LM"}
# Options PEFT writes that jlora can honour at these values only.
REFUSED = {"use_dora": False, "layers_to_transform": None, "layers_pattern": None, "megatron_config": None,
           "loftq_config": {}, "layer_replication": None, "use_qalora": False}


def module_name(path: str) -> str:
    """PyTorch module name of a Flax kernel path (``a/b/kernel`` → ``a.b``)."""
    if not path.endswith("/kernel"):
        raise ValueError(f"'{path}': only dense kernels (…/kernel) can be exported in PEFT's format")
    return path[: -len("/kernel")].replace("/", ".")


def _layout_ok(lw: LoraWeight) -> bool:
    return str(lw.layout) in ("io", "oi")


def save_adapter(path: str | os.PathLike, params: Any, hf_config: Any, *, base_model_name_or_path: str | None = None,
                 task_type: str | None = None) -> Path:
    """Write ``params``' adapters as a PEFT LoRA adapter that ``peft.PeftModel.from_pretrained`` loads
    onto the PyTorch model with the same base weights."""
    from safetensors.numpy import save_file

    nodes = [(p, x) for p, x in leaves_with_paths(params, is_leaf=is_node) if is_node(x)]
    targets = [(p, x) for p, x in nodes if isinstance(x, LoraWeight)]
    biases = [(p, x) for p, x in nodes if not isinstance(x, LoraWeight) and p.endswith("/bias")]
    others = [p for p, x in nodes if not isinstance(x, LoraWeight) and not p.endswith("/bias")]
    if not targets:
        raise ValueError("jlora.peft.save_adapter: params hold no LoraWeight")
    if others:
        raise ValueError(f"jlora.peft.save_adapter: fully trained leaves {others[:3]} have no PEFT LoRA form "
                         "(only biases do, as PEFT's bias='all' / 'lora_only')")
    model_type = hf_config.model_type
    fan_in_fan_out = model_type in LAYOUT_PRESETS
    tensors, ranks, alphas, modules = {}, {}, {}, []
    for p, lw in targets:
        if not _layout_ok(lw):
            raise ValueError(f"'{p}': layout '{lw.layout}' has no PEFT form (2-D kernels only)")
        if (str(lw.layout) == "oi") != fan_in_fan_out:
            raise ValueError(f"'{p}': layout '{lw.layout}' does not match {model_type}'s PyTorch layout")
        name = module_name(p)
        modules.append(name)
        tensors[f"{PREFIX}{name}.lora_A.weight"] = np.ascontiguousarray(np.asarray(lw.a, np.float32).T)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = np.ascontiguousarray(np.asarray(lw.b, np.float32).T)
        ranks[name] = lw.rank
        alphas[name] = lw.scale * lw.rank  # PEFT: scaling = lora_alpha / r (rsLoRA is folded in)
    lora_modules = set(modules)
    for p, x in biases:  # PEFT names the bias of a LoRA-wrapped module "<module>.base_layer.bias"
        name = p[: -len("/bias")].replace("/", ".")
        wrapped = ".base_layer" if name in lora_modules else ""
        tensors[f"{PREFIX}{name}{wrapped}.bias"] = np.asarray(x.value, np.float32)
    bias_mode = "none" if not biases else (
        "lora_only" if all(p[: -len("/bias")].replace("/", ".") in lora_modules for p, _ in biases) else "all")
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    alpha = collections.Counter(alphas.values()).most_common(1)[0][0]
    if task_type is None:
        archs = getattr(hf_config, "architectures", None) or []
        task_type = next((t for arch in archs for suffix, t in TASK_TYPES.items() if arch.endswith(suffix)), None)
    config = {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model_name_or_path,
        "r": r, "lora_alpha": alpha, "lora_dropout": max(lw.dropout for _, lw in targets),
        "target_modules": sorted(modules),
        "fan_in_fan_out": fan_in_fan_out, "bias": bias_mode, "use_rslora": False, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "rank_pattern": {f"^{n}$": k for n, k in ranks.items() if k != r},
        "alpha_pattern": {f"^{n}$": a for n, a in alphas.items() if a != alpha},
    }
    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))

    return write_directory(path, write)


def _pattern_value(table: dict, name: str, default: Any) -> Any:
    import re

    for key, value in table.items():  # PEFT matches a key against the end of the module name
        if re.match(rf"(.*\.)?({key})$", name) or re.fullmatch(key.strip("^$"), name):
            return value
    return default


def load_adapter(path: str | os.PathLike, base_params: Any, hf_config: Any) -> Any:
    """Read a PEFT LoRA adapter into ``LoraWeight`` nodes over ``base_params`` (checked first)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no {CONFIG_FILE}: not a PEFT adapter directory") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path / CONFIG_FILE}: corrupted JSON ({err})") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: PEFT type {config.get('peft_type')!r}; only LORA adapters are supported")
    for key, allowed in REFUSED.items():
        if config.get(key, allowed) not in (allowed, None, False, {}):
            raise ValueError(f"{path}: PEFT option {key}={config[key]!r} is not supported by jlora")
    if config.get("bias", "none") not in ("none", "all", "lora_only"):
        raise ValueError(f"{path}: PEFT option bias={config['bias']!r} is not supported by jlora")
    if config.get("modules_to_save"):
        raise ValueError(f"{path}: PEFT option modules_to_save={config['modules_to_save']!r} is not supported yet")
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path / WEIGHTS_FILE}: cannot read adapter weights ({err})") from None
    flat, treedef = jax.tree_util.tree_flatten_with_path(base_params)
    by_path = {path_str(kp): i for i, (kp, _) in enumerate(flat)}
    factors: dict[str, dict[str, np.ndarray]] = {}
    biases: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        if key.startswith(PREFIX) and key.endswith(".bias") and config.get("bias", "none") != "none":
            name = key[len(PREFIX): -len(".bias")].removesuffix(".base_layer")
            biases[name.replace(".", "/") + "/bias"] = value
            continue
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"{path}: unexpected tensor {key!r} in a LoRA adapter")
        name, part = key[len(PREFIX):].rsplit(".lora_", 1)
        factors.setdefault(name, {})[part[0]] = value
    for p, value in biases.items():
        if p not in by_path:
            raise ValueError(f"{path}: adapter for another base model: no Flax param '{p}'")
        if tuple(flat[by_path[p]][1].shape) != value.shape:
            raise ValueError(f"{path}: '{p}' is {tuple(flat[by_path[p]][1].shape)} in the base, {value.shape} in the adapter")
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    leaves = [leaf for _, leaf in flat]
    for name, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{path}: module {name!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        p = name.replace(".", "/") + "/kernel"
        if p not in by_path:
            raise ValueError(f"{path}: adapter for another base model: no Flax param '{p}' for module {name!r}")
        w = leaves[by_path[p]]
        a, b = ab["A"].T, ab["B"].T  # a: (in, r), b: (r, out)
        layout = Layout.parse("oi" if fan_in_fan_out else "io")
        r = a.shape[1]
        if layout.a_shape(w.shape, r) != a.shape or layout.b_shape(w.shape, r) != b.shape:
            raise ValueError(f"{path}: adapter for another base model: '{p}' is {tuple(w.shape)} but lora_A/lora_B "
                             f"are {ab['A'].shape}/{ab['B'].shape}")
        expected_r = _pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        if expected_r != r:
            raise ValueError(f"{path}: module {name!r} has rank {r} but the config says {expected_r}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        leaves[by_path[p]] = LoraWeight(w, jnp.asarray(a), jnp.asarray(b), scale=scale, layout=layout, path=p,
                                        dropout=float(config.get("lora_dropout", 0.0)))
    for p, value in biases.items():  # PEFT's trained biases: fully trained leaves
        leaves[by_path[p]] = Trainable(jnp.asarray(value, leaves[by_path[p]].dtype))
    return jax.tree_util.tree_unflatten(treedef, leaves)
