"""Structural rules (``jlora.structural``): kernels moved, cut, joined or picked stay lazy; the
factored results equal the materialised oracle, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax
from jax.ad_checkpoint import checkpoint_name

import jlora
from jlora import _compat
from oracle import check_against_oracle, normal, oracle_merge, perturb, random_lora
from quantized import quantize


def test_flipped_kernel_stays_factored():
    lw = random_lora(jax.random.key(0), (3, 3, 2, 4), "iiio", 2)
    x = normal(jax.random.key(1), (1, 5, 5, 2))
    fn = lambda p, x: lax.conv_general_dilated(x, lax.rev(p["w"], (0, 1, 3)), (1, 1), "SAME",
                                               dimension_numbers=("NHWC", "HWIO", "NHWC"))
    check_against_oracle(fn, {"w": lw}, x)


def test_structural_rules_keep_lazy():
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    x = normal(jax.random.key(1), (3, 2, 3))

    def fn(p, x):  # (4, 6) -> T (6, 4) -> reshape (2, 3, 4) -> contract (2, 3)
        w = p["w"].astype(jnp.float32).T.reshape(2, 3, 4)
        return jnp.einsum("nij,ijk->nk", x, w)

    check_against_oracle(fn, {"w": lw}, x)


@pytest.mark.parametrize("use", [
    lambda w, c: w * c,  # StyleGAN's equalized learning rate, a muP multiplier
    lambda w, c: c * w,
    lambda w, c: w / c,
    lambda w, c: -w,
    lambda w, c: lax.stop_gradient(w) * c,  # a target network's or teacher's pass
], ids=["w*c", "c*w", "w/c", "-w", "stop_gradient"])
def test_a_kernel_scaled_negated_or_detached_stays_factored(use):
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    fn = lambda p, x, c: x @ use(p["w"], c)
    check_against_oracle(fn, {"w": lw}, normal(jax.random.key(1), (3, 4)), jnp.float32(0.7))  # c traced too


PER_CHANNEL = {  # (kernel shape, layout, the scale's shape, how the kernel meets the input)
    "output channels": ((4, 6), "io", (1, 6), lambda x, w: x @ w),
    "input channels": ((4, 6), "io", (4, 1), lambda x, w: x @ w),
    "a torch-ordered kernel's outputs": ((6, 4), "oi", (6, 1), lambda x, w: x @ w.T),
    "DenseGeneral's heads and head_dim": ((4, 2, 3), "ioo", (1, 2, 3), lambda x, w: jnp.einsum("ti,ihk->thk", x, w)),
    "each layer of a stack, and its outputs": ((2, 4, 6), "bio", (2, 1, 6), lambda x, w: jnp.einsum("ti,lio->lto", x, w)),
    "each layer of a stack": ((2, 4, 6), "bio", (2, 1, 1), lambda x, w: jnp.einsum("ti,lio->lto", x, w)),
}


@pytest.mark.parametrize("name", list(PER_CHANNEL))
@pytest.mark.parametrize("op", ["w*s", "s*w", "w/s", "w*broadcast_to(s)"])
def test_a_kernel_scaled_per_channel_stays_factored(name, op):
    """A quantized kernel's dequantisation, ``w * s[None, :]``: the scale goes on the factor that
    holds its axes, ``w·C + scale·a@(b·c)``; JAX's own size-1 broadcast, and a spread one."""
    shape, layout, scale_shape, use = PER_CHANNEL[name]
    lw = random_lora(jax.random.key(0), shape, layout, 2)
    scale = 0.5 + jnp.abs(normal(jax.random.key(1), scale_shape))
    times = {"w*s": lambda w, s: w * s, "s*w": lambda w, s: s * w, "w/s": lambda w, s: w / s,
             "w*broadcast_to(s)": lambda w, s: w * jnp.broadcast_to(s, w.shape)}[op]
    fn = lambda p, x, s: use(x, times(p["w"], s))
    check_against_oracle(fn, {"w": lw}, normal(jax.random.key(2), (3, shape[layout.index("i")])), scale)


