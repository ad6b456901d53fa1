"""The values jlora puts in a parameter tree: ``LoraWeight`` and ``Trainable``.

Both are pytree nodes, so ``jax.tree`` functions, ``jax.jit``, optax and orbax see their arrays.
``LoraWeight`` is the first *lazy* kind: a value that stands for an array (``materialize()``) and
that the evaluator of ``jlora.apply`` can use without forming it.
"""

from __future__ import annotations

import contextvars
import math
import sys
from typing import Any, Callable, NoReturn

import jax
import jax.numpy as jnp
from jax import lax

from jlora import _compat, explicit
from jlora.layout import Layout


def narrow_float(dtype: Any) -> bool:
    """Whether ``dtype`` is a float of fewer than 16 bits (fp8, fp4): fine for a base kernel, too
    narrow for an adapter's factors or for ``w + scale·a@b``.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.weight import narrow_float
        >>> narrow_float(jnp.float8_e4m3fn), narrow_float(jnp.bfloat16), narrow_float(jnp.int8)
        (True, False, False)
    """
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 16


def widest(*dtypes: Any) -> Any:
    """JAX's promotion of ``dtypes``, where 8-bit floats, which JAX promotes with no other float,
    give way to the wider ones: the dtype in which ``w + scale·a@b`` is formed.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.weight import widest
        >>> widest(jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32)
        dtype('float32')
    """
    dtypes = [jax.dtypes.canonicalize_dtype(d) for d in dtypes]  # numpy's float64 with x64 off: float32, unwarned
    wide = [d for d in dtypes if not narrow_float(d)]
    return jnp.result_type(*(wide or dtypes))


# Set while jlora.apply traces its function: a node met as an array then was not an argument.
TRACING_APPLY: contextvars.ContextVar[bool] = contextvars.ContextVar("jlora_tracing_apply", default=False)


class NotAnArray:
    """A jlora node a model may meet as an array when called on a LoRA tree without
    ``jlora.apply``: the array protocols and operators say so, not ``'LoraWeight' object is not
    subscriptable`` (``.T`` raises an ``AttributeError``, other attributes are not there:
    ``hasattr`` must not raise)."""

    __slots__ = ()

    def __bool__(self) -> bool:  # true, as any object, not through the __len__ below
        return True

    def describe(self) -> str:
        """How messages (a fallback's warning) name this value."""
        return type(self).__name__

    def _contents(self) -> str:
        """Where its arrays are, for the message below."""
        return "read its fields"

    def _used_outside_apply(self, *args: Any, **kwargs: Any) -> NoReturn:
        if TRACING_APPLY.get():
            raise TypeError(f"{self.describe()} was used as an array inside jlora.apply, but it is not in the wrapped "
                            "function's arguments (closed over, or an attribute of the function): pass the params or "
                            "the module as an argument, jlora.apply(lambda params, x: ...)(params, x)")
        raise TypeError(f"{self.describe()} was used as an array outside jlora.apply: wrap the function that takes "
                        "the params (forward = jlora.apply(fn)), or run fn on jlora.merge(params); an optimizer (an "
                        "optax tx, nnx.Optimizer) takes adapters through jlora.optimizer(tx, params). To look at it, "
                        f"print it or {self._contents()} (an NNX variable holding it: {_nnx_value()}, not "
                        "variable[...]). A param the wrapped function returns untouched (a model returning its learned "
                        "temperature) comes back as this node: take its array, .value of a Trainable, .materialize() of an adapter")

    def __eq__(self, other: Any) -> Any:
        """``w == 0`` (a count of nonzeros, a mask) as any array use; a node is equal to itself only."""
        if isinstance(other, (int, float, complex, jax.Array)) or hasattr(other, "__array__") and not isinstance(other, NotAnArray):
            self._used_outside_apply()
        return NotImplemented

    __hash__ = object.__hash__
    __jax_array__ = __array__ = __getitem__ = __len__ = __neg__ = __pow__ = _used_outside_apply
    __matmul__ = __rmatmul__ = __add__ = __radd__ = __sub__ = __rsub__ = _used_outside_apply
    __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __floordiv__ = __mod__ = __rpow__ = _used_outside_apply
    __lt__ = __le__ = __gt__ = __ge__ = __abs__ = __pos__ = __float__ = __int__ = _used_outside_apply
    reshape = astype = transpose = swapaxes = squeeze = ravel = flatten = _used_outside_apply
    sum = mean = max = min = prod = dot = take = clip = _used_outside_apply

    @property
    def T(self) -> NoReturn:
        """``w.T`` (a tied head's ``x @ w.T``): the same message, as an ``AttributeError``, so that
        ``hasattr(x, "T")`` stays false."""
        try:
            self._used_outside_apply()
        except TypeError as err:
            raise AttributeError(str(err)) from None

    mT = T


def _nnx_value() -> str:
    """How an NNX variable's value is read: ``get_value()`` (Flax 0.12+) or ``.value`` (0.11)."""
    variable = getattr(sys.modules.get("flax.nnx"), "Variable", None)
    return "variable.value" if variable is not None and not hasattr(variable, "get_value") else "variable.get_value()"


