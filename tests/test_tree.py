import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from oracle import oracle_merge, perturb
from quantized import Int8Weight, quantize

KEY = jax.random.key(0)


def tree():
    base = {"q": {"kernel": jax.random.normal(KEY, (8, 8)), "bias": jnp.zeros(8)},
            "v": {"kernel": jax.random.normal(KEY, (8, 4))}, "none": None}
    cfg = jlora.LoraConfig(rank=2, targets=["q", "v"], trainable=["q/bias"])
    return perturb(jlora.lora_init(KEY, base, cfg), KEY)


def test_split_refuses_a_tree_with_no_adapters():
    """The base params lora_init was given (its result dropped), or merge's result: an empty
    trainable half trained nothing, silently (with a plain optax tx)."""
    base = {"q": {"kernel": jnp.ones((4, 4))}}
    params = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["q"]))
    for tree in (base, jlora.merge(params)):
        with pytest.raises(ValueError, match=r"jlora.split: params hold no LoraWeight or Trainable leaf, so the "
                                             r"trainable half would be empty"):
            jlora.split(tree)
    assert jlora.split({}) == ({}, {})  # no arrays: nothing to say


def test_split_and_combine_partition_like_equinox():
    p = tree()
    trainable, frozen = jlora.split(p)
    assert trainable["v"]["kernel"].w is None and frozen["v"]["kernel"].a is None
    assert isinstance(trainable["q"]["bias"], jlora.Trainable) and frozen["q"]["bias"].value is None
    assert len(jax.tree.leaves(trainable)) == 5 and len(jax.tree.leaves(frozen)) == 2
    back = jlora.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), back, p)


def test_combine_refuses_trees_that_do_not_match():
    trainable, _ = jlora.split(tree())
    other = jlora.lora_init(KEY, {"q": {"kernel": jnp.ones((8, 8))}}, jlora.LoraConfig(rank=2, targets=["q"]))
    with pytest.raises(ValueError, match="jlora.combine: trainable and frozen do not have the same structure"):
        jlora.combine(trainable, jlora.split(other)[1])
    extra = {**tree(), "extra": {"count": jnp.zeros(2)}}  # a leaf one side has: only that side is named
    with pytest.raises(ValueError, match=r"do not have the same structure: only in frozen: \['extra/count'\]$"):
        jlora.combine(trainable, jlora.split(extra)[1])
    base = {"q": {"kernel": jnp.ones((8, 8))}}
    alpha = lambda a: jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, alpha=a, targets=["q"]))
    with pytest.raises(ValueError, match=r"differ at \['q/kernel'\], e.g. 'q/kernel': \{'scale': 1.0, 'layout': "
                                         r"Layout\('io'\), .*\} in trainable, \{'scale': 2.0, .*\} in frozen \(LoRA scales of "
                                         r"another rank or alpha: from two lora_init calls, or a jlora.stack\(\.\.\., "
                                         r"pad=True\), whose frozen half is its adapter 0's\? a scale folds into b, to "
                                         r"one rounding: lw.replace\(b=lw.b \* \(lw.scale / s\), scale=s\)\)"):
        jlora.combine(jlora.split(alpha(2.0))[0], jlora.split(alpha(4.0))[1])
    # as it says: folded, the half combines with the other's frozen half and computes the same
    half = jlora.split(perturb(alpha(2.0), KEY))[0]
    lw = half["q"]["kernel"]
    folded = {"q": {"kernel": lw.replace(b=lw.b * (lw.scale / 2.0), scale=2.0)}}
    x = jnp.ones((1, 8))
    forward = jlora.apply(lambda p, x: x @ p["q"]["kernel"])
    np.testing.assert_allclose(forward(jlora.combine(folded, jlora.split(alpha(4.0))[1]), x),
                               forward(jlora.combine(half, jlora.split(alpha(2.0))[1]), x), rtol=1e-6)
    with pytest.raises(ValueError, match="trainable half"):
        jlora.split(alpha(2.0))[0]["q"]["kernel"].dtype
    # the same leaves in other containers (a half restored as FrozenDicts, a list become a tuple)
    from flax.core import freeze
    trainable, frozen = jlora.split({**alpha(2.0), "extra": [jnp.ones(2)]})
    with pytest.raises(ValueError, match="at 'q' trainable has a FrozenDict, frozen a dict"):
        jlora.combine({**trainable, "q": freeze(trainable["q"])}, frozen)
    with pytest.raises(ValueError, match="at 'extra' trainable has a tuple, frozen a list"):
        jlora.combine({**trainable, "extra": tuple(trainable["extra"])}, frozen)
    # same structure and metadata, other shapes: the factors would broadcast against w, silently wrong
    cfg = jlora.LoraConfig(rank=1, targets=["q"])
    small = jlora.lora_init(KEY, {"q": {"kernel": jnp.ones((8, 1))}}, cfg)
    big = jlora.lora_init(KEY, {"q": {"kernel": jnp.ones((8, 6))}}, cfg)
    with pytest.raises(ValueError, match=r"jlora.combine: the halves do not fit together \(from two models\?\): LoraWeight 'q/kernel': "
                                         r"for w \(8, 6\) .* b \(1, 6\); got a \(8, 1\), b \(1, 1\)"):
        jlora.combine(jlora.split(small)[0], jlora.split(big)[1])
    # halves with leading axes of their own (pmap replicas, vmapped adapters) still combine
    stack = lambda tree: jax.tree.map(lambda x: jnp.stack([x] * 3), tree)
    replicated = jlora.combine(stack(jlora.split(big)[0]), stack(jlora.split(big)[1]))
    assert replicated["q"]["kernel"].w.shape == (3, 8, 6) and replicated["q"]["kernel"].b.shape == (3, 1, 6)
    jlora.combine(stack(jlora.split(big)[0]), jlora.split(big)[1])  # adapters stacked over one base
    with pytest.raises(ValueError, match="the halves do not fit together"):
        jlora.combine(stack(jlora.split(small)[0]), stack(jlora.split(big)[1]))
    # statistics mapped over each half (no kernel axes left) combine as before
    means = jlora.combine(*[jax.tree.map(jnp.mean, half) for half in jlora.split(big)])
    assert means["q"]["kernel"].w.shape == ()
    # ensembles (jax.vmap(lora_init)) of other sizes
    stack_of = lambda n, tree: jax.tree.map(lambda x: jnp.stack([x] * n), tree)
    with pytest.raises(ValueError, match=r"LoraWeight 'q/kernel': the leading axes of w \(3, 8, 6\) and a \(2, 8, 1\) "
                                         r"differ, \(3,\) and \(2,\) \(ensembles or replicas of other sizes\?\)"):
        jlora.combine(stack_of(2, jlora.split(big)[0]), stack_of(3, jlora.split(big)[1]))
    # one adapter over a stack of bases: no rule reads it; materialised, it broadcasts as merge does
    trainable, frozen = jlora.split(big)[0], stack_of(3, jlora.split(big)[1])
    shared = jlora.combine(trainable, frozen)
    x = jnp.ones((2, 8))
    for fn in (lambda p, x: x @ p["q"]["kernel"],
               lambda p, x: jax.lax.scan(lambda c, w: (jnp.tanh(c @ w) @ jnp.ones((6, 8)), None), x, p["q"]["kernel"])[0]):
        with pytest.warns(jlora.MaterializeWarning, match="LoraWeight at 'q/kernel' materialised"):
            got = jlora.apply(fn)(shared, x)
        np.testing.assert_allclose(got, fn(jlora.merge(shared), x), rtol=1e-6)
        jlora.lazy.reset_warnings()
    # replicas of adapters stacked over one base (pmap of a vmap over the trainable half): (2,) and (2, 3)
    replicas = jlora.combine(stack_of(2, stack_of(3, jlora.split(big)[0])), stack_of(2, jlora.split(big)[1]))
    assert replicas["q"]["kernel"].a.shape == (2, 3, 8, 1)


