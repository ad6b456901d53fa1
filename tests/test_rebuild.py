"""Adapters' inputs rebuilt in the backward (``apply(..., recompute="inputs")``, the default)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from jlora import _compat, rebuild
from jlora.lazy import Context, Frame
from oracle import check_against_oracle, normal, perturb

KEY = jax.random.key(0)
D, F = 16, 24


def rms_norm(h, w):
    var = jnp.mean(h.astype(jnp.float32) ** 2, axis=-1, keepdims=True)
    return w * (h.astype(jnp.float32) / jnp.sqrt(var + 1e-6)).astype(h.dtype)


def block(p, h):
    """A pre-norm gated MLP with a residual, as in Llama."""
    x = rms_norm(h, p["norm"])
    act = jax.nn.silu(x @ p["gate"]) * (x @ p["up"])
    return h + act @ p["down"]


def model(p, h):
    for layer in p["layers"]:
        h = block(layer, h)
    return h


def base_params(dtype=jnp.float32):
    def layer(k):
        kg, ku, kd = jax.random.split(k, 3)
        return {"norm": jnp.ones((D,), dtype), "gate": (normal(kg, (D, F)) / 4).astype(dtype),
                "up": (normal(ku, (D, F)) / 4).astype(dtype),
                "down": (normal(kd, (F, D)) / 5).astype(dtype)}
    return {"layers": [layer(k) for k in jax.random.split(KEY, 2)]}


def adapted(targets=("gate", "up", "down"), dtype=jnp.float32):
    cfg = jlora.LoraConfig(rank=4, targets=list(targets))
    return perturb(jlora.lora_init(KEY, base_params(dtype), cfg), KEY)


def frame_of(fn, *args):
    closed = jax.make_jaxpr(fn)(*args)
    return Frame(_compat.open_jaxpr(closed)[0], {})


def dot_inputs(frame):
    """The ``x`` operand of every matmul, in order."""
    return [e.invars[0] for e in frame.eqns if e.primitive is _compat.dot_general_p]


def test_chains_are_found_for_a_norm_output_and_a_gated_activation():
    p = base_params()["layers"][0]
    frame = frame_of(block, p, jnp.ones((3, D)))
    norm_x, _, act_x = dot_inputs(frame)
    norm_chain = rebuild.find(frame, norm_x)
    assert norm_chain is not None
    # rebuilt from the residual input, the norm statistics and the norm weight
    assert sorted(tuple(v.aval.shape) for v in norm_chain.leaves) == [(3,), (3, D), (D,)]
    act_chain = rebuild.find(frame, act_x)
    assert act_chain is not None and [v.aval.shape for v in act_chain.leaves] == [(3, F), (3, F)]


def test_no_chain_where_storing_is_as_good():
    # a cast only: its backward keeps nothing, so the leaf would be stored instead of x
    frame = frame_of(lambda h, w: h.astype(jnp.bfloat16) @ w, jnp.ones((3, D)), jnp.ones((D, 4), jnp.bfloat16))
    assert rebuild.find(frame, dot_inputs(frame)[0]) is None
    # the output of another matmul (attention's probs @ v): not elementwise
    frame = frame_of(lambda a, b, w: (a @ b) @ w, jnp.ones((3, 5)), jnp.ones((5, D)), jnp.ones((D, 4)))
    assert rebuild.find(frame, dot_inputs(frame)[1]) is None
    # the function's own input
    frame = frame_of(lambda h, w: h @ w, jnp.ones((3, D)), jnp.ones((D, 4)))
    assert rebuild.find(frame, dot_inputs(frame)[0]) is None
    # tanh, the logistic, exp: their backward keeps their output (x itself), not their operand, so a
    # rebuild from h would store h beside x (measured: 1.5x hand-written LoRA's scratch)
    for act in (jnp.tanh, jax.nn.sigmoid, jnp.exp, jnp.sqrt, lambda h: 2.0 * jnp.tanh(h)):
        frame = frame_of(lambda h, b, w: act(h + b) @ w, jnp.ones((64, D)), jnp.ones(D), jnp.ones((D, 4)))
        assert rebuild.find(frame, dot_inputs(frame)[0]) is None
    for act in (jax.nn.silu, jax.nn.gelu, jax.nn.relu, lambda h: h * jnp.tanh(h)):  # these keep h: rebuilt
        frame = frame_of(lambda h, b, w: act(h + b) @ w, jnp.ones((64, D)), jnp.ones(D), jnp.ones((D, 4)))
        assert rebuild.find(frame, dot_inputs(frame)[0]) is not None


def test_a_tanh_mlp_stores_no_more_than_hand_written_lora():
    """The adapters' inputs tanh(h + bias) are what tanh's backward keeps: stored, not rebuilt."""
    base = {"layers": [{"kernel": normal(k, (D, D)) / 4, "bias": normal(k, (D,))} for k in jax.random.split(KEY, 3)]}
    params = perturb(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=4, targets=["layers"])), KEY)
    trainable, frozen = jlora.split(params)
    mlp = lambda p, h: jax.tree.reduce(lambda h, l: jnp.tanh(h @ l["kernel"] + l["bias"]), p["layers"], h,
                                       is_leaf=lambda l: isinstance(l, dict))

    def by_hand(t, h):
        for lt, lf in zip(t["layers"], frozen["layers"]):
            lw, bias = lt["kernel"], lf["bias"]
            h = jnp.tanh(h @ lf["kernel"].w + lw.scale * (h @ lw.a) @ lw.b + bias)
        return h

    h = normal(KEY, (256, D))
    scratch = lambda f: jax.jit(jax.grad(lambda t: jnp.sum(f(t, h) ** 2))).lower(trainable).compile() \
        .memory_analysis().temp_size_in_bytes
    assert scratch(lambda t, h: jlora.apply(mlp)(jlora.combine(t, frozen), h)) <= scratch(by_hand)
    check_against_oracle(mlp, params, h)


@pytest.mark.parametrize("recompute", ["inputs", False, True])
def test_every_recompute_mode_matches_the_oracle(recompute):
    check_against_oracle(model, adapted(), normal(KEY, (2, 5, D)), recompute=recompute)


def test_recompute_modes_give_the_same_gradients():
    params, h = adapted(), normal(KEY, (2, 5, D))
    trainable, frozen = jlora.split(params)

    def grads(recompute):
        forward = jlora.apply(model, recompute=recompute)
        loss = lambda t: jnp.sum(forward(jlora.combine(t, frozen), h) ** 2)
        return jax.jit(jax.grad(loss))(trainable)

    for got in (grads("inputs"), grads(True)):
        jax.tree.map(lambda a, b: assert_close(a, b, 1e-5), got, grads(False))


def assert_close(got, want, tol):
    """Equal up to ``tol`` times the largest entry: float32 sums run in another order (the joint
    matmul of ``jlora.joint`` adds both terms in one pass), which moves small entries most."""
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * float(jnp.abs(want).max()))


def residuals(recompute, params, h):
    """The arrays a ``jax.vjp`` of the model keeps for its backward (w.r.t. adapters and input)."""
    trainable, frozen = jlora.split(params)
    forward = jlora.apply(model, recompute=recompute)
    _, vjp = jax.vjp(lambda t, h: forward(jlora.combine(t, frozen), h), trainable, h)
    return [np.asarray(r) for r in jax.tree.leaves(vjp) if hasattr(r, "shape")]


def stored(value, arrays):
    return any(r.shape == value.shape and np.allclose(r, value, rtol=1e-5, atol=1e-6) for r in arrays)


def test_the_adapters_inputs_are_not_stored():
    params, h = adapted(), normal(KEY, (2, 5, D))
    layer = jlora.merge(params)["layers"][1]
    h1 = block(jlora.merge(params)["layers"][0], h)
    x = rms_norm(h1, layer["norm"])  # the second block's adapted inputs: its input is differentiated
    act = jax.nn.silu(x @ layer["gate"]) * (x @ layer["up"])
    kept = residuals(False, params, h)
    assert stored(x, kept) and stored(act, kept)  # the check can fail
    lean = residuals("inputs", params, h)
    assert not stored(x, lean) and not stored(act, lean)
    assert stored(h1, lean)  # what the rebuild reads, kept by the norm's own backward


def biased_mlp(p, h):
    """GPT-2's and BERT's MLP: Dense with a bias, then GELU."""
    for layer in p["layers"]:
        h = h + jax.nn.gelu(h @ layer["fc"]["kernel"] + layer["fc"]["bias"]) @ layer["proj"]["kernel"]
    return h


def test_an_activation_of_a_biased_matmul_is_rebuilt_not_stored():
    base = {"layers": [{"fc": {"kernel": normal(k, (D, F)) / 4, "bias": normal(k, (F,))},
                        "proj": {"kernel": normal(k, (F, D)) / 5}} for k in jax.random.split(KEY, 2)]}
    frame = frame_of(biased_mlp, base, jnp.ones((64, D)))  # a bias is small beside 64 tokens' activations
    chain = rebuild.find(frame, dot_inputs(frame)[1])  # gelu(h + bias): rebuilt from h and the bias
    assert chain is not None and sorted(tuple(v.aval.shape) for v in chain.leaves) == [(F,), (64, F)]
    params = perturb(jlora.lora_init(KEY, base, jlora.LoraConfig(rank=4, targets=["fc", "proj"])), KEY)
    h = normal(KEY, (2, 32, D))
    check_against_oracle(biased_mlp, params, h)
    trainable, frozen = jlora.split(params)
    _, vjp = jax.vjp(lambda t: jlora.apply(biased_mlp)(jlora.combine(t, frozen), h), trainable)
    layer = jlora.merge(params)["layers"][0]
    act = jax.nn.gelu(h @ layer["fc"]["kernel"] + layer["fc"]["bias"])
    assert not stored(act, [np.asarray(r) for r in jax.tree.leaves(vjp) if hasattr(r, "shape")])


def test_a_sum_read_by_a_rebuilt_chain_is_kept_whole():
    layer, h = adapted()["layers"][0], jnp.ones((3, D))
    jaxpr = _compat.open_jaxpr(jax.make_jaxpr(block)(jlora.merge(layer), h))[0]
    values = jax.tree.leaves((layer, h), is_leaf=lambda x: isinstance(x, jlora.LoraWeight))
    frame = Frame(jaxpr, dict(zip(jaxpr.invars, values)))
    gate_out, up_out, down_out = (e.outvars[0] for e in frame.eqns if e.primitive is _compat.dot_general_p)
    # gate and up are the leaves that rebuild down's input; down's output is no leaf
    assert rebuild.kept_for_rebuild(frame, gate_out, Context()) and rebuild.kept_for_rebuild(frame, up_out, Context())
    assert not rebuild.kept_for_rebuild(frame, down_out, Context())


def grad_jaxpr(params, tokens=8, **kwargs):
    trainable, frozen = jlora.split(params)
    forward = jlora.apply(model)
    loss = lambda t: jnp.sum(forward(jlora.combine(t, frozen), jnp.ones((tokens, D)), **kwargs))
    return str(jax.make_jaxpr(jax.grad(loss))(trainable))


def test_a_sum_read_by_a_rebuilt_chain_is_one_matmul():
    stacked = r"f32\[20,24\] = concatenate"  # [w ; b] of gate and up: D + rank rows
    assert len(re.findall(stacked, grad_jaxpr(adapted()))) == 4  # gate and up of 2 layers
    # fewer tokens than half of D: stacking the weight costs more than the add pass it saves
    few = grad_jaxpr(adapted(), tokens=7)
    assert not re.search(stacked, few) and "optimization_barrier" in few
    # down is frozen: nothing reads silu(gate)·up's leaves, the sums stay plain
    text = grad_jaxpr(adapted(targets=("gate", "up")))
    assert not re.search(stacked, text) and "optimization_barrier" not in text
    # under LoRA dropout the inputs are stored (the mask would have to be replayed too)
    dropping = jlora.lora_init(KEY, base_params(), jlora.LoraConfig(rank=4, targets=["gate", "up", "down"], dropout=0.1))
    text = grad_jaxpr(dropping, lora_rng=KEY)
    assert not re.search(stacked, text) and "optimization_barrier" not in text


def test_a_stored_sum_is_pinned_only_where_differentiated():
    """Behind a barrier in a grad step (its backward's rebuild reads it as stored); in a forward-only
    call (serving) it fuses with what reads it, as it would in the plain model."""
    params = adapted()
    few = grad_jaxpr(params, tokens=7)  # the plain sum, not [x | t] @ [w ; b]
    assert few.count("optimization_barrier") >= 4  # gate and up of 2 layers, and their cotangents
    forward = str(jax.make_jaxpr(jlora.apply(model))(params, jnp.ones((7, D))))
    assert "optimization_barrier" not in forward

    def mixed(p, h):  # down's input in bf16 against an f32 kernel: gate's and up's sums kept, nothing rebuilt
        act = (jax.nn.silu(h @ p["gate"]) * (h @ p["up"])).astype(jnp.bfloat16)
        return h + lax.dot_general(act, p["down"], (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    layer = jlora.lora_init(KEY, {k: v for k, v in base_params()["layers"][0].items() if k != "norm"},
                            jlora.LoraConfig(rank=4, targets=["gate", "up", "down"]))
    x = jnp.ones((7, D))
    _, tangent = jax.jvp(lambda x: jlora.apply(mixed)(layer, x), (x,), (x,))  # forward mode works, as without jlora
    want = jax.jvp(lambda x: mixed(jlora.merge(layer), x), (x,), (x,))[1]  # eager; jlora's runs compiled
    np.testing.assert_allclose(tangent, want, rtol=2e-2, atol=1e-2)  # bf16 rounding, on outputs of magnitude 1-4


def test_no_trace_is_leaked_by_the_backward_a_jaxpr_keeps():
    """The custom_vjp backward of a stacked matmul or a rebuilt down-projection, kept in the traced
    jaxpr, closes over nothing of the trace (it kept a LoraWeight of tracers: jax.checking_leaks raised)."""
    params = adapted()
    trainable, frozen = jlora.split(params)
    h = jnp.ones((64, D))
    loss = lambda t: jnp.sum(jlora.apply(model)(jlora.combine(t, frozen), h))
    assert re.search(r"f32\[20,24\] = concatenate", str(jax.make_jaxpr(jax.grad(loss))(trainable)))  # both are there
    with jax.checking_leaks():
        jax.jit(jlora.apply(model))(params, h)
        jax.jit(jax.grad(loss))(trainable)


def test_a_sum_that_cannot_be_one_matmul_is_pinned():
    def two_axis_block(p, h):  # gate's kernel (2, D/2, F) contracts two axes of x
        x = rms_norm(h, p["norm"])
        gate = jnp.einsum("bhd,hdf->bf", x.reshape(-1, 2, D // 2), p["gate"])
        return h + (jax.nn.silu(gate) * (x @ p["up"])) @ p["down"]

    layer = base_params()["layers"][0]
    layer["gate"] = layer["gate"].reshape(2, D // 2, F)
    cfg = jlora.LoraConfig(rank=4, targets=["gate", "up", "down"], layouts={"gate": "iio"})
    trainable, frozen = jlora.split(perturb(jlora.lora_init(KEY, layer, cfg), KEY))
    forward = jlora.apply(two_axis_block)
    loss = lambda t: jnp.sum(forward(jlora.combine(t, frozen), jnp.ones((8, D))) ** 2)
    text = str(jax.make_jaxpr(jax.grad(loss))(trainable))
    assert len(re.findall(r"f32\[20,24\] = concatenate", text)) == 1  # up's [w ; b] only
    # as many pins as when both are joint matmuls: gate's sum is pinned instead
    joint_only = grad_jaxpr({"layers": [adapted()["layers"][0]]})
    assert len(re.findall(r"f32\[20,24\] = concatenate", joint_only)) == 2
    assert text.count("optimization_barrier") == joint_only.count("optimization_barrier") > 0
    check_against_oracle(two_axis_block, perturb(jlora.lora_init(KEY, layer, cfg), KEY), jnp.ones((8, D)))


@pytest.mark.parametrize("routed", [False, True])
def test_expert_kernels_match_the_oracle(routed):
    """(experts, in, out) kernels: every token through every expert (the expert axis is no batch
    axis of the matmul: t has it, x does not, so no joint matmul), or tokens already split per
    expert (a batch axis of the matmul: joint)."""
    E = 3

    def experts(p, h):
        x = rms_norm(h, p["norm"])
        if routed:  # h: (experts, tokens, D)
            act = jax.nn.silu(jnp.einsum("etd,edf->etf", x, p["gate"])) * jnp.einsum("etd,edf->etf", x, p["up"])
            return h + jnp.einsum("etf,efd->etd", act, p["down"])
        act = jax.nn.silu(jnp.einsum("td,edf->tef", x, p["gate"])) * jnp.einsum("td,edf->tef", x, p["up"])
        return h + jnp.einsum("tef,efd->ted", act, p["down"]).sum(1)

    keys = jax.random.split(KEY, 3)
    base = {"norm": jnp.ones((D,)), "gate": normal(keys[0], (E, D, F)) / 4,
            "up": normal(keys[1], (E, D, F)) / 4, "down": normal(keys[2], (E, F, D)) / 5}
    cfg = jlora.LoraConfig(rank=4, targets=["gate", "up", "down"], layouts={"gate": "bio", "up": "bio", "down": "bio"})
    params = perturb(jlora.lora_init(KEY, base, cfg), KEY)
    h = normal(KEY, (E, 12, D) if routed else (12, D))
    check_against_oracle(experts, params, h)
    trainable, frozen = jlora.split(params)
    forward = jlora.apply(experts)
    text = str(jax.make_jaxpr(jax.grad(lambda t: jnp.sum(forward(jlora.combine(t, frozen), h) ** 2)))(trainable))
    assert bool(re.search(r"f32\[3,20,24\] = concatenate", text)) == routed


def test_bfloat16_model_is_as_accurate_as_storing():
    params, h = adapted(dtype=jnp.bfloat16), normal(KEY, (2, 5, D)).astype(jnp.bfloat16)
    trainable, frozen = jlora.split(params)

    def grads(recompute, dtype=jnp.bfloat16):
        forward = jlora.apply(model, recompute=recompute)
        cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
        loss = lambda t: jnp.sum(forward(jlora.combine(t, cast(frozen)), h.astype(dtype)).astype(jnp.float32) ** 2)
        return jax.jit(jax.grad(loss))(trainable)

    # the compiler may fuse the replayed chain differently (no bf16 rounding between fused steps):
    # measure both against float32 and require the rebuilt gradients to be as accurate
    exact = grads(False, jnp.float32)
    error = lambda got: max(float(jnp.abs(g - e).max() / jnp.abs(e).max())
                            for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(exact)))
    assert error(grads("inputs")) <= 2 * error(grads(False)) + 1e-3 < 0.1


def test_forward_mode_of_the_function_needs_stored_inputs():
    params, h = adapted(), normal(KEY, (2, 5, D))
    trainable, frozen = jlora.split(params)
    tangent = jax.tree.map(jnp.ones_like, trainable)
    run = lambda recompute: jax.jvp(lambda t: jlora.apply(model, recompute=recompute)(jlora.combine(t, frozen), h),
                                    (trainable,), (tangent,))
    run(False)  # stored inputs: forward mode works
    with pytest.raises(TypeError, match=r"custom_vjp.*use jlora.apply\(fn, recompute=False\)"):
        run("inputs")


def test_forward_mode_through_the_functions_own_custom_vjp_gets_no_jlora_hint():
    """Nothing for jlora to rebuild here: the custom_vjp forward mode fails on is the user's."""
    clip = jax.custom_vjp(lambda y: y)
    clip.defvjp(lambda y: (y, None), lambda _, g: (jnp.clip(g, -1, 1),))
    lw = jlora.LoraWeight(jnp.eye(4), jnp.ones((4, 2)), jnp.ones((2, 4)), scale=0.5, path="w")
    fn = jlora.apply(lambda p, x: clip(x @ p["w"]))
    with pytest.raises(TypeError, match="forward-mode") as raised:
        jax.jvp(lambda x: fn({"w": lw}, x), (jnp.ones((3, 4)),), (jnp.ones((3, 4)),))
    assert "recompute" not in str(raised.value)


@pytest.mark.parametrize("recompute", ["inputs", False, True])
def test_a_shape_polymorphic_export_matches_the_oracle(recompute):
    """``jax.export`` with a symbolic batch: sizes that are symbols are not compared."""
    params, h = adapted(), normal(KEY, (3, D))
    batch, = jax.export.symbolic_shape("b")
    forward = jax.jit(jlora.apply(model, recompute=recompute))
    exported = jax.export.export(forward)(params, jax.ShapeDtypeStruct((batch, D), h.dtype))
    assert exported.out_avals[0].shape == (batch, D)
    np.testing.assert_allclose(exported.call(params, h), model(jlora.merge(params), h), rtol=1e-5, atol=1e-5)


def test_unknown_recompute_option_is_an_error():
    with pytest.raises(ValueError, match="recompute"):
        jlora.apply(model, recompute="everything")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)")