def test_a_learned_per_channel_gain_gets_its_gradient_from_both_terms():
    """A gain trained with the adapter (a magnitude vector): ``w·C`` and ``b·c`` both carry it."""
    params = {"w": random_lora(jax.random.key(0), (4, 6), "io", 2),
              "gain": jlora.Trainable(0.5 + jnp.abs(normal(jax.random.key(1), (6,))))}
    check_against_oracle(lambda p, x: jnp.tanh(x @ (p["w"] * p["gain"])), params, normal(jax.random.key(2), (3, 4)))


def test_an_8_bit_float_scale_stays_factored():
    """fp8 times fp8 (JAX promotes no fp8 implicitly): the scale is cast to the factor's dtype."""
    lw = random_lora(jax.random.key(0), (5, 4), "io", 2)
    lw = lw.replace(w=lw.w.astype(jnp.float8_e4m3fn))
    scale = jnp.array([2.0, 1.0, 4.0, 1.0], jnp.float8_e4m3fn)  # exact in fp8, as is their product with w
    x = normal(jax.random.key(1), (2, 5))
    for times in (lambda w, s: w * s[None, :], lambda w, s: w * s[0]):
        fn = lambda p, s, x: x @ times(p["w"], s).astype(jnp.float32)
        whole = lw.w.astype(jnp.float32) + lw.scale * lw.a @ lw.b  # in f32: the path keeps the update unrounded
        np.testing.assert_allclose(jlora.apply(fn)({"w": lw}, scale, x), x @ times(whole, scale.astype(jnp.float32)),
                                   rtol=1e-5, atol=1e-5)


def test_a_complex_scale_of_complex_factors_stays_factored():
    lw = random_lora(jax.random.key(0), (5, 4), "io", 2)
    lw = lw.replace(w=lw.w.astype(jnp.complex64) * (1 + 1j), a=lw.a.astype(jnp.complex64), b=lw.b.astype(jnp.complex64) * 1j)
    x = normal(jax.random.key(1), (2, 5)).astype(jnp.complex64)
    fn = lambda p, s, x: x @ (p["w"] * s)
    scale = (jnp.arange(1, 5) * (1 + 2j)).astype(jnp.complex64)
    np.testing.assert_allclose(jlora.apply(fn)({"w": lw}, scale, x), fn(oracle_merge({"w": lw}), scale, x), rtol=1e-5, atol=1e-5)


def test_a_complex_scale_of_real_factors_is_exact():
    """A complex per-channel or scalar scale of a complex kernel with real factors: made whole, as
    the factors cannot hold it."""
    lw = random_lora(jax.random.key(0), (5, 4), "io", 2)
    lw = lw.replace(w=lw.w.astype(jnp.complex64) * (1 + 1j))
    x = normal(jax.random.key(1), (2, 5)).astype(jnp.complex64)
    for scale in (jnp.arange(1, 5) * (1 + 2j), jnp.complex64(1 + 2j)):
        fn = lambda p, s, x: x @ (p["w"] * s)
        jlora.lazy.reset_warnings()  # each is said
        with pytest.warns(jlora.MaterializeWarning, match="'w' materialised at 'mul'"):
            got = jlora.apply(fn)({"w": lw}, scale.astype(jnp.complex64), x)
        np.testing.assert_allclose(got, fn(oracle_merge({"w": lw}), scale.astype(jnp.complex64), x), rtol=1e-5, atol=1e-5)


def test_a_kernel_scaled_along_inputs_and_outputs_falls_back():
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    scale = jnp.arange(1.0, 25.0).reshape(4, 6)
    with pytest.warns(jlora.MaterializeWarning, match="'w' materialised at 'mul'"):
        check_against_oracle(lambda p, x: x @ (p["w"] * jnp.broadcast_to(scale[:, :1] * scale[:1], (4, 6))),
                             {"w": lw}, jnp.ones((2, 4)))
    with pytest.warns(jlora.MaterializeWarning, match="'w' materialised at 'div'"):  # s / w has no factored form
        check_against_oracle(lambda p, x: x @ (scale[:1] / p["w"]), {"w": lw}, jnp.ones((2, 4)))


def test_a_kernel_times_an_array_falls_back():
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    fn = lambda p, x: x @ (p["w"] * (jnp.arange(24.0).reshape(4, 6) > 5))  # a pruning mask: no factored form
    with pytest.warns(jlora.MaterializeWarning, match="'w' materialised at 'mul'"):
        check_against_oracle(fn, {"w": lw}, jnp.ones((2, 4)))


