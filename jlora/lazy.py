"""``apply(fn)``: run any JAX function on a tree holding lazy values, keeping them lazy.

The function is traced once per input signature with ``jax.make_jaxpr`` (lazy leaves enter as
plain abstract arrays), then its jaxpr is evaluated by a small interpreter in which values may be
lazy. An equation with no lazy input is re-bound unchanged. Otherwise the rule registered for
(primitive, lazy kind) runs; a rule may decline by returning ``NotImplemented``. Without a rule,
lazy inputs are materialised exactly and a ``MaterializeWarning`` names the primitive and the
param path, once. Correctness never depends on rule coverage; only speed does.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
import math
import numbers
import os
import re
import sys
import threading
import warnings
import weakref
from collections import Counter, OrderedDict
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive

from jlora import _compat
from jlora.config import check_key
from jlora.paths import DELETED, is_deleted, path_str
from jlora.tree import check_whole
from jlora.variables import add_created, nnx_variables, state_after_call, state_variables, value_of, write_back
from jlora.weight import TRACING_APPLY, Lazy, LoraWeight, NotAnArray, Trainable, is_param, materialized

Rule = Callable[["Context", Any, list], "list | type(NotImplemented)"]
_RULES: dict[tuple[Any, type], Rule] = {}
_WARNED: set[tuple[tuple[str, str], bool]] = set()  # ((what, param), dropout lost)
_GENERATION = 0  # bumped where eager calls' compiled evaluations go stale: warnings reset, a rule registered
_EVALUATING = threading.local()  # .eqns: the equations with lazy inputs being evaluated, innermost last
# Where no frame is the user's: JAX's, jlora's and the standard library's files
_INTERNAL = tuple(os.path.dirname(m.__file__) + os.sep for m in (jax, np, inspect)) + (os.path.dirname(__file__) + os.sep,)


class MaterializeWarning(UserWarning):
    """A lazy value was materialised: correct, but the factored fast path was not taken.

    It names the primitive and the param path, once per pair. Make it an error to catch every
    fallback (the test suite does), or silence it for one that is expected.

    Example:
        >>> import warnings, jax.numpy as jnp, jlora
        >>> from jlora.weight import LoraWeight
        >>> lw = LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0, path="doc/w")
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     _ = jlora.apply(lambda w: jnp.sin(w))(lw)  # sin takes the weight whole
        >>> print(seen[0].message)  # doctest: +ELLIPSIS
        jlora: LoraWeight at 'doc/w' materialised at 'sin' in <doctest ...>:3 (<lambda>). The result is exact; only the factored fast path was skipped.
    """


def register(primitive: Any, kind: type = Lazy) -> Callable[[Rule], Rule]:
    """Register ``rule(ctx, eqn, invals) -> outvals | NotImplemented`` for a primitive and a lazy kind.

    ``apply`` calls the rule for each equation of the traced function that has an input of ``kind``:

    - ``eqn``: the JAX equation: ``eqn.primitive``, ``eqn.params``, ``eqn.invars`` and
      ``eqn.outvars`` (their ``.aval``: shapes and dtypes);
    - ``invals``: its inputs, each an array (a tracer) or a lazy value (a ``LoraWeight``, a kind's);
    - ``ctx`` (a ``jlora.lazy.Context``): ``ctx.drops(x)`` says whether LoRA dropout applies to
      ``x`` (it has a rate and the call was given ``lora_rng``), ``ctx.next_key()`` gives a key for
      one use, ``ctx.where(x)`` names a param for a message. A rule that ignores ``ctx.drops``
      leaves dropout out there, silently.

    It returns the list of outputs (arrays, or lazy values with the equation's shapes and dtypes:
    checked), or ``NotImplemented``: the lazy inputs are then materialised, with a
    ``MaterializeWarning``. ``jlora.lazy.evaluate_eqn(ctx, eqn, invals)`` computes the equation on other
    inputs: it binds it on arrays, and sends a lazy one (a quantized ``w`` under a ``LoraWeight``)
    through its own kind's rules.

    A rule registered on ``Lazy`` applies to every kind. A subclass of a kind inherits the kind's
    rules unless it overrides ``materialize`` (it then stands for another value: DoRA over
    ``LoraWeight``). Registering a pair that has a rule replaces that rule, with a warning;
    ``jlora.lazy.find_rule(primitive, kind)`` gives the rule in force, for a new one to fall back to.
    ``jax.extend.core.primitives`` holds most primitives; any other is read off a trace,
    ``jax.make_jaxpr(fn)(*args).eqns[0].primitive``. A ``jax.custom_jvp`` function is JAX's generic
    ``custom_jvp_call`` (jlora's rule runs its primal lazily): to give an op a rule, make it a primitive.

    Example: a kind for ``s·x`` whose matmul scales the product instead of the kernel.
        >>> import jax, jlora
        >>> from jlora.lazy import evaluate_eqn, is_lazy
        >>> @jax.tree_util.register_pytree_node_class
        ... class Scaled(jlora.Lazy):
        ...     def __init__(self, x, s): self.x, self.s = x, s
        ...     shape = property(lambda self: self.x.shape)
        ...     dtype = property(lambda self: self.x.dtype)
        ...     def materialize(self): return self.s * self.x
        ...     def tree_flatten(self): return (self.x, self.s), None
        ...     @classmethod
        ...     def tree_unflatten(cls, _, children): return cls(*children)
        >>> @jlora.register(jax.extend.core.primitives.dot_general_p, Scaled)
        ... def scaled_matmul(ctx, eqn, invals):
        ...     x, w = invals
        ...     if is_lazy(x) or not isinstance(w, Scaled):
        ...         return NotImplemented  # materialised, with a warning
        ...     return [w.s * evaluate_eqn(ctx, eqn, [x, w.x])[0]]
        >>> import jax.numpy as jnp
        >>> jlora.apply(lambda w, x: x @ w)(Scaled(jnp.eye(2), jnp.float32(3.0)), jnp.ones((1, 2)))
        Array([[3., 3.]], dtype=float32)
    """

    if not isinstance(primitive, Primitive):
        raise TypeError(f"jlora.register: {primitive!r} is not a JAX primitive; rules are for primitives, as "
                        "jax.extend.core.primitives.dot_general_p (not the function jax.lax.dot_general)")
    if not (isinstance(kind, type) and issubclass(kind, Lazy)):
        raise TypeError(f"jlora.register: kind must be a subclass of jlora.Lazy, got {kind!r}")

    def deco(rule: Rule) -> Rule:
        replaced = _RULES.get((primitive, kind))
        if replaced is not None and replaced is not rule:
            warnings.warn(f"jlora.register: the rule {getattr(replaced, '__qualname__', replaced)} for "
                          f"{primitive.name} on {kind.__name__} is replaced by {getattr(rule, '__qualname__', rule)}; "
                          "jlora.lazy.find_rule(primitive, kind) before registering gives the old one to fall back to",
                          stacklevel=2)
        global _GENERATION
        if replaced is not rule:  # wrappers called eagerly before evaluate with it from their next call
            _GENERATION += 1
        _RULES[(primitive, kind)] = rule
        return rule

    return deco


def find_rule(primitive: Any, kind: type) -> Rule | None:
    """The rule for ``primitive`` on ``kind``: its own, else a base class's where ``kind`` keeps that
    class's ``materialize`` (a subclass that changes what it stands for, DoRA over ``LoraWeight``,
    does not inherit rules computing the old value), else the rules of every ``Lazy``."""
    cls = _rule_class(primitive, kind)
    return None if cls is None else _RULES[(primitive, cls)]


def _rule_class(primitive: Any, kind: type) -> type | None:
    """The class whose rule for ``primitive`` applies to ``kind`` (see ``find_rule``), or ``None``."""
    for cls in kind.__mro__:
        if (primitive, cls) in _RULES and (cls is kind or cls is Lazy or kind.materialize is cls.materialize):
            return cls
    return None


def is_lazy(x: Any) -> bool:
    return isinstance(x, Lazy)


def warn_once(what: str, value: Any, why: str = "", where: str = "", undropped: bool = False) -> None:
    """Warn once per (what, param path) that a value was materialised, and once more where LoRA
    dropout is lost there (a fallback first met in an evaluation without ``lora_rng``, then in
    training). ``where`` names the param of a value that has no ``path`` of its own (a quantized
    kernel, or the base of a ``LoraWeight``); ``undropped``: LoRA dropout was due there, and a
    whole weight has no low-rank path to drop."""
    own = getattr(value, "path", "")
    key = (what, own or where or value.describe())
    if (key, undropped) in _WARNED or (key, True) in _WARNED:
        return
    _WARNED.update({(key, False), (key, undropped)})
    outcome = ("LoRA dropout is NOT applied to this use (a whole weight has no low-rank path to drop)"
               if undropped else "The result is exact; only the factored fast path was skipped")
    if (not undropped and not isinstance(value, LoraWeight)  # a quantized kernel: its whole float array
            and all(isinstance(d, int) for d in value.shape)):  # (not a shape-polymorphic export's symbols)
        parts = sum(math.prod(np.shape(x)) * jnp.result_type(x).itemsize for x in jax.tree.leaves(value))
        whole = math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
        outcome = (f"The result is exact, from the whole {jnp.dtype(value.dtype).name}{list(value.shape)} array it "
                   f"stands for ({_size(whole)}, where its parts hold {_size(parts)})")
    eqns = _evaluating()
    # the innermost equation made in the user's code: one inside a jnp function that is itself a
    # jit (jnp.sort) has only JAX's frames
    traced = next((t for eqn in reversed(eqns) if (t := _compat.traced_at(eqn, _INTERNAL))), "")
    warnings.warn(
        f"jlora: {value.describe()}{'' if own or not where else f' ({where})'} materialised at '{what}'"
        f"{f' in {traced}' if traced else ''}{': ' + why if why else ''}. {outcome}.",
        MaterializeWarning,
        stacklevel=_user_stacklevel(),
    )


def _size(nbytes: int) -> str:
    """``nbytes`` in the largest binary unit it reaches, to 3 digits: ``"2.25 KiB"``."""
    return next(f"{nbytes / 2**p:.3g} {unit}" for p, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB"), (0, "bytes"))
                if nbytes >= 2**p or not p)


def _evaluating() -> list:
    """This thread's stack of the equations with lazy inputs being evaluated, innermost last."""
    if not hasattr(_EVALUATING, "eqns"):
        _EVALUATING.eqns = []
    return _EVALUATING.eqns


_DROPOUT_OFF_WARNED: list[bool] = []  # once per process: a training loop calls the function at every step


def _dropout_differentiated(x: Any) -> bool:
    """Whether ``x`` is an adapter with LoRA dropout whose factors are being differentiated."""
    return (isinstance(x, LoraWeight) and x.dropout > 0
            and any(_compat.differentiated(f) for f in (x.a, x.b) if f is not None))


def _user_stacklevel() -> int:
    """The ``stacklevel`` of a warning from jlora's caller's caller: the innermost frame outside
    jlora, JAX and the standard library (the user's call of the wrapped function, or the step it
    is traced in), as ``warnings.warn`` counts from this function's caller."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def reset_warnings() -> None:
    """Forget which fallbacks were already reported (each is reported once per process), and
    whether LoRA dropout left off for want of ``lora_rng`` was (once per process too).

    Example:
        >>> import warnings, jax, jax.numpy as jnp, jlora
        >>> from jlora.lazy import reset_warnings
        >>> lw = jlora.lora_init(jax.random.key(0), {"k": jnp.ones((4, 4))}, jlora.LoraConfig(rank=1, targets=["k"]))
        >>> sine = jlora.apply(lambda p: jnp.sin(p["k"]))  # no rule for sin: w + scale·a@b, with a warning
        >>> with warnings.catch_warnings(record=True) as seen:
        ...     warnings.simplefilter("always")
        ...     reset_warnings(); _ = sine(lw); _ = sine(lw)  # reported once
        ...     reset_warnings(); _ = sine(lw)                # and again
        >>> sum(issubclass(w.category, jlora.MaterializeWarning) for w in seen)
        2
    """
    global _GENERATION
    _WARNED.clear()
    _DROPOUT_OFF_WARNED.clear()
    _GENERATION += 1  # an eager call's evaluation warned when compiled: compiled again (_compiled_entry), it warns again


def materialize(x: Any, what: str | None = None, why: str = "", where: str = "", undropped: bool = False) -> Any:
    """A plain array for ``x``; warns once when ``what`` names a fallback (``where``, ``undropped``:
    see ``warn_once``)."""
    if not is_lazy(x):
        return x
    if what is not None and (undropped or getattr(x, "warn_on_fallback", True)):
        warn_once(what, x, why, where, undropped)
    try:
        return materialized(x)
    except Exception as err:
        if where and hasattr(err, "add_note"):  # Python 3.11+: the param, which the value may not know
            err.add_note(f"jlora: materialising {where}")
        raise


def materialize_all(xs: Sequence[Any], what: str | None = None, why: str = "", ctx: "Context | None" = None,
                    looks_only: bool = False) -> list:
    """``materialize`` of each; ``ctx`` names the params of lazy values without a path of their own
    and says where LoRA dropout was due (``looks_only``: nowhere, a use with no result)."""
    if ctx is None:
        return [materialize(x, what, why) for x in xs]
    return [materialize(x, what, why, ctx.where(x), ctx.drops_within(x) and not looks_only) for x in xs]


class Context:
    """State shared by one evaluation: the dropout key, what rules want to record, and the frame
    (jaxpr, environment, position) of the equation being evaluated, for rules that look around."""

    def __init__(self, rng: Any = None, records: dict | None = None, rebuild_inputs: bool = False,
                 names: dict[int, str] | None = None):
        self.rng = rng
        self.records = records
        self.rebuild_inputs = rebuild_inputs  # see jlora.rebuild
        self.names = names or {}  # id of a lazy input without a path -> where it is, for warnings
        self.frame: Frame | None = None
        self._counter = itertools.count()

    def where(self, value: Any) -> str:
        """Which param ``value`` is, for a warning, if it is one of the named inputs."""
        return self.names.get(id(value), "")

    def renamed(self, before: Sequence[Any], after: Sequence[Any]) -> "Context":
        """This context for a body whose inputs ``after`` are new copies of ``before`` (a rebuilt
        ``jit``, ``checkpoint``, loop or branch body): the names follow the values. The copy shares
        the dropout key's site counter."""
        names = {id(new): self.where(old) for old, new in zip(before, after) if self.where(old)}
        if not names:
            return self
        ctx = copy.copy(self)
        ctx.names = {**self.names, **names}
        return ctx

    def next_key(self) -> Any:
        """A fresh key per use site (the site counter advances at trace time)."""
        return jax.random.fold_in(self.rng, next(self._counter))

    def drops(self, value: Any) -> bool:
        """Whether LoRA dropout applies to ``value`` here: it has a rate and a key was given."""
        return getattr(value, "dropout", 0.0) > 0.0 and self.rng is not None

    def drops_within(self, value: Any) -> bool:
        """Whether dropout applies to ``value`` or to an adapter under it (its ``w``, that one's ...)."""
        while isinstance(value, Lazy):
            if self.drops(value):
                return True
            value = getattr(value, "w", None)
        return False

    def note_custom_vjp(self) -> None:
        """Record that a rule put a ``custom_vjp`` of jlora's own in the program (forward mode
        cannot differentiate it: ``apply`` then says how to avoid it)."""
        if self.records is not None:
            self.records["custom_vjp"] = True

    def with_rng(self, rng: Any) -> "Context":
        return Context(rng, self.records, self.rebuild_inputs, self.names)

    def forward_mode(self) -> "Context":
        """This context for a body that only forward mode can differentiate (``while_loop``). The
        copy shares the dropout key's site counter."""
        ctx = copy.copy(self)
        ctx.rebuild_inputs = False
        return ctx


# Equations that only restructure a value: safe to evaluate ahead of their turn. (``pvary`` only
# retypes a replicated value as varying inside shard_map: it stands between a weight and its use.)
_STRUCTURAL = tuple(p for p in (
    _compat.convert_element_type_p, _compat.transpose_p, _compat.reshape_p, _compat.copy_p,
    _compat.sharding_constraint_p, _compat.pvary_p, _compat.reshard_p, _compat.device_put_p,
) if p is not None)
# Evaluated ahead only as a lazy value's scaling (a kernel's dequantisation, ``w * s[None, :]``),
# with the scale's ``broadcast_in_dim``: never over plain values alone, whose order stays the program's.
_SCALINGS = (_compat.mul_p, _compat.div_p)


class Frame:
    """One jaxpr being evaluated: its equations, the values computed so far, and what rules
    computed ahead of time for later equations (``pending``)."""

    def __init__(self, jaxpr: Any, env: dict):
        self.eqns = jaxpr.eqns
        self.env = env
        self.index = 0
        self.pending: dict[int, Any] = {}
        self.done: set[int] = set()
        self.memo: dict[Any, Any] = {}  # what rules derived from the jaxpr (types only)
        self._users: dict[Any, list[int]] | None = None
        self._producer: dict[Any, int] | None = None

    def _index(self) -> None:
        self._users, self._producer = {}, {}
        for i, eqn in enumerate(self.eqns):
            for v in eqn.invars:
                if not _compat.is_literal(v):
                    self._users.setdefault(v, []).append(i)
            for v in eqn.outvars:
                self._producer[v] = i

    def producer(self, var: Any) -> int | None:
        """Index of the equation that computes ``var`` (``None`` for the jaxpr's inputs)."""
        if self._producer is None:
            self._index()
        return self._producer.get(var)  # type: ignore[union-attr]

    def users(self, var: Any) -> list[int]:
        """Indices of the equations that read ``var``, in order."""
        if self._users is None:
            self._index()
        return self._users.get(var, [])  # type: ignore[union-attr]

    def value(self, var: Any, ctx: Context, depth: int = 3, spread: bool = False) -> Any:
        """The value of ``var``; computed ahead of its turn through structural equations
        (casts, transposes, reshapes, a lazy value's scaling) if needed; ``None`` if it is not
        available yet."""
        if _compat.is_literal(var):
            return _compat.literal_value(var)
        if var in self.env:
            return self.env[var]
        i = self.producer(var)
        if i is None or depth == 0 or i in self.done:
            return None
        eqn = self.eqns[i]
        scaling = eqn.primitive in _SCALINGS and any(self._reaches_lazy(v, depth - 1) for v in eqn.invars)
        if not (eqn.primitive in _STRUCTURAL or scaling or (spread and eqn.primitive is _compat.broadcast_in_dim_p)):
            return None
        invals = [self.value(v, ctx, depth - 1, spread=scaling) for v in eqn.invars]
        if any(v is None for v in invals):
            return None
        _write(self.env, eqn, _eval_eqn(ctx, self, eqn, invals))
        self.done.add(i)
        return self.env[var]

    def _reaches_lazy(self, var: Any, depth: int) -> bool:
        """Whether ``var`` is a lazy value, or structural equations ``value`` would follow lead
        to one, without evaluating any."""
        if _compat.is_literal(var):
            return False
        if var in self.env:
            return is_lazy(self.env[var])
        i = self.producer(var)
        if i is None or depth == 0 or i in self.done or self.eqns[i].primitive not in _STRUCTURAL:
            return False
        return any(self._reaches_lazy(v, depth - 1) for v in self.eqns[i].invars)


def _write(env: dict, eqn: Any, outs: Sequence[Any]) -> None:
    for var, val in zip(eqn.outvars, outs):
        if not _compat.is_drop_var(var):
            env[var] = val


def _eval_eqn(ctx: Context, frame: Frame, eqn: Any, invals: list) -> list:
    lazy = [x for x in invals if is_lazy(x)]
    outs: Any = NotImplemented
    if lazy:
        evaluating = _evaluating()
        evaluating.append(eqn)  # a fallback's warning says where the function made it
        try:
            # one adapter over a stack of bases: no rule reads it; materialised, it broadcasts as merge's
            stacked_bases = any(isinstance(x, LoraWeight) and x.over_stacked_bases() for x in lazy)
            owner = None if stacked_bases else _rule_class(eqn.primitive, type(lazy[0]))
            rule = None if owner is None else _RULES[(eqn.primitive, owner)]
            if rule is not None and any(isinstance(x, owner) and find_rule(eqn.primitive, type(x)) is not rule
                                        for x in lazy[1:]):
                rule = None  # another input is a subclass that changed what it stands for (DoRA over LoraWeight)
            if rule is not None:
                outer, ctx.frame = ctx.frame, frame
                try:
                    with _compat.eqn_context(eqn):  # the rule's ops in the context the equation was traced in
                        outs = rule(ctx, eqn, invals)
                except Exception as err:
                    _note_rule(err, rule, eqn, lazy, ctx)
                    raise
                finally:
                    ctx.frame = outer
                if outs is not NotImplemented:
                    _check_outputs(rule, eqn, outs)
            if outs is NotImplemented:  # an equation without outputs (jax.debug.callback) only looks
                invals = materialize_all(invals, what=str(eqn.primitive), ctx=ctx, looks_only=not eqn.outvars)
        finally:
            evaluating.pop()
    if outs is NotImplemented:
        outs = _compat.bind(eqn, invals)
    return outs


def _note_rule(err: Exception, rule: Rule, eqn: Any, lazy: list, ctx: Context) -> None:
    """Add to ``err`` which rule raised it, and on which ``lazy`` inputs: a kind's own bug (a scale
    of the wrong shape) otherwise fails deep in JAX, naming no param. A kind's own rules only (jlora's
    run the user's code: a custom_vjp's), the innermost, and not over a kind's materialize()'s note."""
    module = getattr(rule, "__module__", None) or "?"
    if (not hasattr(err, "add_note") or module.startswith("jlora.")
            or any(n.startswith("jlora: raised in") for n in getattr(err, "__notes__", ()))):
        return
    names = [type(x).__name__ + (f" ({ctx.where(x)})" if ctx.where(x) else "") for x in lazy]  # describe() may fail
    err.add_note(f"jlora: raised in the rule {getattr(rule, '__qualname__', rule)} ({module}) for {eqn.primitive}, "
                 f"on {', '.join(names)}")


def _check_outputs(rule: Rule, eqn: Any, outs: Any) -> None:
    """Refuse, naming the rule, outputs that are not the equation's: a list of as many values, each
    of its output's shape and dtype (a rule's wrong result would flow on silently, or fail far away)."""
    name = f"jlora: the rule {getattr(rule, '__name__', rule)} for {eqn.primitive}"
    if not isinstance(outs, (list, tuple)):
        raise TypeError(f"{name} returned {type(outs).__name__}; a rule returns a list of outputs, or NotImplemented")
    if len(outs) != len(eqn.outvars):
        raise TypeError(f"{name} returned {len(outs)} outputs; the equation has {len(eqn.outvars)}")
    for i, (out, var) in enumerate(zip(outs, eqn.outvars)):
        if not (hasattr(var.aval, "shape") and hasattr(out, "dtype")):
            continue
        want, got = (tuple(var.aval.shape), var.aval.dtype), (tuple(np.shape(out)), out.dtype)
        if got != want:  # dtypes compared as they are: a PRNG key's is no numpy dtype
            raise TypeError(f"{name} returned output {i} of {got[1]}{list(got[0])}; the equation's is "
                            f"{want[1]}{list(want[0])}")


def evaluate_eqn(ctx: Context, eqn: Any, invals: list, where: str | Sequence[str] = "") -> list:
    """``eqn`` on values that may be lazy, through their kind's rules (else materialised, with a
    warning), apart from the jaxpr being evaluated: how a ``LoraWeight`` whose ``w`` is itself lazy
    (a quantized base weight) forms its base term, e.g. ``x·w``, with ``w``'s own rules. ``where``
    names the lazy inputs in warnings (``"the base of 'layers/0/q/kernel'"``; one name per input
    where they differ). The rules get a
    dropout key (``ctx.rng``) only where an adapter under ``w`` drops; a base kind's rules get
    ``None``: they must not draw keys, or the later adapters' keys would depend on the base's kind.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jlora.lazy import Context, evaluate_eqn
        >>> eqn = jax.make_jaxpr(jnp.sin)(1.0).eqns[0]
        >>> evaluate_eqn(Context(), eqn, [jnp.zeros(())])[0]
        Array(0., dtype=float32)
    """
    # a key only for a base that drops (stacked adapters): others must not shift the later adapters' keys
    rng = ctx.next_key() if any(ctx.drops_within(v) for v in invals) else None
    per_input = [where] * len(invals) if isinstance(where, str) else list(where)
    inner = Context(rng, ctx.records, rebuild_inputs=False,
                    names={id(v): name for v, name in zip(invals, per_input) if is_lazy(v)})
    return _eval_eqn(inner, None, eqn, invals)


def _raised_by_jlora(err: BaseException) -> bool:
    """Whether the innermost frame outside JAX that ``err`` came through is a rule's own op (not
    the evaluator re-binding one of the function's equations: ``lazy`` and ``_compat``)."""
    jax_dir, ours = os.path.dirname(jax.__file__) + os.sep, os.path.dirname(__file__) + os.sep
    innermost, tb = None, err.__traceback__
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(jax_dir):
            innermost = tb.tb_frame.f_code.co_filename
        tb = tb.tb_next
    return (innermost is not None and innermost.startswith(ours)
            and os.path.basename(innermost) not in ("lazy.py", "_compat.py"))


def evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any], ctx: Context) -> list:
    """Evaluate an open jaxpr on values that may be lazy."""
    env: dict[Any, Any] = {}

    def read(atom: Any) -> Any:
        return _compat.literal_value(atom) if _compat.is_literal(atom) else env[atom]

    for var, val in zip(jaxpr.constvars, consts):
        env[var] = val
    if len(args) != len(jaxpr.invars):
        raise ValueError(f"jaxpr takes {len(jaxpr.invars)} inputs, got {len(args)}")
    for var, val in zip(jaxpr.invars, args):
        env[var] = val
    frame = Frame(jaxpr, env)
    with _compat.evaluating_jaxpr():
        for i, eqn in enumerate(jaxpr.eqns):
            if i in frame.done:
                continue
            frame.index = i
            _write(env, eqn, _eval_eqn(ctx, frame, eqn, [read(v) for v in eqn.invars]))
    return [read(v) for v in jaxpr.outvars]


