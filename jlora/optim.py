"""``optimizer``: train adapters only, with LoRA+ learning rates for ``b``."""

from __future__ import annotations

import functools
import math
import numbers
import types
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jlora import _compat
from jlora.paths import leaves_with_paths, only_in
from jlora.tree import FROZEN, _container_difference, combine, labels, split
from jlora.variables import without_variables
from jlora.weight import LoraWeight, is_node

ADAPTER = "adapter"


def scale_lora_b(ratio: float) -> optax.GradientTransformation:
    """Multiply the updates of every ``LoraWeight.b`` by ``ratio`` (LoRA+: ``lr_b = ratio·lr_a``).
    A ratio that is not a finite number > 0 is refused, but for a 0-d array of 0 (a schedule decayed
    to its end, as ``optax.inject_hyperparams`` passes it), which gives ``b`` no update; a traced
    one, which cannot be checked, makes ``b``'s updates NaN where negative or not finite (never a
    silent sign flip).

    Example:
        >>> import jax.numpy as jnp, optax, jlora
        >>> tx = optax.chain(optax.sgd(1.0), jlora.scale_lora_b(16.0))
        >>> grads = {"k": jlora.LoraWeight(None, jnp.ones((2, 1)), jnp.ones((1, 2)), scale=1.0)}
        >>> updates, _ = tx.update(grads, tx.init(grads))
        >>> updates["k"].a.ravel().tolist(), updates["k"].b.ravel().tolist()
        ([-1.0, -1.0], [-16.0, -16.0])
    """
    ratio = _check_ratio(ratio, "jlora.scale_lora_b: ratio")
    if _compat.is_tracer(ratio):
        ratio = jnp.where((ratio >= 0) & (ratio < jnp.inf), ratio, jnp.nan)

    def one(x: Any) -> Any:
        if isinstance(x, LoraWeight) and hasattr(x.b, "dtype"):
            return x.replace(b=(x.b * ratio).astype(x.b.dtype))
        return x

    return optax.stateless(lambda updates, params=None: jax.tree.map(one, updates, is_leaf=is_node))


def _no_change(x: Any) -> Any:
    """A zero update that leaves ``x`` as it is under ``optax.apply_updates``: ``-0.0``, since
    ``p + -0.0`` is ``p`` for every float ``p`` (``+0.0`` would turn a ``-0.0`` into ``+0.0``; a
    complex ``p``'s two parts likewise). Bitwise where XLA folds the add (in the jitted step that
    made the update); an add of its own flushes subnormals and quiets signalling NaNs, as any does."""
    if x.dtype == jax.dtypes.float0:  # an integer param's (a quantized base's, under grad's allow_int)
        return jnp.zeros(x.shape, bool)  # p + False is p, in p's dtype; float0 has no add
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        return jnp.full_like(x, complex(-0.0, -0.0))
    return jnp.full_like(x, -0.0) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros_like(x)


def _group(params: Any) -> Any:
    return jax.tree.map(lambda label: FROZEN if label == FROZEN else ADAPTER, labels(params))


def misfit(grads: Any, params: Any) -> str | None:
    """Where gradients do not fit ``params`` leaf by leaf (from another model, or another rank):
    the first path that differs and how, or ``None``. ``update`` asks only when ``tx`` fails, so
    gradients of other shapes that ``tx`` takes (DP-SGD's per-example ones) still pass.

    Example:
        >>> import jax.numpy as jnp
        >>> from jlora.optim import misfit
        >>> misfit({"k": jnp.zeros((2, 3))}, {"k": jnp.zeros((3, 2))})
        "'k' is (2, 3) in the gradients, (3, 2) in the params"
    """
    shape = lambda x: tuple(x.shape) if hasattr(x, "shape") else None

    def flat(tree: Any) -> dict[str, Any]:  # a frozen leaf's None in a trainable half is a place too
        out = {}
        for path, x in leaves_with_paths(tree, is_leaf=lambda x: x is None or is_node(x)):
            out.update({f"{path}/{field}": shape(y) for field, y in leaves_with_paths(x)} if is_node(x) else
                       {path: shape(x)})
        return out

    in_grads, in_params = flat(grads), flat(params)
    only_grads, only_params = set(in_grads) - set(in_params), set(in_params) - set(in_grads)
    if only_grads or only_params:
        return only_in(("the gradients", only_grads), ("the params", only_params))
    for path, s in in_grads.items():
        if s != in_params[path]:
            return f"'{path}' is {s} in the gradients, {in_params[path]} in the params"
    return None