def test_combine_of_halves_with_other_targets_names_the_param():
    base = {"q": {"kernel": jnp.ones((8, 8))}, "v": {"kernel": jnp.ones((8, 8))}}
    _, frozen = jlora.split(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["q", "v"])))
    trainable, _ = jlora.split(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["q"])))
    with pytest.raises(ValueError, match=r"at 'v/kernel' trainable has a plain leaf, frozen a LoraWeight \(from "
                                         r"lora_init calls with other targets\?\)"):
        jlora.combine(trainable, frozen)


def test_combine_refuses_halves_that_both_hold_a_value():
    """A full tree passed as a half would overwrite the other half's values (the trained factors)."""
    p = tree()
    trainable, frozen = jlora.split(p)
    with pytest.raises(ValueError, match=r"jlora.combine: both halves hold \['q/bias', 'q/kernel/a', "
                                         r"'q/kernel/b'\] and more: it takes the halves of jlora.split"):
        jlora.combine(jax.tree.map(lambda x: x + 1, trainable), p)
    with pytest.raises(ValueError, match=r"both halves hold \['q/kernel/w', 'v/kernel/w'\]: "):
        jlora.combine(p, frozen)


def test_merge_is_exact_and_runs_the_unmodified_function():
    p = tree()
    merged = jlora.merge(p)
    np.testing.assert_allclose(merged["q"]["kernel"], oracle_merge(p)["q"]["kernel"], rtol=1e-6, atol=1e-6)
    fn = lambda p, x: (x @ p["q"]["kernel"] + p["q"]["bias"]) @ p["v"]["kernel"]
    x = jax.random.normal(KEY, (3, 8))
    np.testing.assert_allclose(fn(merged, x), jlora.apply(fn)(p, x), rtol=1e-5, atol=1e-5)


def test_base_takes_the_adapters_off_without_copying_for_a_reference_pass():
    """DPO's or a KL penalty's reference: the base model, in the same step as the adapted one."""
    base = {"q": {"kernel": jax.random.normal(KEY, (8, 8)), "bias": jnp.ones(8)}, "v": {"kernel": jnp.ones((8, 4))}}
    p = perturb(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["q", "v"])), KEY)
    fn = lambda p, x: (x @ p["q"]["kernel"] + p["q"]["bias"]) @ p["v"]["kernel"]
    x = jax.random.normal(KEY, (3, 8))
    assert jlora.base(p)["q"]["kernel"] is base["q"]["kernel"]  # the same arrays, nothing copied
    trainable, frozen = jlora.split(p)
    for tree in (p, frozen):
        np.testing.assert_array_equal(jax.jit(lambda t, x: fn(jlora.base(t), x))(tree, x), jax.jit(fn)(base, x))

    def dpo_like(trainable, frozen, x):  # the reference under stop_gradient, the policy adapted
        reference = jax.lax.stop_gradient(fn(jlora.base(frozen), x))
        return jnp.sum((jlora.apply(fn)(jlora.combine(trainable, frozen), x) - reference) ** 2)

    oracle = lambda trainable, frozen, x: jnp.sum((fn(oracle_merge(jlora.combine(trainable, frozen)), x) - fn(base, x)) ** 2)
    jax.tree.map(lambda g, o: np.testing.assert_allclose(g, o, rtol=1e-5, atol=1e-4),  # grads up to ~30
                 jax.grad(dpo_like)(trainable, frozen, x), jax.grad(oracle)(trainable, frozen, x))
    over = {"w": jlora.LoraWeight(p["q"]["kernel"], jnp.ones((8, 1)), jnp.ones((1, 8)), scale=1.0)}
    assert jlora.base(over)["w"] is p["q"]["kernel"]  # one adapter off: the one under it stays
    with_head = jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["v"], trainable=["q/bias"]))
    np.testing.assert_array_equal(jlora.base(with_head)["q"]["bias"], base["q"]["bias"])
    trainable, frozen = jlora.split(with_head)
    with pytest.raises(ValueError, match=r"jlora.base: 'q/bias' is trained whole .* keep jlora.base\(params\) from "
                                         "before training"):
        jlora.base(frozen)
    with pytest.raises(ValueError, match="jlora.base: 'v/kernel' comes from the trainable half"):
        jlora.base(trainable)