def evaluate_closed(closed: Any, args: Sequence[Any], ctx: Context) -> list:
    jaxpr, consts = _compat.open_jaxpr(closed)
    return evaluate(jaxpr, consts, args, ctx)


# --- apply --------------------------------------------------------------------------------------

def is_array(x: Any) -> bool:
    """Whether ``x`` is an array leaf (traced by ``apply``); other leaves stay static, numpy
    strings and objects too (``np.str_``: an item of an array of labels)."""
    if isinstance(x, (np.ndarray, np.generic)):
        return x.dtype.kind not in "OSU"  # bfloat16 and fp8 (ml_dtypes) are kind "V": arrays
    return isinstance(x, (jax.Array, _compat.Ref))  # a tracer is a jax.Array; a Ref (JAX 0.7+) is traced too


def apply(fn: Callable, *, cache_size: int = 32, recompute: bool | str = "inputs") -> Callable:
    """Wrap ``fn`` so that it accepts trees holding ``LoraWeight`` (and other lazy values).

    The wrapped function has ``fn``'s signature plus an optional keyword ``lora_rng``: a PRNG key
    for LoRA dropout (without it, the adapters run deterministically). Array outputs are plain arrays,
    except a param returned as it came in (``return params``, NNX's ``nnx.state(model)``): that
    comes back as the same ``LoraWeight`` (or ``Trainable``). A kernel returned after an op (``w.T``) comes back
    merged, with a ``MaterializeWarning``. Outputs that are not arrays (a Python number, an Equinox
    module's flags and activation function) come back as the function returned them, as from
    Equinox's ``filter_jit``: a module returned runs again as it came in (a closure over a traced
    value would leak it). The state of a Flax NNX module in
    the arguments (a ``BatchNorm``'s statistics, a ``Dropout``'s RNG count: every variable but the
    params) is updated as ``fn`` updates it, as a call of the module would, and a variable the
    call creates (``sow``'s intermediates) is added to its module.

    ``fn`` is traced once per input signature, as ``jax.jit`` does, and the trace is reused: array
    leaves (and jax ``Ref``s) by their types, every other leaf (a Python number, a string, a function) as a static
    value, by its type and equality (as ``jax.jit``'s static arguments), and JAX's configuration
    (x64, matmul precision, promotion rules, the default PRNG). What ``fn`` reads from outside its
    arguments (a closed-over Python value) is fixed by the trace, as under ``jax.jit``, and so under
    ``jax.grad`` too: a closed-over value set anew (a traced one included) is not seen by a
    cached trace; pass it as an argument. ``cache_size`` traces are kept
    (the least recently used go first; a warning says when a dropped one is made again: calls
    cycling through more signatures, variable sequence lengths in eager serving, each trace and
    compile anew); ``wrapped.cache_clear()`` drops them. Called outside any
    ``jax.jit`` (eagerly, or under ``jax.grad`` or ``jax.vmap`` of an eager call from its second call
    on; under ``vmap`` where no adapter is mapped), or where none of its inputs is traced (params
    closed over inside a transformation: a ``jax.jit`` of the evaluation nested in it), the
    evaluation itself runs compiled, once per trace, as under ``jax.jit``: evaluated op by op, every ``jit``, ``scan``,
    ``cond`` or loop body a weight enters would be compiled again at each call, and a ``jax.grad``
    would differentiate each of the evaluation's many small ops at every call.

    ``recompute``: what the backward keeps of the adapters' inputs (the ``x`` of ``x @ a``, which
    ``dA = xᵀ·dt`` needs and a frozen model's backward does not).

    - ``"inputs"`` (default): an ``x`` that is an elementwise function of values the backward keeps
      anyway (a norm's output, the MLP's ``silu(gate)·up``) is rebuilt from them in the backward
      (``jlora.rebuild``); other inputs are stored. A ``custom_vjp``: gradients and derivatives of
      gradients (Hessian-vector products) work, forward mode of the function itself does not.
    - ``False``: store every input; use it for ``jax.jvp``, ``jax.linearize`` or ``jax.jacfwd``
      of the wrapped function (with the default, ``jax.linearize`` returns, and its linear
      function raises JAX's "can't apply forward-mode autodiff (jvp) to a custom_vjp function").
    - ``True``: keep only matmul outputs and recompute the rest (``jax.checkpoint`` with
      ``dots_saveable`` around the whole function): slowest; least memory on the Llama step below,
      but not on every model (the whole forward is recomputed at once: on small GPT-2 and BERT
      steps, CPU, it keeps more than ``"inputs"``).

    Measured on a Llama-3.2-1B-shaped step (H100, ``benchmarks/RESULTS.md``): peak memory 21.64,
    24.15 and 19.87 GiB (the frozen floor: 21.25) at 1.02x, 1.01x and 0.90x the hand-written
    LoRA's speed.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
        >>> lora = jlora.lora_init(jax.random.key(0), params, jlora.LoraConfig(rank=2, targets=["dense"]))
        >>> forward = jlora.apply(lambda p, x: x @ p["dense"]["kernel"])
        >>> forward(lora, jnp.ones((2, 4))).shape
        (2, 3)
    """
    if not callable(fn):
        raise ValueError(f"jlora.apply: fn must be callable, got {fn!r}")
    if not (recompute is False or recompute is True or isinstance(recompute, str) and recompute == "inputs"):
        raise ValueError(f"jlora.apply: recompute must be False, True or 'inputs', got {recompute!r}")
    if isinstance(cache_size, bool) or not isinstance(cache_size, numbers.Integral) or cache_size < 1:
        raise ValueError(f"jlora.apply: cache_size must be an int >= 1 (traces kept), got {cache_size!r}")
    try:
        own = "lora_rng" in inspect.signature(fn).parameters and not _applied(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins)
        own = False
    if own:
        raise ValueError(f"jlora.apply: {getattr(fn, '__name__', fn)!s} has a parameter named 'lora_rng', "
                         "the keyword the wrapped function takes for LoRA dropout's key; rename it")
    cache = _TraceCache()

    @functools.wraps(fn)
    def wrapped(*args: Any, lora_rng: Any = None, **kwargs: Any) -> Any:
        if lora_rng is not None:
            check_key(lora_rng, "lora_rng")
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs), is_leaf=is_param)

        @functools.cache
        def param_paths() -> list[str]:  # only for messages: flattening with paths costs more
            flat = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_param)[0]
            return [path_str(keys[2:]) for keys, _ in flat]  # past (args, kwargs) and the argument

        values, dynamic, abstract, static, given, given_now, types = [], [], [], [], {}, set(), {}
        eager = _compat.eager()  # called outside every trace
        for i, leaf in enumerate(leaves):
            trainable = leaf if isinstance(leaf, Trainable) else None
            if trainable is not None:
                if leaf.value is None:  # the frozen half's placeholder
                    check_whole(leaf, param_paths()[i], "jlora.apply")
                leaf = leaf.value
            seen = _prepared_before(leaf) if type(leaf) is LoraWeight else None
            if seen is not None and id(seen[0]) not in given_now:  # one node twice in a call: each its own
                given[len(values)] = leaf
                given_now.add(id(seen[0]))
                types[len(values)] = seen[2]
                values.append(seen[0])
                abstract.append(seen[1])
                dynamic.append(i)
            elif isinstance(leaf, Lazy):
                given[len(values)] = leaf
                given_leaf = leaf
                try:
                    leaf = check_whole(leaf, getattr(leaf, "path", "") or param_paths()[i], "jlora.apply",
                                       used_as_is=True)
                except ValueError as err:
                    if "half of jlora.split" not in str(err):
                        raise
                    lacks = ("a trainable half, an optimizer state or gradients hold no base weight"
                             if getattr(leaf, "w", True) is None else "the frozen half holds no adapters")
                    raise ValueError(f"{err} (it is {_argument(args, kwargs, i)}: {lacks})") from None
                if lora_rng is None and not _DROPOUT_OFF_WARNED and _dropout_differentiated(leaf):
                    _DROPOUT_OFF_WARNED.append(True)
                    warnings.warn(f"jlora.apply: the adapter at '{leaf.path or param_paths()[i]}' has LoRA dropout "
                                  f"{leaf.dropout:g} and is differentiated without lora_rng=, so dropout is off (a "
                                  "key as flax's rngs={'dropout': ...} does not reach it): pass lora_rng=key to the "
                                  "wrapped function while training (warned once)", stacklevel=_user_stacklevel())
                values.append(leaf.prepare())
                abstract.append(leaf.example())
                dynamic.append(i)
                if (type(given_leaf) is LoraWeight and not isinstance(given_leaf.w, Lazy)  # a base's prepare may make arrays
                        and not any(map(_compat.is_tracer, (given_leaf.w, given_leaf.a, given_leaf.b)))):
                    _remember_prepared(given_leaf, values[-1], abstract[-1])
                    given_now.add(id(values[-1]))
            elif is_array(leaf):
                if trainable is not None:  # returned as it came in, it comes back a Trainable
                    given[len(values)] = trainable
                values.append(leaf)
                abstract.append(leaf)  # make_jaxpr takes its type (shape, dtype, weak type, vma)
                dynamic.append(i)
            else:
                static.append((i, leaf))
        # called outside jax.jit (eagerly, or under grad or vmap of an eager call), where JAX runs op by op;
        # no tracer among the values: a constant to any trace around the call
        tracers = [] if eager else [v for v in jax.tree.leaves((values, lora_rng)) if _compat.is_tracer(v)]
        outside_jit = eager or bool(tracers) and all(map(_compat.over_arrays, tracers))
        unhashable = [i for i, v in static if not _hashable(v)]
        if unhashable and outside_jit:  # under jax.jit a trace is made once anyway
            leaf = leaves[unhashable[0]]
            warnings.warn(f"jlora.apply: {_argument(args, kwargs, unhashable[0])} is a {type(leaf).__name__}, which "
                          f"cannot be hashed, so {getattr(fn, '__name__', 'fn')}'s trace cannot be cached: each call "
                          "traces it again (jax.jit refuses such an argument); make it hashable (a frozen dataclass, "
                          "a tuple) or call inside jax.jit", stacklevel=2)
        # NNX modules in the arguments: their state (BatchNorm statistics) is updated as fn updates it
        nnx_vars = nnx_variables({"args": args, "kwargs": kwargs})
        state = [(path, v) for path, v, is_param in nnx_vars if not is_param]
        try:
            traced = _trace(fn, cache, cache_size, treedef, len(leaves), tuple(dynamic), static, abstract,
                            bool(nnx_vars), types, outside_jit)
        except _CONCRETE_VALUE_ERRORS as err:  # JAX's message names 'dyn[k]', jlora's trace argument
            named = _named_values(err, "dyn", args, kwargs, dynamic)
            if hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(f"jlora.apply traces {getattr(fn, '__name__', 'fn')} once per input signature, as jax.jit "
                             "does, so Python code in it cannot read the values of its array arguments"
                             + (f" ({'; '.join(named)})" if named else "")
                             + " (under jax.disable_jit() too; to step through it eagerly, call it on "
                             "jlora.merge(params))")
            raise
        except TypeError as err:  # a static jax.ShapeDtypeStruct (a callback's result spec is one) used as a value
            specs = [_argument(args, kwargs, i) for i, v in static if isinstance(v, jax.ShapeDtypeStruct)]
            if specs and hasattr(err, "add_note"):
                err.add_note(f"jlora.apply: {', '.join(specs[:3])} is a jax.ShapeDtypeStruct, which "
                             f"{getattr(fn, '__name__', 'fn')} gets as it is, not as an array: for shapes alone, call "
                             "the wrapped function under jax.eval_shape, or compile it with jax.jit(...).lower(...)")
            raise
        closed, out_tree, static_out, compiled = traced
        # a quantized kernel has no path of its own: its place in the arguments names it
        unnamed = {k: _argument(args, kwargs, i) for k, i in enumerate(dynamic)
                   if isinstance(leaves[i], Lazy) and not getattr(leaves[i], "path", "")}

        def interpreter(came_back: dict[int, int], records: dict) -> Callable:
            """The jaxpr's evaluation with the rules; ``came_back`` gets, as it runs, the output
            positions that are inputs returned as they came in (their value positions), which
            leave as the given objects (a lazy or Trainable param as itself, not merged)."""
            def run(values: list, rng: Any) -> list:
                names = {id(values[k]): name for k, name in unnamed.items()} if unnamed else None
                ctx = Context(rng=rng, records=records, rebuild_inputs=recompute == "inputs", names=names)
                out = evaluate_closed(closed, values, ctx)
                ids = Counter(map(id, values))  # one array passed twice names neither
                position = {id(v): k for k, v in enumerate(values) if ids[id(v)] == 1}
                came_back.update({j: position[id(o)] for j, o in enumerate(out) if id(o) in position})
                return [None if j in came_back else materialize(o, "the function's output", _RETURNED, ctx.where(o))
                        for j, o in enumerate(out)]

            if recompute is True:
                return jax.checkpoint(run, policy=jax.checkpoint_policies.dots_saveable)
            return run

        # outside jax.jit the evaluation is compiled (and differentiated or batched) once per trace; under
        # vmap only where no adapter is mapped (the rules tell a mapped factor apart from its shared base,
        # which a jit would hide)
        if compiled is None:
            run_compiled = False
        elif not tracers:  # eager, or nothing the call takes is traced (a frozen adapted encoder under grad)
            run_compiled = not any(_compat.is_tracer(v) for v in values)
        elif not outside_jit or any(_compat.vmapped_by(x) for k, v in given.items() if isinstance(v, Lazy)
                                    for x in jax.tree.leaves(values[k])):
            run_compiled = False
        else:  # from its second call: one grad alone is evaluated faster op by op than compiled
            called_before = ("called under grad or vmap", tuple(given))
            run_compiled = called_before in compiled
            compiled[called_before] = True
        entry = _compiled_entry(compiled, tuple(given), interpreter) if run_compiled else None
        came_back, records = ({}, {}) if entry is None else entry[1:]
        try:
            out = None
            if entry is not None:
                try:
                    out = entry[0](values, lora_rng)
                except (*_CONCRETE_VALUE_ERRORS, TypeError):
                    # a lazy kind or rule that reads its arrays' values (host code), or a custom_jvp that
                    # closes over a traced value (differentiated compiled, JAX meets it as a constant):
                    # evaluated op by op, as without jax.jit, below (which says what is wrong where it
                    # fails too, with no compiled attempt's traceback before it)
                    came_back, records = {}, {}
            if out is None:
                out = interpreter(came_back, records)(values, lora_rng)
                if entry is not None:
                    compiled[tuple(given)] = (_GENERATION, None, {}, {})  # from now on
        except TypeError as err:
            text = str(closed.jaxpr) if isinstance(err, jax.errors.UnexpectedTracerError) else ""
            if ("custom_jvp_call" in text or "custom_vjp_call" in text) and hasattr(err, "add_note"):  # 3.11+
                err.add_note(f"jlora.apply traces {getattr(fn, '__name__', 'fn')} once, as jax.jit does, then "
                             "evaluates that trace: a jax.custom_jvp or custom_vjp function in it that closes over a "
                             "traced value (an array it does not take as an argument) cannot be differentiated "
                             "then, as under jax.grad(jax.jit(fn)); pass that value to it as an argument "
                             "(or jax.closure_convert it)")
            if "forward-mode" not in str(err) or not records.get("custom_vjp"):
                raise  # not jlora's custom_vjp (the function's own, say): JAX's error as it is
            raise TypeError(f"{err} jlora.apply rebuilds adapter inputs in the backward through a custom_vjp "
                            "(recompute='inputs', the default); for jax.jvp, jax.linearize or jax.jacfwd of the "
                            "wrapped function use jlora.apply(fn, recompute=False) (a custom_vjp of the function's "
                            "own has no forward mode either)") from None
        except Exception as err:
            if "deleted" in str(err):  # a donated array: JAX's error names none
                gone = next((i for i, x in enumerate(jax.tree.leaves((args, kwargs))) if is_deleted(x)), None)
                if gone is not None:
                    raise ValueError(f"jlora.apply: {_argument(args, kwargs, gone, is_leaf=None)} {DELETED}; pass "
                                     "live arrays (the step's results, or copies made before)") from None
            named = _named_values(err, "values", args, kwargs, dynamic)  # jax.jit's names for run's arguments
            if named and "interpreter.<locals>.run" in str(err) and hasattr(err, "add_note"):  # Python 3.11+
                err.add_note(f"jlora.apply: {'; '.join(named)}")  # devices that differ, say
            if not (_compat.is_sharding_type_error(err) and _raised_by_jlora(err)):
                raise  # the function's own code (a custom rule's fwd, run only when differentiated)
            raise ValueError(f"jlora.apply could not shard the low-rank path on this mesh's Explicit axes: {err} "
                             "(a jlora bug: please report it with the function; a mesh with Auto axes avoids it: "
                             "jlora.sharding.make_mesh, or jax.make_mesh(..., axis_types=(AxisType.Auto,) * n))"
                             ) from None
        # a constant output (a Python or numpy value in the jaxpr) as an array, as jax.jit gives it
        out = [given.get(came_back[j], values[came_back[j]]) if j in came_back else x for j, x in enumerate(out)]
        out = iter(x if isinstance(x, (jax.Array, NotAnArray)) else jnp.asarray(x) for x in out)
        result = jax.tree_util.tree_unflatten(
            out_tree, [static_out[j] if j in static_out else next(out) for j in range(out_tree.num_leaves)])
        if not nnx_vars:
            return result
        result, changed, created = result
        write_back(state, changed)
        missed = add_created({"args": args, "kwargs": kwargs}, created)  # sow's intermediates, as a call adds them
        if missed:
            warnings.warn(f"jlora.apply: {getattr(fn, '__name__', 'fn')} created NNX variables at {missed[:3]}, which "
                          "have no module in its arguments to go into (or one with another value in that attribute): return "
                          "what you need of them", stacklevel=2)
        return result

    def cache_clear() -> None:
        with cache.lock:
            cache.clear()
            cache.dropped.clear()  # traced again after this, by choice

    wrapped.cache_clear = cache_clear  # type: ignore[attr-defined]
    wrapped._jlora_apply = True  # type: ignore[attr-defined]  # its lora_rng is apply's own (see _applied)
    signature = _with_lora_rng(fn)
    if signature is not None:
        wrapped.__signature__ = signature  # type: ignore[attr-defined]
    return wrapped


