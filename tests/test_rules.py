"""LoraWeight rules: factored results equal the materialised oracle, values and gradients."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import lax

import jlora
from oracle import check_against_oracle, normal, oracle_merge, perturb, random_lora


@st.composite
def dot_cases(draw):
    """A LoraWeight of random layout and an operand with random dimension numbers."""
    nb, ni, no = draw(st.integers(0, 1)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    roles = ["b"] * nb + ["i"] * ni + ["o"] * no
    order = draw(st.permutations(list(range(len(roles)))))
    roles = [roles[i] for i in order]
    sizes = [draw(st.integers(2, 4)) for _ in roles]
    rank = draw(st.integers(1, 3))
    transposed_use = draw(st.booleans())  # contract the output axes (x @ W.T)
    batch_as_dot_batch = draw(st.booleans())
    contract_role = "o" if transposed_use else "i"
    # the other operand: contracted axes + (maybe) batch axes + 0-2 free axes, shuffled
    x_axes = [("c", ax) for ax, r in enumerate(roles) if r == contract_role]
    if batch_as_dot_batch:
        x_axes += [("bt", ax) for ax, r in enumerate(roles) if r == "b"]
    x_axes += [("f", draw(st.integers(2, 4))) for _ in range(draw(st.integers(0, 2)))]
    x_axes = draw(st.permutations(x_axes))
    lazy_left = draw(st.booleans())
    return roles, sizes, rank, x_axes, lazy_left


@settings(max_examples=25, deadline=None)
@given(dot_cases(), st.integers(0, 2**16))
def test_dot_general_any_dimension_numbers(case, seed):
    roles, sizes, rank, x_axes, lazy_left = case
    key = jax.random.key(seed)
    lw = random_lora(key, tuple(sizes), "".join(roles), rank)
    x_shape = tuple(sizes[a] if kind in ("c", "bt") else a for kind, a in x_axes)
    x = normal(jax.random.fold_in(key, 1), x_shape)
    x_contract = tuple(i for i, (kind, _) in enumerate(x_axes) if kind == "c")
    w_contract = tuple(a for kind, a in x_axes if kind == "c")
    x_batch = tuple(i for i, (kind, _) in enumerate(x_axes) if kind == "bt")
    w_batch = tuple(a for kind, a in x_axes if kind == "bt")
    if lazy_left:
        dims = ((w_contract, x_contract), (w_batch, x_batch))
        fn = lambda p, x: lax.dot_general(p["w"], x, dims)
    else:
        dims = ((x_contract, w_contract), (x_batch, w_batch))
        fn = lambda p, x: lax.dot_general(x, p["w"], dims)
    check_against_oracle(fn, {"w": lw}, x)


def test_dot_general_layout_mismatch_falls_back_exactly_and_warns():
    lw = random_lora(jax.random.key(0), (3, 4, 5), "ioo", 2)
    x = normal(jax.random.key(1), (2, 3, 4))
    fn = lambda p, x: jnp.einsum("bij,ijk->bk", x, p["w"])  # contracts an output axis too
    with pytest.warns(jlora.MaterializeWarning, match="'w'.*dot_general"):
        out = jlora.apply(fn)({"w": lw}, x)
    np.testing.assert_allclose(out, fn(oracle_merge({"w": lw}), x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, fn", [
    ("experts summed in one einsum (dense MoE)", lambda p, g, x: jnp.einsum("te,td,edf->tf", g, x, p["w"])),
    ("the same, transposed use", lambda p, g, x: jnp.einsum("te,tf,edf->td", g, x[:, :8], p["w"])),
    ("experts picked, then weighed and summed", lambda p, g, x: jnp.einsum(
        "td,tkdf,tk->tf", x, p["w"][jnp.array([[0, 1], [3, 2], [1, 1], [2, 0], [0, 3]])], g[:, :2])),
])
def test_batch_axes_contracted_with_the_input_axes_stay_factored(name, fn):
    # Σ_e g[t,e]·x[t]·(w[e] + s·a[e]@b[e]): the sum over e is the last contraction, of t@b
    lw = random_lora(jax.random.key(0), (4, 16, 8), "bio", 2)
    check_against_oracle(fn, {"w": lw}, normal(jax.random.key(1), (5, 4)), normal(jax.random.key(2), (5, 16)))


def test_gather_embedding_lookup():
    lw = random_lora(jax.random.key(0), (10, 6), "io", 3)
    ids = jnp.array([[0, 3, 9], [2, 2, 1]])
    check_against_oracle(lambda p, ids: jnp.take(p["w"], ids, axis=0), {"w": lw}, ids)
    check_against_oracle(lambda p, ids: p["w"][ids], {"w": lw}, ids)


def test_gather_out_of_range_rows_are_the_fill_value_alone_or_clamped():
    lw = random_lora(jax.random.key(0), (10, 6), "io", 3)
    ids = jnp.array([[0, 12, 9], [-20, 2, 1]])
    for fill in (-1.0, None):  # None: NaN, the default fill
        check_against_oracle(lambda p, ids: jnp.take(p["w"], ids, axis=0, mode="fill", fill_value=fill), {"w": lw}, ids)
    # W[ids] promises its ids in range: one out of it is clamped, and its gradient dropped (it reached b)
    check_against_oracle(lambda p, ids: p["w"][ids], {"w": lw}, ids)
    check_against_oracle(lambda p, ids: jnp.take(p["w"], ids, axis=0, mode="clip"), {"w": lw}, ids)


@pytest.mark.parametrize("transposed", [False, True])
def test_integer_and_bool_activations_get_the_adapter_in_the_result_dtype(transposed):
    """x @ W with an int or bool x is a mixed-dtype dot: the low-rank path must not run in x's dtype
    (that would truncate a and b to integers)."""
    lw = random_lora(jax.random.key(0), (6, 5), "io", 2)
    fn = (lambda p, x: x @ p["w"].T) if transposed else (lambda p, x: x @ p["w"])
    n = 5 if transposed else 6
    for x in (jnp.arange(2 * n).reshape(2, n) - 4, jnp.arange(n) % 2 == 0):
        check_against_oracle(fn, {"w": lw}, x)


@pytest.mark.parametrize("op", ["einsum", "ragged_dot"])
def test_a_bfloat16_activation_against_a_float32_kernel_keeps_the_adapter_in_float32(op):
    """A mixed dot (bf16 x, f32 kernel, f32 result) computes in f32: so must the low-rank path, or
    a and b are rounded to bf16 (0.5% off the merged weight's output and gradients)."""
    x = normal(jax.random.key(1), (6, 8)).astype(jnp.bfloat16)
    if op == "einsum":
        params = {"w": random_lora(jax.random.key(0), (8, 5), "io", 2)}
        fn = lambda p, x: jnp.einsum("ti,io->to", x, p["w"])
    else:
        params = {"w": random_lora(jax.random.key(0), (3, 8, 5), "bio", 2)}
        fn = lambda p, x: lax.ragged_dot(x, p["w"], jnp.array([2, 0, 3], jnp.int32))
    assert jax.eval_shape(fn, oracle_merge(params), x).dtype == jnp.float32
    check_against_oracle(fn, params, x)


def test_gather_forms_of_vmap_and_of_index_maps_stay_factored():
    """vmap of a lookup leaves the row axis uncollapsed (slice size 1) and indexes the output axis
    at 0; a stacked lookup indexes rows through a permuted index vector."""
    lw = random_lora(jax.random.key(0), (10, 6), "io", 3)
    ids = jnp.array([0, 3, 9, 3])
    check_against_oracle(lambda p, ids: jax.vmap(lambda i: p["w"][i])(ids), {"w": lw}, ids)
    check_against_oracle(lambda p, ids: jax.vmap(lambda i: jnp.take(p["w"], i, axis=0))(ids.reshape(2, 2)), {"w": lw}, ids)


@pytest.mark.parametrize("name, fn", [
    ("W[..., ids]", lambda p, ids: p["w"][..., ids]),
    ("take, fill", lambda p, ids: jnp.take(p["w"], ids, axis=-1, mode="fill", fill_value=-1.0)),
    ("rows of W.T", lambda p, ids: jnp.swapaxes(jnp.swapaxes(p["w"], 0, -1)[ids], 0, -1)),
])
@pytest.mark.parametrize("shape, layout", [((10, 6), "io"), ((2, 5, 6), "iio")])
def test_gather_of_columns_stays_factored(name, fn, shape, layout):
    """Columns picked along the output axis (label words' logits from an LM head): w's columns plus
    a @ (s·b's columns); an id out of range (7) is the fill, or clamped with its gradient dropped."""
    lw = random_lora(jax.random.key(0), shape, layout, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", jlora.MaterializeWarning)
        check_against_oracle(fn, {"w": lw}, jnp.array([1, 4, 4, 7]))


def test_gather_of_columns_falls_back_for_one_output_axis_of_two_or_under_dropout():
    lw = random_lora(jax.random.key(0), (10, 3, 6), "ioo", 3)
    with pytest.warns(jlora.MaterializeWarning, match="gather"):
        check_against_oracle(lambda p, ids: jnp.take(p["w"], ids, axis=2), {"w": lw}, jnp.array([1, 4]))
    lw = random_lora(jax.random.key(0), (10, 6), "io", 3).replace(dropout=0.5)
    with pytest.warns(jlora.MaterializeWarning, match="gather.*dropout"):
        jlora.apply(lambda p, x: x @ p["w"][:, jnp.array([1, 4])])({"w": lw}, jnp.ones((2, 10)),
                                                                    lora_rng=jax.random.key(0))


@pytest.mark.parametrize("spec", ["NHWC", "NCHW"])
def test_conv(spec):
    lw = random_lora(jax.random.key(0), (3, 3, 4, 5), "iiio", 2)
    x = normal(jax.random.key(1), (2, 7, 7, 4) if spec == "NHWC" else (2, 4, 7, 7))
    fn = lambda p, x: lax.conv_general_dilated(
        x, p["w"], (1, 2), "SAME", rhs_dilation=(2, 1), dimension_numbers=(spec, "HWIO", spec)
    )
    check_against_oracle(fn, {"w": lw}, x)


@pytest.mark.parametrize("spec", ["NHWC", "NCHW"])
@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose(spec, transpose_kernel):
    """With ``transpose_kernel`` the conv reads w's output features as its inputs: b runs first."""
    lw = random_lora(jax.random.key(0), (3, 3, 4, 5), "iiio", 2)
    channels = 5 if transpose_kernel else 4
    x = normal(jax.random.key(1), (2, 6, 6, channels) if spec == "NHWC" else (2, channels, 6, 6))
    fn = lambda p, x: lax.conv_transpose(x, p["w"], (2, 1), "SAME", dimension_numbers=(spec, "HWIO", spec),
                                         transpose_kernel=transpose_kernel)
    check_against_oracle(fn, {"w": lw}, x)


def test_grouped_conv_falls_back_exactly_saying_why():
    lw = random_lora(jax.random.key(0), (3, 3, 2, 8), "iiio", 2)  # 4 groups of 2 input channels
    x = normal(jax.random.key(1), (2, 7, 7, 8))
    fn = lambda p, x: lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                               feature_group_count=4)
    with pytest.warns(jlora.MaterializeWarning, match=r"'w'.*grouped or depthwise conv \(feature_group_count=4"):
        check_against_oracle(fn, {"w": lw}, x)


def test_elementwise_use_materialises_exactly():
    lw = random_lora(jax.random.key(0), (4, 6), "io", 2)
    fn = lambda p, x: x @ p["w"] + jnp.sum(p["w"] ** 2)
    with pytest.warns(jlora.MaterializeWarning, match="integer_pow"):
        check_against_oracle(fn, {"w": lw}, jnp.ones((2, 4)))


def test_dropout_is_on_the_low_rank_input_only():
    lw = random_lora(jax.random.key(0), (8, 8), "io", 2).replace(dropout=0.5)
    x = jnp.ones((4096, 8))  # the mean of 4096 rows is within about 0.01 of the expectation
    fwd = jlora.apply(lambda p, x: x @ p["w"])
    deterministic = fwd({"w": lw}, x)
    np.testing.assert_allclose(deterministic, x @ oracle_merge({"w": lw})["w"], rtol=1e-5, atol=1e-5)
    dropped = fwd({"w": lw}, x, lora_rng=jax.random.key(3))
    base = x @ lw.w
    low = dropped - base
    # each row's low-rank part is (mask·x/(1-p)) @ a @ b·s: differs from the deterministic one,
    # but the base part is untouched and the expectation matches.
    assert not np.allclose(dropped, deterministic)
    np.testing.assert_allclose(low.mean(0), (deterministic - base).mean(0), rtol=0, atol=0.08)
    again = fwd({"w": lw}, x, lora_rng=jax.random.key(3))
    np.testing.assert_array_equal(dropped, again)


def test_bf16_low_rank_path_runs_in_activation_dtype():
    lw = random_lora(jax.random.key(0), (16, 16), "io", 4)
    lw = lw.replace(w=lw.w.astype(jnp.bfloat16))
    x = normal(jax.random.key(1), (4, 16), jnp.bfloat16)
    out = jlora.apply(lambda p, x: x @ p["w"])({"w": lw}, x)
    assert out.dtype == jnp.bfloat16
    ref = x.astype(jnp.float32) @ oracle_merge({"w": lw})["w"].astype(jnp.float32)
    np.testing.assert_allclose(out.astype(jnp.float32), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("op", ["matmul", "tied head", "conv"])
def test_a_float16_model_with_a_large_scale_stays_finite(op):
    """The scale goes on the path's second factor, as PEFT applies it last: s·(x@a) overflows
    float16 where x@w does not, and a fresh adapter (b = 0) then gave inf · 0 = NaN."""
    shape = {"matmul": (256, 32), "tied head": (32, 256), "conv": (3, 3, 256, 32)}[op]
    kernel = (normal(jax.random.key(0), shape) * 0.02).astype(jnp.float16)
    layouts = {"matmul": "io", "tied head": "io", "conv": "iiio"}  # the head contracts w's output axis: b first
    cfg = jlora.LoraConfig(rank=8, alpha=512, targets=["k"], layouts={"k": layouts[op]})  # scale 64, b = 0
    params = jlora.lora_init(jax.random.key(1), {"k": kernel}, cfg)
    x = jnp.full((2, 5, 5, 256) if op == "conv" else (2, 256), 1000.0, jnp.float16)
    fn = {"matmul": lambda p, x: x @ p["k"], "tied head": lambda p, x: x @ p["k"].T,
          "conv": lambda p, x: lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))}[op]
    want = fn({"k": kernel}, x)
    assert bool(jnp.all(jnp.isfinite(want)))
    np.testing.assert_array_equal(jlora.apply(fn)(params, x), want)  # b = 0: the base's output exactly
    if op == "tied head":  # b first: b's gradient, s·(g@a)ᵀx, is itself beyond float16 here (76,000)
        return
    trainable, frozen = jlora.split(params)
    grads = jax.grad(lambda t: jnp.sum(jlora.apply(fn)(jlora.combine(t, frozen), x).astype(jnp.float32)))(trainable)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_a_per_operand_precision_follows_the_kernel_to_its_factors():
    """``precision=(for the kernel, for x)`` with the kernel as lhs: x goes first in x@a and t@b,
    so the factors get the kernel's precision and x keeps its own."""
    from jax.lax import Precision

    p = jlora.lora_init(jax.random.key(0), {"k": jnp.ones((64, 48))}, jlora.LoraConfig(rank=4, targets=["k"]))
    fn = lambda p, x: lax.dot_general(p["k"], x, (((0,), (1,)), ((), ())), precision=(Precision.HIGHEST, Precision.DEFAULT))
    dots = [e for e in jax.make_jaxpr(jlora.apply(fn))(p, jnp.ones((8, 64))).jaxpr.eqns if e.primitive.name == "dot_general"]
    for eqn in dots:
        kernel_side = 0 if eqn.invars[0].aval.shape in ((64, 48), (64, 4), (4, 48)) else 1
        assert eqn.params["precision"][kernel_side] == Precision.HIGHEST, eqn
    assert len(dots) == 3