def test_bf16_factors_over_an_f32_kernel_add_an_f32_product():
    """Adapters kept in bf16 (as a PEFT model cast to bf16 saves them) over an f32 model: merge,
    a matmul and an embedding lookup all form a@b from the bf16 values in f32, not rounded to bf16."""
    p = tree()
    lw = p["q"]["kernel"]
    lw = lw.replace(a=(3 * lw.a).astype(jnp.bfloat16), b=(3 * lw.b).astype(jnp.bfloat16))
    a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
    want = np.asarray(lw.w, np.float64) + lw.scale * a @ b  # numpy, in float64
    merged = jlora.merge({"q": lw})["q"]
    assert merged.dtype == jnp.float32
    np.testing.assert_allclose(merged, want, rtol=1e-6, atol=1e-6)
    x, ids = jax.random.normal(KEY, (3, 8)), jnp.array([5, 0, 7])
    np.testing.assert_allclose(jlora.apply(lambda p: x @ p["q"])({"q": lw}), x @ want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jlora.apply(lambda p: p["q"][ids])({"q": lw}), want[ids], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jlora.apply(lambda p: p["q"][ids[0]])({"q": lw}), want[5], rtol=1e-6, atol=1e-6)


def test_merge_and_unmerge_compile_once_per_kind_of_kernel_not_per_param():
    """Each leaf's sum is one compiled pass (op by op, a bf16 kernel's f32 copies each took its
    size); layers of one shape share it."""
    from jlora.tree import _merged, _unmerged

    base = {str(i): {"q": {"kernel": jax.random.normal(jax.random.key(i), (16, 12), jnp.bfloat16)}} for i in range(6)}
    p = perturb(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=2, targets=["q"])), KEY)
    before = _merged._cache_size(), _unmerged._cache_size()
    merged = jlora.merge(p)
    back = jlora.unmerge(merged, p)
    assert (_merged._cache_size(), _unmerged._cache_size()) == (before[0] + 1, before[1] + 1)
    for i in map(str, range(6)):
        lw = p[i]["q"]["kernel"]
        want = (lw.w.astype(jnp.float32) + lw.scale * lw.a @ lw.b).astype(jnp.bfloat16)
        np.testing.assert_array_equal(merged[i]["q"]["kernel"], want)
        np.testing.assert_allclose(back[i]["q"]["kernel"].w.astype(jnp.float32), lw.w.astype(jnp.float32), atol=0.07)


def test_merge_of_half_precision_factors_rounds_once():
    """bf16 factors over a bf16 kernel, a scale that is no power of two: w + scale·a@b formed in
    float32 and rounded once, not once for the product, once for the scale and once for the sum
    (which put a quarter of the entries one step off)."""
    k1, k2, k3 = jax.random.split(KEY, 3)
    w = jax.random.normal(k1, (64, 48), jnp.bfloat16)
    lw = jlora.LoraWeight(w, jax.random.normal(k2, (64, 4), jnp.bfloat16), jax.random.normal(k3, (4, 48), jnp.bfloat16),
                          scale=16 / 6)
    f64 = lambda x: np.asarray(x.astype(jnp.float32), np.float64)
    want = jnp.asarray(f64(w) + (16 / 6) * f64(lw.a) @ f64(lw.b), jnp.float32).astype(jnp.bfloat16)
    ids = jnp.arange(64)
    looked_up = jlora.apply(lambda p: p["q"][ids])({"q": lw})  # an embedding lookup forms its rows alike
    for got in (jlora.merge({"q": lw})["q"], lw.materialize(), looked_up):
        off = np.asarray(got != want)  # the correctly rounded sum but where float32's own rounding tips a near tie
        assert got.dtype == jnp.bfloat16 and off.mean() < 0.01, off.mean()  # 23% before
        np.testing.assert_allclose(f64(got)[off], f64(want)[off], rtol=2 ** -7)  # one step at most


def test_merge_warns_where_a_float16_sum_overflows():
    """An adapter whose update passes float16's largest value (65504): the merged kernel holds inf
    where w is finite, which jlora.apply never computes; merge says so, naming the param."""
    lw = jlora.LoraWeight(jnp.ones((4, 4), jnp.float16), jnp.full((4, 1), 300.0), jnp.full((1, 4), 300.0), scale=1.0)
    with pytest.warns(UserWarning, match=r"jlora.merge: w \+ scale·a@b is not finite in 1 kernel\(s\) where w is, "
                                         r"e.g. layers/0/q \(16 entries; past the range of w's dtype"):
        merged = jlora.merge({"layers": [{"q": lw}, {"q": lw.replace(a=lw.a / 300)}]})
    assert np.isinf(merged["layers"][0]["q"]).all() and np.isfinite(merged["layers"][1]["q"]).all()
    inf_base = lw.replace(w=jnp.full((4, 4), jnp.inf, jnp.float16), a=lw.a / 300)  # inf already in w: not the merge's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jlora.merge({"q": inf_base})
        jax.jit(jlora.merge)({"q": lw})  # traced: nothing to count
    # over a quantized base (QLoRA merged onto a float16 model) too
    q8 = Int8Weight(jnp.ones((4, 4), jnp.int8), jnp.ones(4, jnp.float16))
    with pytest.warns(UserWarning, match=r"is not finite in 1 kernel\(s\) where w is, e.g. q \(16 entries"):
        assert np.isinf(jlora.merge({"q": lw.replace(w=q8)})["q"]).all()


def test_an_integer_base_put_in_by_a_tree_map_is_refused_not_truncated():
    """The constructor refuses an integer w (w + scale·a@b rounded to integers drops the adapter);
    replace, merge and apply refuse one a tree map or replace put there, naming the param."""
    lw = jlora.LoraWeight(jnp.ones((8, 4)), jnp.full((8, 2), 0.25), jnp.full((2, 4), 0.25), scale=1.0, path="q/kernel")
    as_int = jax.tree.map(lambda x: x.astype(jnp.int8) if x.shape == (8, 4) else x, lw)
    message = r"w must be a float array, got int8\[8,4\]"
    with pytest.raises(ValueError, match=r"LoraWeight 'layer/q': " + message):
        jlora.merge({"layer": {"q": as_int}})
    with pytest.raises(ValueError, match=r"LoraWeight 'q/kernel': " + message):
        jlora.apply(lambda w, x: x @ w)(as_int, jnp.ones((1, 8)))
    with pytest.raises(ValueError, match=r"LoraWeight 'q/kernel': " + message):
        lw.replace(w=jnp.ones((8, 4), jnp.int8))
    with pytest.raises(ValueError, match=r"LoraWeight 'q/kernel': b must be a float array, got int32\[2,4\]"):
        lw.replace(b=jnp.ones((2, 4), jnp.int32))