class Lazy(NotAnArray):
    """A value that stands for an array without holding it.

    Subclasses are pytree nodes and define ``shape``, ``dtype``, ``materialize()``; the evaluator's
    rules (``jlora.lazy.register``) decide where they stay lazy. To be sharded (a quantized base
    under FSDP or tensor parallelism), a kind also defines ``sharding`` (the ``NamedSharding`` of
    the array it stands for: ``lora_init`` derives the factors' from it) and ``part_specs(spec)``
    (its parts' ``PartitionSpec``s, the same pytree, when that array is sharded as ``spec``:
    ``jlora.sharding`` places it by them). To stay lazy when ``lax.scan`` slices stacked layers,
    it defines ``unstack()``. ``tests/quantized.py`` (in jlora's repository) has a complete one: an
    int8 kernel with its matmul rule.

    Example:
        >>> import jax, jax.numpy as jnp, jlora
        >>> @jax.tree_util.register_pytree_node_class
        ... class Halved(jlora.Lazy):                      # stands for 0.5 * x
        ...     def __init__(self, x): self.x = x
        ...     shape = property(lambda self: self.x.shape)
        ...     dtype = property(lambda self: self.x.dtype)
        ...     def materialize(self): return 0.5 * self.x
        ...     def tree_flatten(self): return (self.x,), None
        ...     @classmethod
        ...     def tree_unflatten(cls, aux, children): return cls(*children)
        >>> Halved(jnp.ones(2)).materialize()
        Array([0.5, 0.5], dtype=float32)
    """

    shape: tuple[int, ...]
    dtype: Any

    def __getattr__(self, name: str) -> Any:  # after a failed lookup, or a property's AttributeError
        if name in ("shape", "dtype") and not any(name in vars(kind) for kind in type(self).__mro__):
            raise AttributeError(f"{type(self).__name__}, a jlora.Lazy kind, defines no {name}: a kind says the shape "
                                 "and dtype of the array it stands for (two properties, or attributes set in __init__)")
        return object.__getattribute__(self, name)  # the lookup's own error again (a property's message)

    @property
    def __jax_array__(self) -> Callable[..., NoReturn]:
        """JAX asks for this of a value that is no pytree node: a kind left unregistered is named."""
        check_registered(self)
        return self._used_outside_apply

    @property
    def ndim(self) -> int:
        """The number of axes of the array this value stands for."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """The number of elements of the array this value stands for."""
        return math.prod(self.shape)

    def materialize(self) -> jax.Array:
        """The array this value stands for."""
        raise NotImplementedError(f"{type(self).__name__}, a jlora.Lazy kind, defines no materialize(): jlora needs "
                                  "the array it stands for where no rule keeps it lazy (a fallback, jlora.merge)")

    def example(self) -> Any:
        """A value of the type this one has in the traced function (an array or ShapeDtypeStruct)."""
        return jax.ShapeDtypeStruct(self.shape, self.dtype)

    def prepare(self) -> "Lazy":
        """Called once when the value enters the evaluator (e.g. to stop gradients)."""
        return self

    def unstack(self) -> "tuple[tuple, Callable[[tuple], Lazy]] | None":
        """``(children, rebuild)`` for ``lax.scan`` to slice along axis 0 (each child is sliced,
        ``rebuild`` makes one layer's value from the slices), or ``None``: the scan then takes the
        materialised array."""
        return None


_REGISTERED: set[type] = set()


def check_registered(x: Lazy) -> None:
    """A ``TypeError`` naming ``x``'s kind where it is no pytree node (JAX would take it for an
    array and fail far away).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.weight import check_registered
        >>> check_registered(jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0))
    """
    kind = type(x)
    if kind in _REGISTERED:
        return
    if jax.tree_util.all_leaves([x]):
        raise TypeError(f"{kind.__name__}, a jlora.Lazy kind, is not a pytree node: register it, e.g. with "
                        "@jax.tree_util.register_pytree_node_class and its tree_flatten/tree_unflatten, so that "
                        "jax.jit and jlora see its arrays (see jlora.Lazy)")
    _REGISTERED.add(kind)


def _shape_str(x: Any) -> str:
    if x is None:
        return "None"
    if not has_shape(x) or isinstance(x, type):  # a tree mapped to something else (jax.tree.map(jnp.shape, p))
        text = repr(x)
        return text if len(text) <= 60 else text[:57] + "..."
    core = f"{jnp.dtype(x.dtype).name}[{','.join(str(d) for d in x.shape)}]"
    return f"{type(x).__name__}({core})" if isinstance(x, Lazy) else core  # a quantized base says its kind


class NoBaseWeight(ValueError, AttributeError):
    """A ``LoraWeight`` of the trainable half of ``jlora.split`` asked for its base's shape or dtype:
    a ValueError, and an AttributeError so that ``hasattr(x, "shape")`` answers ``False``."""


class LoraWeight(Lazy):
    """A frozen kernel ``w`` plus the low-rank update ``scale · a @ b``.

    Behaves like an array of ``w``'s shape and dtype; ``materialize()`` gives ``w + scale·a@b``.
    ``layout`` says which axes of ``w`` are batch/input/output (see ``jlora.layout``); ``a`` has
    shape ``batch + input + (r,)``, ``b`` has ``batch + (r,) + output``. ``path`` names the param in
    messages (``lora_init`` sets it); ``dropout`` is the LoRA dropout rate on the low-rank path, in
    ``[0, 1)``. A ``ValueError`` naming the path refuses factors that do not fit ``w`` and the
    layout, an integer array, complex factors over a real ``w``, and a rate outside ``[0, 1)``.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> w = jnp.ones((4, 3)); a = jnp.ones((4, 2)); b = jnp.zeros((2, 3))
        >>> lw = jlora.LoraWeight(w, a, b, scale=1.0)
        >>> lw.shape, bool((lw.materialize() == w).all())
        ((4, 3), True)
    """

    __slots__ = ("w", "a", "b", "scale", "layout", "path", "dropout")
    STATIC_FIELDS = ("scale", "layout", "path", "dropout")  # the treedef's, in order (see metadata)

    def __init__(
        self,
        w: Any,
        a: Any,
        b: Any,
        *,
        scale: float,
        layout: Layout | str = "io",
        path: str = "",
        dropout: float = 0.0,
    ):
        _set(self, w, a, b, _number(scale, "scale", path), Layout.parse(layout), path, _dropout(dropout, path))
        for name, x in (("w", w), ("a", a), ("b", b)):
            if x is not None and not has_shape(x) and not isinstance(x, _compat.Ref):
                raise ValueError(f"LoraWeight {path!r}: {name} must be an array (or None, in a half of jlora.split), "
                                 f"got {type(x).__name__}")
            if isinstance(x, _compat.Ref):
                raise ValueError(f"LoraWeight {path!r}: {name} is a jax Ref (mutable): a LoraWeight holds arrays; "
                                 f"read the Ref first ({name}[...])")
            check_float(name, x, path)
        complex_factor = [n for n, x in (("a", a), ("b", b)) if has_shape(x) and jnp.issubdtype(x.dtype, jnp.complexfloating)]
        if complex_factor and has_shape(w) and not jnp.issubdtype(w.dtype, jnp.complexfloating):
            # merged, w + scale·a@b would be cast to w's real dtype, dropping the imaginary part
            raise ValueError(f"LoraWeight {path!r}: {complex_factor[0]} is complex but w is {_shape_str(w)}: a real "
                             "weight takes real factors")
        self.check_shapes()

    def check_shapes(self, *, stacked: bool = False) -> None:
        """Raise ``ValueError`` naming the path unless ``w``, ``a`` and ``b`` fit the layout (parts
        that are ``None`` or carry no shape are not checked). ``stacked``: each may also carry
        leading axes of its own (replicas for ``pmap``, adapters for ``vmap``); the rest must fit.

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> lw = jlora.LoraWeight(None, jnp.ones((4, 2)), jnp.ones((2, 3)), scale=1.0)
            >>> lw.replace(w=jnp.ones((4, 5))).check_shapes()
            Traceback (most recent call last):
            ValueError: LoraWeight '': for w (4, 5) with layout 'io' and rank 2 (a's last axis), a must be (4, 2) and b (2, 5); got a (4, 2), b (2, 3)
        """
        w, a, b, layout = self.w, self.a, self.b, self.layout
        if has_shape(w) and len(w.shape) != layout.ndim:
            if not stacked:
                raise ValueError(f"LoraWeight {self.path!r}: w has shape {tuple(w.shape)} but layout '{layout}'")
            if len(w.shape) < layout.ndim:
                full = [n for n in ("a", "b") if has_shape(getattr(self, n))
                        and len(getattr(self, n).shape) >= len(getattr(layout, f"{n}_shape")((1,) * layout.ndim, 1))]
                if len(full) == 2 and not layout.group("b"):  # w alone cut: jax.tree.map(lambda v: v[k], combined stack)
                    raise ValueError(f"LoraWeight {self.path!r}: w {tuple(w.shape)} has fewer axes than its layout "
                                     f"'{layout}' names, a {tuple(a.shape)} and b {tuple(b.shape)} do not: a slice of "
                                     "the whole tree cut the base too; slice the trainable half only, "
                                     "jax.tree.map(lambda v: v[k], trainable), and combine it with the frozen half")
                return  # fewer axes than a kernel: a slice of a stack (inside scan), or values mapped over the tree
        if has_shape(w) and has_shape(a) and has_shape(b) and len(a.shape) > 0:
            rank = a.shape[-1]
            kernel = tuple(w.shape)[len(w.shape) - layout.ndim:]
            want_a, want_b = layout.a_shape(kernel, rank), layout.b_shape(kernel, rank)
            got_a, got_b = tuple(a.shape), tuple(b.shape)
            if stacked:
                leads = {"w": tuple(w.shape)[:len(w.shape) - layout.ndim], "a": got_a[:max(len(got_a) - len(want_a), 0)],
                         "b": got_b[:max(len(got_b) - len(want_b), 0)]}
                for (m, x), (n, y) in ((("w", leads["w"]), ("a", leads["a"])), (("w", leads["w"]), ("b", leads["b"])),
                                       (("a", leads["a"]), ("b", leads["b"]))):
                    # as many leading axes, of other sizes (ensembles of other sizes); more axes on
                    # one side are adapters stacked over one base, or replicas of such (pmap of vmap)
                    if len(x) == len(y) and x != y:
                        raise ValueError(f"LoraWeight {self.path!r}: the leading axes of {m} {tuple(getattr(self, m).shape)} "
                                         f"and {n} {tuple(getattr(self, n).shape)} differ, {x} and {y} (ensembles or "
                                         "replicas of other sizes?)")
                got_a, got_b = got_a[max(len(got_a) - len(want_a), 0):], got_b[max(len(got_b) - len(want_b), 0):]
            if got_a != want_a or got_b != want_b:
                swapped_rank = b.shape[-1] if str(layout) == "io" and len(b.shape) else None  # lorax's a (r, out), b (in, r)
                swapped = swapped_rank is not None and (got_a, got_b) == (
                    layout.b_shape(kernel, swapped_rank), layout.a_shape(kernel, swapped_rank))
                raise ValueError(
                    f"LoraWeight {self.path!r}: for w {tuple(w.shape)} with layout '{layout}' and rank {rank} (a's last axis), "
                    f"a must be {want_a} and b {want_b}; got a {tuple(a.shape)}, b {tuple(b.shape)}"
                    + (" (lorax's orientation, ΔW = b @ a: jlora's a is (in, r) and b (r, out), ΔW = scale·a @ b; "
                       "from lorax's, LoraWeight(w, a=lx.b, b=lx.a, scale=lx.alpha / r))" if swapped else "")
                )

    def over_stacked_bases(self) -> bool:
        """Whether this is one adapter over a stack of bases: ``w`` has leading axes that its factors
        and its layout lack (``jlora.combine`` of one adapter's trainable half with a stack's frozen
        one). ``merge`` broadcasts it; no rule of ``apply`` reads it.

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> one = jlora.LoraWeight(jnp.ones((4, 2)), jnp.ones((4, 1)), jnp.ones((1, 2)), scale=1.0)
            >>> one.over_stacked_bases(), one.replace(w=jnp.ones((3, 4, 2))).over_stacked_bases()
            (False, True)
        """
        if not (has_shape(self.w) and has_shape(self.a)) or len(self.w.shape) <= self.layout.ndim:
            return False
        return len(self.a.shape) == len(self.layout.a_shape(tuple(self.w.shape)[-self.layout.ndim:], self.rank))

    def fitted(self) -> "LoraWeight":
        """This adapter with its layout fitted to its arrays, where ``w`` (if given), ``a`` and
        ``b`` all have ``k`` leading axes more than it says (``jax.vmap(lora_init)``'s ensemble,
        ``pmap``'s replicas: they become leading batch axes, a member's own adapter each) or fewer
        (a layer of a stack sliced outside jlora, by ``lax.scan`` over stacked params: the layout's
        leading batch axes go); otherwise ``self``.

        Example:
            >>> import jax, jax.numpy as jnp, jlora
            >>> stack = jlora.LoraWeight(jnp.ones((3, 4, 2)), jnp.ones((3, 4, 1)), jnp.ones((3, 1, 2)), scale=1.0, layout="bio")
            >>> str(jax.tree.map(lambda x: x[0], stack).fitted().layout)
            'io'
        """
        layout, nb = self.layout, len(self.layout.group("b"))
        if not (has_shape(self.a) and has_shape(self.b)):
            return self
        k = len(self.a.shape) - (nb + len(layout.group("i")) + 1)
        if k == 0 or len(self.b.shape) - (nb + 1 + len(layout.group("o"))) != k or (
                has_shape(self.w) and len(self.w.shape) - layout.ndim != k):
            return self
        lead = [tuple(x.shape[:k]) for x in (self.w, self.a, self.b) if has_shape(x)] if k > 0 else []
        if any(s != lead[0] for s in lead):
            return self
        fitted = layout.batched(k)
        return self if fitted is None else self.replace(layout=fitted)

    # --- pytree -------------------------------------------------------------------------------
    # A jitted train step flattens every adapter at each call (its trainable half, the optimizer's
    # moments, the frozen half) and unflattens the outputs: these run hundreds of times a step, so
    # they do the least Python they can (the key-aware form serves key paths only).
    def metadata(self) -> dict[str, Any]:
        """The static fields (what ``jax.tree`` keeps in the treedef, not as leaves).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> jlora.LoraWeight(None, jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5).metadata()["scale"]
            0.5
        """
        return {name: getattr(self, name) for name in self.STATIC_FIELDS}

    def tree_flatten(self):
        return (self.w, self.a, self.b), (self.scale, self.layout, self.path, self.dropout)  # STATIC_FIELDS' order

    def tree_flatten_with_keys(self):
        children, aux = self.tree_flatten()
        return tuple(zip(_FIELD_KEYS, children)), aux

    @classmethod
    def tree_unflatten(cls, aux: tuple, children: tuple) -> "LoraWeight":
        obj = object.__new__(cls)
        _set(obj, *children, *aux)
        return obj

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in LoraWeight.__slots__:  # a subclass's own attributes
            return object.__setattr__(self, name, value)
        raise AttributeError(f"LoraWeight {self.path!r}: a node is not changed in place (an eager jlora.apply reuses "
                             f"what it made of it, as JAX treats arrays); make a new one: lw.replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        if name not in LoraWeight.__slots__:
            return object.__delattr__(self, name)
        self.__setattr__(name, None)

    def __setstate__(self, state: Any) -> None:  # pickle and copy restore the fields through this
        own, slots = state if isinstance(state, tuple) else (None, state)
        _set(self, *(slots[name] for name in ("w", "a", "b", *self.STATIC_FIELDS)))
        for name, value in (own or {}).items():  # a subclass's own attributes
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> "LoraWeight":
        """A copy with some fields changed (like ``dataclasses.replace``): ``scale`` and ``dropout``
        checked as the constructor checks them, and that an array given is a float one; not the
        arrays' shapes, nor complex factors over a real ``w`` (a rule or ``split`` puts ``None`` or
        other values there).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0)
            >>> lw.replace(scale=0.5).scale
            0.5
        """
        fields = {"w": self.w, "a": self.a, "b": self.b, **self.metadata()}
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise ValueError(f"LoraWeight.replace: unknown field(s) {unknown}; fields are {', '.join(fields)}")
        fields.update(changes)
        for name in ("w", "a", "b"):
            if name in changes:
                check_float(name, changes[name], fields["path"])
        if "scale" in changes:
            fields["scale"] = _number(changes["scale"], "scale", fields["path"])
        if "dropout" in changes:
            fields["dropout"] = _dropout(changes["dropout"], fields["path"])
        obj = object.__new__(type(self))
        _set(obj, **{**fields, "layout": Layout.parse(fields["layout"])})
        return obj

    @property
    def half(self) -> str | None:
        """Which half of ``jlora.split`` this node is: ``"trainable"`` (no ``w``), ``"frozen"`` (no
        factors), or ``None`` (whole).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> jlora.LoraWeight(None, jnp.ones((2, 1)), jnp.ones((1, 3)), scale=1.0).half
            'trainable'
        """
        return "trainable" if self.w is None else "frozen" if self.a is None or self.b is None else None

    # --- array-like ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the kernel ``w`` (a ``NoBaseWeight`` error for the trainable half, which has no ``w``)."""
        if self.w is None:
            raise NoBaseWeight(f"LoraWeight {self.path!r} has no base weight (the trainable half of jlora.split)")
        return tuple(self.w.shape)

    @property
    def dtype(self) -> Any:
        """The dtype of the kernel ``w`` (a ``NoBaseWeight`` error for the trainable half, which has no ``w``)."""
        if self.w is None:
            raise NoBaseWeight(f"LoraWeight {self.path!r} has no base weight (the trainable half of jlora.split)")
        return self.w.dtype

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """``w``'s shape, also in the trainable half of ``jlora.split`` (from ``a`` and ``b``).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> jlora.LoraWeight(None, jnp.ones((4, 2)), jnp.ones((2, 3)), scale=1.0).kernel_shape
            (4, 3)
        """
        if self.w is not None:
            return tuple(self.w.shape)
        return self.fitted().layout.w_shape(self.a.shape, self.b.shape)  # an ensemble's: its leading axes too

    @property
    def rank(self) -> int:
        """The adapter's rank: ``a``'s last axis (a symbolic size under ``jax.export``'s shape
        polymorphism: one export serves every rank).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> jlora.LoraWeight(jnp.ones((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), scale=1.0).rank
            2
        """
        return self.a.shape[-1]

    def delta(self, over: Any = None) -> jax.Array:
        """``scale · a @ b`` in ``w``'s axis order, in the adapter's dtype; with ``over`` (the dtype
        of the weight it is added to), formed in the widest of that, the factors' dtypes and float32,
        as ``materialize`` forms it (bf16 factors over a bf16 kernel: an f32 product, rounded once
        with the sum, not once for the product, once for the scale and once for the sum).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> lw = jlora.LoraWeight(jnp.zeros((4, 3)), jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5)
            >>> lw.delta()[0]
            Array([1., 1., 1.], dtype=float32)
        """
        if over is not None:
            wide = widest(over, self.a.dtype, self.b.dtype, jnp.float32)
            if not self.a.dtype == self.b.dtype == wide:
                return self.replace(a=self.a.astype(wide), b=self.b.astype(wide)).delta()
        nb, r = len(self.layout.group("b")), self.a.ndim - 1
        a_labels = list(range(self.a.ndim))  # batch..., inputs..., rank
        b_labels = a_labels[:nb] + [r] + list(range(r + 1, r + self.b.ndim - nb))
        b, axes_of, mesh = explicit.fit_factor(self.a, a_labels, self.b, b_labels)  # a mesh with Explicit axes
        d = lax.dot_general(
            self.a, b, (((r,), (nb,)), (tuple(range(nb)), tuple(range(nb)))),
            **explicit.out_sharding(axes_of, mesh, a_labels[:r] + b_labels[nb + 1:]),
        )
        d = jnp.transpose(d, self.layout.canonical_to_w()) if d.ndim > 1 else d
        return self.scale * d

    def materialize(self) -> jax.Array:
        """``w + scale·a@b`` in ``w``'s dtype, rounded once: ``a@b`` and the sum formed in the widest
        of the three dtypes and float32 (bf16 factors over a bf16 kernel add an f32 product).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> lw = jlora.LoraWeight(jnp.ones((4, 3), jnp.bfloat16), jnp.ones((4, 2)), jnp.ones((2, 3)), scale=0.5)
            >>> lw.materialize().dtype, float(lw.materialize()[0, 0])
            (dtype(bfloat16), 2.0)
        """
        if self.half is not None:
            raise ValueError(f"LoraWeight {self.path!r} comes from the {self.half} half of jlora.split, which holds no "
                             f"{'base weight' if self.half == 'trainable' else 'adapter'}: materialise "
                             "jlora.combine(trainable, frozen)'s (jlora.merge)")
        w = materialized(self.w) if isinstance(self.w, Lazy) else self.w  # a lazy base: a quantized weight
        delta = explicit.resharded_like(self.delta(over=w.dtype), w)
        return (w.astype(delta.dtype) + delta).astype(jax.dtypes.canonicalize_dtype(w.dtype))  # numpy's float64: x64's

    @property
    def sharding(self) -> Any:
        """``w``'s sharding (see ``sharding_of``).

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> lw = jlora.LoraWeight(jnp.ones((2, 3)), jnp.ones((2, 1)), jnp.ones((1, 3)), scale=1.0)
            >>> lw.sharding.is_fully_replicated
            True
        """
        return sharding_of(self.w)

    def example(self) -> Any:
        """``w`` (a lazy base's example): its type, including the mesh axes it varies over.

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> jlora.LoraWeight(jnp.ones((2, 3)), jnp.ones((2, 1)), jnp.ones((1, 3)), scale=1.0).example().shape
            (2, 3)
        """
        # its type, including the mesh axes it varies over inside shard_map
        return self._varying(self.w.example() if isinstance(self.w, Lazy) else self.w)

    def _varying(self, w: Any) -> Any:
        """``w`` (each array of a lazy one) typed as varying over the manual mesh axes the factors
        vary over inside ``shard_map`` too (an adapter per device over a replicated base: the
        weight varies as they do)."""
        if not (_compat.is_tracer(self.a) or _compat.is_tracer(self.b)):  # varying only inside shard_map
            return w
        factors = _compat.varying_axes(self.a) | _compat.varying_axes(self.b)

        def one(v: Any) -> Any:
            extra = factors - _compat.varying_axes(v) if isinstance(v, (jax.Array, jax.ShapeDtypeStruct)) else ()
            return _compat.vary(v, tuple(sorted(extra))) if extra else v

        return jax.tree.map(one, w)

    def prepare(self) -> "LoraWeight":
        """The same adapter with ``w`` under ``stop_gradient``: the base never gets a gradient.

        Example:
            >>> import jax, jax.numpy as jnp, jlora
            >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=1.0)
            >>> jax.grad(lambda w: lw.replace(w=w).prepare().materialize().sum())(jnp.ones((2, 2)))
            Array([[0., 0.],
                   [0., 0.]], dtype=float32)
        """
        if any(isinstance(x, jax.ShapeDtypeStruct) for x in (self.w, self.a, self.b)):
            raise ValueError(f"LoraWeight {self.path!r} holds abstract values (jax.ShapeDtypeStruct, as jax.eval_shape "
                             "gives), not arrays: run the wrapped function under jax.eval_shape, or compile it with "
                             "jax.jit(...).lower(...)")
        w = self.w.prepare() if isinstance(self.w, Lazy) else self.w
        if any(map(_compat.is_tracer, jax.tree.leaves(w))):
            w = self._varying(lax.stop_gradient(w))  # every leaf of a lazy base too
        # else concrete, nothing outside differentiates it: a node of its own (apply tells a returned
        # input by its id), w checked as replace checks it (a tree map may have cast it); an eager
        # call prepares each node at every call
        check_float("w", w, self.path)
        children, aux = self.tree_flatten()  # made as an unflatten makes one: a subclass's own arrays kept
        return self.tree_unflatten(aux, tuple(w if c is self.w else c for c in children))

    def unstack(self):
        """Stacked along a leading batch axis: ``w``, ``a`` and ``b`` sliced together (the factors'
        batch axis for it moved to their front), each layer's adapter rebuilt factored; ``None``
        for any other layout, and for a subclass holding arrays of its own that does not say how
        they slice (its own ``unstack``): it is materialised, and the stack sliced.

        Example:
            >>> import jax, jax.numpy as jnp, jlora
            >>> stack = jlora.LoraWeight(jnp.ones((3, 2, 2)), jnp.ones((3, 2, 1)), jnp.ones((3, 1, 2)), scale=1.0,
            ...                    layout="bio")
            >>> children, rebuild = stack.unstack()
            >>> rebuild(jax.tree.map(lambda c: c[0], children))  # layer 0
            LoraWeight(w=float32[2,2], a=float32[2,1], b=float32[1,2], scale=1, layout='io')
        """
        if len(self.tree_flatten()[0]) != 3 and type(self).unstack is LoraWeight.unstack:
            return None  # arrays beyond w, a and b that no unstack of its own slices: each layer would hold them whole
        role, k = self.layout.axes[0]
        if role == "b" and k != 0:  # vmap of a scan over a stack puts the scanned axis first: the factors follow
            axes = (("b", 0),) + tuple(("b", j + 1 if j < k else j) if r == "b" else (r, j)
                                       for r, j in self.layout.axes[1:])
            return self.replace(a=jnp.moveaxis(self.a, k, 0), b=jnp.moveaxis(self.b, k, 0), layout=Layout(axes)).unstack()
        sliced = self.layout.batched(-1)
        if sliced is None:
            return None
        if isinstance(self.w, Lazy):  # a lazy base (quantized, or another adapter) slices by its own rule
            base = self.w.unstack()
            if base is None:
                return None
            w_parts, w_rebuild = base
        else:
            w_parts, w_rebuild = (self.w,), lambda parts: parts[0]
        n = len(w_parts)
        template = self.replace(w=None, a=None, b=None, layout=sliced)
        return (*w_parts, self.a, self.b), lambda ch: template.replace(w=w_rebuild(ch[:n]), a=ch[n], b=ch[n + 1])

    def describe(self) -> str:
        """``LoraWeight at '<path>'`` (a subclass: its own name), as messages name it.

        Example:
            >>> import jax.numpy as jnp, jlora
            >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.ones((1, 2)), scale=1.0, path="q/kernel")
            >>> lw.describe()
            "LoraWeight at 'q/kernel'"
        """
        return f"{type(self).__name__} at {self.path!r}" if self.path else type(self).__name__  # a subclass: its own

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(w={_shape_str(self.w)}, a={_shape_str(self.a)}, b={_shape_str(self.b)}, "
            f"scale={self.scale:g}, layout='{self.fitted().layout}'"  # a sliced layer's, an ensemble's
            + (f", path={self.path!r}" if self.path else "") + ")"
        )