def test_an_fp8_matmul_keeps_the_low_rank_path_in_its_result_dtype():
    """fp8 x · fp8 kernel accumulated in f32 (``preferred_element_type``): the adapter's f32 factors
    are not rounded to fp8 (7% off the update), the path runs in the result's dtype; the gradients
    too, against float64 numpy."""
    lw = random_lora(jax.random.key(0), (8, 6), "io", 2)
    lw = lw.replace(w=lw.w.astype(jnp.float8_e4m3fn))
    x = normal(jax.random.key(1), (3, 8)).astype(jnp.float8_e4m3fn)
    fn = jlora.apply(lambda p, x: jnp.dot(x, p["w"], preferred_element_type=jnp.float32))
    xf, a, b = (np.asarray(v.astype(jnp.float32), np.float64) for v in (x, lw.a, lw.b))
    want = xf @ np.asarray(lw.w.astype(jnp.float32), np.float64) + lw.scale * xf @ a @ b
    out = fn({"w": lw}, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda lw: fn({"w": lw}, x).sum())(lw)
    ones = np.ones_like(want)
    np.testing.assert_allclose(g.a, lw.scale * xf.T @ ones @ b.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g.b, lw.scale * (xf @ a).T @ ones, rtol=1e-5, atol=1e-5)


def test_a_kernel_cast_to_fp8_at_use_keeps_the_adapter_out_of_fp8():
    """A model that casts its f32 kernel to fp8 for the matmul: the base term is fp8's, the adapter's
    f32 factors are not cast (in fp8 the update is 6% off and a's and b's gradients underflow to 0)."""
    lw = random_lora(jax.random.key(0), (8, 6), "io", 2)
    f8 = jnp.float8_e4m3fn
    x = normal(jax.random.key(1), (3, 8)).astype(f8)
    fn = jlora.apply(lambda p, x: jnp.dot(x, p["w"].astype(f8), preferred_element_type=jnp.float32))
    xf, a, b = (np.asarray(v.astype(jnp.float32), np.float64) for v in (x, lw.a, lw.b))
    want = xf @ np.asarray(lw.w.astype(f8).astype(jnp.float32), np.float64) + lw.scale * xf @ a @ b
    np.testing.assert_allclose(fn({"w": lw}, x), want, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda lw: 1024 * fn({"w": lw}, x).sum())(lw)  # a loss scale, as fp8 training has
    ones = 1024 * np.ones_like(want)
    np.testing.assert_allclose(g.a, lw.scale * xf.T @ ones @ b.T, rtol=1e-5)
    np.testing.assert_allclose(g.b, lw.scale * (xf @ a).T @ ones, rtol=1e-5)