def test_merge_of_abstract_values_names_the_param():
    lw = jlora.LoraWeight(jax.ShapeDtypeStruct((4, 4), jnp.float32), jnp.ones((4, 2)), jnp.ones((2, 4)), scale=1.0)
    with pytest.raises(ValueError, match=r"jlora.merge: 'q/kernel' holds abstract values \(jax.ShapeDtypeStruct"):
        jlora.merge({"q": {"kernel": lw}})


def test_merge_gives_plain_arrays_over_a_quantized_base():
    """Adapters over int8 kernels and a quantized kernel no adapter touches: merged, all plain
    arrays, equal to merging over the float kernels they stand for."""
    p = tree()
    q8, v8 = quantize(p["q"]["kernel"].w), quantize(p["v"]["kernel"].w)
    over_int8 = {**p, "q": {**p["q"], "kernel": p["q"]["kernel"].replace(w=q8)}, "v": {"kernel": v8}}
    over_float = {**p, "q": {**p["q"], "kernel": p["q"]["kernel"].replace(w=q8.materialize())},
                  "v": {"kernel": v8.materialize()}}
    merged = jlora.merge(over_int8)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(merged))
    # to the last bit but one: merge compiles each leaf, and the int8 scale fuses with the sum
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), merged, jlora.merge(over_float))


@pytest.mark.filterwarnings("ignore:Some donated buffers were not usable")
def test_merge_with_donated_params():
    p = tree()
    want = jlora.merge(p)
    got = jax.jit(jlora.merge, donate_argnums=0)(jax.tree.map(jnp.copy, p))
    jax.tree.map(np.testing.assert_array_equal, got, want)


def test_unmerge_recovers_the_base_from_full_or_trainable_adapters():
    p = tree()
    merged = jlora.merge(p)
    for adapters in (p, jlora.split(p)[0]):
        back = jlora.unmerge(merged, adapters)
        np.testing.assert_allclose(back["q"]["kernel"].w, p["q"]["kernel"].w, rtol=1e-6, atol=1e-5)
        assert isinstance(back["q"]["bias"], jlora.Trainable)
    # QLoRA: a quantized kernel no adapter is on comes back as the base it is, from the whole tree
    qlora = {**p, "o": {"kernel": quantize(jax.random.normal(jax.random.key(5), (8, 8)))}}
    back = jlora.unmerge(jlora.merge(qlora), qlora)
    assert back["o"]["kernel"] is qlora["o"]["kernel"]
    np.testing.assert_allclose(back["q"]["kernel"].w, p["q"]["kernel"].w, rtol=1e-6, atol=1e-5)
    as_int = {**merged, "v": {"kernel": merged["v"]["kernel"].astype(jnp.int8)}}
    with pytest.raises(ValueError, match=r"jlora.unmerge: merged 'v/kernel' is int8; a merged kernel is float"):
        jlora.unmerge(as_int, p)


def test_unmerge_subtracts_the_product_merge_added():
    """bf16 factors over an f32 kernel: merge adds an f32 product, so unmerge must subtract that one
    (a bf16 product is 4e-3 off); f32 factors over an fp8 kernel (fp8 promotes with no other float
    in JAX) merge in f32, rounded once to fp8, and unmerge."""
    p = tree()
    lw = p["q"]["kernel"]
    lw = lw.replace(a=(3 * lw.a).astype(jnp.bfloat16), b=(3 * lw.b).astype(jnp.bfloat16))
    back = jlora.unmerge(jlora.merge({"q": lw}), {"q": lw})["q"]
    np.testing.assert_allclose(back.w, lw.w, rtol=0, atol=4e-6)
    lw8 = p["q"]["kernel"].replace(w=p["q"]["kernel"].w.astype(jnp.float8_e4m3fn))
    with pytest.warns(UserWarning, match=r"jlora.merge: 1 adapted kernel\(s\) in floats of 8 bits or fewer, e.g. q "
                                         r"\(float8_e4m3fn\): w \+ scale·a@b rounded to w's dtype keeps little"):
        merged = jlora.merge({"q": lw8})["q"]  # as it says, and as asked
    want = np.asarray(lw8.w.astype(jnp.float32), np.float64) + lw8.scale * np.asarray(lw8.a, np.float64) @ np.asarray(lw8.b, np.float64)
    assert merged.dtype == jnp.float8_e4m3fn
    np.testing.assert_array_equal(merged, jnp.asarray(want, jnp.float32).astype(jnp.float8_e4m3fn))
    assert jlora.unmerge({"q": merged}, {"q": lw8})["q"].w.dtype == jnp.float8_e4m3fn


def test_a_complex_kernel_merges_and_unmerges():
    """A complex w (built by hand: lora_init adapts float kernels) merges to a complex kernel, which
    unmerge took for no merged kernel at all."""
    p = tree()
    lw = p["q"]["kernel"]
    lw = lw.replace(w=lw.w * (1 + 0.5j))
    merged = jlora.merge({"q": lw})["q"]
    assert merged.dtype == jnp.complex64
    np.testing.assert_allclose(merged, lw.w + lw.scale * lw.a @ lw.b, rtol=1e-6)
    back = jlora.unmerge({"q": merged}, {"q": lw})["q"]
    np.testing.assert_allclose(back.w, lw.w, rtol=0, atol=1e-6)


def test_unmerge_refuses_mismatched_trees_and_shapes():
    p = tree()
    merged = jlora.merge(p)
    with pytest.raises(ValueError, match="only in merged"):
        jlora.unmerge({**merged, "extra": jnp.ones(3)}, p)
    bad = {**merged, "v": {"kernel": jnp.ones((4, 8))}}
    with pytest.raises(ValueError, match=r"merged 'v/kernel' has shape \(4, 8\)"):
        jlora.unmerge(bad, p)
    for swapped in ((p, merged), (p, jlora.split(p)[0])):  # the arguments swapped, or the LoRA tree as merged
        with pytest.raises(ValueError, match=r"merged holds jlora nodes .*: pass the merged params .* first"):
            jlora.unmerge(*swapped)


def test_labels_of_full_tree_and_halves():
    p = tree()
    assert jax.tree.leaves(jlora.labels(p)) == ["trainable", "frozen", "lora_a", "lora_b", "frozen", "lora_a", "lora_b"]
    assert jax.tree.leaves(jlora.labels(jlora.split(p)[0])) == ["trainable", "lora_a", "lora_b", "lora_a", "lora_b"]


