import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

import jlora
from jlora import _compat
from jlora.probe import infer_layouts
from jlora.sharding import make_mesh


def test_plain_dense_and_transposed_storage():
    p = {"dense": jnp.ones((4, 6)), "conv1d": jnp.ones((6, 4))}  # GPT-2's Conv1D stores (out, in)
    fn = lambda p: jnp.ones((2, 4)) @ p["dense"] + jnp.ones((2, 4)) @ p["conv1d"].T
    got = infer_layouts(fn, p, ["dense", "conv1d"])
    assert {k: str(v) for k, v in got.items()} == {"dense": "io", "conv1d": "oi"}


def test_a_kernel_scaled_by_a_scalar_is_seen_through():
    p = {"conv": jnp.ones((3, 3, 4, 8)), "dense": jnp.ones((8, 2))}

    def fn(p):  # StyleGAN's equalized learning rate: the kernel scaled on every call
        y = lax.conv_general_dilated(jnp.ones((1, 5, 5, 4)), p["conv"] * 0.5, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return -y.mean((1, 2)) @ (p["dense"] / 3.0)

    assert {k: str(v) for k, v in infer_layouts(fn, p, ["conv", "dense"]).items()} == {"conv": "iiio", "dense": "io"}


def test_a_kernel_masked_or_scaled_by_an_array_of_its_shape_is_seen_through():
    """Flax's ``nn.Conv(mask=...)``, a scale per output channel, ``nn.WeightNorm``'s divisor: each
    keeps every axis of the kernel in its place (they were read as no use at all)."""
    mask = jnp.zeros((3, 3, 4, 8)).at[:2].set(1.0)
    p = {"masked": jnp.ones((3, 3, 4, 8)), "scaled": jnp.ones((3, 3, 8, 8)), "normed": jnp.ones((8, 2, 3))}
    conv = lambda x, k: lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def fn(p):
        h = conv(conv(jnp.ones((1, 5, 5, 4)), p["masked"] * mask), p["scaled"] * jnp.linspace(0.5, 1.5, 8))
        normed = p["normed"] / jnp.sqrt((p["normed"] ** 2).sum(0, keepdims=True))
        return jnp.einsum("bi,ihd->bhd", h.mean((1, 2)), normed)

    got = {k: str(v) for k, v in infer_layouts(fn, p, ["masked", "scaled", "normed"]).items()}
    assert got == {"masked": "iiio", "scaled": "iiio", "normed": "ioo"}
    data = jax.random.normal(jax.random.key(0), (5, 4))  # a param times data of its shape: a use, not a kernel
    got = infer_layouts(lambda p: (data * p["pos"]) @ p["w"], {"pos": jnp.ones((5, 4)), "w": jnp.ones((4, 2))}, ["pos", "w"])
    assert {k: str(v) for k, v in got.items()} == {"w": "io"}


def test_scan_slices_mark_batch_axes_and_reshape_merges():
    p = {"stack": jnp.ones((3, 4, 2, 2))}

    def fn(p):
        return lax.scan(lambda h, w: (h @ w.reshape(4, 4), None), jnp.ones((2, 4)), p["stack"])[0]

    assert str(infer_layouts(fn, p, ["stack"])["stack"]) == "bioo"


def test_a_stack_mapped_in_chunks_is_still_a_stack():
    """lax.map(batch_size=8) splits the 48 layers into 6 chunks of 8, scans over the chunks and
    applies the 8 in each to the one input: the layer axis is a stack, as without batch_size."""
    p = {"w": jnp.ones((48, 16, 16))}
    for batch_size in (None, 8):
        fn = lambda p: lax.map(lambda w: jnp.tanh(jnp.ones((5, 16)) @ w), p["w"], batch_size=batch_size)
        assert str(infer_layouts(fn, p, ["w"])["w"]) == "bio", batch_size


def test_a_reshape_adding_a_size_1_axis_keeps_the_kernels_axes():
    p = {"k_proj": jnp.ones((6, 4))}  # one KV head: (d, 1, head_dim)
    fn = lambda p: jnp.einsum("td,dhk->thk", jnp.ones((3, 6)), p["k_proj"].reshape(6, 1, 4))
    assert str(infer_layouts(fn, p, ["k_proj"])["k_proj"]) == "io"


def test_a_size_1_axis_a_reshape_drops_or_moves_joins_a_neighbour():
    p = {"q": jnp.ones((6, 1, 4)), "o": jnp.ones((1, 4, 6)), "depthwise": jnp.ones((3, 3, 8, 1))}

    def fn(p):  # one head stored (d, 1, head_dim) and used flat; Keras's depthwise kernel (kh, kw, c, 1)
        y = lax.conv_general_dilated(jnp.ones((1, 5, 5, 8)), p["depthwise"].reshape(3, 3, 1, 8), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=8)
        return (jnp.ones((2, 6)) @ p["q"].reshape(6, 4)) @ p["o"].reshape(4, 6) + y.sum()

    got = {k: str(v) for k, v in infer_layouts(fn, p, ["q", "o", "depthwise"]).items()}
    assert got == {"q": "iio", "o": "iio", "depthwise": "iioo"}


def test_layer_picked_by_index_is_a_batch_axis():
    p = {"stack": jnp.ones((3, 4, 5))}
    by_slice = lambda p: jnp.ones((2, 4)) @ p["stack"][1]  # slice + squeeze
    by_index = lambda p: lax.fori_loop(0, 3, lambda i, h: h + jnp.ones((2, 4)) @ p["stack"][i], jnp.zeros((2, 5)))
    for fn in (by_slice, by_index):
        assert str(infer_layouts(fn, p, ["stack"])["stack"]) == "bio"


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS in conftest.py)")
@pytest.mark.parametrize("spec", [P(), P(None, None, "model")])
def test_a_shard_map_splitting_the_kernel_is_seen_through(spec):
    mesh = make_mesh({"model": 8})
    body = lambda k, x: jnp.einsum("lbi,lio->lbo", x, k)  # layer l of x through layer l of the stack
    fn = lambda p: jax.shard_map(body, mesh=mesh, in_specs=(spec, P()), out_specs=P(None, None, "model"))(
        p["stack"], jnp.ones((3, 4, 16)))
    assert str(infer_layouts(fn, {"stack": jnp.ones((3, 16, 32))}, ["stack"])["stack"]) == "bio"