class _TraceCache(OrderedDict):
    """``apply``'s traces, the least recently used first, and the lock that guards their order and
    number under calls from several threads. Pickled empty: a wrapped function shipped to a worker
    (cloudpickle: Ray, multiprocessing) traces again there, as ``jax.jit``'s does.

    Example:
        >>> import pickle
        >>> cache = _TraceCache(); cache["key"] = "a trace"
        >>> len(pickle.loads(pickle.dumps(cache)))
        0
    """

    DROPPED_KEPT = 4096  # how many dropped traces' keys are remembered, by hash, to tell a cache too small

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.RLock()
        self.dropped: OrderedDict[int, None] = OrderedDict()  # hashes of the keys of traces dropped, the latest last
        self.warned = False  # of traces made again after they were dropped (once per wrapped function)

    def drop_oldest(self) -> None:
        """Drop the least recently used trace, remembering its key's hash."""
        key, _ = self.popitem(last=False)
        self.dropped[hash(key)] = None
        if len(self.dropped) > self.DROPPED_KEPT:
            self.dropped.popitem(last=False)

    def dropped_before(self, key: Any) -> bool:
        """Whether ``key``'s trace was made before and dropped: the first such is reported (True) once."""
        again = hash(key) in self.dropped and not self.warned
        self.warned |= again
        return again

    def __reduce__(self) -> tuple:
        return _TraceCache, ()