def _check_has_adapters(params: Any, where: str, what: str = "params") -> None:
    """Refuse arrays without a jlora node (``lora_init`` forgotten), or the frozen half of
    ``jlora.split``; ``what`` names the argument. A tree with no arrays either passes:
    ``optax.tree_map_params`` calls ``init`` with placeholders for whole nodes."""
    leaves = jax.tree.leaves(params, is_leaf=is_node)
    if not any(is_node(x) for x in leaves) and any(hasattr(x, "shape") for x in leaves):
        raise ValueError(f"{where}: {what} hold no LoraWeight or Trainable leaf, so nothing would train; "
                         "call jlora.lora_init first")
    nodes = [x for x in leaves if is_node(x)]
    if nodes and all(x.half == "frozen" if isinstance(x, LoraWeight) else x.value is None for x in nodes):
        raise ValueError(f"{where}: {what} are the frozen half of jlora.split (no factors, nothing would train): "
                         "jlora.split returns (trainable, frozen), in that order")


def _has_nodes(tree: Any) -> bool:
    """Whether ``tree`` holds a ``LoraWeight`` or ``Trainable``: not a callback (a function, a
    ``jax.tree_util.Partial`` over the frozen half), but an Equinox module of gradients, callable too."""
    if isinstance(tree, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial)):
        return False
    return any(is_node(x) for x in jax.tree.leaves(tree, is_leaf=is_node))


def _check_arguments(grads: Any, state: Any, params: Any) -> None:
    """Say what is wrong where ``update``'s arguments are a half of ``jlora.split`` other than the
    one it takes, or in another order (``update(grads, params, opt_state)``)."""
    if not isinstance(state, optax.MultiTransformState) and _has_nodes(state):  # ours is a multi_transform's
        if _holds_optax_states(state) and not isinstance(params, optax.MultiTransformState):
            raise ValueError("jlora.optimizer: opt_state was not made by this optimizer's init (it holds the params' "
                             "LoraWeight or Trainable nodes inside optax's states, as a plain optax tx's state "
                             "initialised on them does): make it with tx.init(params), tx = jlora.optimizer(...)")
        raise ValueError("jlora.optimizer: opt_state holds LoraWeight or Trainable nodes, as params do: "
                         "update takes (grads, opt_state, params), in that order")
    _check_has_adapters(grads, "jlora.optimizer's update", "the gradients")
    if params is not None:
        _check_has_adapters(without_variables(params), "jlora.optimizer's update")


def _holds_optax_states(tree: Any) -> bool:
    """Whether ``tree`` holds a state of an optax transformation (``ScaleByAdamState``, ``EmptyState``:
    named tuples of optax's), as no param tree does."""
    is_state = lambda x: isinstance(x, tuple) and hasattr(x, "_fields") and type(x).__module__.startswith("optax")
    return any(is_state(x) for x in jax.tree.leaves(tree, is_leaf=is_state))


def _state_shapes(inner: optax.GradientTransformation) -> Callable[[Any], Any]:
    """``trainable -> jax.eval_shape(inner.init, trainable)``, or ``None`` for a ``tx`` whose
    ``init`` needs concrete values; remembered per structure and shapes, so an eager ``update``
    traces ``init`` once, not at every step."""
    @functools.lru_cache(maxsize=4)
    def of_avals(structure: Any, avals: tuple) -> Any:
        try:
            return jax.eval_shape(inner.init, jax.tree.unflatten(structure, avals))
        except Exception:
            return None

    def shapes(trainable: Any) -> Any:
        leaves, structure = jax.tree.flatten(trainable)
        try:
            return of_avals(structure, tuple(jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in leaves))
        except (AttributeError, TypeError):  # a leaf with no dtype, or aux data that does not hash
            return of_avals.__wrapped__(structure, leaves)

    return shapes


