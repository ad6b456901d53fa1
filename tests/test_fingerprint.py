import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from jlora.fingerprint import fingerprint, same
from quantized import quantize


def test_the_numbers_stay_those_files_were_written_with():
    """Files keep fingerprints: a change of the sample or the hash would make every earlier file
    warn on load. Pinned here, the same on numpy, a device and a sharded array."""
    w = np.sin(np.arange(96 * 80, dtype=np.float32)).reshape(96, 80)
    pinned = [0.4249, 1.6687, -1.1348, -0.0978]
    mesh = jlora.sharding.make_mesh({"fsdp": -1})
    for held in (w, jnp.asarray(w), jlora.sharding.place({"w": w}, mesh, [jlora.sharding.fsdp(min_size=1)])["w"]):
        np.testing.assert_allclose(fingerprint(held), pinned, atol=2e-4)


@pytest.mark.parametrize("shape", [(64, 64), (768, 3072), (3, 40, 50), (3, 3, 16, 32)])
def test_one_kernel_in_any_precision_is_the_same_and_unrelated_ones_are_not(shape):
    w = jax.random.normal(jax.random.key(0), shape) * 0.02
    for copy in (w.astype(jnp.bfloat16), w.astype(jnp.float16), w.astype(jnp.float8_e4m3fn), np.asarray(w)):
        assert same(fingerprint(w), fingerprint(copy))
    if len(shape) == 2:
        assert same(fingerprint(w), fingerprint(quantize(w)))  # a lazy int8 base: its dequantized values
    others = [jax.random.normal(jax.random.key(i), shape) * 0.02 for i in range(1, 41)]
    assert not any(same(fingerprint(w), fingerprint(o)) for o in others)
    assert not same(fingerprint(w), fingerprint(-w)) and not same(fingerprint(w), fingerprint(jnp.zeros(shape)))


def test_no_values_no_fingerprint_and_a_missing_one_is_no_difference():
    assert fingerprint(jax.ShapeDtypeStruct((4, 4), jnp.float32)) is None
    assert fingerprint(jnp.ones((4, 4), jnp.int8)) is None
    seen = []
    jax.jit(lambda w: seen.append(fingerprint(w)) or w)(jnp.ones((4, 4)))  # a tracer: none
    assert seen == [None]
    assert same(None, [0.0] * 4) and same([0.0] * 4, None) and same("hand edited", [0.0] * 4)