_FIELD_KEYS = (jax.tree_util.GetAttrKey("w"), jax.tree_util.GetAttrKey("a"), jax.tree_util.GetAttrKey("b"))


def _set(obj, w, a, b, scale, layout, path, dropout) -> None:
    # the slots' own setters: LoraWeight refuses setattr, and this runs at every unflatten
    _SET_W(obj, w)
    _SET_A(obj, a)
    _SET_B(obj, b)
    _SET_SCALE(obj, scale)
    _SET_LAYOUT(obj, layout)
    _SET_PATH(obj, path)
    _SET_DROPOUT(obj, dropout)


_SET_W, _SET_A, _SET_B, _SET_SCALE, _SET_LAYOUT, _SET_PATH, _SET_DROPOUT = (
    LoraWeight.__dict__[name].__set__ for name in ("w", "a", "b", *LoraWeight.STATIC_FIELDS))


def check_float(name: str, x: Any, path: str) -> None:
    """A ``ValueError`` naming the path for an integer (or bool) ``w``, ``a`` or ``b``: an integer
    ``w + scale·a@b``, merged, would drop the adapter."""
    if has_shape(x) and not isinstance(x, Lazy) and not jnp.issubdtype(x.dtype, jnp.inexact):
        raise ValueError(f"LoraWeight {path!r}: {name} must be a float array, got {_shape_str(x)} "
                         "(a quantized kernel goes in as a lazy value: see jlora.register)")