def _check_state(expected: Any, state: Any, per_example_ok: bool = False) -> None:
    """Refuse a state unlike ``expected``, the state ``init`` would have made for the adapters (from
    ``_state_shapes``): one kept from adapters of another rank would broadcast into the new ones
    silently. Shapes only (a state may keep its moments in another dtype); with no ``expected``
    (a ``tx`` whose ``init`` needs concrete values) nothing is checked. ``per_example_ok``: the
    adapters are gradients, which may have a leading axis more than the state (DP-SGD's
    per-example gradients)."""
    if expected is None:
        return
    got, got_def = jax.tree_util.tree_flatten_with_path(state)
    want, want_def = jax.tree_util.tree_flatten_with_path(expected)

    def check_shapes() -> None:
        for (kp, x), (_, y) in zip(got, want):
            if per_example_ok and tuple(y.shape[1:]) == np.shape(x):
                continue
            if np.shape(x) != tuple(y.shape):
                raise ValueError(f"jlora.optimizer: opt_state{jax.tree_util.keystr(kp)} has shape {np.shape(x)}, "
                                 f"but these adapters need {tuple(y.shape)}: a state kept from adapters of another "
                                 "rank? make it again with tx.init(params)")

    if got_def != want_def:  # the paths only here: every update of an eager step checks its state
        got_paths = {jax.tree_util.keystr(k) for k, _ in got}
        want_paths = {jax.tree_util.keystr(k) for k, _ in want}
        if got_paths == want_paths:
            check_shapes()  # another rank first: its scale differs too, but the shapes say what is wrong
        differ = _container_difference(got_def, want_def) if got_paths == want_paths else None
        detail = (f": only in the state {sorted(got_paths - want_paths)[:3]}, only in a state for these "
                  f"adapters {sorted(want_paths - got_paths)[:3]} (adapters on other params, or a state of another "
                  "tx or b_lr_ratio: a ratio of 1 wraps tx in nothing, another in a chain with its scale)"
                  if got_paths != want_paths else
                  f": at '{differ[0]}' the state has {differ[1]}, these adapters {differ[2]}" if differ else
                  " (the same paths, other LoRA scales, layouts or dropout)")
        raise ValueError(f"jlora.optimizer: opt_state was not made for these adapters{detail}; "
                         "make it again with tx.init(params)")
    check_shapes()


def _check_ratio(ratio: Any, name: str = "jlora.optimizer: b_lr_ratio") -> Any:
    """``ratio`` if a finite number > 0: a Python or numpy number (a ``Fraction`` as a float), or
    a 0-d array (a traced one, as ``optax.inject_hyperparams`` passes under ``jit``, is taken as it
    is; a concrete one may be 0, as a schedule's end is, alike eagerly and under ``jit``)."""
    dtype = getattr(ratio, "dtype", None)
    real = not isinstance(ratio, bool) and (isinstance(ratio, numbers.Real) or (
        dtype is not None and np.ndim(ratio) == 0
        and (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))))
    f32 = np.finfo(np.float32)  # the updates' dtype: a ratio outside its range is 0 or inf there
    value = None if not real or _compat.is_tracer(ratio) else float(ratio)
    scheduled_end = isinstance(ratio, jax.Array) and value == 0
    if not real or not (value is None or scheduled_end or float(f32.tiny) <= value <= float(f32.max)):
        schedule = (" (to schedule it, wrap the optimizer: optax.inject_hyperparams(jlora.optimizer, "
                    "static_args=('tx',))(tx, params, b_lr_ratio=schedule))" if callable(ratio) else "")
        bounds = " (within float32's range, 1.2e-38 to 3.4e38)" if real and 0 < value < math.inf else ""
        zero = " (a 0-d array may be 0, a schedule's end)" if dtype is not None and real else ""
        raise ValueError(f"{name} must be a finite number > 0{bounds}{zero}, got {ratio!r}{schedule}")
    return ratio if dtype is not None else value


# States of transformations whose updates are not steps proportional to the learning rate:
# differences of iterates (schedule-free, Mechanic, COCOB, MADGRAD), a step size that grows with how
# far the params have moved (DoG, as contrib's DoGState and core optax's
# ScaleByDistanceOverGradientsState, DoWG, Prodigy: a b moved further raises a's step too), or
# Polyak's step from the loss and the params (Momo). Scaling b's updates would not scale b's
# learning rate alone. (Lookahead's is refused at any ratio: _check_scalable.)
_NOT_SCALABLE = ("ScheduleFreeState", "MechanicState", "COCOBState", "DoGState", "DoWGState", "ProdigyState",
                 "ScaleByDistanceOverGradientsState", "MadgradState", "MomoState", "MomoAdamState")


