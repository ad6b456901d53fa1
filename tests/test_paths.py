import pytest

from jlora.paths import LEAF, SUBTREE, Pattern, leaves_with_paths, nearest

PATH = "model/layers/0/self_attn/q_proj/kernel"


@pytest.mark.parametrize(
    "pattern, expected",
    [
        ("q_proj", SUBTREE),
        ("kernel", LEAF),
        ("self_attn/q_proj", SUBTREE),
        ("q_proj/kernel", LEAF),
        ("*_proj", SUBTREE),
        ("layers/*/self_attn", SUBTREE),
        ("layers/**/kernel", LEAF),
        ("re:.*layers/[0-3]/.*proj", SUBTREE),
        ("re:.*/q_proj/kernel", LEAF),
        ("v_proj", None),
        ("proj", None),
        ("re:layers", None),
        ("layers/1/**", None),
    ],
)
def test_pattern_kinds(pattern, expected):
    assert Pattern(pattern).match(PATH) == expected


def test_paths_of_dicts_lists_and_nnx_variables_read_as_slash_joined():
    tree = {"a": [{"kernel": 1}], "b": {"c": 2}}
    assert leaves_with_paths(tree) == [("a/0/kernel", 1), ("b/c", 2)]


def test_nearest_suggests_similar_paths():
    paths = ["model/q_proj/kernel", "model/k_proj/kernel", "model/mlp/up/kernel"]
    assert nearest("q_prj", paths)[0] == "model/q_proj/kernel"
    assert nearest("attention", paths) == []  # nothing close: no suggestion rather than an arbitrary one


def test_bad_pattern():
    with pytest.raises(ValueError, match="non-empty"):
        Pattern("")
