import os
import re
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))
# Multi-device tests run on 8 CPU devices; single-device code uses the first one as usual.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite compiles thousands of tiny programs, whose run time is nothing beside LLVM's optimizing
# them: unoptimized, the suite takes about 30% less CPU time (floats may round otherwise in the last bits).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

# Tests compile many identical programs (a new closure under jit, the same small op in each xdist
# worker and in the subprocesses some tests start): JAX's persistent cache compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jlora-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from jlora import lazy  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    """Every fallback warns once per process; tests each start with none reported."""
    lazy.reset_warnings()
    yield


@pytest.fixture
def cpu_env():
    """``cpu_env(n)``: the environment for a subprocess on ``n`` CPU devices, with the suite's other
    XLA flags (compiled with other flags, the same random draw may differ in its last bits)."""
    def env(devices: int) -> dict:
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
        return {**os.environ, "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={devices}".strip()}
    return env