# What a call made of each concrete LoraWeight it was given (checked and prepared, and its example),
# kept while the node lives: an eager loop passes the same nodes at every call, and a node is
# immutable (an eager call with 224 adapters spent about half its host time checking and preparing
# them again)
_PREPARED: dict[int, tuple] = {}


def _remember_prepared(leaf: LoraWeight, prepared: LoraWeight, example: Any) -> None:
    """Keep ``leaf``'s ``prepared`` node (a new one, which holds its arrays but not ``leaf``),
    ``example`` and its type key for the calls it is given to next, until ``leaf`` is gone."""
    key = id(leaf)

    def forget(ref: Any) -> None:
        if _PREPARED.get(key, (None,))[0] is ref:
            _PREPARED.pop(key, None)

    _PREPARED[key] = (weakref.ref(leaf, forget), prepared, example, _compat.type_key(example))


def _prepared_before(leaf: LoraWeight) -> tuple | None:
    """``(prepared, example, type key)`` that ``_remember_prepared`` keeps for ``leaf``, or ``None``. (A function
    of the module: a wrapped function pickled by value, for workers, takes no weak references.)"""
    seen = _PREPARED.get(id(leaf))
    return seen[1:] if seen is not None and seen[0]() is leaf else None


def _compiled_entry(compiled: dict, given: tuple, interpreter: Callable) -> tuple | None:
    """``(run, came_back, records)`` for a call outside any ``jax.jit``: the evaluation compiled once
    per trace and set of params that may come back (``given``; ``interpreter`` makes it), and
    again after ``reset_warnings`` (it warns when compiled). Evaluated eagerly, every ``jit``,
    ``scan``, ``cond`` or loop body the rules rebuild is a new function to JAX, compiled again at
    each call. ``None`` where the evaluation reads its arrays' values (it runs op by op)."""
    entry = compiled.get(given)
    if entry is None or entry[0] != _GENERATION:
        came_back: dict[int, int] = {}
        records: dict = {}
        entry = compiled[given] = (_GENERATION, jax.jit(interpreter(came_back, records)), came_back, records)
    return None if entry[1] is None else entry[1:]


