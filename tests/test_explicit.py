"""jlora on meshes with Explicit axes (sharding in types; 8 CPU devices: see conftest.py).

The oracle is the same function on the merged weights, on the same mesh.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora import _compat, explicit, sharding
from oracle import normal

pytestmark = [
    pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)"),
    pytest.mark.skipif(not hasattr(jax, "set_mesh") or not hasattr(jax.sharding, "AxisType"),
                       reason="Explicit mesh axes need a newer JAX"),
]


def _mesh(size=2):
    """A ``size`` x ``size`` mesh with Explicit axes ``data`` and ``model``."""
    return jax.make_mesh((size, size), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2,
                         devices=jax.devices()[:size * size])


def _place(mesh, lw, w_spec, layout="io"):
    """``lw`` with ``w`` on ``w_spec`` and its factors on the derived specs."""
    a_spec, b_spec = sharding.factor_specs(w_spec, layout)
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    return lw.replace(w=put(lw.w, w_spec), a=put(lw.a, a_spec), b=put(lw.b, b_spec))


def _with_b(params, key):
    """Nonzero ``b`` everywhere, so that the low-rank path counts."""
    def one(x):
        return x.replace(b=0.1 * normal(key, x.b.shape)) if isinstance(x, jlora.LoraWeight) else x
    return jax.tree.map(one, params, is_leaf=lambda x: isinstance(x, jlora.LoraWeight))


def _grads_and_oracle(fn, params, x, recompute):
    trainable, frozen = jlora.split(params)
    lazy = jlora.apply(fn, recompute=recompute)
    loss = lambda t, x: jnp.mean(lazy(jlora.combine(t, frozen), x) ** 2)
    oracle = lambda t, x: jnp.mean(fn(jlora.merge(jlora.combine(t, frozen)), x) ** 2)
    return jax.jit(jax.value_and_grad(loss))(trainable, x), jax.jit(jax.value_and_grad(oracle))(trainable, x), loss


def _assert_close(got, want):
    (loss, grads), (want_loss, want_grads) = got, want
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


# --- a Llama-style block: embedding, norm, gate/up/down ------------------------------------------

SPECS = {
    "dp": {},
    "tp": {"embed": P(None, "model"), "gate": P(None, "model"), "up": P(None, "model"), "down": P("model", None)},
    "fsdp": {"embed": P("model", None), "gate": P("model", None), "up": P("model", None), "down": P(None, "model")},
}


def _block(parallel):
    """The block as a user writes it on an Explicit mesh: the row-parallel matmul says its output
    sharding; FSDP gathers each kernel (``reshard``) before its use."""
    gather = (lambda w: jax.sharding.reshard(w, P())) if parallel == "fsdp" else (lambda w: w)

    def block(p, ids):
        x = gather(p["embed"]["embedding"]).at[ids].get(out_sharding=P("data", None, None))
        h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * p["norm"]["scale"]
        m = jax.nn.silu(h @ gather(p["gate"]["kernel"])) * (h @ gather(p["up"]["kernel"]))
        return jnp.matmul(m, gather(p["down"]["kernel"]), out_sharding=P("data", None, None))

    return block


def _block_params(mesh, parallel, dropout=0.0):
    k = jax.random.split(jax.random.key(0), 6)
    base = {"embed": {"embedding": normal(k[0], (16, 8))},
            "gate": {"kernel": normal(k[1], (8, 16)) / 3},
            "up": {"kernel": normal(k[2], (8, 16)) / 3},
            "down": {"kernel": normal(k[3], (16, 8)) / 4},
            "norm": {"scale": jnp.ones((8,))}}
    config = jlora.LoraConfig(rank=2, targets=["gate", "up", "down", "embed/embedding"], dropout=dropout)
    params = _with_b(jlora.lora_init(k[4], base, config), k[5])
    if mesh is None:
        return params
    specs = SPECS[parallel]
    place = lambda name, x: (_place(mesh, x, specs.get(name, P())) if isinstance(x, jlora.LoraWeight)
                             else jax.device_put(x, NamedSharding(mesh, P())))
    return {name: {leaf: place(name, x) for leaf, x in sub.items()} for name, sub in params.items()}


def _ids(mesh):
    ids = jax.random.randint(jax.random.key(9), (4, 4), 0, 16)
    return ids if mesh is None else jax.device_put(ids, NamedSharding(mesh, P("data", None)))


def test_fsdp_gathers_a_quantized_kernel_by_its_parts():
    """QLoRA under FSDP on an Explicit mesh: ``reshard`` of an int8 kernel before its use gathers
    its parts (int8 and scales), not a float copy, and the int8 matmul runs; the loss and the
    adapters' gradients equal the merged oracle's."""
    from quantized import INT8_DOTS, quantize

    mesh = _mesh()
    with jax.set_mesh(mesh):
        lw = _with_b(jlora.lora_init(jax.random.key(0), {"up": {"kernel": normal(jax.random.key(1), (8, 16)) / 3}},
                                     jlora.LoraConfig(rank=2, targets=["up"])), jax.random.key(2))["up"]["kernel"]
        lw = lw.replace(w=quantize(lw.w))
        a_spec, b_spec = sharding.factor_specs(P("model", None), "io")
        put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
        params = {"up": {"kernel": lw.replace(w=jax.tree.map(put, lw.w, lw.w.part_specs(P("model", None))),
                                              a=put(lw.a, a_spec), b=put(lw.b, b_spec))}}
        x = jax.device_put(normal(jax.random.key(3), (4, 8)), NamedSharding(mesh, P("data", None)))
        fn = lambda p, x: jnp.tanh(x @ jax.sharding.reshard(p["up"]["kernel"], P()))
        INT8_DOTS.clear()
        (loss, grads), (want_loss, want_grads), _ = _grads_and_oracle(fn, params, x, False)
    assert INT8_DOTS
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("recompute", [False, "inputs", True])
@pytest.mark.parametrize("parallel", ["dp", "tp", "fsdp"])
def test_a_train_step_equals_the_merged_oracle(parallel, recompute):
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params, ids = _block_params(mesh, parallel), _ids(mesh)
        got, want, loss = _grads_and_oracle(_block(parallel), params, ids, recompute)
        _assert_close(got, want)
        # the adapters' gradients are sharded as the adapters are
        for name in ("embed", "gate", "down"):
            lw, grad = params[name], got[1][name]
            lw, grad = (next(iter(d.values())) for d in (lw, grad))
            assert jax.typeof(grad.a).sharding.spec == jax.typeof(lw.a).sharding.spec, name
            assert jax.typeof(grad.b).sharding.spec == jax.typeof(lw.b).sharding.spec, name
        if recompute == "inputs":  # the fast paths ran: gate and up stacked with their weights (jlora.joint),
            # their inputs' down-projection shared, the adapters' inputs rebuilt (jlora.rebuild)
            forward = str(jax.make_jaxpr(loss)(jlora.split(params)[0], ids))
            assert forward.count("custom_vjp_call") == 4 and forward.count("concatenate") == 5


@pytest.mark.parametrize("parallel", ["dp", "tp"])
def test_dropout_draws_the_mask_of_one_device(parallel):
    key = jax.random.key(7)

    def loss(mesh, dropout):
        with jax.set_mesh(mesh):
            params, ids = _block_params(mesh, parallel, dropout), _ids(mesh)
            return jax.jit(lambda p, ids: jnp.mean(jlora.apply(_block(parallel))(p, ids, lora_rng=key) ** 2))(params, ids)

    one_device, sharded, without = loss(_mesh(1), 0.5), loss(_mesh(), 0.5), loss(_mesh(1), 0.0)
    np.testing.assert_allclose(sharded, one_device, rtol=1e-5)
    assert abs(float(one_device) - float(without)) > 1e-3  # the mask counted


@pytest.mark.parametrize("recompute", [False, "inputs"])
def test_each_device_draws_only_its_block_of_the_dropout_mask(recompute):
    """A mask drawn without a sharding has a replicated type: every device would draw all of it."""
    mesh, key = _mesh(), jax.random.key(7)
    with jax.set_mesh(mesh):
        x = jax.device_put(normal(jax.random.key(1), (64, 32, 128)), P("data", None, "model"))
        w = jax.device_put(normal(jax.random.key(2), (128, 96)), P("model", None))
        params = jlora.lora_init(jax.random.key(3), {"l": {"kernel": w}},
                                 jlora.LoraConfig(rank=4, targets=["l"], dropout=0.1))
        trainable, frozen = jlora.split(params)
        lazy = jlora.apply(lambda p, x: jnp.matmul(x, p["l"]["kernel"], out_sharding=P("data")), recompute=recompute)
        loss = lambda t, x: jnp.sum(lazy(jlora.combine(t, frozen), x, lora_rng=key) ** 2)
        hlo = jax.jit(jax.grad(loss)).lower(trainable, x).compile().as_text()
    random_bits = {tuple(map(int, s.split(","))) for s in re.findall(r"u32\[([\d,]+)\]", hlo)}
    assert (32, 32, 64) in random_bits  # a device's block of x: the mask is drawn
    assert not {b for b in random_bits if np.prod(b) > 32 * 32 * 64}, random_bits


# --- kernel kinds ---------------------------------------------------------------------------------

def _conv(p, x):
    return jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        out_sharding=P("data", None, None, "model"))


def _scan(p, x):
    body = lambda h, w: (jnp.tanh(jax.sharding.reshard(h @ w, P("data", None))), None)
    return jax.lax.scan(body, x, p["w"])[0]


# (function, kernel shape, its spec, layout, input shape, its spec)
KINDS = {
    "dense_general": (lambda p, x: jnp.einsum("bsd,dhk->bshk", x, p["w"]),
                      (8, 4, 6), P(None, "model", None), "ioo", (4, 3, 8), P("data", None, None)),
    "row_parallel_general": (lambda p, x: jnp.einsum("bshk,hkd->bsd", x, p["w"], out_sharding=P("data", None, None)),
                             (4, 6, 8), P("model", None, None), "iio", (4, 3, 4, 6), P("data", None, "model", None)),
    "scan_over_layers": (_scan, (3, 8, 8), P(None, None, "model"), "bio", (4, 8), P("data", None)),
    # rank 3 does not divide over the 2-way model axis that shards the conv's output features
    "conv": (_conv, (3, 3, 4, 6), P(None, None, None, "model"), "iiio", (4, 5, 5, 4), P("data", None, None, None)),
    "tied_embedding": (lambda p, x: x @ p["w"].T, (16, 8), P("model", None), "io", (4, 8), P("data", None)),
    "vmap": (lambda p, x: jax.vmap(lambda xi: xi @ p["w"])(x), (8, 6), P(None, "model"), "io", (4, 3, 8),
             P("data", None, None)),
}


@pytest.mark.parametrize("recompute", [False, "inputs"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_kernel_kinds_equal_the_merged_oracle(kind, recompute):
    fn, w_shape, w_spec, layout, x_shape, x_spec = KINDS[kind]
    k = jax.random.split(jax.random.key(1), 4)
    config = jlora.LoraConfig(rank=3, targets=["w"], layouts={"w": layout})
    params = _with_b(jlora.lora_init(k[0], {"w": normal(k[1], w_shape) / 3}, config), k[2])
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = {"w": _place(mesh, params["w"], w_spec, layout)}
        x = jax.device_put(normal(k[3], x_shape), NamedSharding(mesh, x_spec))
        got, want, _ = _grads_and_oracle(fn, params, x, recompute)
        _assert_close(got, want)


def test_weights_reading_one_input_but_sharded_differently_each_keep_their_own_down_projection():
    k = jax.random.split(jax.random.key(2), 4)
    params = _with_b(jlora.lora_init(k[0], {"q": normal(k[1], (8, 8)), "k": normal(k[2], (8, 8))},
                                     jlora.LoraConfig(rank=2, targets=["q", "k"])), k[3])
    fn = lambda p, x: (jnp.matmul(x, p["q"], out_sharding=P("data", None))
                       + jnp.matmul(x, p["k"], out_sharding=P("data", None)))
    mesh = _mesh()
    with jax.set_mesh(mesh):  # a_q whole, a_k split by rows: no one x @ [a_q | a_k]
        params = {"q": _place(mesh, params["q"], P(None, "model")), "k": _place(mesh, params["k"], P("model", None))}
        x = jax.device_put(normal(k[0], (4, 8)), NamedSharding(mesh, P("data", None)))
        got, want, _ = _grads_and_oracle(fn, params, x, "inputs")
        _assert_close(got, want)


def _adapter(mesh, shape, w_spec, layout="io", rank=2):
    k = jax.random.split(jax.random.key(3), 3)
    params = jlora.lora_init(k[0], {"w": normal(k[1], shape) / 3},
                             jlora.LoraConfig(rank=rank, targets=["w"], layouts={"w": layout}))
    return {"w": _place(mesh, _with_b(params, k[2])["w"], w_spec, layout)}


WAYS_TO_USE_A_KERNEL = {
    # FSDP's gather marking the kernel reduced over the data axis (JAX 0.10+): the factors are too
    "reduced_gather": (lambda p, x: x @ jax.sharding.reshard(p["w"], P(None, None, reduced={"data"})),
                       (8, 16), P("data", None), "io"),
    "device_put": (lambda p, x: x @ jax.device_put(p["w"], P(None, "model")), (8, 16), P("model", None), "io"),
    "reshape_with_out_sharding": (lambda p, x: x @ jnp.reshape(p["w"], (8, 24), out_sharding=P(None, "model")),
                                  (8, 4, 6), P(None, None, "model"), "ioo"),
}


@pytest.mark.parametrize("way", list(WAYS_TO_USE_A_KERNEL))
def test_ways_to_reshard_a_kernel_keep_it_factored(way):
    fn, shape, w_spec, layout = WAYS_TO_USE_A_KERNEL[way]
    if way == "reduced_gather" and not _compat.REDUCED_FACTORS:
        pytest.skip("reduced factors need JAX 0.10 (before, such a kernel is materialised)")
    if way == "device_put" and (0, 8, 2) <= jax.__version_info__ <= (0, 8, 3):
        pytest.skip("JAX 0.8.2-0.8.3: the gradient through device_put on an Explicit mesh fails, plain JAX alike")
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = _adapter(mesh, shape, w_spec, layout)
        x = jax.device_put(normal(jax.random.key(4), (4, 8)), NamedSharding(mesh, P("data", None)))
        got, want, _ = _grads_and_oracle(fn, params, x, "inputs")  # a fallback would raise (pyproject.toml)
        _assert_close(got, want)


def test_an_unreduced_output_falls_back_exactly_and_says_why():
    if not hasattr(P(), "unreduced"):
        pytest.skip("unreduced specs need JAX 0.10")

    def fn(p, x):  # a row-parallel matmul whose all-reduce is left for later
        y = jnp.matmul(x, p["w"], out_sharding=P("data", None, unreduced={"model"}))
        return jax.sharding.reshard(y, P("data", None))

    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = _adapter(mesh, (8, 16), P("model", None))
        x = jax.device_put(normal(jax.random.key(4), (4, 8)), NamedSharding(mesh, P("data", "model")))
        with pytest.warns(jlora.MaterializeWarning, match="left unreduced across devices"):
            got, want, _ = _grads_and_oracle(fn, params, x, "inputs")
        _assert_close(got, want)


def test_inputs_of_another_sharding_get_a_trace_of_their_own():
    # the sharding is part of an Explicit mesh's types, and a trace bakes it in (ones_like here)
    mesh = _mesh()
    fn = lambda p, x: (x + jnp.ones_like(x)) @ p["w"]
    with jax.set_mesh(mesh):
        params, wrapped = _adapter(mesh, (8, 16), P()), jlora.apply(fn)
        x = normal(jax.random.key(4), (4, 8))
        for spec in (P("data", None), P("model", None)):
            placed = jax.device_put(x, NamedSharding(mesh, spec))
            got, want = wrapped(params, placed), fn(jlora.merge(params), placed)
            assert jax.typeof(got).sharding.spec == jax.typeof(want).sharding.spec == P(spec[0], None)
            np.testing.assert_allclose(got, want, rtol=1e-5)


def test_merge_with_factors_sharded_along_the_rank():
    mesh = _mesh()
    with jax.set_mesh(mesh):  # placed by hand: factor_specs never shards the rank
        lw = _adapter(mesh, (8, 16), P(None, "model"), rank=4)["w"]
        put = lambda v, spec: jax.device_put(v, NamedSharding(mesh, spec))
        lw = lw.replace(a=put(lw.a, P(None, "model")), b=put(lw.b, P("model", None)))
        merged = jlora.merge({"w": lw})["w"]
        assert jax.typeof(merged).sharding.spec == P(None, "model")
        np.testing.assert_allclose(merged, np.asarray(lw.w) + lw.scale * np.asarray(lw.a) @ np.asarray(lw.b),
                                   rtol=1e-5, atol=1e-6)


# --- the rest of the library ------------------------------------------------------------------------

def test_init_optimizer_merge_and_unmerge():
    mesh = _mesh()
    base = {"up": {"kernel": jnp.ones((8, 16)) / 8}, "down": {"kernel": jnp.ones((16, 8)) / 16}}
    rules = [("up/kernel", P(None, "model")), ("down/kernel", P("model", None))]
    config = jlora.LoraConfig(rank=4, targets=["up", "down"])
    with jax.set_mesh(mesh):
        params = jlora.lora_init(jax.random.key(0), sharding.place(base, mesh, rules), config)
        assert jax.typeof(params["up"]["kernel"].b).sharding.spec == P(None, "model")
        assert jax.typeof(params["down"]["kernel"].a).sharding.spec == P("model", None)
        trainable, frozen = jlora.split(params)
        tx = jlora.optimizer(optax.adamw(1e-2), trainable, b_lr_ratio=4.0)
        state = sharding.init_state(tx, trainable, mesh, rules)
        x = jax.device_put(jnp.ones((4, 8)), NamedSharding(mesh, P("data", None)))
        fn = lambda p, x: jnp.matmul(jnp.tanh(x @ p["up"]["kernel"]), p["down"]["kernel"], out_sharding=P("data", None))

        @jax.jit
        def step(trainable, state):
            loss = lambda t: jnp.mean(jlora.apply(fn)(jlora.combine(t, frozen), x) ** 2)
            value, grads = jax.value_and_grad(loss)(trainable)
            updates, state = tx.update(grads, state, trainable)
            return optax.apply_updates(trainable, updates), state, value

        losses = []
        for _ in range(3):
            trainable, state, value = step(trainable, state)
            losses.append(float(value))
        assert losses[2] < losses[0]
        params = jlora.combine(trainable, frozen)
        merged = jlora.merge(params)
        assert jax.typeof(merged["down"]["kernel"]).sharding.spec == P("model", None)
        np.testing.assert_allclose(jax.jit(fn)(merged, x), jax.jit(jlora.apply(fn))(params, x), rtol=1e-5)
        restored = jlora.unmerge(merged, params)["down"]["kernel"].w
        np.testing.assert_allclose(restored, base["down"]["kernel"], atol=1e-6)


def test_lora_init_under_jit_shards_the_factors_as_the_kernels_types_say():
    """Under ``jax.jit`` on a mesh with Explicit axes the kernels' types carry their sharding: the
    factors take the derived shardings there too, as outside jit (they came out replicated)."""
    mesh = _mesh()
    base = {"up": {"kernel": jnp.ones((8, 16)) / 8}, "stack": {"kernel": jnp.ones((2, 16, 8)) / 16}}
    rules = [("up/kernel", P("data", "model")), ("stack/kernel", P("data", "model", None))]
    config = jlora.LoraConfig(rank=4, targets=["up", "stack"], layouts={"stack": "bio"})
    with jax.set_mesh(mesh):
        placed = sharding.place(base, mesh, rules)
        eager = jlora.lora_init(jax.random.key(0), placed, config)
        jitted = jax.jit(lambda p: jlora.lora_init(jax.random.key(0), p, config))(placed)
    for name, (a_spec, b_spec) in {"up": (P("data", None), P(None, "model")),
                                   "stack": (P("data", "model", None), P("data", None, None))}.items():
        for lw in (eager[name]["kernel"], jitted[name]["kernel"]):
            assert (lw.a.sharding.spec, lw.b.sharding.spec) == (a_spec, b_spec), name
        np.testing.assert_array_equal(jitted[name]["kernel"].a, eager[name]["kernel"].a)


def test_a_checkpoint_restores_onto_the_abstract_base_of_the_mesh_set(tmp_path):
    """``jax.eval_shape`` under ``jax.set_mesh`` gives shardings on an abstract mesh: the adapters
    restore onto the mesh set (they went to device 0, and the first step failed)."""
    from jlora.checkpoint import AdapterCheckpointer

    mesh = _mesh()
    config = jlora.LoraConfig(rank=4, targets=["up"])
    saved = jlora.lora_init(jax.random.key(0), {"up": {"kernel": jnp.ones((8, 16))}}, config)
    AdapterCheckpointer(tmp_path / "ckpt", async_save=False).save(1, saved)
    make = lambda: {"up": {"kernel": jax.sharding.reshard(jnp.ones((8, 16)), P(None, "model"))}}
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(make)
        restored, _, _ = AdapterCheckpointer(tmp_path / "ckpt").restore(abstract)
        b = restored["up"]["kernel"].b
        assert b.sharding.mesh == mesh and b.sharding.spec == P(None, "model")
        np.testing.assert_array_equal(b, saved["up"]["kernel"].b)
    with pytest.raises(ValueError, match="the base's shardings are on an abstract mesh .* restore inside "
                                         "`with jax.set_mesh"):
        AdapterCheckpointer(tmp_path / "ckpt").restore(abstract)  # no mesh set


# --- errors -----------------------------------------------------------------------------------------

def test_a_sharding_error_in_jloras_own_ops_names_the_mesh_mode(monkeypatch):
    # as if jlora left x @ a's output sharding out: JAX's type error, reported as jlora's
    monkeypatch.setattr(explicit, "fit_factor", lambda x, x_labels, y, y_labels: (y, None, None))
    mesh = _mesh()
    with jax.set_mesh(mesh):
        params = {"w": _place(mesh, _with_b(jlora.lora_init(jax.random.key(0), {"w": jnp.ones((4, 6))},
                                                            jlora.LoraConfig(rank=2, targets=["w"])),
                                            jax.random.key(1))["w"], P("model", None))}
        x = jax.device_put(jnp.ones((8, 4)), NamedSharding(mesh, P(None, "model")))
        fn = lambda p, x: jnp.matmul(x, p["w"], out_sharding=P())
        with pytest.raises(ValueError, match=r"could not shard the low-rank path on this mesh's Explicit axes: "
                                             r".*Contracting dimensions.*jlora.sharding.make_mesh"):
            jax.jit(jlora.apply(fn))(params, x)


def test_a_sharding_error_of_the_functions_own_code_is_left_as_it_is():
    @jax.custom_vjp
    def user_op(h):
        return h

    def fwd(h):  # runs only when differentiated: the user's own sharding conflict, no LoRA value in it
        bad = jnp.ones((4, 4), out_sharding=P("model", None)) @ jnp.ones((4, 4), out_sharding=P(None, "model"))
        return h + bad.sum(), None

    user_op.defvjp(fwd, lambda _, g: (g,))
    with jax.set_mesh(_mesh()):
        trainable, frozen = jlora.split({"w": jlora.LoraWeight(jnp.ones((4, 6)), jnp.ones((4, 2)), jnp.ones((2, 6)),
                                                               scale=0.5, path="w")})
        loss = lambda t: jlora.apply(lambda p, x: user_op(x @ p["w"]))(jlora.combine(t, frozen), jnp.ones((8, 4))).sum()
        with pytest.raises(Exception, match="illegally sharded") as raised:
            jax.grad(loss)(trainable)
        assert not isinstance(raised.value, ValueError)  # JAX's own error, not jlora's
