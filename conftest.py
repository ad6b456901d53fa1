"""The whole suite's fixtures (``tests/`` and the docstring examples of ``jlora/``);
``tests/conftest.py`` holds the tests' own."""

import pytest


@pytest.fixture(autouse=True)
def _in_an_empty_directory(tmp_path_factory, monkeypatch) -> None:
    """Every test and docstring example runs in an empty working directory: one that names a
    relative path (``jlora finetune``'s default ``--out jlora-out``) neither reads nor writes the
    checkout. The README's first line, run in the checkout, leaves an earlier run there, which
    the examples and the CLI's tests then met as the "earlier run" refusal."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # not tmp_path, which the test may write into