def _applied(fn: Callable) -> bool:
    """Whether ``fn`` is, or wraps (``jax.jit``, ``functools.wraps``), a function ``apply`` made:
    the ``lora_rng`` its signature shows is apply's own, not the user's."""
    for _ in range(100):  # a chain of __wrapped__, as inspect.unwrap follows it
        if getattr(fn, "_jlora_apply", False):
            return True
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return False
    return False


def _with_lora_rng(fn: Callable) -> inspect.Signature | None:
    """``fn``'s signature with the keyword ``lora_rng=None`` that ``apply``'s wrapper adds (before
    a ``**kwargs``), or ``None`` where ``fn`` has none to read.

    Example:
        >>> str(_with_lora_rng(lambda params, x, **kw: x))
        '(params, x, *, lora_rng=None, **kw)'
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if "lora_rng" in signature.parameters:  # fn is apply's own (nested apply)
        return signature
    params = list(signature.parameters.values())
    at = len(params) - (1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else 0)
    added = inspect.Parameter("lora_rng", inspect.Parameter.KEYWORD_ONLY, default=None)
    return signature.replace(parameters=[*params[:at], added, *params[at:]])


_CONCRETE_VALUE_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                          jax.errors.TracerIntegerConversionError)

_RETURNED = ("returned after an op, it comes back as an array, w + scale·a@b merged (a param returned as it "
             "came in stays a LoraWeight)")


def _static_key(v: Any) -> tuple:
    """A static argument's part of the trace cache's key: its type and value, a float by its
    ``repr`` (``-0.0 == 0.0`` though they trace differently, and ``nan`` equals no other ``nan``)."""
    if isinstance(v, (float, complex)):
        return (type(v), repr(v))
    if type(v) is tuple:
        return (tuple, tuple(_static_key(x) for x in v))
    return (type(v), v)


def _hashed_by_identity(v: Any) -> bool:
    """Whether a static value hashes by identity (a function, a plain object; not ``None`` or a
    class, which stay): a new one at each call is a new key, and a freed one's id may come back."""
    if type(v) is tuple:
        return any(map(_hashed_by_identity, v))
    return v is not None and not isinstance(v, type) and type(v).__hash__ is object.__hash__


