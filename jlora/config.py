"""``LoraConfig``: what to adapt and how, validated when it is made."""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import warnings
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jlora.layout import Layout
from jlora.paths import compile_patterns
from jlora.weight import narrow_float

INITS = ("kaiming_uniform", "gaussian")
ALL_LINEAR = "all-linear"


@dataclasses.dataclass(frozen=True, init=False)
class LoraConfig:
    """LoRA settings. All arguments are keywords; unknown ones are refused.

    Args:
      rank: ``r``, the rank of ``a @ b``.
      alpha: scale numerator: ``scale = alpha / rank`` (``alpha / sqrt(rank)`` with ``use_rslora``).
      targets: param-path patterns to adapt (see ``jlora.paths``), or ``"all-linear"`` (every
        dense ``kernel`` except the output head, and except conv windows where ``infer_layout``
        shows them; with ``infer_layout``, each ``weight`` it sees in a matmul, as Equinox's
        ``Linear``); ``None`` (default) means ``"all-linear"`` for
        ``jlora.lora_init`` and the model type's preset for ``jlora.hf``.
      exclude: patterns never adapted (each must match a param: a typo is an error, not a no-op).
      rank_pattern, alpha_pattern: ``{pattern: value}`` overriding ``rank``/``alpha`` per path (each
        pattern must match a param). Kept (as ``layouts``) as a tuple of ``(pattern, value)``
        pairs, so that a config is hashable; ``to_dict()`` gives them as dicts.
      dropout: LoRA dropout on the input of the low-rank path (needs ``lora_rng`` in ``apply``).
      init: ``"kaiming_uniform"`` (PEFT's default for ``a``) or ``"gaussian"`` (std ``1/rank``);
        ``b`` starts at zero either way. An embedding table's factors start as PEFT's do, whatever
        ``init``: ``a`` zeros, ``b`` standard normal.
      use_rslora: rank-stabilised scale ``alpha / sqrt(rank)``.
      param_dtype: dtype of ``a`` and ``b``.
      trainable: patterns of base leaves to fine-tune fully (biases, norms, a new head).
      layouts: ``{pattern: "iio"}`` axis roles of n-D kernels (see ``jlora.layout``).

    Example:
        >>> import jlora
        >>> jlora.LoraConfig(rank=8, alpha=16, targets=["q_proj", "v_proj"]).scale_for(8, 16)
        2.0
    """

    rank: int
    alpha: float
    targets: tuple[str, ...] | str | None
    exclude: tuple[str, ...]
    rank_pattern: tuple[tuple[str, int], ...]
    alpha_pattern: tuple[tuple[str, float], ...]
    dropout: float
    init: str
    use_rslora: bool
    param_dtype: Any
    trainable: tuple[str, ...]
    layouts: tuple[tuple[str, str], ...]

    def __init__(
        self,
        *,
        rank: int = 8,
        alpha: float = 8.0,
        targets: Sequence[str] | str | None = None,
        exclude: Sequence[str] | None = (),
        rank_pattern: Mapping[str, int] | Sequence[tuple[str, int]] | None = None,
        alpha_pattern: Mapping[str, float] | Sequence[tuple[str, float]] | None = None,
        dropout: float = 0.0,
        init: str = "kaiming_uniform",
        use_rslora: bool = False,
        param_dtype: Any = jnp.float32,
        trainable: Sequence[str] | None = (),
        layouts: Mapping[str, str] | Sequence[tuple[str, str]] | None = None,
        **unknown: Any,
    ):
        if unknown:
            names = [f.name for f in dataclasses.fields(LoraConfig)]
            hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
            raise ValueError(
                "LoraConfig: unknown option(s) "
                + ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
                + f"; options are {', '.join(names)}"
            )
        dropout, use_rslora = _scalar(dropout), _scalar(use_rslora)
        rank, alpha = _check_rank("rank", rank), _check_alpha("alpha", alpha)
        if targets is not None and not (isinstance(targets, str) and targets == ALL_LINEAR):
            targets = _patterns("targets", targets)
            if not targets:
                raise ValueError("LoraConfig: targets is empty; give patterns or 'all-linear'")
            if ALL_LINEAR in targets:
                raise ValueError("LoraConfig: 'all-linear' is not a pattern, it stands alone: "
                                 f"targets='all-linear' (got {list(targets)})")
        exclude = _patterns("exclude", () if exclude is None else exclude)
        trainable = _patterns("trainable", () if trainable is None else trainable)
        rank_pattern = _pattern_map("rank_pattern", rank_pattern, _check_rank)
        alpha_pattern = _pattern_map("alpha_pattern", alpha_pattern, _check_alpha)
        layouts_t = _pattern_map("layouts", layouts, lambda name, v: str(Layout.parse(v)))
        if isinstance(dropout, bool) or not (isinstance(dropout, numbers.Real) and 0.0 <= dropout < 1.0):
            raise ValueError(f"LoraConfig: dropout must be in [0, 1), got {dropout!r}")
        if not isinstance(use_rslora, bool):
            raise ValueError(f"LoraConfig: use_rslora must be True or False, got {use_rslora!r}")
        if init not in INITS:
            raise ValueError(f"LoraConfig: init must be one of {INITS}, got {init!r}")
        try:
            if param_dtype is None:  # jnp.dtype(None) is float64, which JAX turns into float32 unless x64
                raise TypeError
            dtype = jnp.dtype(param_dtype)
        except TypeError:
            raise ValueError(f"LoraConfig: param_dtype {param_dtype!r} is not a dtype") from None
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"LoraConfig: param_dtype must be a float dtype, got {dtype.name}")
        if narrow_float(dtype):
            raise ValueError(f"LoraConfig: param_dtype {dtype.name} has 8 bits: factors that narrow lose most of "
                             "each update, and their gradients underflow to 0; use float32 (or bfloat16). An fp8 "
                             "base works: its kernels may be fp8, the factors not")
        if dtype == jnp.float16:
            warnings.warn("LoraConfig: float16 factors: optax's Adam(W) gives NaN or inf updates where gradients "
                          "are small (its eps=1e-8 is 0 in float16, and squared gradients underflow); bfloat16 "
                          "or float32 factors train (a float16 base with float32 factors is fine)", stacklevel=2)
        for name, value in dict(
            rank=int(rank), alpha=float(alpha), targets=targets, exclude=exclude, rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern, dropout=float(dropout), init=init, use_rslora=bool(use_rslora),
            param_dtype=dtype, trainable=trainable, layouts=layouts_t,
        ).items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> "LoraConfig":
        """A copy with some options changed (validated again).

        Example:
            >>> import jlora
            >>> jlora.LoraConfig(rank=8).replace(rank=4).rank
            4
        """
        return LoraConfig(**{**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able options; ``LoraConfig(**cfg.to_dict()) == cfg``.

        Example:
            >>> import jlora
            >>> jlora.LoraConfig(rank=4, targets=["q_proj"]).to_dict()["targets"]
            ['q_proj']
        """
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("rank_pattern", "alpha_pattern", "layouts"):
            out[name] = dict(out[name])
        for name in ("exclude", "trainable"):
            out[name] = list(out[name])
        if isinstance(out["targets"], tuple):
            out["targets"] = list(out["targets"])
        out["param_dtype"] = out["param_dtype"].name
        return out

    def scale_for(self, rank: int, alpha: float) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.

        Example:
            >>> import jlora
            >>> jlora.LoraConfig().scale_for(16, 32.0), jlora.LoraConfig(use_rslora=True).scale_for(16, 32.0)
            (2.0, 8.0)
        """
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _scalar(value: Any) -> Any:
    """A 0-d NumPy or JAX array as the Python number it holds (``rank=jnp.int32(8)``); else ``value``."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        try:
            return value.item()
        except Exception:  # a tracer: refused below as it is
            return value
    return value


def _check_rank(name: str, value: Any) -> int:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:  # numpy ints too
        raise ValueError(f"LoraConfig: {name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_alpha(name: str, value: Any) -> float:
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"LoraConfig: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    elif isinstance(value, (set, frozenset)):  # PEFT's target_modules are often sets
        value = sorted(value, key=str)
    if not isinstance(value, Iterable) or isinstance(value, (Mapping, bytes)):
        raise ValueError(f"LoraConfig: {name} must be a pattern or a list of patterns, got {value!r}")
    value = tuple(str(v) if isinstance(v, str) else v for v in value)  # numpy's str_ as str
    try:
        compile_patterns(value)
    except ValueError as err:
        raise ValueError(f"LoraConfig: {name}: {err}") from None
    return value


def _pattern_map(name: str, value: Mapping[str, Any] | Sequence[tuple[str, Any]] | None, check: Any) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (tuple, list)) and all(isinstance(v, (tuple, list)) and len(v) == 2 for v in value):
        value = dict(value)  # the form a config keeps (dataclasses.replace passes it back)
    if not isinstance(value, Mapping):
        raise ValueError(f"LoraConfig: {name} must be a mapping of pattern -> value, got {type(value).__name__}")
    _patterns(name, list(value))
    items = []
    for pattern, v in value.items():
        try:
            items.append((pattern, check(f"{name}[{pattern!r}]", v)))  # a plain int, float or layout string
        except ValueError as err:
            where = f"LoraConfig: {name}[{pattern!r}]"
            raise ValueError(str(err) if str(err).startswith(where) else f"{where}: {err}") from None
    return tuple(items)


def type_name(x: Any) -> str:
    """``x``'s type as an error message names it: with its module, unless a builtin (a foreign
    config of the same name, PEFT's ``LoraConfig``, is then told apart from jlora's).

    Example:
        >>> import jlora
        >>> from jlora.config import type_name
        >>> type_name({}), type_name(jlora.LoraConfig())
        ('dict', 'jlora.config.LoraConfig')
    """
    module = type(x).__module__
    return type(x).__qualname__ if module == "builtins" else f"{module}.{type(x).__qualname__}"


def check_key(key: Any, where: str) -> None:
    """Refuse anything but a PRNG key (``jax.random.key``, or a legacy ``uint32`` key: 2 words for
    threefry, 4 for rbg) with a message naming ``where`` it was passed.

    Example:
        >>> import jax
        >>> from jlora.config import check_key
        >>> check_key(jax.random.key(0), "lora_init")
    """
    array = isinstance(key, (jax.Array, np.ndarray))  # not an object whose attributes are made on demand (nnx.Rngs)
    dtype, shape = (key.dtype, key.shape) if array else (None, None)
    typed = array and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) and shape == ()
    legacy = array and dtype == jnp.uint32 and shape in ((2,), (4,))  # threefry; rbg and unsafe_rbg
    if not (typed or legacy):
        what = f"{dtype}{list(shape)}" if array else repr(key) if isinstance(key, (int, float, str)) else type_name(key)
        hint = "; draw one from an nnx.Rngs: rngs.dropout()" if type(key).__module__.startswith("flax.nnx") else ""
        raise ValueError(f"{where}: expected a PRNG key (jax.random.key(seed)), got {what}{hint}")