def test_summary_counts_like_peft():
    s = jlora.summary(tree())
    assert (s.trainable, s.total) == (2 * (8 + 8) + 2 * (8 + 4) + 8, 64 + 32 + 8 + 32 + 24)
    text = str(s)
    assert "q/kernel" in text and "trainable params: 64 || all params: 160 || trainable%: 40.0000" in text
    # integer arrays and PRNG keys are no params (an index table, a step counter, RNG state), as PyTorch's buffers
    with_buffers = {**tree(), "positions": jnp.arange(100), "step": jnp.int32(3), "rng": jax.random.key(0),
                    "rate": 0.1}
    assert (jlora.summary(with_buffers).trainable, jlora.summary(with_buffers).total) == (s.trainable, s.total)
    members = jax.vmap(lambda k: jlora.lora_init(k, {"w": jnp.ones((8, 8))}, jlora.LoraConfig(rank=2, targets=["w"])))(
        jax.random.split(KEY, 3))  # an ensemble: a member's adapter each
    assert jlora.summary(members).targets[0][1:3] == ("3x8x8", "bio")


def test_whole_tree_operations_refuse_one_half_of_split():
    p = tree()
    trainable, frozen = jlora.split(p)
    for op, half, name in [(jlora.merge, trainable, "trainable"), (jlora.merge, frozen, "frozen"),
                           (jlora.summary, trainable, "trainable"), (jlora.summary, frozen, "frozen"),
                           (lambda t: jlora.unmerge(jlora.merge(p), t), frozen, "frozen")]:
        with pytest.raises(ValueError, match=f"'q/(kernel|bias)' comes from the {name} half of jlora.split"):
            op(half)


def test_a_hand_edited_node_is_refused_before_jax_sees_it():
    p = tree()
    lw = p["q"]["kernel"]
    bad = {**p, "q": {**p["q"], "kernel": lw.replace(b=jnp.zeros((lw.rank + 2, lw.shape[1])))}}
    forward = jlora.apply(lambda params, x: x @ params["q"]["kernel"])
    for op, call in (("jlora.merge", lambda: jlora.merge(bad)), ("jlora.apply", lambda: forward(bad, jnp.ones((1, lw.shape[0])))),
                     ("jlora.summary", lambda: jlora.summary(bad))):
        with pytest.raises(ValueError, match=rf"{op}: LoraWeight 'q/kernel': for w .* a must be .* and b "):
            call()


def test_split_puts_a_quantized_kernel_whole_in_the_frozen_half():
    """A lazy kernel no adapter touches is frozen whole: the trainable half is the same over an
    int8 base as over the float one, and summary counts the kernel by the array it stands for."""
    base = {"q": {"kernel": jax.random.normal(KEY, (8, 8))}, "k": {"kernel": jax.random.normal(KEY, (8, 4))}}
    cfg = jlora.LoraConfig(rank=2, targets=["q"])
    over_float = jlora.lora_init(KEY, base, cfg)
    over_int8 = jlora.lora_init(KEY, {"q": {"kernel": quantize(base["q"]["kernel"])},
                                      "k": {"kernel": quantize(base["k"]["kernel"])}}, cfg)
    trainable, frozen = jlora.split(over_int8)
    assert trainable["k"]["kernel"] is None and frozen["k"]["kernel"] is over_int8["k"]["kernel"]
    assert jax.tree.structure(trainable) == jax.tree.structure(jlora.split(over_float)[0])
    back = jlora.combine(jlora.split(over_float)[0], frozen)  # trained over the float base, run over int8
    assert back["k"]["kernel"] is over_int8["k"]["kernel"] and back["q"]["kernel"].w is over_int8["q"]["kernel"].w
    assert (jlora.summary(over_int8).trainable, jlora.summary(over_int8).total) == \
           (jlora.summary(over_float).trainable, jlora.summary(over_float).total)


def test_split_and_combine_an_adapter_stacked_on_an_adapter():
    """A LoraWeight whose w is a LoraWeight (a second adapter over a merged-in first): the outer
    factors are trainable, the inner adapter is frozen whole."""
    inner = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.ones((2, 4)), scale=0.5, path="w")
    outer = {"w": jlora.LoraWeight(inner, jnp.full((4, 1), 2.0), jnp.ones((1, 4)), scale=1.0, path="w")}
    trainable, frozen = jlora.split(outer)
    assert trainable["w"].w is None and frozen["w"].w is inner
    back = jlora.combine(trainable, frozen)
    assert jax.tree.structure(back) == jax.tree.structure(outer)
    np.testing.assert_array_equal(jlora.merge(back)["w"], jlora.merge(outer)["w"])


def test_summary_counts_nnx_params_not_their_state():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.bn = nnx.BatchNorm(8, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)  # holds RNG state

    model = Net(nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    s = jlora.summary(jlora.lora_init(KEY, model, jlora.LoraConfig(rank=2, targets=["l1"])))
    assert (s.trainable, s.total) == (2 * (4 + 8), params + 2 * (4 + 8))  # as PEFT leaves out buffers


def test_combine_names_the_static_field_two_nnx_halves_differ_in():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 4, rngs=rngs)
            self.drop = nnx.Dropout(0.5, rngs=rngs)

    trainable, frozen = jlora.split(jlora.lora_init(KEY, Net(nnx.Rngs(0)), jlora.LoraConfig(rank=2, targets=["l1"])))
    frozen.eval()  # one half switched to evaluation
    with pytest.raises(ValueError, match="at 'drop' trainable has deterministic=False, frozen deterministic=True"):
        jlora.combine(trainable, frozen)


def test_combine_names_the_static_field_two_equinox_halves_differ_in():
    eqx = pytest.importorskip("equinox")
    x = jnp.ones((2, 4))
    halves = [jlora.split(jlora.lora_init(KEY, eqx.nn.MLP(4, 3, width, 2, key=KEY), jlora.LoraConfig(rank=2, targets=["layers"]),
                                          infer_layout=lambda m: jax.vmap(m)(x)))
              for width in (16, 8)]  # halves of two builds of a model
    with pytest.raises(ValueError, match="at '/' trainable has width_size=16, frozen width_size=8"):
        jlora.combine(halves[0][0], halves[1][1])
    with pytest.raises(ValueError, match="at '0' trainable has out_features=16, frozen out_features=8"):
        jlora.combine(halves[0][0].layers, halves[1][1].layers)


