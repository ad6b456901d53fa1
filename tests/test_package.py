"""The package itself: what ``import jlora`` loads and what it makes reachable."""

import subprocess
import sys


def test_every_module_is_reachable_after_import_jlora_and_heavy_ones_load_on_first_use():
    script = """
import pkgutil, sys, jlora
assert "transformers" not in sys.modules and "orbax.checkpoint" not in sys.modules, "imported with jlora"
for name, attr in [("tokens", "token_ids"), ("adapter", "save_adapter"), ("checkpoint", "AdapterCheckpointer"), ("hf", "LoraModel"),
                   ("peft", "load_adapter"), ("sharding", "place"), ("finetune", "load_job")]:
    assert callable(getattr(getattr(jlora, name), attr)), name
for module in pkgutil.iter_modules(jlora.__path__):  # every public module, as the README names them
    if not module.name.startswith("_"):
        getattr(jlora, module.name)
try:
    jlora.no_such_thing
except AttributeError as err:
    assert "no attribute 'no_such_thing'" in str(err)
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