def test_reshape_across_roles_falls_back():
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    fn = lambda p, x: x @ p["w"].reshape(6, 4)
    with pytest.warns(jlora.MaterializeWarning, match="reshape"):
        check_against_oracle(fn, {"w": lw}, jnp.ones((2, 6)))


SIZE_1_RESHAPES = {
    "one KV head (MQA)": lambda p, x: jnp.einsum("td,dhk->thk", x, p["w"].reshape(6, 1, 4)),
    "a trailing 1": lambda p, x: jnp.einsum("td,dko->tko", x, p["w"].reshape(6, 4, 1)),
    "inputs split beside a 1": lambda p, x: jnp.einsum("tab,abhk->thk", x.reshape(3, 3, 2), p["w"].reshape(3, 2, 1, 4)),
    "added, then removed": lambda p, x: x @ p["w"].reshape(6, 1, 4).reshape(6, 4),
    "a stack of one layer, flattened": lambda p, x: x @ p["stack"].reshape(6, 4),
}


@pytest.mark.parametrize("name", list(SIZE_1_RESHAPES))
def test_a_reshape_through_size_1_axes_stays_factored(name):
    """A size-1 axis removed leaves its role; one added is a batch axis of size 1."""
    params = {"w": random_lora(jax.random.key(0), (6, 4), "io", 2),
              "stack": random_lora(jax.random.key(1), (1, 6, 4), "bio", 2)}
    check_against_oracle(SIZE_1_RESHAPES[name], params, normal(jax.random.key(2), (3, 6)))  # no MaterializeWarning


def test_a_stack_given_a_size_1_axis_still_scans_factored():
    """The size-1 axis added to a stack (one KV head per layer) is a batch axis after the stack's
    own: the scan still takes the layers off axis 0 without materialising them."""
    params = {"stack": random_lora(jax.random.key(0), (3, 6, 4), "bio", 2)}

    def fn(p, x):
        def layer(total, w):
            return total + jnp.einsum("td,dhk->thk", x, w), None
        return lax.scan(layer, jnp.zeros((x.shape[0], 1, 4)), p["stack"].reshape(3, 6, 1, 4))[0]

    check_against_oracle(fn, params, normal(jax.random.key(1), (5, 6)))  # no MaterializeWarning


def test_a_complex_weight_cast_to_a_real_dtype_is_exact():
    """Re(w + s·a@b) needs Im(a)@Im(b): the factors cannot simply be cast, so the weight is materialised."""
    k = jax.random.split(jax.random.key(0), 7)
    cplx = lambda k1, k2, s: (normal(k1, s) + 1j * normal(k2, s)).astype(jnp.complex64)
    lw = jlora.LoraWeight(cplx(k[0], k[1], (4, 3)), cplx(k[2], k[3], (4, 2)), cplx(k[4], k[5], (2, 3)), scale=0.5,
                          path="w")
    x = normal(k[6], (5, 4))
    fn = lambda p, x: x @ lax.convert_element_type(p["w"], jnp.float32)
    with pytest.warns(jlora.MaterializeWarning, match="'w' materialised at 'convert_element_type'"):
        got = jlora.apply(fn)({"w": lw}, x)
    np.testing.assert_allclose(got, x @ (lw.w + 0.5 * lw.a @ lw.b).real, rtol=1e-5, atol=1e-5)


def test_device_put_of_a_tree_inside_the_function_keeps_its_adapters_factored():
    base = {"w": jnp.ones((4, 3)), "v": jnp.ones((3, 2)), "bias": jnp.ones(2)}
    params = jlora.lora_init(jax.random.key(0), base, jlora.LoraConfig(rank=2, targets=["w", "v"]))
    params["w"] = params["w"].replace(b=jnp.ones_like(params["w"].b))
    fn = lambda p, x: (lambda q: jnp.tanh(x @ q["w"]) @ q["v"] + q["bias"])(jax.device_put(p))
    x = jnp.arange(8.0).reshape(2, 4)
    # no MaterializeWarning (an error in this suite): the factors went through device_put as they are
    np.testing.assert_allclose(jax.jit(jlora.apply(fn))(params, x), fn(jlora.merge(params), x), rtol=1e-6)