def test_rebuilding_moves_nothing_more_between_devices():
    mesh = jlora.sharding.make_mesh({"data": 8})
    trainable, frozen = jlora.split(adapted())
    h = jax.device_put(normal(KEY, (8, 5, D)), NamedSharding(mesh, P("data")))

    def collectives(recompute):
        forward = jlora.apply(model, recompute=recompute)
        step = jax.jit(jax.grad(lambda t, f, h: jnp.sum(forward(jlora.combine(t, f), h) ** 2)))
        hlo = step.lower(trainable, frozen, h).compile().as_text()
        return sorted(re.findall(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)", hlo))

    assert collectives("inputs") == collectives(False)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)")
def test_inside_shard_map_with_the_batch_split():
    """Replicated weights meet a varying batch through JAX's ``pvary``: the gate and up sums are
    still found to be kept whole (joint matmuls), and the gradients equal storing's."""
    mesh = jlora.sharding.make_mesh({"data": 8})
    trainable, frozen = jlora.split(adapted())
    h = normal(KEY, (8 * 8, D))

    def loss(recompute):
        forward = jlora.apply(model, recompute=recompute)
        local = lambda t, f, h: jax.lax.psum(jnp.sum(forward(jlora.combine(t, f), h) ** 2), "data")
        return lambda t, f, h: jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data")), out_specs=P())(t, f, h)

    text = str(jax.make_jaxpr(jax.grad(loss("inputs")))(trainable, frozen, h))
    assert len(re.findall(r"f32\[20,24\]\S* = concatenate", text)) == 4
    grads = lambda recompute: jax.jit(jax.grad(loss(recompute)))(trainable, frozen, h)
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-5), grads("inputs"), grads(False))


def test_second_derivatives_match_storing():
    params, h = adapted(), normal(KEY, (2, 5, D))
    trainable, frozen = jlora.split(params)

    def loss_of(recompute):
        forward = jlora.apply(model, recompute=recompute)
        return lambda t: jnp.sum(jnp.tanh(forward(jlora.combine(t, frozen), h)) ** 2)

    def hvp(recompute):  # forward over reverse
        return jax.jvp(jax.grad(loss_of(recompute)), (trainable,), (trainable,))[1]

    def penalty_grad(recompute):  # reverse over reverse
        grad = jax.grad(loss_of(recompute))
        return jax.grad(lambda t: sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grad(t))))(trainable)

    for derivative in (hvp, penalty_grad):
        jax.tree.map(lambda a, b: assert_close(a, b, 1e-5), derivative("inputs"), derivative(False))
