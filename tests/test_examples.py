"""Every example is a complete program; each runs here with fallbacks turned into errors."""

import pathlib
import runpy

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("name", ["quickstart.py", "flax_linen.py", "flax_nnx.py"])
def test_example_runs(name, capsys):
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert "trainable params" in capsys.readouterr().out