@pytest.mark.parametrize("name, shape, layout, fn", [
    ("rows", (8, 9), "io", lambda p, x, i: x[:, :4] @ p["w"][2:6]),
    # (lax.slice itself: JAX 0.6 traces a strided index as a gather)
    ("strided columns", (8, 9), "io", lambda p, x, i: x @ lax.slice(p["w"], (0, 1), (8, 6), (1, 2))),
    ("one part of a fused kernel", (8, 9), "io", lambda p, x, i: x @ lax.dynamic_slice_in_dim(p["w"], 3, 3, axis=1)),
    ("a block", (8, 9), "io", lambda p, x, i: x[:, :4] @ p["w"][2:6, 1:8]),
    ("rows of an (out, in) kernel", (9, 8), "oi", lambda p, x, i: x @ p["w"][1:7].T),
    # a traced start, clamped where the slice would run past the end
    ("a layer of a stack, then its columns", (3, 8, 9), "bio",
     lambda p, x, i: x @ lax.dynamic_slice(p["w"], (i, 0, 5), (1, 8, 4))[0]),
])
@pytest.mark.parametrize("layer", [1, 2])
def test_slices_of_a_kernel_slice_its_factors(name, shape, layout, fn, layer):
    params = jlora.lora_init(jax.random.key(0), {"w": normal(jax.random.key(1), shape)},
                             jlora.LoraConfig(rank=3, targets=["w"], layouts={"w": layout}))
    params["w"] = params["w"].replace(b=normal(jax.random.key(2), params["w"].b.shape))
    # no MaterializeWarning (an error in this suite): w[rows] = w0[rows] + s·a[rows]@b, and so on
    check_against_oracle(fn, params, normal(jax.random.key(3), (5, 8)), jnp.int32(layer))


PADDED_OR_FENCED = {
    "rows padded": ((6, 5), "io", lambda p, x: x @ jnp.pad(p["w"], ((1, 3), (0, 0)), constant_values=0.5)),
    # interior padding on the input axis, a column cropped (negative padding) and one added before
    "interleaved and cropped": ((6, 5), "io", lambda p, x: x @ lax.pad(p["w"], 0.3, ((0, -1, 1), (2, -1, 0)))),
    "a stack padded on every axis": ((3, 6, 5), "bio", lambda p, x: jnp.einsum(
        "ti,lio->lto", x[:, :8], jnp.pad(p["w"], ((1, 1), (0, 2), (0, 2))))),
    "behind an optimization barrier": ((6, 5), "io", lambda p, x: x[:, :6] @ lax.optimization_barrier((p["w"], x))[0]),
    "named for a remat policy": ((6, 5), "io", jax.checkpoint(
        lambda p, x: jnp.tanh(x[:, :6] @ checkpoint_name(p["w"], "kernel")),
        policy=jax.checkpoint_policies.save_only_these_names("kernel"))),
}


@pytest.mark.parametrize("name", list(PADDED_OR_FENCED))
def test_a_kernel_padded_fenced_or_named_stays_factored(name):
    shape, layout, fn = PADDED_OR_FENCED[name]
    # no MaterializeWarning (an error in this suite): the factors padded with zeros, or fenced too
    check_against_oracle(fn, {"w": random_lora(jax.random.key(0), shape, layout, 2)}, normal(jax.random.key(1), (3, 10)))


ONE_ROW_OR_COLUMN = {
    "a row by a traced index (eqx.nn.Embedding's per-token call)": lambda p, x, i: jnp.tanh(p["w"][i]) * x,
    "a row by a Python int": lambda p, x, i: p["w"][3] * x,
    "rows in a decoding loop": lambda p, x, i: lax.scan(lambda h, t: (h + p["w"][t], None), x, jnp.stack([i, 4, i]))[0],
    "a column by a traced index": lambda p, x, i: (jnp.arange(8.0) @ p["w"][:, i]) * x,
}