def _states_named(state: Any, names: tuple[str, ...]) -> list[Any]:
    """The inner states in ``state`` whose type is named one of ``names``."""
    named = lambda x: type(x).__name__ in names
    return [x for x in jax.tree.leaves(state, is_leaf=named) if named(x)]


# States of a line search: it picks the step length for tx's own update, so a b scaled after it
# takes a step no search checked (the loss can diverge).
_LINE_SEARCH = ("ScaleByZoomLinesearchState", "ScaleByBacktrackingLinesearchState")


def _check_scalable(state: Any, plain: bool = False) -> None:
    """Refuse a ``tx`` that cannot run inside ``optimizer`` (``optax.lookahead``), or, unless
    ``plain`` (a ratio of 1), one whose ``b`` updates a ratio would not make LoRA+."""
    if _states_named(state, ("LookaheadState",)):
        raise ValueError("jlora.optimizer: optax.lookahead goes around it, not inside (its slow and fast params do "
                         "not fit a multi_transform): optax.lookahead(jlora.optimizer(tx, params, b_lr_ratio=...), ...)")
    if plain:
        return
    searches = [type(x).__name__ for x in _states_named(state, _LINE_SEARCH)]
    if searches:
        raise ValueError(f"jlora.optimizer: tx holds a {searches[0]}: its line search picks the step length for "
                         "tx's update, so b's update scaled by b_lr_ratio after it is a step no search checked. "
                         "Use b_lr_ratio=1.0, or a fixed step (optax.lbfgs(learning_rate=..., linesearch=None))")
    found = [type(x).__name__ for x in _states_named(state, _NOT_SCALABLE)]
    # optax.contrib.sam's transparent mode (the default) steps to the adversarial point and back
    found += ["SAMState in transparent mode (optax.contrib.sam's default; opaque_mode=True is fine)"
              for x in _states_named(state, ("SAMState",)) if getattr(x, "cache", None) is not None]
    if found:
        raise ValueError(f"jlora.optimizer: b_lr_ratio scales b's updates, which is LoRA+ only where an update is "
                         f"proportional to the learning rate; tx holds a {found[0]}, whose updates are not. Use "
                         "b_lr_ratio=1.0 (a Python number: an array, as optax.inject_hyperparams passes it, scales "
                         "even at 1), or give b its own tx: optax.multi_transform over jlora.labels(params)"
                         + (" (then evaluate schedule-free's params with optax.contrib.schedule_free_eval_params of "
                            "each label's state: jlora.optim.schedule_free_eval_params takes one)"
                            if found[0] == "ScheduleFreeState" else ""))


