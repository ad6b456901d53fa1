import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jlora import lazy  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    """Every fallback warns once per process; tests each start with none reported."""
    lazy.reset_warnings()
    yield