@pytest.mark.parametrize("name", list(ONE_ROW_OR_COLUMN))
def test_one_row_or_column_of_a_kernel_is_made_whole_without_a_warning(name):
    # w[i] = w0[i] + s·a[i]@b costs no more than its (9,) result: no fast path is lost, so no
    # MaterializeWarning (an error in this suite)
    params = {"w": random_lora(jax.random.key(0), (8, 9), "io", 3)}
    check_against_oracle(ONE_ROW_OR_COLUMN[name], params, normal(jax.random.key(1), (9,)), jnp.int32(2))


@pytest.mark.parametrize("shape, layout", [((8, 1), "io"), ((1, 8), "io"), ((8, 1, 1), "ioo")])
def test_a_kernel_of_one_column_or_row_reshaped_to_a_vector_is_made_whole_without_a_warning(shape, layout):
    """A value head's (d, 1) kernel as a (d,) vector, as h[:, 0] would give it; under dropout
    (not a lookup: a (1, d) kernel's input is a feature) it says the dropout is lost."""
    params = {"w": random_lora(jax.random.key(0), shape, layout, 1)}
    fn = lambda p, x: x @ p["w"].reshape(8)
    check_against_oracle(fn, params, normal(jax.random.key(1), (3, 8)))
    with pytest.warns(jlora.MaterializeWarning, match="'w' materialised at 'reshape'.*NOT applied"):
        jlora.apply(fn)({"w": params["w"].replace(dropout=0.5)}, jnp.ones((3, 8)), lora_rng=jax.random.key(2))


def test_a_row_is_not_dropped_and_a_columns_matmul_says_its_dropout_is_lost():
    params = {"w": random_lora(jax.random.key(0), (8, 9), "io", 3).replace(dropout=0.5)}
    x, merged = normal(jax.random.key(1), (9,)), oracle_merge(params)
    row = ONE_ROW_OR_COLUMN["a row by a traced index (eqx.nn.Embedding's per-token call)"]
    # an embedding lookup, as gather's: no dropout (as PEFT's Embedding), no warning
    got = jlora.apply(row)(params, x, jnp.int32(2), lora_rng=jax.random.key(2))
    np.testing.assert_allclose(got, row(merged, x, 2), rtol=1e-6)
    column = ONE_ROW_OR_COLUMN["a column by a traced index"]
    with pytest.warns(jlora.MaterializeWarning, match="'w' materialised at 'squeeze'.*NOT applied"):
        got = jlora.apply(column)(params, x, jnp.int32(2), lora_rng=jax.random.key(2))
    np.testing.assert_allclose(got, column(merged, x, 2), rtol=1e-5)


JOINED = {
    "side by side, a plain kernel between": lambda p, x: x @ jnp.concatenate([p["q"], p["plain"], p["k"]], axis=1),
    "one above the other": lambda p, x: jnp.concatenate([x, x[:, :6]], 1) @ jnp.concatenate([p["q"], p["short"]], 0),
    "stacked, then each layer's output": lambda p, x: jnp.einsum("ti,lio->lto", x, jnp.stack([p["q"], p["k"]])),
    "stacked, then scanned": lambda p, x: lax.scan(lambda h, w: (jnp.tanh(h @ w[:, :8]), h @ w), x,
                                                   jnp.stack([p["q"], p["k"], p["q"]]))[1],
    "stacks joined": lambda p, x: jnp.einsum("ti,lio->lto", x, jnp.concatenate(
        [jnp.stack([p["q"]]), jnp.stack([p["k"], p["q"]])], axis=0)),
    "split in parts": lambda p, x: jnp.concatenate([jnp.sin(x @ w) for w in jnp.split(p["q"], [4, 12], axis=1)], 1),
    "a stack unstacked": lambda p, x: sum(jnp.sin(x @ w) for w in jnp.unstack(jnp.stack([p["q"], p["k"]]))),
    "one layer of a stack": lambda p, x: x @ jnp.expand_dims(p["q"], 0)[0],
    "broadcast over a batch": lambda p, x: jnp.matmul(jnp.stack([x, 2 * x]), jnp.broadcast_to(p["q"], (2, 8, 16))),
    "w[None] grown over a batch": lambda p, x: jnp.einsum("ti,lio->lto", x, jnp.broadcast_to(p["q"][None], (3, 8, 16))),
    "w[None] tiled over a batch": lambda p, x: jnp.einsum("ti,lio->lto", x, jnp.tile(p["q"][None], (3, 1, 1))),
    "columns tiled": lambda p, x: x @ jnp.tile(p["k"], (1, 2)),
    "rows tiled": lambda p, x: jnp.concatenate([x, -x], 1) @ jnp.tile(p["q"], (2, 1)),
}