def test_fp8_kernels_chained_keep_the_adapter_out_of_fp8_with_inputs_rebuilt():
    """Under recompute="inputs" a LoRA output a rebuild reads is computed as one matmul [x | t] @ [w ; b]
    in w's dtype: not for an fp8 w (b rounded to fp8, 7% off); and an fp8 kernel against a bf16 x
    promotes to bf16 (lax.dot_general takes them mixed)."""
    if jax.default_backend() != "cpu":  # measured on an H200: the oracle itself, jitted, is 0.27 off its eager self
        pytest.skip("XLA's GPU rewrite of fp8 matmuls rounds otherwise than the oracle's op-by-op evaluation")
    if jax.__version_info__[:2] == (0, 7):
        pytest.skip("JAX 0.7's f32 -> float8_e4m3fn cast on CPU rounds twice (through f16), off ml_dtypes' rounding")
    l1, l2 = (random_lora(jax.random.key(i), (8, 8), "io", 2) for i in (0, 1))
    l1, l2 = (lw.replace(w=lw.w.astype(jnp.float8_e4m3fn)) for lw in (l1, l2))
    f8 = lambda h, w: jnp.dot(h.astype(jnp.float8_e4m3fn), w, preferred_element_type=jnp.float32)
    fn = lambda p, x: f8(jax.nn.silu(f8(x, p["l1"])), p["l2"])
    x = normal(jax.random.key(2), (16, 8))  # at least d_in / 2 tokens: the joint matmul would pay
    whole = lambda lw: lw.w.astype(jnp.float32) + lw.scale * jnp.dot(lw.a, lw.b, precision="highest")  # f32, unrounded
    f32 = lambda h, w: jnp.dot(h.astype(jnp.float8_e4m3fn).astype(jnp.float32), w, precision="highest")
    want = f32(jax.nn.silu(f32(x, whole(l1))), whole(l2))
    for recompute in ("inputs", False):
        got = jlora.apply(fn, recompute=recompute)({"l1": l1, "l2": l2}, x)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    mixed = lambda p, x: lax.dot_general(x, p["l1"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    xb = x.astype(jnp.bfloat16)
    np.testing.assert_allclose(jlora.apply(mixed)({"l1": l1}, xb), jnp.dot(xb.astype(jnp.float32), whole(l1)),
                               rtol=2e-2, atol=2e-2)  # the adapter's path in bf16


def _count_dots(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return str(jaxpr).count("dot_general")


def test_adapters_reading_one_input_share_one_down_projection():
    key = jax.random.key(0)
    p = {n: random_lora(jax.random.fold_in(key, i), (8, 6 + i), "io", 2 + i) for i, n in enumerate("qkv")}
    p["o"] = random_lora(jax.random.fold_in(key, 9), (6, 8), "oi", 2)  # stored (out, in): used as x @ o.T

    def fn(p, x):
        h = x @ p["q"] + (x @ p["k"]).sum(-1, keepdims=True) + (x @ p["v"])[:, :1]
        return (x @ p["o"].T.astype(jnp.float32)) * h.sum()

    x = normal(key, (5, 8))
    # 4 base matmuls + 1 shared down-projection (q, k, v, o) + 4 up-projections
    assert _count_dots(jlora.apply(fn), p, x) == 9
    check_against_oracle(fn, p, x)


def test_kernels_dequantised_per_channel_share_one_down_projection():
    """An int8 or fp8 model's q, k and v, each ``w.astype(f32) * s`` before its matmul: the
    later kernels' scales are read ahead like their casts, and one down-projection serves all."""
    key = jax.random.key(0)
    p = {n: random_lora(jax.random.fold_in(key, i), (8, 6), "io", 2) for i, n in enumerate("qkv")}
    scales = {n: 0.01 * jnp.arange(1.0, 7.0) + i for i, n in enumerate("qkv")}
    fn = lambda p, s, x: sum(x @ (p[n].astype(jnp.float32) * s[n]) for n in "qkv")
    x = normal(key, (5, 8))
    assert _count_dots(jlora.apply(fn), p, scales, x) == 7  # 3 base, 1 shared down, 3 up
    check_against_oracle(fn, p, scales, x)


def test_no_shared_down_projection_under_dropout():
    key = jax.random.key(0)
    p = {n: random_lora(jax.random.fold_in(key, i), (8, 6), "io", 2).replace(dropout=0.5) for i, n in enumerate("qk")}
    fn = lambda p, x: x @ p["q"] + x @ p["k"]
    x = jnp.ones((3, 8))
    assert _count_dots(lambda p, x: jlora.apply(fn)(p, x, lora_rng=jax.random.key(1)), p, x) == 6
    assert _count_dots(jlora.apply(fn), p, x) == 5


def _muls_on(jaxpr, size: int) -> list:
    """``mul`` equations (nested jaxprs included) with an operand or result that has an axis of ``size``."""
    found = []
    for eqn in jaxpr.eqns:
        avals = [v.aval for v in (*eqn.invars, *eqn.outvars) if hasattr(v.aval, "shape")]
        if eqn.primitive is lax.mul_p and any(size in a.shape for a in avals):
            found.append(eqn)
        for sub in jax.tree.leaves(list(eqn.params.values()), is_leaf=lambda v: hasattr(v, "eqns") or hasattr(v, "jaxpr")):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                found += _muls_on(inner, size)
    return found


def test_scale_is_applied_to_the_factors_not_the_activations():
    """``x@(s·a)`` rather than ``s·(x@a)``: no multiply on a ``[tokens, r]`` value, forward or backward
    (on a GPU such a multiply is fused into the rank-r GEMMs and multiplies their distinct kernels)."""
    key, tokens = jax.random.key(0), 37  # no weight has an axis of 37
    p = {n: random_lora(jax.random.fold_in(key, i), (8, 6), "io", 2, scale=0.5 + i) for i, n in enumerate("qke")}

    def fn(p, x):  # q and k share a down-projection; e is used tied (x @ E.T: b applied first)
        return (x @ p["q"] + x @ p["k"]) @ p["e"].T

    x = normal(key, (tokens, 8))
    grad = jax.make_jaxpr(jax.grad(lambda p: jlora.apply(fn)(p, x).sum()))(p)
    assert _muls_on(grad.jaxpr, tokens) == []
    check_against_oracle(fn, p, x)


def _reordered_outputs(lw, order):
    """``lw`` with its output axes stored in another order (the same kernel, another layout)."""
    outs = lw.layout.group("o")
    perm = [ax for ax in range(lw.ndim) if ax not in outs] + [outs[k] for k in order]
    return lw.replace(w=jnp.transpose(lw.w, perm), layout=lw.layout.permute(perm))


GROUPED = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(((1,), (1,)), ((), ())), lhs_ragged_dimensions=(0,),
                                        rhs_group_dimensions=(0,))


@pytest.mark.parametrize("name, shape, layout, fn", [
    ("lax.ragged_dot", (4, 16, 8), "bio", lambda p, x, g: lax.ragged_dot(x, p["w"], g)),
    ("(out, in) experts", (4, 8, 16), "boi", lambda p, x, g: lax.ragged_dot_general(
        x, p["w"], g, lax.RaggedDotDimensionNumbers((((1,), (2,)), ((), ())), (0,), (0,)))),
    ("several output axes, stored in another order", (4, 16, 2, 3, 5), ("biooo", (2, 0, 1)),
     lambda p, x, g: lax.ragged_dot_general(x, p["w"], g, GROUPED)),
    # (on the GPU, JAX 0.11.2's own gradient of this ragged_dot, the oracle's, is zero for an expert
    # whose rows it took in the forward)
    pytest.param("rows ragged along x's second axis", (4, 8, 5), "bio", lambda p, x, g: lax.ragged_dot_general(
        x.reshape(2, 6, 8), p["w"], g, lax.RaggedDotDimensionNumbers((((2,), (1,)), ((), ())), (1,), (0,))),
        marks=pytest.mark.skipif(jax.default_backend() == "gpu", reason="JAX's ragged_dot gradient on the GPU")),
])
@pytest.mark.parametrize("dense_up_to", [0, 256])  # the grouped form, the dense form over all experts
def test_ragged_dot_of_experts_stays_factored(name, shape, layout, fn, dense_up_to, monkeypatch):
    monkeypatch.setattr(jlora.rules, "DENSE_EXPERT_RANKS", dense_up_to)
    layout, order = layout if isinstance(layout, tuple) else (layout, None)
    lw = random_lora(jax.random.key(0), shape, layout, 2)
    lw = lw if order is None else _reordered_outputs(lw, order)
    # groups of 3, 0 and 2 rows, the last row in none (its output is zero)
    check_against_oracle(fn, {"w": lw}, normal(jax.random.key(1), (6, 16)), jnp.array([3, 0, 2, 0], jnp.int32))


def test_ragged_dot_experts_get_their_layout_inferred_and_train():
    base = {"experts": normal(jax.random.key(0), (4, 16, 8))}
    x, groups = normal(jax.random.key(1), (6, 16)), jnp.array([2, 2, 1, 1], jnp.int32)
    fn = lambda p, x: lax.ragged_dot(x, p["experts"], groups)
    params = jlora.lora_init(jax.random.key(2), base, jlora.LoraConfig(rank=2, targets=["experts"]),
                             infer_layout=lambda p: fn(p, x))
    lw = params["experts"]
    assert str(lw.layout) == "bio" and lw.a.shape == (4, 16, 2) and lw.b.shape == (4, 2, 8)  # an adapter per expert
    check_against_oracle(fn, perturb(params, jax.random.key(3)), x)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention, fp8 matmuls and pinned host memory: GPU")
@pytest.mark.parametrize("case", ["cudnn_attention", "fp8_cast", "offloaded_base"])
def test_gpu_paths_stay_factored_and_agree_with_the_merged_weights(case):
    """Attention through cuDNN on adapted q, k, v, o; a kernel cast to fp8 at its use; a frozen
    base kept in pinned host memory and brought in inside the step. bf16, so compared against
    the merged weights at bf16's rounding; every MaterializeWarning is an error here."""
    batch, tokens, width, heads = 2, 128, 256, 4
    keys = jax.random.split(jax.random.key(0), 6)
    base = {n: {"kernel": (normal(keys[i], (width, width)) / 16).astype(jnp.bfloat16)} for i, n in enumerate("qkvo")}
    params = perturb(jlora.lora_init(keys[4], base, jlora.LoraConfig(rank=8, targets=list("qkvo"),
                                                                     param_dtype=jnp.bfloat16)), keys[5])
    x = normal(keys[5], (batch, tokens, width)).astype(jnp.bfloat16)

    def attention(p, x, implementation=None):
        split = lambda name: (x @ p[name]["kernel"]).reshape(batch, tokens, heads, width // heads)
        out = jax.nn.dot_product_attention(split("q"), split("k"), split("v"), is_causal=True,
                                           implementation=implementation)
        return out.reshape(batch, tokens, width) @ p["o"]["kernel"]

    if case == "cudnn_attention":
        fn = lambda p, x: attention(p, x, "cudnn")
    elif case == "fp8_cast":
        fn = lambda p, x: jnp.dot(x.astype(jnp.float8_e4m3fn), p["q"]["kernel"].astype(jnp.float8_e4m3fn),
                                  preferred_element_type=jnp.bfloat16)
    else:
        device = jax.devices()[0]
        on_host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
        trainable, frozen = jlora.split(params)
        frozen = jax.tree.map(lambda w: jax.device_put(w, on_host), frozen)
        back = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
        step = lambda t, f, x: jlora.apply(attention)(jlora.combine(t, jax.device_put(f, back)), x)
        got = jax.jit(step)(trainable, frozen, x)
        want = attention(jlora.merge(params), x)
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.05 * float(jnp.abs(want).max()))
        return
    got = jax.jit(jlora.apply(fn))(params, x)
    want = fn(jlora.merge(params), x)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               atol=0.05 * float(jnp.abs(want.astype(jnp.float32)).max()))


@pytest.mark.parametrize("use", ["matmul", "b_first", "conv", "ragged_dot"])
def test_narrow_factors_on_a_wider_model_are_scaled_in_the_models_dtype(use):
    """bfloat16 factors on a float32 model: the scale (4/3) multiplies the factor in float32, as
    jlora.merge forms the weight; it was applied in bfloat16 first (4/3 as 1.336, 0.2% off the
    adapter's term) and only the product cast up."""
    keys = jax.random.split(jax.random.key(0), 3)
    if use == "conv":
        base, x = {"k": normal(keys[0], (3, 3, 16, 8))}, normal(keys[1], (2, 6, 6, 16))
        fn = lambda p, x: lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        layouts = {"k": "iiio"}
    elif use == "ragged_dot":
        base, x = {"k": normal(keys[0], (2, 16, 8))}, normal(keys[1], (6, 16))
        fn = lambda p, x: lax.ragged_dot(x, p["k"], jnp.array([4, 2], jnp.int32))
        layouts = {"k": "bio"}
    else:
        base, x = {"k": normal(keys[0], (16, 8))}, normal(keys[1], (6, 16) if use == "matmul" else (6, 8))
        fn = (lambda p, x: x @ p["k"]) if use == "matmul" else (lambda p, x: x @ p["k"].T)  # x @ W.T: b first
        layouts = {}
    params = jlora.lora_init(keys[2], base, jlora.LoraConfig(rank=6, alpha=8, targets=["k"], layouts=layouts,
                                                             param_dtype=jnp.bfloat16))
    lw = params["k"]
    params = {"k": lw.replace(a=jnp.full(lw.a.shape, 0.5, jnp.bfloat16), b=jnp.full(lw.b.shape, 0.25, jnp.bfloat16))}
    base_term = fn(base, x)
    got, want = jlora.apply(fn)(params, x) - base_term, fn(jlora.merge(params), x) - base_term
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    if use == "matmul":  # and float32 factors on a bfloat16 model, under strict promotion: no promotion needed
        wide = jlora.lora_init(keys[2], jax.tree.map(lambda w: w.astype(jnp.bfloat16), base),
                               jlora.LoraConfig(rank=6, alpha=8, targets=["k"]))
        with jax.numpy_dtype_promotion("strict"):
            assert jlora.apply(fn)(wide, x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