def optimizer(tx: optax.GradientTransformation, params: Any = None, *, b_lr_ratio: float = 1.0) -> optax.GradientTransformation:
    """Train adapters only: ``tx`` on ``LoraWeight`` factors and ``Trainable`` leaves, nothing else.

    An ``optax.multi_transform`` applied to the trainable half of ``jlora.split``: ``lora_a``,
    ``lora_b`` and ``trainable`` leaves (see ``jlora.labels``) share one ``tx`` — so a clipping or global-norm
    transform inside ``tx`` sees all adapter gradients together and nothing else — followed by a
    scale of ``b_lr_ratio`` on ``lora_b`` updates (LoRA+). Frozen leaves get zero updates and no
    state. ``init``, ``update``'s gradients and its ``params`` may each be the full tree or the
    trainable half (a state made from one serves the other), with or without Flax NNX variables
    (``nnx.Optimizer(model, jlora.optimizer(...), wrt=nnx.Param)`` works: the state holds none);
    updates come back in the gradients' structure. Extra arguments of ``update`` (``value=`` for
    ``reduce_on_plateau``, ``lbfgs``'s ``value_fn``) reach ``tx``: a callback among them gets the
    trainable half, and a tree-shaped one (``grad=``, full tree or half) reaches it as the trainable half. ``params``, if given, must hold
    at least one adapter (``b_lr_ratio`` is keyword-only: ``optimizer(tx, 16.0)`` is refused);
    where ``tx`` fails, ``update`` names the param whose gradient does not fit (``misfit``); it refuses a state ``init`` would not have made for the params (or, without
    them, the gradients): one kept from adapters of another rank would otherwise broadcast into the
    new ones.

    ``b_lr_ratio`` (a number, or a scalar array: ``optax.inject_hyperparams`` can schedule it)
    multiplies ``b``'s updates after ``tx``: LoRA+ for any ``tx`` whose update is proportional to
    its learning rate (SGD, momentum, Adam(W), Lion, RMSProp, Adafactor). A ``tx`` whose updates
    are differences of iterates (schedule-free, Mechanic, COCOB, MADGRAD, SAM's transparent mode),
    whose step size grows with the params' distance from their start (DoG, DoWG, Prodigy) or is
    Polyak's (Momo), or whose step length a line search picks (``optax.lbfgs``'s default), is
    refused with a ratio other than 1 (by ``optimizer`` when it is given ``params``, else by
    ``init``); ``optax.lookahead`` with any (it goes around ``optimizer``); a transformation that
    projects the params (``optax.keep_params_nonnegative``, a projection) cannot be told from its
    state, and with a ratio its projection of ``b`` is scaled too: keep those to 1.
    Accumulate gradients with ``optimizer(optax.MultiSteps(tx, k).gradient_transformation(), ...)``:
    inside, the accumulators hold the adapters' gradients only (``optax.MultiSteps`` around the
    result, initialised on the full tree, would keep a zero copy of every frozen weight); its
    ``has_updated(state)`` reads a state of its own, so on jlora's ask
    ``optax.tree_utils.tree_get(state, "mini_step") == 0``.

    Example:
        >>> import jax, jax.numpy as jnp, optax, jlora
        >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0)
        >>> tx = jlora.optimizer(optax.adam(1e-3), {"k": lw}, b_lr_ratio=16.0)
        >>> state = tx.init({"k": lw})                       # from the full tree ...
        >>> trainable, _ = jlora.split({"k": lw})
        >>> grads = jax.tree.map(jnp.ones_like, trainable)   # a gradient of 1 for each of a's and b's entries
        >>> updates, state = tx.update(grads, state)         # ... updated with the trainable half
        >>> float(updates["k"].b[0, 0] / updates["k"].a[0, 0])  # LoRA+: b's step is 16 times a's
        16.0
    """
    b_lr_ratio = _check_ratio(b_lr_ratio)
    if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
        raise ValueError(f"jlora.optimizer: tx must be an optax transformation (init and update), got {tx!r}")
    if params is not None:
        params = without_variables(params)
        if not _has_nodes(params):
            raise ValueError(f"jlora.optimizer: params must be the param tree after jlora.lora_init (or its trainable "
                             f"half), got a {type(params).__name__} with no LoraWeight or Trainable leaf; a LoRA+ ratio "
                             "goes in b_lr_ratio=")
        _check_has_adapters(params, "jlora.optimizer")
    plain = isinstance(b_lr_ratio, numbers.Real) and b_lr_ratio == 1.0
    adapter = tx if plain else optax.chain(tx, scale_lora_b(b_lr_ratio))
    inner = optax.multi_transform({FROZEN: optax.set_to_zero(), ADAPTER: adapter}, _group)
    state_shapes = _state_shapes(inner)

    def init(params: Any) -> Any:
        if params is None:
            raise ValueError("jlora.optimizer's init: params is None; pass the LoRA params (lora_init's tree, or its "
                             "trainable half)")
        params = without_variables(params)  # no NNX variables in the state: nnx.Optimizer wraps its leaves in its own
        _check_has_adapters(params, "jlora.optimizer's init")
        try:
            state = inner.init(split(params)[0])
        except AttributeError as err:
            if "'NoneType'" not in str(err):
                raise
            raise ValueError(f"jlora.optimizer's init: tx's init failed on a None ({type(err).__name__}: {err}, "
                             "above): tx gets the trainable half of jlora.split, which holds None where the frozen "
                             "leaves were (as equinox.partition's halves do); a tx that maps over None as a leaf "
                             "(optax.contrib.galore does) cannot take it: use one that skips None") from err
        _check_scalable(state, plain)
        return state

    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, Any]:
        bare = without_variables(updates)
        if not _has_nodes(bare):
            raise ValueError("jlora.optimizer: the gradients hold no adapters (no LoraWeight or Trainable): take "
                             "them with respect to the LoRA params (their trainable half), not the merged or base "
                             "params")
        trainable, frozen = split(bare)
        try:
            trainable_params = None if params is None else split(without_variables(params))[0]
            if trainable_params is None:  # the gradients have the params' shapes (per-example ones, an axis more)
                _check_state(state_shapes(trainable), state, per_example_ok=True)
            else:
                _check_state(state_shapes(trainable_params), state)
        except ValueError:
            _check_arguments(bare, state, params)  # merged params, a frozen half, the arguments in another order
            raise
        # a tree-shaped extra argument (lbfgs's grad=) as tx sees the gradients: the trainable half
        extra_args = {k: split(without_variables(v))[0] if _has_nodes(v) else v for k, v in extra_args.items()}
        try:
            out, state = inner.update(trainable, state, trainable_params, **extra_args)
        except (TypeError, ValueError):  # a broadcasting error deep in tx: say which param, if it is that
            _check_arguments(bare, state, params)
            problem = None if params is None else misfit(trainable, trainable_params)
            if problem is None:
                raise
            raise ValueError(f"jlora.optimizer: the gradients do not fit the params (from another model?): "
                             f"{problem}") from None
        # frozen leaves' zero updates where tx's are None; not jlora.combine, whose checks want arrays
        # where optax.masked around this optimizer leaves a MaskedNode
        out = jax.tree.map(lambda u, zero: zero if u is None else u, out, jax.tree.map(_no_change, frozen),
                           is_leaf=lambda x: x is None or isinstance(x, optax.MaskedNode))
        if bare is not updates:  # back in the gradients' structure, their NNX variables included
            out = jax.tree.unflatten(jax.tree.structure(updates), jax.tree.leaves(out))
        return out, state

    if params is not None:  # refuse a ratio for a schedule-free tx now, not at the first init
        # on the trainable half: frozen leaves need not be arrays (an Equinox module's fields); a tx
        # whose init needs concrete values gives None, and init checks it
        _check_scalable(state_shapes(split(params)[0]), plain)
    return optax.GradientTransformationExtraArgs(init, update)