def test_combine_shows_the_static_data_of_a_node_it_cannot_name_the_fields_of():
    @jax.tree_util.register_pytree_node_class
    class Box:
        def __init__(self, value, tag):
            self.value, self.tag = value, tag

        def tree_flatten(self):
            return (self.value,), (self.tag,)

        @classmethod
        def tree_unflatten(cls, aux, children):
            return cls(children[0], *aux)

    lw = jlora.LoraWeight(jnp.ones((4, 4)), jnp.ones((4, 2)), jnp.zeros((2, 4)), scale=1.0)
    trainable, frozen = jlora.split({"box": Box({"k": lw}, "left")})
    frozen["box"].tag = "right"
    with pytest.raises(ValueError, match=r"at 'box' trainable has a Box of static data \('left',\), frozen \('right',\)"):
        jlora.combine(trainable, frozen)


def test_adapters_stacked_over_one_base_are_used_under_vmap_only():
    base = {"q": {"kernel": jax.random.normal(KEY, (6, 5))}}
    config = jlora.LoraConfig(rank=2, targets=["q"])
    _, frozen = jlora.split(jlora.lora_init(KEY, base, config))
    adapters = [perturb(jlora.split(jlora.lora_init(jax.random.key(i), base, config))[0], jax.random.key(i))
                for i in range(3)]
    stacked = jax.tree.map(lambda *z: jnp.stack(z), *adapters)
    fn = lambda p, x: x @ p["q"]["kernel"]
    x = jnp.ones((4, 6))
    mapped = jax.vmap(lambda t: jlora.merge(jlora.combine(t, frozen)), in_axes=0)(stacked)
    for i, adapter in enumerate(adapters):
        want = oracle_merge(jlora.combine(adapter, frozen))
        np.testing.assert_allclose(mapped["q"]["kernel"][i], want["q"]["kernel"], rtol=1e-6)
    together = jlora.combine(stacked, frozen)  # combine keeps it: it is what jax.vmap's in_axes take
    for use, name, mapped in [(jlora.merge, "merge", r"jlora.merge\(jlora.combine\(t, frozen\)\)\)\(stacked\)"),
                              (lambda p: jlora.apply(fn)(p, x), "apply", r"in_axes=\(0, None\)\)\(stacked, x\)")]:
        with pytest.raises(ValueError, match=rf"jlora.{name}: 'q/kernel' has a \(3, 6, 2\) and b \(3, 2, 5\) "
                                             rf"with 1 leading axis.*w \(6, 5\) lacks.*jax.vmap.*{mapped}"):
            use(together)


def test_a_module_holding_a_layer_twice_is_counted_once_and_not_split():
    from flax import nnx

    class Tied(nnx.Module):
        def __init__(self):
            self.a = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
            self.b = self.a  # one layer used twice
            self.c = nnx.Linear(8, 2, rngs=nnx.Rngs(1))

    graphdef, state = nnx.split(Tied())
    state = jlora.lora_init(KEY, state, jlora.LoraConfig(rank=2, targets=["a", "c"]))
    model = nnx.merge(graphdef, state)
    counted = jlora.summary(model)
    assert (counted.trainable, counted.total) == ((8 * 2 + 2 * 8) + (8 * 2 + 2 * 2), 8 * 8 + 8 + 8 * 2 + 2 + 52)
    assert (counted.trainable, counted.total) == (jlora.summary(state).trainable, jlora.summary(state).total)
    # split would give each place its own copy of the adapter, each then trained on its own
    with pytest.raises(ValueError, match=r"jlora.split: 'a/bias' and 'b/bias' are one NNX variable.*nnx.split\(model\); "
                                         r"trainable, frozen = jlora.split\(state\)$"):
        jlora.split(model)


def test_one_adapter_picked_from_a_combined_stack_is_refused_naming_the_param(tmp_path):
    """Picking adapter k from the combined tree slices each w too (a row of the base): apply, merge
    and save say so, not JAX's dot_general (p199); picked from the trainable half it is that adapter."""
    trees = [perturb(tree(), jax.random.key(i)) for i in range(3)]
    frozen = jlora.split(trees[0])[1]
    stacked = jlora.stack([jlora.split(t)[0] for t in trees])
    fn = lambda p, x: x @ p["q"]["kernel"]
    bad = jax.tree.map(lambda v: v[1], jlora.combine(stacked, frozen))
    message = (r"'q/kernel': w \(8,\) has fewer axes than its layout 'io' names, a \(8, 2\) and b \(2, 8\) do not: "
               r"a slice of the whole tree cut the base too; slice the trainable half only, jax.tree.map\(lambda v: "
               r"v\[k\], trainable\)")
    for op, call in [("jlora.apply", lambda: jlora.apply(fn)(bad, jnp.ones((2, 8)))), ("jlora.merge", lambda: jlora.merge(bad)),
                     ("save_adapter", lambda: jlora.adapter.save_adapter(tmp_path / "ad", bad))]:
        with pytest.raises(ValueError, match=rf"{op}: LoraWeight {message}"):
            call()
    table = str(jlora.summary(jlora.combine(stacked, frozen)))  # the stack's factors counted, and said to be 3 adapters'
    assert "q/kernel  8x8    io, 3 adapters" in table and "trainable params: 192 ||" in table, table  # 3·(32+24+8)
    picked = jlora.combine(jax.tree.map(lambda v: v[1], stacked), frozen)
    np.testing.assert_allclose(jlora.apply(fn)(picked, jnp.ones((2, 8))), fn(oracle_merge(trees[1]), jnp.ones((2, 8))),
                               rtol=1e-6, atol=1e-6)