def _number(x: Any, name: str, path: str) -> float:
    """``x`` as a finite float, or a ValueError naming the field and the param."""
    try:
        value = None if isinstance(x, (bool, str)) else float(x)
    except (TypeError, ValueError):
        value = None
    if value is None or not math.isfinite(value):
        raise ValueError(f"LoraWeight {path!r}: {name} must be a finite number, got {x!r}")
    return value


def _dropout(x: Any, path: str) -> float:
    """``x`` as a dropout rate in [0, 1) (1 or more would drop every input of the adapter)."""
    value = _number(x, "dropout", path)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"LoraWeight {path!r}: dropout must be in [0, 1), got {x!r}")
    return value


def has_shape(x: Any) -> bool:
    """Whether ``x`` carries a shape and a dtype (an array, a tracer, a lazy value, a ShapeDtypeStruct).

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.weight import has_shape
        >>> has_shape(jnp.ones(2)), has_shape(None)
        (True, False)
    """
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, type)  # jax.Array itself: no shape


jax.tree_util.register_pytree_with_keys_class(LoraWeight)


@jax.tree_util.register_pytree_with_keys_class
class Trainable(NotAnArray):
    """Marks a base leaf that is fine-tuned fully (a bias, a norm, a task head).

    ``jlora.apply`` and ``jlora.merge`` unwrap it; ``split`` puts it in the trainable half.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> jlora.Trainable(jnp.zeros(3)).shape
        (3,)
    """

    __slots__ = ("value",)

    def __init__(self, value: Any):
        if isinstance(value, Lazy):
            raise ValueError(f"Trainable: a lazy {type(value).__name__} (a quantized kernel, an adapter) cannot "
                             "be trained in full; only arrays can")
        object.__setattr__(self, "value", value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Trainable: a node is not changed in place (as JAX treats arrays); make a new one: "
                             f"jlora.Trainable(new_{name})")

    def __delattr__(self, name: str) -> None:
        self.__setattr__(name, None)

    def __setstate__(self, state: Any) -> None:  # pickle and copy restore the value through this
        object.__setattr__(self, "value", (state[1] if isinstance(state, tuple) else state)["value"])

    def _contents(self) -> str:
        return "read its array, .value"

    def tree_flatten(self):
        return (self.value,), None

    def tree_flatten_with_keys(self):
        return ((jax.tree_util.GetAttrKey("value"), self.value),), None

    @classmethod
    def tree_unflatten(cls, aux: None, children: tuple) -> "Trainable":
        return cls(children[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """The value's shape."""
        return tuple(self.value.shape)

    @property
    def dtype(self) -> Any:
        """The value's dtype."""
        return self.value.dtype

    @property
    def sharding(self) -> Any:
        """The value's sharding (see ``sharding_of``)."""
        return sharding_of(self.value)

    def __repr__(self) -> str:
        return f"Trainable({_shape_str(self.value)})"

    describe = __repr__


def sharding_of(x: Any) -> Any:
    """``x``'s sharding (``None`` for a tracer: its type has it); for an abstract value without
    one (a ``ShapeDtypeStruct`` from ``jax.eval_shape``) where ``jax.set_mesh`` set a mesh, a
    replicated one there. Flax's ``nnx.eval_shape`` under a mesh reads a variable's value's
    ``sharding`` and gives a value without one an array's place: a node's adapters (a
    ``Trainable``'s wrapper) would be dropped from the abstract model.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jlora.weight import sharding_of
        >>> sharding_of(None) is None, sharding_of(jax.ShapeDtypeStruct((2,), jnp.float32)) is None
        (True, True)
    """
    found = getattr(x, "sharding", None)  # a tracer's raises: None
    if found is None and isinstance(x, jax.ShapeDtypeStruct):
        return _compat.replicated_on_set_mesh()
    return found


class MaterializeMismatch(TypeError):
    """A lazy kind's ``materialize()`` gave an array of another shape or dtype than the value says."""


def materialized(x: "Lazy") -> jax.Array:
    """``x.materialize()``, refused, naming the kind, where it is not of the shape and dtype ``x``
    says it has (a kind's own bug, which would flow on silently or fail far away).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.weight import materialized
        >>> materialized(jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0)).shape
        (2, 2)
    """
    try:
        out = x.materialize()
    except Exception as err:
        path = getattr(x, "path", None)  # not describe(): a kind's own may fail too
        if hasattr(err, "add_note") and (path or not type(x).__module__.startswith("jlora.")):  # Python 3.11+
            err.add_note(f"jlora: raised materialising {type(x).__name__} at {path!r}" if path else
                         f"jlora: raised in {type(x).__name__}.materialize(), the lazy kind's own code")
        raise
    shape, want = tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype)  # numpy's float64, x64 off: float32
    if (tuple(out.shape), jnp.dtype(out.dtype)) != (shape, want):
        raise MaterializeMismatch(f"{type(x).__name__}.materialize() gave {jnp.dtype(out.dtype).name}{list(out.shape)}, "
                                  f"but the value says it is {want.name}{list(x.shape)} (its shape and dtype)")
    return out


def zero_padded(x: jax.Array, size: int, axis: int) -> jax.Array:
    """``x`` with zeros appended along ``axis`` up to ``size`` (a factor's rank axis: the zero
    directions add nothing to ``a @ b``).

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.weight import zero_padded
        >>> zero_padded(jnp.ones((4, 2)), 3, -1)[0]
        Array([1., 1., 0.], dtype=float32)
    """
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def is_node(x: Any) -> bool:
    """True for the nodes jlora adds to a tree (``LoraWeight``, ``Trainable``): the ``is_leaf`` to
    see them whole in ``jax.tree`` functions.

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.weight import is_node
        >>> is_node(jlora.Trainable(jnp.zeros(2))), is_node(jnp.zeros(2))
        (True, False)
    """
    return isinstance(x, (LoraWeight, Trainable))


def is_param(x: Any) -> bool:
    """True for what jlora takes as one parameter of a tree although it is a pytree node: its own
    nodes and lazy values (a quantized kernel is one parameter, not its integer and scale parts).

    Example:
        >>> import jax.numpy as jnp, jlora
        >>> from jlora.weight import is_param
        >>> is_param(jlora.Trainable(jnp.zeros(2))), is_param(jnp.zeros(2))
        (True, False)
    """
    return isinstance(x, (Lazy, Trainable))