def schedule_free_eval_params(opt_state: Any, params: Any) -> Any:
    """The params to evaluate with when ``jlora.optimizer`` wraps a schedule-free ``tx``
    (``optax.contrib.schedule_free_*``): ``optax.contrib.schedule_free_eval_params`` applied to the
    adapters, found inside jlora's state. ``params`` may be the full tree (frozen leaves come back as
    they are) or the trainable half; each leaf keeps its dtype.

    Example:
        >>> import jax.numpy as jnp, optax, jlora
        >>> from jlora.optim import schedule_free_eval_params
        >>> lw = jlora.LoraWeight(jnp.ones((2, 2)), jnp.ones((2, 1)), jnp.zeros((1, 2)), scale=1.0)
        >>> tx = jlora.optimizer(optax.contrib.schedule_free_sgd(0.1), {"k": lw})
        >>> state = tx.init({"k": lw})
        >>> schedule_free_eval_params(state, {"k": lw})["k"].a.shape
        (2, 1)
    """
    found = _states_named(opt_state, ("ScheduleFreeState",))
    if len(found) != 1:
        raise ValueError(f"jlora.optim.schedule_free_eval_params: opt_state must hold one ScheduleFreeState (the "
                         f"state of jlora.optimizer(optax.contrib.schedule_free_...)), found {len(found)}")
    trainable, frozen = split(without_variables(params))
    # the state as jlora.optimizer made it, its z in the half's containers (nnx.Optimizer wraps the
    # state's leaves in variables of its own, and holds z in the nnx.State it was given)
    state = without_variables(found[0])
    z = jax.tree.leaves(state.z)
    if [np.shape(x) for x in z] != [np.shape(x) for x in jax.tree.leaves(trainable)]:
        raise ValueError("jlora.optim.schedule_free_eval_params: params are not those opt_state was made for: its "
                         f"{len(z)} trained arrays are not the arrays of params' adapters and trained leaves")
    state = state._replace(z=jax.tree.unflatten(jax.tree.structure(trainable), z))
    evaluated = optax.contrib.schedule_free_eval_params(state, trainable)
    out = combine(jax.tree.map(lambda e, p: e.astype(p.dtype), evaluated, trainable), frozen)
    return jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(out))  # NNX variables kept, if any
