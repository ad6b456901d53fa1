"""Every example is a complete program; each runs here with fallbacks turned into errors, and none
compiles an array (a frozen weight, a batch) into its computations as a constant."""

import math
import pathlib
import re
import runpy

import jax
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
CONSTANT = re.compile(r'stablehlo\.constant dense<["\[][^>]*> : tensor<([\dx]+)x')  # splats excluded


@pytest.fixture
def compiled_ir(tmp_path):
    """The folder where JAX writes the StableHLO of every computation compiled during the test."""
    before = jax.config.read("jax_dump_ir_to")
    jax.config.update("jax_dump_ir_to", str(tmp_path / "ir"))
    yield tmp_path / "ir"
    jax.config.update("jax_dump_ir_to", before)


def baked_in(ir: pathlib.Path, limit: int = 256) -> dict[str, int]:
    """Modules holding a constant array of more than ``limit`` elements (a closed-over array inside
    jit): file name -> the largest one's size."""
    sizes = {f.name: max((math.prod(map(int, s.split("x"))) for s in CONSTANT.findall(f.read_text())), default=0)
             for f in ir.glob("*.mlir")}
    return {name: n for name, n in sizes.items() if n > limit}


@pytest.mark.parametrize("name", ["quickstart.py", "flax_linen.py", "flax_nnx.py"])
def test_example_runs(name, capsys, compiled_ir):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert "trainable params" in capsys.readouterr().out
    assert any("step" in f.name for f in compiled_ir.iterdir())
    assert baked_in(compiled_ir) == {}
