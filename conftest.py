"""The whole suite's fixtures: the docstring examples (``--doctest-modules`` over ``jlora/``) run
where a user's session would not find files of its own. ``tests/conftest.py`` holds the tests'."""

import pytest


@pytest.fixture(autouse=True)
def _doctest_in_an_empty_directory(request: pytest.FixtureRequest, tmp_path, monkeypatch) -> None:
    """A docstring example runs in an empty working directory: one that names a relative path (the
    default ``--out jlora-out``) neither reads nor writes the checkout (a ``jlora finetune`` run in
    it, as the README's first line does, left an earlier run there that the examples refused)."""
    if type(request.node).__name__ == "DoctestItem":
        monkeypatch.chdir(tmp_path)