@pytest.mark.parametrize("name", list(JOINED))
def test_kernels_joined_or_split_stay_factored(name):
    if "tiled" in name and _compat.tile_p is None:
        pytest.skip("JAX before 0.9 traces jnp.tile to reshapes through size-1 axes: an exact fallback")
    # ranks 2 and 3 and scales 0.7 and 2.0: joined along an input or output axis the adapters take
    # their own blocks of a rank-5 factor; along a batch axis the rank-2 one is padded to 3
    params = {"q": random_lora(jax.random.key(0), (8, 16), "io", 2),
              "k": random_lora(jax.random.key(1), (8, 16), "io", 3, scale=2.0),
              "short": random_lora(jax.random.key(2), (6, 16), "io", 2),
              "plain": normal(jax.random.key(3), (8, 4))}
    # no MaterializeWarning (an error in this suite)
    check_against_oracle(JOINED[name], params, normal(jax.random.key(4), (5, 8)))


def test_linen_lstm_cell_joining_its_gate_kernels_stays_factored():
    import flax.linen as nn

    cell = nn.OptimizedLSTMCell(16)
    x = normal(jax.random.key(0), (3, 8))
    carry = cell.initialize_carry(jax.random.key(1), x.shape)
    params = jlora.lora_init(jax.random.key(2), cell.init(jax.random.key(3), carry, x),
                             jlora.LoraConfig(rank=2, targets="all-linear"))
    params = perturb(params, jax.random.key(4))
    assert sum(isinstance(v, jlora.LoraWeight) for v in jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, jlora.LoraWeight))) == 8
    check_against_oracle(lambda p, c, x: cell.apply(p, c, x), params, carry, x)


def test_one_kernel_joined_with_itself_and_with_a_quantized_kernel():
    q = random_lora(jax.random.key(0), (8, 16), "io", 2)
    x = normal(jax.random.key(2), (5, 8))
    # each copy in its own block of the rank
    check_against_oracle(lambda p, x: jnp.concatenate([x] * 4, 1) @ jnp.concatenate([p["q"]] * 4, 0), {"q": q}, x)
    int8 = quantize(normal(jax.random.key(1), (8, 16)))
    fn = lambda p, x: jnp.einsum("ti,lio->lto", x, jnp.stack([p["q"], p["int8"]]))
    # another lazy kind: merged, exactly (JAX 0.6 stacks by broadcast_in_dim, then concatenate)
    with pytest.warns(jlora.MaterializeWarning, match="materialised at '(stack|broadcast_in_dim)'"):
        got = jlora.apply(fn)({"q": q, "int8": int8}, x)
    np.testing.assert_allclose(got, fn({**oracle_merge({"q": q}), "int8": int8.materialize()}, x), rtol=1e-5, atol=1e-5)


def test_kernels_of_different_dropout_joined_fall_back_exactly():
    params = {"q": random_lora(jax.random.key(0), (8, 16), "io", 2).replace(dropout=0.5),
              "k": random_lora(jax.random.key(1), (8, 16), "io", 3)}
    fn = lambda p, x: x @ jnp.concatenate([p["q"], p["k"]], axis=1)
    x = normal(jax.random.key(4), (5, 8))
    check_against_oracle(fn, params, x)  # no key, no dropout: joined and factored
    with pytest.warns(jlora.MaterializeWarning, match="'w'.*'concatenate'.*NOT applied"):
        dropped = jlora.apply(fn)(params, x, lora_rng=jax.random.key(5))
    np.testing.assert_allclose(dropped, fn(oracle_merge(params), x), rtol=1e-5, atol=1e-5)