def test_stacked_adapters_serve_one_per_row_over_one_base():
    """Multi-tenant serving: each row of the batch with its own adapter, the base once; each row as
    the merged weights of its adapter give it, and no adapter's ΔW formed."""
    fn = lambda p, x: jax.nn.silu(x @ p["q"]["kernel"] + p["q"]["bias"]) @ p["v"]["kernel"]  # q's sum kept: stacked
    trees = [perturb(tree(), jax.random.key(i)) for i in range(3)]
    frozen = jlora.split(trees[0])[1]
    halves = [jlora.split(t)[0] for t in trees]
    stacked = jlora.stack(halves)
    assert stacked["q"]["kernel"].a.shape == (3, 8, 2) and stacked["q"]["kernel"].w is None
    x = jax.random.normal(KEY, (3, 5, 8))
    serve = jax.jit(jax.vmap(lambda t, x: jlora.apply(fn)(jlora.combine(t, frozen), x)))
    got = serve(stacked, x)
    for i, half in enumerate(halves):
        np.testing.assert_allclose(got[i], fn(oracle_merge(jlora.combine(half, frozen)), x[i]), rtol=1e-5, atol=1e-6)
    jaxpr = str(jax.make_jaxpr(jax.vmap(lambda t, x: jlora.apply(fn)(jlora.combine(t, frozen), x)))(stacked, x))
    assert "3,8,8]" not in jaxpr  # no per-adapter (3, 8, 8) ΔW, nor a copy of w per adapter
    for unseen in (jax.jit, jax.checkpoint):  # the vmap hidden from jlora.apply: still no copy of w per adapter
        row = jax.vmap(unseen(lambda t, x: jlora.apply(fn)(jlora.combine(t, frozen), x)))
        np.testing.assert_allclose(row(stacked, x), got, rtol=1e-5, atol=1e-6)
        jaxpr = str(jax.make_jaxpr(jax.grad(lambda t: jnp.sum(row(t, x))))(stacked))
        assert "3,8,8]" not in jaxpr and "3,10,8]" not in jaxpr
    # one adapter over a stack of bases keeps the stacked matmul [x | t] @ [w ; b]: it copies b per base
    bases = jax.tree.map(lambda w: jnp.stack([w] * 3), frozen)
    over_bases = jax.vmap(lambda f, x: jlora.apply(fn)(jlora.combine(halves[0], f), x))
    assert "concatenate" in str(jax.make_jaxpr(over_bases)(bases, x))
    with pytest.raises(ValueError, match=r"jlora.stack: adapter 0 holds base weights \(w at 'q/kernel'\): stack the "
                                         r"trainable halves"):
        jlora.stack(trees)
    dropped = jax.tree.map(lambda x: x.replace(dropout=0.1) if isinstance(x, jlora.LoraWeight) else x, halves[1],
                           is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    with pytest.raises(ValueError, match=r"jlora.stack: adapter 0 and adapter 1 do not have the same structure: .*"
                                         r"'dropout': 0.1.*set the rate to 0 in every adapter and in the frozen half: "
                                         r"lw.replace\(dropout=0.0\)"):
        jlora.stack([halves[0], dropped])
    base = {"q": {"kernel": trees[0]["q"]["kernel"].w, "bias": jnp.zeros(8)}, "v": {"kernel": trees[0]["v"]["kernel"].w},
            "none": None}
    # rank 4 at alpha 16: the same scale as rank 2 at alpha 8
    wider = jlora.split(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=4, alpha=16, targets=["q", "v"],
                                                                     trainable=["q/bias"])))[0]
    with pytest.raises(ValueError, match=r"jlora.stack: at 'q/kernel/a' adapter 1 has shape \(8, 4\), adapter 0 \(8, 2\) "
                                         r"\(another rank: jlora.stack\(adapters, pad=True\); or ensembles of other sizes\?\)"):
        jlora.stack([halves[0], wider])
    with pytest.raises(ValueError, match=r"jlora.stack: at 'q/bias' adapter 1 is bfloat16, adapter 0 float32"):
        jlora.stack([halves[0], jax.tree.map(lambda x: x.astype(jnp.bfloat16), halves[1])])
    with pytest.raises(ValueError, match="jlora.stack: adapters must be a non-empty list of adapters, got dict"):
        jlora.stack(halves[0])
    with pytest.raises(ValueError, match=r"jlora.unmerge: merged 'q/kernel' has shape \(8, 8\), .*\(layout 'bio'\); a "
                                         r"stack of adapters \(jlora.stack\) has one merged model per adapter"):
        jlora.unmerge(jlora.merge(trees[0]), stacked)