def _hashable(v: Any) -> bool:
    try:
        hash(_static_key(v))
    except TypeError:
        return False
    return True


def _named_values(err: Exception, name: str, args: tuple, kwargs: dict, dynamic: Sequence[int]) -> list[str]:
    """``"<name>[k] is argument ... at '...'"`` for each ``<name>[k]`` JAX's message ``err`` names:
    jlora's traced or compiled function's k-th array, the k-th of ``dynamic`` among the leaves."""
    found = dict.fromkeys(int(k) for k in re.findall(rf"\b{name}\[(\d+)\]", str(err)))
    return [f"{name}[{k}] is {_argument(args, kwargs, dynamic[k])}" for k in found if k < len(dynamic)]


def _argument(args: tuple, kwargs: dict, leaf: int, is_leaf: Any = is_param) -> str:
    """How a message names leaf ``leaf`` of ``(args, kwargs)`` (flattened with ``is_leaf``): the
    argument, and the path in it.

    Example:
        >>> _argument((1, {"flag": 2}), {}, 1)
        "argument 1 at 'flag'"
    """
    keys = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_leaf)[0][leaf][0]
    which = f"argument {keys[1].idx}" if keys[0].idx == 0 else f"keyword argument '{keys[1].key}'"
    inside = path_str(keys[2:])
    return f"{which} at '{inside}'" if inside else which


