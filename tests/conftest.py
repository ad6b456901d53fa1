import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Multi-device tests run on 8 CPU devices; single-device code uses the first one as usual.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jlora import lazy  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    """Every fallback warns once per process; tests each start with none reported."""
    lazy.reset_warnings()
    yield
