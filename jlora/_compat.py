"""Every touchpoint with JAX internals, in one place.

jlora evaluates jaxprs itself, so it reads equations, parameters and primitives that JAX does not
promise to keep stable. Each difference between supported JAX versions lives here, with a comment
naming the version that introduced it. Nothing else in the package reads equation parameters
that changed between versions, except by ``params.get`` where the older versions' absent parameter
means the default (``ragged_dot_general``'s ``out_sharding``); elsewhere ``jax.extend`` gives only
the ``Primitive`` class, and the primitives' own names.

Supported: JAX 0.6.2 (oldest, tested in CI) to 0.11.x (GPU image), see ``pyproject.toml``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax import export  # a submodule that ``import jax`` does not load before JAX 0.7
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as _core
from jax.extend.core import primitives as _p

Literal = _core.Literal

dot_general_p = _p.dot_general_p
conv_general_dilated_p = _p.conv_general_dilated_p
gather_p = _p.gather_p
transpose_p = _p.transpose_p
reshape_p = _p.reshape_p
convert_element_type_p = _p.convert_element_type_p
copy_p = _p.copy_p
squeeze_p = _p.squeeze_p
slice_p = _p.slice_p
dynamic_slice_p = _p.dynamic_slice_p
rev_p = _p.rev_p
add_p = _p.add_p
sub_p = _p.sub_p
mul_p = _p.mul_p
div_p = _p.div_p
neg_p = _p.neg_p
stop_gradient_p = _p.stop_gradient_p
sharding_constraint_p = _p.sharding_constraint_p
device_put_p = _p.device_put_p
scan_p = _p.scan_p
while_p = _p.while_p
cond_p = _p.cond_p


def is_sharding_type_error(err: BaseException) -> bool:
    """Whether ``err`` is JAX's type error of an op whose shardings cannot be inferred on a mesh
    with Explicit axes (JAX 0.5+). The class is not public (``jax._src.core.ShardingTypeError``
    through 0.11), so it is known by its name."""
    return type(err).__name__ == "ShardingTypeError"


def _traced_primitive(fn: Any, *args: Any) -> Any:
    """The primitive of the one equation ``fn`` traces to, found through the public API."""
    return jax.make_jaxpr(fn)(*args).jaxpr.eqns[0].primitive


# jax.checkpoint's primitive ("remat2"/"checkpoint") joined jax.extend.core.primitives after JAX 0.6.
remat_p = getattr(_p, "remat_p", None) or _traced_primitive(jax.checkpoint(lambda x: x * 2), 1.0)

concatenate_p = _p.concatenate_p
all_gather_p = _p.all_gather_p
broadcast_in_dim_p = _p.broadcast_in_dim_p
pad_p = _p.pad_p
# Not in jax.extend.core.primitives (JAX 0.6 - 0.10): read off a trace. ``split`` (params axis,
# sizes), ``optimization_barrier`` (no params) and ``ragged_dot_general`` are primitives in every
# supported JAX; ``unstack`` and ``stack`` (param axis) became
# primitives in 0.10 (before, jnp.unstack traced to a jit of split and squeezes, jnp.stack to
# broadcast_in_dim and concatenate): None where they are not.
split_p = _traced_primitive(lambda x: jax.lax.split(x, (1, 1)), np.zeros(2, np.float32))
# checkpoint_name's primitive ("name") joined jax.extend.core.primitives after JAX 0.6
name_p = _traced_primitive(lambda x: checkpoint_name(x, "n"), np.zeros(1, np.float32))
optimization_barrier_p = _traced_primitive(jax.lax.optimization_barrier, np.zeros(1, np.float32))
ragged_dot_general_p = _traced_primitive(
    lambda x, w: jax.lax.ragged_dot(x, w, np.array([1], np.int32)), np.zeros((1, 1), np.float32), np.zeros((1, 1, 1), np.float32))


def _own_primitive(name: str, fn: Any, *args: Any) -> Any:
    prim = _traced_primitive(fn, *args)
    return prim if prim.name == name else None


unstack_p = _own_primitive("unstack", lambda x: jax.numpy.unstack(x), np.zeros((2, 1), np.float32))
stack_p = _own_primitive("stack", lambda x: jax.numpy.stack([x, x]), np.zeros(1, np.float32))
# ``jnp.tile`` became a primitive (param reps) in 0.9; before, a broadcast_in_dim and a reshape.
tile_p = _own_primitive("tile", lambda x: jax.numpy.tile(x, 2), np.zeros(1, np.float32))


def _shard_map_eqn() -> Any:
    """A traced ``shard_map`` of ``x @ w`` with ``w`` replicated over a 2-way manual axis (no
    devices needed; size-1 axes may be left out of types, and then no pvary is traced)."""
    from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

    mesh = AbstractMesh((2,), ("i",), axis_types=(AxisType.Auto,))  # JAX 0.11 defaults to Explicit
    f = jax.shard_map(lambda w, x: x @ w, mesh=mesh, in_specs=(P(), P("i")), out_specs=P("i"))
    s = jax.ShapeDtypeStruct((2, 2), jax.numpy.float32)
    return jax.make_jaxpr(f)(s, jax.ShapeDtypeStruct((4, 2), jax.numpy.float32)).jaxpr.eqns[0]


# shard_map's primitive and pvary (which marks a replicated value as varying over manual axes
# before it meets a varying one) are not in jax.extend.core.primitives (JAX 0.6 - 0.10): both are
# read off a traced shard_map. Params (0.6+): mesh, in_specs, out_specs, check_vma, and the manual
# axes (see shard_map_axes). Without a pvary (a JAX that does not trace one) its rule is not needed.
_smap = _shard_map_eqn()
shard_map_p = _smap.primitive
pvary_p = next((e.primitive for e in _smap.params["jaxpr"].eqns if e.primitive.name == "pvary"), None)


def shard_map_axes(params: dict) -> set:
    """The mesh axes a shard_map equation makes manual: ``manual_axes`` up to JAX 0.9,
    ``newly_manual_axes`` from 0.10 (the axes already manual outside it are not repeated)."""
    return set(params["manual_axes"] if "manual_axes" in params else params["newly_manual_axes"])


def primitives(*names: str) -> frozenset:
    """Primitive objects of ``jax.extend.core.primitives`` by name (``"tanh"`` for ``tanh_p``), for
    membership tests by object; a name a JAX version lacks is left out.

    Example:
        >>> primitives("tanh", "no_such_primitive") == {jax.extend.core.primitives.tanh_p}
        True
    """
    return frozenset(getattr(_p, f"{n}_p") for n in names if hasattr(_p, f"{n}_p"))


custom_jvp_call_p = _p.custom_jvp_call_p
custom_vjp_call_p = _p.custom_vjp_call_p
# JAX 0.7 renamed pjit_p to jit_p.
jit_p = getattr(_p, "jit_p", None) or getattr(_p, "pjit_p")


def _vma(aval: Any) -> frozenset:
    # Manual axes a value varies over: ``aval.vma`` in JAX 0.6 - 0.9, ``aval.mat.varying`` from 0.10.
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "mat", None), "varying", None)
    return frozenset(vma or ())


def varying_axes(x: Any) -> frozenset:
    """Manual mesh axes over which ``x`` varies inside ``shard_map`` (empty outside one)."""
    return _vma(jax.typeof(x))


def vary(x: Any, axes: tuple) -> Any:
    """``x`` typed as varying over the manual mesh axes ``axes`` too (inside ``shard_map``):
    ``jax.lax.pcast(x, axes, to="varying")`` from JAX 0.10, ``jax.lax.pvary`` before."""
    pcast = getattr(jax.lax, "pcast", None)
    return pcast(x, axes, to="varying") if pcast is not None else jax.lax.pvary(x, axes)


def bind(eqn: Any, invals: Sequence[Any], **changed: Any) -> list:
    """Re-bind an equation on new inputs, unchanged or with the params in ``changed`` replaced;
    always returns a list of outputs.

    JAX 0.9.2 changed ``Primitive.get_bind_params`` to return one dict that keeps ``'subfuns'``
    inside the params (``bind(*args, **params)``); before, it returned ``(subfuns, params)`` and
    the subfuns went first among the positional arguments.
    """
    got = eqn.primitive.get_bind_params({**eqn.params, **changed} if changed else eqn.params)
    with eqn_context(eqn):
        if isinstance(got, dict):
            out = eqn.primitive.bind(*invals, **got)
        else:
            subfuns, params = got
            out = eqn.primitive.bind(*subfuns, *invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


@contextlib.contextmanager
def eqn_context(eqn: Any) -> Iterator[None]:
    """The context ``eqn`` was traced in, to bind it (or a rule's ops in its place) in: the
    abstract mesh (an ``auto_axes`` region inside a function on a mesh with Explicit axes, as
    ``x.at[i].get(out_sharding=...)`` traces), ``compute_on``, XLA metadata, the threefry mode;
    and where it was traced: its ``jax.named_scope`` names, under those of the jaxpr's evaluation
    (``evaluating_jaxpr``), and the user's line, which the ops keep in the HLO's metadata
    (profiles, XLA dumps, ``jax_debug_nans``). JAX's own ``eval_jaxpr`` enters ``eqn.ctx.manager``
    (JAX 0.4.36+) and ``source_info_util.user_context`` (the same through 0.11) for each equation."""
    with _source_context(eqn), eqn.ctx.manager:
        yield


@contextlib.contextmanager
def evaluating_jaxpr() -> Iterator[None]:
    """Bind a jaxpr's equations under the names of the scope its evaluation starts in: an equation
    bound inside another's (a rule replaying equations of the same jaxpr) takes its own names, not
    both."""
    bases = _name_bases()
    if _source_info_util is None:
        yield
        return
    bases.append(_source_info_util.current_name_stack())
    try:
        yield
    finally:
        bases.pop()


def unscoped(fn: Callable) -> Callable:
    """``fn`` traced under no ``jax.named_scope`` names, the equations it binds too (see
    ``eqn_context``), for a function JAX traces into a jaxpr of its own (``custom_vmap``,
    ``custom_jvp``): lowering the call puts the call's names before its ops' names, which would
    otherwise hold them twice (``jvp(blk)/jvp(blk)/dot_general``)."""
    if _source_info_util is None:
        return fn

    @functools.wraps(fn)
    def run(*args: Any) -> Any:
        bases = _name_bases()
        _THREAD.name_bases = []
        try:
            with _source_info_util.reset_name_stack():
                return fn(*args)
        finally:
            _THREAD.name_bases = bases
    return run


def _name_bases() -> list:
    if not hasattr(_THREAD, "name_bases"):
        _THREAD.name_bases = []
    return _THREAD.name_bases


_THREAD = threading.local()


def _source_context(eqn: Any) -> Any:
    info = getattr(eqn, "source_info", None)
    if _source_info_util is None or info is None:
        return contextlib.nullcontext()
    bases, current = _name_bases(), _source_info_util.current_name_stack()
    if not bases:  # outside an evaluation (a rebuild replayed in the backward): where it runs
        return _source_info_util.user_context(info.traceback, name_stack=current)
    return _source_info_util.user_context(info.traceback, name_stack=bases[-1] + info.name_stack)


try:  # public in jax.extend from JAX 0.4.x through 0.11 (the same functions as JAX's own module)
    from jax.extend import source_info_util as _source_info_util
except ImportError:  # moved: the ops lose their scope names, nothing else
    _source_info_util = None


def traced_at(eqn: Any, internal: tuple[str, ...]) -> str:
    """Where the user's code made ``eqn``, for a warning: the innermost frame of its traceback
    outside JAX and the ``internal`` directories, and the innermost outside installed packages too
    where that is another (a linen ``Dense``, called from the model's file); '' where JAX keeps no
    traceback. Frames come from jaxlib's ``Traceback.frames`` (innermost first, the same through
    0.11), not from ``jax._src.source_info_util``, whose functions changed arguments in 0.7."""
    try:
        frames = [(f.file_name, f.line_num, f.function_name) for f in eqn.source_info.traceback.frames]
    except AttributeError:
        return ""
    outside = [f for f in frames if not f[0].startswith(internal)]
    if not outside:
        return ""
    mine = next((f for f in outside if "-packages" + os.sep not in f[0]), None)
    say = lambda f: f"{f[0].split('-packages' + os.sep)[-1]}:{f[1]} ({f[2]})"
    return say(outside[0]) + (f", from {say(mine)}" if mine is not None and mine != outside[0] else "")


def open_jaxpr(jaxpr: Any) -> tuple[Any, list]:
    """Return ``(open_jaxpr, consts)`` for a closed or open jaxpr.

    Higher-order params hold ``ClosedJaxpr`` (scan, while, cond, jit) or an open ``Jaxpr``
    (checkpoint). JAX 0.11 made ``ClosedJaxpr`` an alias of ``Jaxpr``, which then carries its
    consts itself; an open jaxpr with ``constvars`` but no ``consts`` has none to give.
    """
    inner = getattr(jaxpr, "jaxpr", jaxpr)
    if inner is None:
        inner = jaxpr
    consts = list(getattr(jaxpr, "consts", None) or ())
    return inner, consts


def scan_counts(params: dict) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a scan equation.

    JAX 0.11 replaced the ``num_consts`` / ``num_carry`` params by ``ft_in``, a flat tree of the
    three input groups ``(consts, carry, xs)``.
    """
    if "num_consts" in params:
        return params["num_consts"], params["num_carry"]
    consts, carry, _ = params["ft_in"].elts
    return len(list(consts.vals)), len(list(carry.vals))


def cond_platforms(params: dict) -> tuple | None:
    """Per branch of a cond equation, the platforms it is lowered for (``None`` for the default
    branch), where ``lax.platform_dependent`` traced it; ``None`` for an ordinary cond. JAX 0.4.2x
    added ``branches_platforms``; a cond without it has no platform branches."""
    return params.get("branches_platforms")


def symbolic(shape: tuple) -> bool:
    """Whether ``shape`` has a symbolic size (``jax.export``'s shape polymorphism): one that only
    some comparisons decide."""
    return any(export.is_symbolic_dim(d) for d in shape)


def jit_shardings(params: dict) -> tuple[list, list]:
    """``(in_shardings, out_shardings)`` of a jit equation, ``None`` where it names no
    ``NamedSharding`` (``UnspecifiedValue``, ``AUTO``): the params' names are those of ``pjit_p``
    since JAX 0.4 and of ``jit_p`` (0.7+)."""
    named = lambda s: s if isinstance(s, jax.sharding.NamedSharding) else None
    return ([named(s) for s in params.get("in_shardings", ())], [named(s) for s in params.get("out_shardings", ())])


def inlined(params: dict) -> bool:
    """Whether a jit equation asks to be inlined (a bool before JAX 0.11, an ``Inline`` since)."""
    return params.get("inline", False) is True


def is_literal(atom: Any) -> bool:
    return isinstance(atom, Literal)


def literal_value(atom: Any) -> Any:
    return atom.val


def is_drop_var(var: Any) -> bool:
    # DropVar is a subclass of Var; its printed name is "_" in every supported version.
    return type(var).__name__ == "DropVar"


def abstractify(x: Any) -> jax.ShapeDtypeStruct:
    """ShapeDtypeStruct of a concrete array or a tracer, keeping weak types."""
    aval = jax.typeof(x)
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


# A mutable array (jax.new_ref and the public jax.Ref from JAX 0.7; jax.experimental.mutable_array's
# MutableArray, a class of jax._src.core only, before): an argument jax.jit traces, as an array.
if hasattr(jax, "Ref"):
    Ref: tuple = (jax.Ref,)
else:  # JAX 0.6: if jax._src.core moved, no Ref is told apart
    _SRC_CORE = getattr(getattr(jax, "_src", None), "core", None)
    Ref = tuple(getattr(_SRC_CORE, name) for name in ("Ref", "MutableArray") if hasattr(_SRC_CORE, name))


def is_ref(x: Any) -> bool:
    """Whether ``x`` is a jax Ref, concrete or traced (its type an ``AbstractRef``, which has an
    ``inner_aval``)."""
    return isinstance(x, Ref) or is_tracer(x) and hasattr(jax.typeof(x), "inner_aval")


def type_key(x: Any) -> tuple:
    """What a traced jaxpr depends on about an argument: shape, dtype, weak type and (inside
    ``shard_map``) the manual axes it varies over. ``x``: an array, a tracer or a ShapeDtypeStruct."""
    aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
    vma = () if isinstance(x, jax.ShapeDtypeStruct) else tuple(sorted(_vma(aval)))
    # on a mesh with Explicit axes the sharding is part of the type, and the trace bakes it in
    return (hasattr(aval, "inner_aval"), tuple(aval.shape), aval.dtype, getattr(aval, "weak_type", False), vma,
            _if_explicit(getattr(aval, "sharding", None)))  # a Ref (an AbstractRef) is not an array of its shape


# The opaque trace state moved to jax.extend.core (JAX 0.10 deprecates jax.core's); JAX 0.6 has
# only jax.core's.
_get_trace_state = (getattr(jax.extend.core, "get_opaque_trace_state", None)
                    or getattr(jax.core, "get_opaque_trace_state", None))


def trace_state() -> Any:
    """A token of the trace a call runs under (eager, a ``jit``, a ``vmap`` with its named axes, a
    ``pmap``): tokens compare equal only within one trace."""
    return _get_trace_state(convention="jlora")


def eager(state: Any = None) -> bool:
    """Whether code runs outside every trace (no ``jit``, ``vmap``, ``grad`` around it): the trace
    state (``state``, a ``trace_state()`` already read, or the current one) is a new thread's, which
    starts outside every trace (JAX has no public test of its own)."""
    return (trace_state() if state is None else state) == _TOP_LEVEL


def _top_level_state() -> Any:
    """The trace state outside every trace, read in a new thread: right even where jlora is first
    imported inside a traced function."""
    found: list = []
    reader = threading.Thread(target=lambda: found.append(trace_state()))
    reader.start()
    reader.join()
    return found[0]


_TOP_LEVEL = _top_level_state()


def replicated_on_set_mesh() -> Any:
    """A replicated ``NamedSharding`` on the (abstract) mesh ``jax.set_mesh`` set, or ``None``
    where none is set (``jax.sharding.get_abstract_mesh``: JAX 0.5+)."""
    get = getattr(jax.sharding, "get_abstract_mesh", None)
    mesh = None if get is None else get()
    if mesh is None or getattr(mesh, "empty", True):
        return None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def current_mesh() -> Any:
    """The mesh ``jax.set_mesh`` set (JAX 0.7+), or ``None``: before 0.7 there is none to set."""
    get_mesh = getattr(jax.sharding, "get_mesh", None)  # JAX 0.8+
    if get_mesh is not None:
        return get_mesh()
    try:  # JAX 0.7: jax.set_mesh sets it, and the getter is not public yet
        from jax._src.mesh import get_concrete_mesh
    except ImportError:
        return None
    mesh = get_concrete_mesh()
    return None if mesh is None or mesh.empty else mesh


def explicit_sharding(x: Any) -> Any:
    """``x``'s ``NamedSharding`` where its type carries one over a mesh with an ``Explicit`` axis
    (sharding in types: JAX 0.6+; ``jax.make_mesh``'s default from 0.10), else ``None``.

    Example:
        >>> explicit_sharding(jax.numpy.ones(3)) is None   # no mesh in the type
        True
    """
    return _if_explicit(getattr(jax.typeof(x), "sharding", None))


def spec_partitions(spec: Any) -> tuple:
    """A ``PartitionSpec``'s per-axis entries: ``.partitions`` where a spec also holds unreduced and
    reduced axes (and refuses to be iterated when it does, JAX 0.8+), else the spec itself."""
    partitions = getattr(spec, "partitions", None)
    return tuple(spec) if partitions is None else tuple(partitions)


def _if_explicit(sharding: Any) -> Any:
    axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", None) or ()
    return sharding if jax.sharding.AxisType.Explicit in axis_types else None


def _reshard_function() -> Any:
    # jax.sharding.reshard from JAX 0.7; jax.experimental.shard.reshard in 0.6.
    found = getattr(jax.sharding, "reshard", None)
    if found is None:
        from jax.experimental.shard import reshard as found
    return found


reshard = _reshard_function()


def _reshard_primitive() -> Any:
    """``reshard``'s primitive (not in ``jax.extend.core.primitives``), read off a trace on a
    one-device abstract mesh."""
    from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

    mesh = AbstractMesh((1,), ("i",), axis_types=(AxisType.Explicit,))
    x = jax.ShapeDtypeStruct((1,), jax.numpy.float32, sharding=NamedSharding(mesh, P()))
    return _traced_primitive(lambda x: reshard(x, NamedSharding(mesh, P("i"))), x)


reshard_p = _reshard_primitive()

def bernoulli(key: Any, p: float, shape: tuple, out_sharding: Any = None) -> Any:
    """``jax.random.bernoulli`` drawn in ``out_sharding`` (a ``NamedSharding`` or ``None``), each
    device drawing its own block. ``bernoulli`` takes ``out_sharding`` from JAX 0.8, ``uniform``
    (of which it is ``< p``) from 0.7; on 0.6 the whole array is drawn and resharded.

    Example:
        >>> bernoulli(jax.random.key(0), 0.9, (2, 3)).shape
        (2, 3)
    """
    p = np.float32(p)  # uniforms in float32 (a Python float is float64 with jax_enable_x64: twice the bits)
    if out_sharding is None:
        return jax.random.bernoulli(key, p, shape)
    if _BERNOULLI_OUT_SHARDING:
        return jax.random.bernoulli(key, p, shape, out_sharding=out_sharding)
    if _UNIFORM_OUT_SHARDING:  # JAX 0.7
        return jax.random.uniform(key, shape, out_sharding=out_sharding) < p
    return reshard(jax.random.bernoulli(key, p, shape), out_sharding)


_BERNOULLI_OUT_SHARDING = "out_sharding" in inspect.signature(jax.random.bernoulli).parameters
_UNIFORM_OUT_SHARDING = "out_sharding" in inspect.signature(jax.random.uniform).parameters

# A kernel gathered as "reduced" over mesh axes (FSDP on an Explicit mesh) passes the mark to its
# factors; JAX 0.8 lacks reduced rules for ops of the low-rank path (a scale, a broadcast), so
# there (until 0.10, where it was tested) such a kernel is materialised instead.
REDUCED_FACTORS = jax.__version_info__[:2] >= (0, 10)

def context_key() -> str:
    """The context an equation traced now records (see ``eqn_context``), as part of a trace's
    cache key: a jaxpr replays each equation in its own, so one traced under another context
    (``compute_on``, XLA metadata, a mesh) must not be reused."""
    if _EQN_CONTEXT is not None:  # JAX 0.10.1+ builds it from the configuration, as a new equation does
        return repr(_EQN_CONTEXT())
    eqn = jax.make_jaxpr(lambda x: -x)(_ONE).eqns[0]  # 1 ms
    return repr(getattr(eqn, "ctx", None))


_ONE = np.float32(1)


def _no_argument_eqn_context() -> Any:
    try:
        from jax._src.core import JaxprEqnContext

        JaxprEqnContext()
        return JaxprEqnContext
    except (ImportError, TypeError):  # before JAX 0.10.1 it takes the context's parts
        return None


_EQN_CONTEXT = _no_argument_eqn_context()


def trace_config() -> Any:
    """JAX's configuration that a trace depends on (x64, the default PRNG implementation, matmul
    precision, dtype and rank promotion, ...), as ``jax.jit`` keys its cache on it: JAX's own
    ``trace_context`` where there is one (every version from 0.6 to 0.11), else the public flags;
    and the default PRNG implementation, which ``jax.jit`` leaves out (a stale key type).

    Example:
        >>> with jax.default_matmul_precision("bfloat16"):
        ...     inside = trace_config()
        >>> inside != trace_config()
        True
    """
    try:
        from jax._src.config import trace_context
    except ImportError:
        trace_context = None
    prng = getattr(jax.config, "jax_default_prng_impl", None)  # not in trace_context: jax.jit keeps a stale trace
    if trace_context is not None:
        return trace_context(), prng
    return prng, *(getattr(jax.config, name, None) for name in (
        "jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_dtype_promotion", "jax_numpy_rank_promotion"))


def is_tracer(x: Any) -> bool:
    return isinstance(x, jax.core.Tracer)


def differentiated(x: Any) -> bool:
    """Whether ``x`` is being differentiated (``jax.grad``, ``jvp``, ``linearize``): a JVP or
    linearize tracer (its ``primal``) is in it, through ``vmap``'s (``val``), as JAX 0.5 to 0.11
    have them (see ``vmapped_by``)."""
    while isinstance(x, jax.core.Tracer):
        if hasattr(x, "primal"):
            return True
        x = getattr(x, "val", None) if hasattr(x, "batch_dim") else None
    return False


def over_arrays(x: Any, through_vmap: bool = True) -> bool:
    """Whether ``x`` is an array, or a tracer of ``grad`` or (``through_vmap``) ``vmap`` (JVP,
    linearize or batch tracers, read as ``differentiated`` reads them) over one: JAX evaluates it
    op by op, with no ``jit`` (or other) trace beneath.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> seen = []
        >>> _ = jax.grad(lambda x: seen.append(over_arrays(x)) or x)(1.0)
        >>> _ = jax.jit(jax.grad(lambda x: seen.append(over_arrays(x)) or x))(1.0)
        >>> seen
        [True, False]
    """
    while isinstance(x, jax.core.Tracer):
        if hasattr(x, "primal"):
            x = x.primal
        elif hasattr(x, "batch_dim") and through_vmap:
            x = getattr(x, "val", None)
        else:
            return False
    return True


def vmapped_by(x: Any) -> frozenset:
    """The ``jax.vmap`` traces that map ``x`` (ids), through the tracers of differentiation around
    it: two values batched alike have the same. JAX has no public test; a ``BatchTracer`` (its
    ``batch_dim``, ``val``) and a JVP or linearize tracer (its ``primal``) are read as JAX 0.5 to
    0.11 have them (stackless tracing, ``_trace``); any other tracer ends the walk."""
    found = set()
    while isinstance(x, jax.core.Tracer):
        if hasattr(x, "batch_dim"):
            dim = x.batch_dim
            if dim is not None and type(dim).__name__ != "NotMapped":
                found.add(id(getattr(x, "_trace", None)))
            x = getattr(x, "val", None)
        else:
            x = getattr(x, "primal", None)
    return frozenset(found)