def _trace(fn, cache, cache_size, treedef, n_leaves, dynamic, static, abstract, has_nnx, types, outside_jit):
    """``types``: type keys of ``abstract``'s values already known, by position; ``outside_jit``:
    the evaluation is compiled per trace (a trace dropped and made again is compiled again)."""
    try:
        # static values with their types: 1, 1.0 and True are equal keys but trace differently;
        # JAX's trace-time configuration (x64, the default PRNG, matmul precision, promotion
        # rules, and what an enclosing vmap, pmap or shard_map fixes: its named axes and their
        # sizes), as jax.jit's cache has it. A trace that closed over an enclosing trace's values
        # is not kept (below). An eager call's entry (its compiled evaluations) and a transform's
        # are kept apart, so a jit tracing the function does not evict the eager calls' compiled code.
        key = (treedef, dynamic, tuple((i, *_static_key(v)) for i, v in static),
               tuple(types[k] if k in types else _compat.type_key(a) for k, a in enumerate(abstract)),
               _compat.context_key(), _compat.trace_config(),
               _compat.eager())
        hash(key)
    except TypeError:
        key = None
    with cache.lock:
        hit = cache.get(key) if key is not None else None
        if hit is not None:
            cache.move_to_end(key)
            return hit
        # under jax.jit, whose own cache keeps every signature, a trace made again costs one trace;
        # a static value hashed by identity (a new closure at each call) is traced at each call anyway
        again = (outside_jit and key is not None and not any(_hashed_by_identity(v) for _, v in static)
                 and cache.dropped_before(key))
    if again:
        warnings.warn(f"jlora.apply: {getattr(fn, '__name__', 'fn')} is traced again for a call signature (input "
                      "shapes, dtypes, static values) whose trace it had dropped: calls cycle through more than "
                      f"cache_size={cache_size} signatures, and each such call traces and compiles anew; raise "
                      "cache_size to the number of signatures (jlora.apply(fn, cache_size=N), "
                      "jlora.hf.LoraModel(..., cache_size=N)), or jit the call, whose cache keeps every signature",
                      stacklevel=_user_stacklevel())

    def flat_fn(*dyn: Any) -> Any:
        leaves: list[Any] = [None] * n_leaves
        for i, v in static:
            leaves[i] = v
        for i, v in zip(dynamic, dyn):
            leaves[i] = v
        a, k = jax.tree_util.tree_unflatten(treedef, leaves)
        if not has_nnx:
            return traced_outputs(fn(*a, **k))
        before = {path: jax.tree.flatten(value_of(v)) for path, v in state_variables({"args": a, "kwargs": k})}
        out = fn(*a, **k)
        return traced_outputs((out, *state_after_call({"args": a, "kwargs": k}, before)))

    def traced_outputs(result: Any) -> list:
        # outputs that are not arrays (a Python number, an Equinox module's flags and activation
        # function) leave the trace as they are, as from Equinox's filter_jit: the trace made them from
        # static values, and an Equinox module returned keeps its Python fields for the next call
        flat, out_def = jax.tree.flatten(result)
        refs = [j for j, x in enumerate(flat) if _compat.is_ref(x)]
        if refs:
            raise ValueError(f"jlora.apply: {getattr(fn, '__name__', 'fn')} returns a jax Ref (output {refs[0]} of "
                             f"{len(flat)}), which jax.jit refuses too: return its value (r[...])")
        keep = [is_array(x) for x in flat]
        outputs.update(tree=out_def, static={j: x for j, (x, k) in enumerate(zip(flat, keep)) if not k})
        return [x for x, k in zip(flat, keep) if k]

    outputs: dict[str, Any] = {}
    token = TRACING_APPLY.set(True)
    try:
        closed = jax.make_jaxpr(flat_fn)(*abstract)
    finally:
        TRACING_APPLY.reset(token)
    _, consts = _compat.open_jaxpr(closed)
    cached = key is not None and not any(_compat.is_tracer(c) for c in consts)
    # with a cache entry, a place for the trace's compiled evaluations (see apply's eager calls)
    result = (closed, outputs["tree"], outputs["static"], {} if cached else None)
    if cached:
        with cache.lock:
            cache[key] = result
            while len(cache) > cache_size:
                cache.drop_oldest()
    return result