EXPERT_IDS = jnp.array([0, 3, 1, 1, 2, 0])
PICKED = {
    "W[ids], then a matmul per token": ((4, 16, 8), "bio", lambda p, x: jnp.einsum("td,tdf->tf", x, p["w"][EXPERT_IDS])),
    "jnp.take": ((4, 16, 8), "bio", lambda p, x: jnp.einsum("td,tdf->tf", x, jnp.take(p["w"], EXPERT_IDS, axis=0))),
    "two experts per token": ((4, 16, 8), "bio", lambda p, x: jnp.einsum(
        "nkd,nkdf->nkf", x.reshape(3, 2, 16), p["w"][EXPERT_IDS.reshape(3, 2)])),
    "W[i] under vmap": ((4, 16, 8), "bio", lambda p, x: jax.vmap(lambda xi, i: xi @ p["w"][i])(x, EXPERT_IDS)),
    "an (out, in) stack": ((4, 8, 16), "boi", lambda p, x: jnp.einsum("td,tfd->tf", x, p["w"][EXPERT_IDS])),
    # out of range: the fill alone (2.0 everywhere in the picked matrix), nothing of a and b
    "an index out of range, filled": ((4, 16, 8), "bio", lambda p, x: jnp.einsum(
        "td,tdf->tf", x, p["w"].at[EXPERT_IDS.at[2].set(7).at[4].set(-9)].get(mode="fill", fill_value=2.0))),
}


@pytest.mark.parametrize("name", list(PICKED))
def test_experts_picked_per_token_stay_factored(name):
    shape, layout, fn = PICKED[name]
    # no MaterializeWarning (an error in this suite): w[ids] + s·a[ids]@b[ids], a batched product per token
    check_against_oracle(fn, {"w": random_lora(jax.random.key(0), shape, layout, 2)}, normal(jax.random.key(1), (6, 16)))


@st.composite
def join_cases(draw):
    """Kernels of one random layout joined along a random axis: each a LoraWeight of its own rank
    and scale, or a plain array; then cut at a random point along that axis, or not."""
    roles = draw(st.permutations(["i", "o", draw(st.sampled_from(["b", "i", "o"]))]))
    sizes = [draw(st.integers(2, 3)) for _ in roles]
    axis = draw(st.integers(0, 2))
    parts = [(draw(st.integers(1, 3)), draw(st.sampled_from([None, 1, 2, 3])), draw(st.sampled_from([0.5, 2.0])))
             for _ in range(draw(st.integers(2, 3)))]  # (extent along axis, rank or None for plain, scale)
    if all(rank is None for _, rank, _ in parts):
        parts[0] = (parts[0][0], 1, parts[0][2])
    total = sum(extent for extent, _, _ in parts)
    cut = draw(st.one_of(st.none(), st.integers(1, total - 1))) if total > 1 else None
    return "".join(roles), sizes, axis, parts, cut


@settings(max_examples=12, deadline=None)
@given(join_cases(), st.integers(0, 2**16))
def test_kernels_joined_along_any_axis_then_cut_equal_the_merged_oracle(case, seed):
    layout, sizes, axis, parts, cut = case
    key = jax.random.key(seed)
    params = {}
    for j, (extent, rank, scale) in enumerate(parts):
        shape = tuple(extent if ax == axis else n for ax, n in enumerate(sizes))
        k = jax.random.fold_in(key, j)
        params[f"p{j}"] = normal(k, shape) if rank is None else random_lora(k, shape, layout, min(rank, *shape), scale)
    total = sum(extent for extent, _, _ in parts)
    kept = (cut if cut is not None else total) if layout[axis] != "o" else total  # what the dot below reads
    x_shape = tuple((kept if ax == axis else n) for ax, n in enumerate(sizes) if layout[ax] != "o")
    x = normal(jax.random.fold_in(key, 99), (4,) + x_shape)
    letters = "abc"
    w_sub = "".join(letters[:3])
    x_sub = "t" + "".join(l for l, r in zip(letters, layout) if r != "o")
    out_sub = "t" + "".join(l for l, r in zip(letters, layout) if r != "i")

    def fn(p, x):
        w = jnp.concatenate([p[f"p{j}"] for j in range(len(parts))], axis=axis)
        if cut is not None:
            w = jnp.split(w, [cut], axis=axis)[0]
        return jnp.einsum(f"{x_sub},{w_sub}->{out_sub}", x, w)

    check_against_oracle(fn, params, x)