def test_adapters_of_other_ranks_and_alphas_stack_padded_each_row_its_own():
    """PEFT's mixed-adapter batches take adapters of any ranks and alphas; padded with zeros to the
    largest rank, each scale folded into b as adapter 0's, every row is its own adapter's."""
    key = jax.random.split(KEY, 4)
    base = {"q": {"kernel": jax.random.normal(key[0], (8, 8))},
            "layers": {"kernel": jax.random.normal(key[1], (2, 8, 8))}}  # stacked layers: b's rank axis is its 2nd
    fn = lambda p, x: jnp.tanh(x @ p["q"]["kernel"]) @ p["layers"]["kernel"][0] @ p["layers"]["kernel"][1]
    configs = [jlora.LoraConfig(rank=r, alpha=alpha, layouts={"layers/kernel": "bio"}) for r, alpha in [(2, 8), (4, 4), (1, 3)]]
    trees = [perturb(jlora.lora_init(key[2], base, c), jax.random.key(i), 0.5)
             for i, c in enumerate(configs)]
    halves = [jlora.split(t)[0] for t in trees]
    frozen = jlora.split(trees[0])[1]
    with pytest.raises(ValueError, match=r"do not have the same structure.*or with jlora.stack\(adapters, pad=True\)"):
        jlora.stack(halves)
    stacked = jlora.stack(halves, pad=True)
    assert stacked["layers"]["kernel"].b.shape == (3, 2, 4, 8) and stacked["q"]["kernel"].scale == 4.0
    np.testing.assert_array_equal(stacked["q"]["kernel"].a[2, :, 1:], 0.0)  # rank 1: three zero directions
    fixed = jlora.stack(halves, pad=6)  # one shape for any ranks up to 6: one compile for a server
    assert fixed["q"]["kernel"].a.shape == (3, 8, 6) and fixed["layers"]["kernel"].b.shape == (3, 2, 6, 8)
    for bad in (0, 2.5, "4"):
        with pytest.raises(ValueError, match=r"jlora.stack: pad must be True, False or a rank >= 1 to pad to, got"):
            jlora.stack(halves, pad=bad)
    x = jax.random.normal(key[3], (3, 5, 8))
    serve = jax.jit(jax.vmap(lambda t, x: jlora.apply(fn)(jlora.combine(t, frozen), x)))
    for got in (serve(stacked, x), serve(fixed, x)):
        for i, t in enumerate(trees):
            np.testing.assert_allclose(got[i], fn(oracle_merge(t), x[i]), rtol=1e-5, atol=1e-5)
    dropped = jax.tree.map(lambda lw: lw.replace(dropout=0.1), halves[1], is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    with pytest.raises(ValueError, match=r"'dropout': 0.1.*set the rate to 0 in every adapter and in the frozen half: "
                                         r"lw.replace\(dropout=0.0\)\)$"):
        jlora.stack([halves[0], dropped], pad=True)  # pad does not help there: not suggested
    # an adapter of fewer targets: a zero update where it has none, as PEFT serves a row without one
    qv = jlora.LoraConfig(rank=3, alpha=3, targets=["q"], layouts={"layers/kernel": "bio"})
    fewer = perturb(jlora.lora_init(key[2], base, qv), jax.random.key(7), 0.5)
    got = jax.jit(jax.vmap(lambda t, x: jlora.apply(fn)(jlora.combine(t, frozen), x)))(
        jlora.stack([halves[0], jlora.split(fewer)[0]], pad=True), x[:2])
    np.testing.assert_allclose(got[1], fn(oracle_merge(fewer), x[1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"adapter 1 adapts 'layers/kernel', adapter 0 does not: with pad=True, put "
                                         r"first an adapter that adapts every param the others do"):
        jlora.stack([jlora.split(fewer)[0], halves[0]], pad=True)
    # a float16 b times a scale ratio of 4096 overflows: refused, not served as inf
    small, large = (jlora.LoraWeight(None, jnp.ones((4, r), jnp.float16), jnp.full((r, 3), 20.0, jnp.float16),
                                     scale=s) for r, s in ((64 // 16, 1 / 64), (1, 64.0)))
    with pytest.raises(ValueError, match=r"at 'k' adapter 1's b times its scale over adapter 0's \(64 / 0.015625\) "
                                         r"leaves the range of float16: cast the factors to float32"):
        jlora.stack([{"k": small}, {"k": large}], pad=True)
    with pytest.raises(ValueError, match=r"adapter 1's b times its scale over adapter 0's \(0.015625 / 64\) leaves the "
                                         r"range of float16"):  # and below: 0.02 / 4096 is no normal float16
        jlora.stack([{"k": large}, {"k": small.replace(b=small.b * 1e-3)}], pad=True)
    zero = jax.tree.map(lambda lw: lw.replace(scale=0.0), halves[0], is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    with pytest.raises(ValueError, match=r"jlora.stack: at '(q|layers)/kernel' adapter 0's scale is 0, adapter 1's 1.0"):
        jlora.stack([zero, halves[1]], pad=True)


def test_arrays_a_jitted_step_deleted_are_named_by_merge_unmerge_and_apply():
    """An array given to a jitted step to reuse (donate_argnums) is deleted; JAX's error names no param."""
    params = tree()
    trainable, frozen = jlora.split(params)
    stale = trainable
    trainable = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)(trainable)
    if jlora.paths.deleted_path(stale) is None:
        pytest.skip("this backend kept the donated arrays")
    where, gone = r"(q/bias|q/kernel/a)", r"' was deleted \(donated: given to a jitted step to reuse, .*\); pass live arrays"
    with pytest.raises(ValueError, match=r"jlora.merge: '" + where + gone):
        jlora.merge(jlora.combine(stale, frozen))
    with pytest.raises(ValueError, match=r"jlora.unmerge: 'adapters/" + where + gone):
        jlora.unmerge(jlora.merge(jlora.combine(trainable, frozen)), stale)
    forward = jlora.apply(lambda p, x: x @ p["q"]["kernel"] + p["q"]["bias"])
    with pytest.raises(ValueError, match=r"jlora.apply: keyword argument 'p' at '" + where + gone):
        forward(p=jlora.combine(stale, frozen), x=jnp.ones((2, 8)))
    forward(jlora.combine(trainable, frozen), jnp.ones((2, 8)))  # the step's own are fine
    # a plain leaf (a head no adapter touches) of a frozen half a step donated: merge returned it as it was
    params = jlora.lora_init(KEY, {"q": {"kernel": jnp.ones((8, 8))}, "head": jnp.ones((8, 2))},
                             jlora.LoraConfig(rank=2, targets=["q"]))
    trainable, frozen = jlora.split(params)
    frozen = {"q": frozen["q"], "head": frozen["head"]}
    kept = jax.jit(lambda f: f, donate_argnums=0)({"head": frozen["head"]})
    with pytest.raises(ValueError, match=r"jlora.merge: 'head" + gone):
        jlora.merge(jlora.combine(trainable, frozen))
    jlora.merge(jlora.combine(trainable, {**frozen, **kept}))


@pytest.mark.skipif(not hasattr(BaseException, "add_note") or jax.device_count() < 2, reason="notes: Python 3.11+; 2 devices")
def test_a_merge_that_jax_refuses_names_the_param():
    """Factors on another device than w: JAX's error names merge's internal argument, the note the param."""
    params = tree()
    lw = params["q"]["kernel"]
    params["q"]["kernel"] = lw.replace(w=jax.device_put(lw.w, jax.devices()[1]), a=jax.device_put(lw.a, jax.devices()[0]))
    with pytest.raises(ValueError, match="incompatible devices") as err:
        jlora.merge(params)
    assert "jlora.merge: at 'q/kernel'" in err.value.__notes__


def test_halves_one_of_nnx_variables_and_one_of_plain_values_are_told_apart_in_combine():
    """An optax callback (lbfgs's ``value_fn``) is given a half of an ``nnx.State`` as plain values:
    combining it with the state's other half said 'trainable has a LoraWeight, frozen a LoraWeight'."""
    from flax import nnx

    from jlora.variables import without_variables

    state = nnx.state(jlora.lora_init(jax.random.key(0), nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
                                      jlora.LoraConfig(rank=2, targets=["kernel"])))
    trainable, frozen = jlora.split(state)
    with pytest.raises(ValueError, match=r"frozen holds NNX variables \(an nnx.State, a module\), trainable plain values"):
        jlora.combine(without_variables(trainable), frozen)
    pure = jlora.combine(*(nnx.to_pure_dict(half) for half in (trainable, frozen)))  # one kind: fine
    np.testing.assert_array_equal(pure["kernel"].a, without_variables(state)["kernel"].a)