def test_flipped_window_and_vmapped_lookup():
    p = {"window": jnp.ones((3, 3, 2, 4)), "emb": jnp.ones((10, 4))}
    flipped = lambda p: lax.conv_general_dilated(jnp.ones((1, 5, 5, 2)), lax.rev(p["window"], (0, 1)), (1, 1), "SAME",
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    assert str(infer_layouts(flipped, p, ["window"])["window"]) == "iiio"
    looked_up = lambda p: jax.vmap(lambda i: p["emb"][i])(jnp.array([1, 2]))  # gather with slice (1, 4), uncollapsed
    assert str(infer_layouts(looked_up, p, ["emb"])["emb"]) == "io"


def test_one_row_by_a_scalar_index_is_an_embedding_lookup():
    """``W[i]`` (dynamic_slice then squeeze; Equinox's Embedding per token): the rows are the input."""
    emb, stacked = {"emb": jnp.ones((10, 4))}, {"emb": jnp.ones((3, 10, 4))}
    assert str(infer_layouts(lambda p: jnp.tanh(p["emb"][jnp.int32(2)]), emb, ["emb"])["emb"]) == "io"
    assert str(infer_layouts(lambda p: p["emb"][7] * 2.0, emb, ["emb"])["emb"]) == "io"
    assert str(infer_layouts(lambda p: p["emb"][1][jnp.int32(2)], stacked, ["emb"])["emb"]) == "bio"
    assert str(infer_layouts(lambda p: p["emb"][1, jnp.int32(2)], stacked, ["emb"])["emb"]) == "bio"  # one squeeze
    # a column is no lookup: a Dense kernel read by column, then used whole, stays (in, out)
    x = jnp.ones((5, 16))
    column_then_whole = lambda p: jnp.tanh(x @ p["w"][:, 3])[:, None] + x @ p["w"]
    lw = jlora.lora_init(jax.random.key(0), {"w": jnp.ones((16, 8))}, jlora.LoraConfig(rank=2, targets=["w"]),
                         infer_layout=column_then_whole)["w"]
    assert str(lw.layout) == "io" and lw.a.shape == (16, 2)
    assert infer_layouts(lambda p: p["emb"][1].sum(), stacked, ["emb"]) == {}  # a layer, unused: no guess


def test_a_padded_or_fenced_kernel_keeps_its_axes():
    p = {"w": jnp.ones((3, 16, 8))}
    padded = lambda p: jnp.einsum("lti,lio->lto", jnp.ones((4, 5, 18)), jnp.pad(p["w"], ((0, 1), (2, 0), (0, 0))))
    fenced = lambda p: jnp.einsum("lti,lio->lto", jnp.ones((3, 5, 16)), lax.optimization_barrier(p["w"]))
    assert str(infer_layouts(padded, p, ["w"])["w"]) == str(infer_layouts(fenced, p, ["w"])["w"]) == "bio"


def test_matrices_picked_from_a_stack_are_batched_not_looked_up():
    """W[idx] (an expert per token) then a matmul: the expert axis is a batch axis, a rank-r adapter
    per expert, not one full-rank 'embedding' update."""
    p = {"experts": jnp.ones((4, 16, 8))}
    x, idx = jnp.ones((6, 16)), jnp.array([0, 3, 1, 1, 2, 0])
    per_token = lambda p: jnp.einsum("td,tdf->tf", x, p["experts"][idx])
    assert str(infer_layouts(per_token, p, ["experts"])["experts"]) == "bio"
    lw = jlora.lora_init(jax.random.key(0), p, jlora.LoraConfig(rank=2, targets=["experts"]), infer_layout=per_token)["experts"]
    assert lw.a.shape == (4, 16, 2) and lw.b.shape == (4, 2, 8)
    assert infer_layouts(lambda p: p["experts"][idx].sum(), p, ["experts"]) == {}  # no matmul: no guess


@pytest.mark.parametrize("name, fn, want", [
    ("layers unstacked", lambda p, x: sum(x @ w for w in jnp.unstack(p["w"])), {"w": "bio"}),
    ("a stack's output axis split",
     lambda p, x: sum(jnp.einsum("lti,lio->lto", jnp.stack([x] * 3), w).sum() for w in jnp.split(p["w"], 2, axis=2)),
     {"w": "bio"}),
    # an LSTM's gate kernels, stacked per layer for a scan and joined in the body
    ("gates joined in a scanned body", lambda p, x: lax.scan(
        lambda h, ws: (h @ jnp.concatenate(ws, axis=1)[:, :16], None), x, (p["w"], p["v"]))[0], {"w": "bio", "v": "bio"}),
    ("stacked along the last axis", lambda p, x: jnp.einsum("lti,lioc->ltoc", jnp.stack([x] * 3), jnp.stack([p["w"], p["v"]], -1)),
     {"w": "bio", "v": "bio"}),
    ("one layer, indexed after w[None]", lambda p, x: x @ p["w"][None][0, 1], {"w": "bio"}),
    ("broadcast over a batch", lambda p, x: jnp.einsum("nlti,nlio->nlto", jnp.broadcast_to(x, (2, 3, 5, 16)),
                                                        jnp.broadcast_to(p["w"], (2, 3, 16, 8))), {"w": "bio"}),
    ("one layer grown over a batch", lambda p, x: jnp.einsum(
        "lti,lio->lto", jnp.stack([x] * 4), jnp.broadcast_to(p["w"][1][None], (4, 16, 8))), {"w": "bio"}),
    ("one layer tiled over a batch", lambda p, x: jnp.einsum(
        "lti,lio->lto", jnp.stack([x] * 4), jnp.tile(p["w"][1][None], (4, 1, 1))), {"w": "bio"}),
])
def test_kernels_split_unstacked_or_joined_are_followed(name, fn, want):
    if "tiled" in name and _compat.tile_p is None:
        pytest.skip("JAX before 0.9 traces jnp.tile to reshapes through size-1 axes")
    p = {"w": jnp.ones((3, 16, 8)), "v": jnp.ones((3, 16, 8))}
    x = jnp.ones((5, 16))
    assert {k: str(v) for k, v in infer_layouts(lambda p: fn(p, x), p, list(want)).items()} == want


def test_tied_embedding_lookup_then_attend_is_one_layout():
    p = {"emb": jnp.ones((10, 4))}
    fn = lambda p: p["emb"][jnp.array([1, 2])] @ p["emb"].T
    assert str(infer_layouts(fn, p, ["emb"])["emb"]) == "io"


def test_a_kernel_used_both_ways_takes_its_more_frequent_use():
    """A spectral norm's power iteration uses a Dense kernel as u @ W.T once, then v @ W (and the layer
    x @ (W / sigma)): it is 'io', as the layer uses it (the first use made it 'oi', with its factors
    swapped: a's Kaiming bound from the output width, LoRA+'s ratio on the input side). A table
    looked up is a table, however often it is attended to."""
    import flax.linen as nn
    from flax import nnx

    x = jnp.ones((2, 5))
    layer = nn.SpectralNorm(nn.Dense(7))
    variables = layer.init(jax.random.key(0), x, update_stats=False)
    layouts = infer_layouts(lambda v: layer.apply(v, x, update_stats=False), variables, ["params/layer_instance/kernel"])
    assert str(layouts["params/layer_instance/kernel"]) == "io"
    if hasattr(nnx, "SpectralNorm"):  # flax 0.11+
        graph, state = nnx.split(nnx.SpectralNorm(nnx.Linear(5, 7, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0)))
        params = jlora.lora_init(jax.random.key(0), state, jlora.LoraConfig(rank=2, targets=["kernel"]),
                                 infer_layout=lambda s: nnx.merge(graph, s)(x, update_stats=False))
        kernel = params["layer_instance"]["kernel"].get_value()
        assert (str(kernel.layout), kernel.a.shape, kernel.b.shape) == ("io", (5, 2), (2, 7))
    p = {"emb": jnp.ones((10, 4))}  # a table looked up is a table, attended to however often (Medusa's heads)
    attended_twice = lambda p: p["emb"][jnp.array([1, 2])] @ p["emb"].T + jnp.ones((2, 4)) @ p["emb"].T
    assert str(infer_layouts(attended_twice, p, ["emb"])["emb"]) == "io"
    attended_first = lambda p: (jnp.ones((2, 4)) @ p["emb"].T).sum() + (jnp.ones((3, 4)) @ p["emb"].T).sum() + p["emb"][1]
    assert str(infer_layouts(attended_first, p, ["emb"])["emb"]) == "io"


def test_conflicting_uses_warn_and_keep_the_first():
    p = {"w": jnp.ones((3, 4, 5))}
    fn = lambda p: jnp.einsum("i,ijk->jk", jnp.ones(3), p["w"]) + jnp.einsum("ij,ijk->k", jnp.ones((3, 4)), p["w"])[None]
    with pytest.warns(UserWarning, match="used with layouts 'ioo' and 'iio'"):
        assert str(infer_layouts(fn, p, ["w"])["w"]) == "ioo"


def test_unused_kernel_has_no_layout():
    assert infer_layouts(lambda p: p["w"].sum(), {"w": jnp.ones((2, 3, 4))}, ["w"]) == {}


def test_leaves_that_are_not_arrays_stay_static():
    params = {"w": jnp.ones((3, 4)), "act": jnp.tanh, "name": "layer"}  # an Equinox module's fields
    got = infer_layouts(lambda p: p["act"](jnp.ones((2, 4)) @ p["w"].T), params, ["w"])
    assert str(got["w"]) == "oi"
