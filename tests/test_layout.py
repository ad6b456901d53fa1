import pytest

from jlora.layout import Layout, reshape_groups


def test_parse_groups_and_shapes():
    layout = Layout.parse("bio")
    assert layout.group("b") == (0,) and layout.a_shape((3, 4, 5), 2) == (3, 4, 2)
    assert layout.b_shape((3, 4, 5), 2) == (3, 2, 5)
    assert Layout.parse("oi").canonical_to_w() == (1, 0)
    assert str(Layout.parse("oi").permute((1, 0))) == "io"
    assert Layout.parse("iio").fan_in((2, 3, 4)) == 6
    assert Layout("bio") == layout and str(Layout("bio")) == "bio"  # the letters, as the constructor's argument too
    assert Layout(layout) == layout and hash(Layout([["b", 0], ["i", 0], ["o", 0]])) == hash(layout)


@pytest.mark.parametrize("spec", ["ii", "oo", "iox", ""])
def test_bad_layouts(spec):
    with pytest.raises(ValueError):
        Layout.parse(spec)
    with pytest.raises(ValueError):
        Layout(spec)


@pytest.mark.parametrize("pairs", [["i", "o"], [("x", 0), ("o", 0)], None, [("i", 0.5), ("o", 0)]])
def test_pairs_that_are_no_roles_are_refused_by_the_constructor(pairs):
    with pytest.raises(ValueError, match="Layout takes the letters of its axes .* or \\(role, k\\) pairs"):
        Layout(pairs)


def test_reshape_groups():
    assert reshape_groups((4, 6), (24,)) == [([0, 1], [0])]
    assert reshape_groups((4, 6), (2, 2, 6)) == [([0], [0, 1]), ([1], [2])]
    assert reshape_groups((4, 1, 6), (4, 6)) is None
