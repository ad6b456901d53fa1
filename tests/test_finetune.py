import collections

import numpy as np
import pytest

from jlora import finetune


def test_builtin_data_sets():
    texts, labels = finetune.tweet_sentiment()
    assert len(texts) == 6000 and len(set(texts)) == 6000
    assert collections.Counter(labels) == {"negative": 2982, "neutral": 2262, "positive": 756}
    texts, labels = finetune.bbc_news()
    assert len(texts) == 2225 and sorted(set(labels)) == ["business", "entertainment", "politics", "sports", "tech"]


def test_split_is_fixed_and_disjoint():
    a = finetune.split_indices(1000)
    b = finetune.split_indices(1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in a] == [700, 150, 150]
    assert len(set(np.concatenate(a))) == 1000


def test_csv_data_and_its_errors(tmp_path):
    good = tmp_path / "d.csv"
    good.write_text('text,label\n"a, quoted text",x\nplain,y\n')
    assert finetune.read_labelled(str(good)) == (["a, quoted text", "plain"], ["x", "y"])
    bad = tmp_path / "bad.csv"
    bad.write_text("body,label\nhello,x\n")
    with pytest.raises(SystemExit, match="bad.csv:1: the header must name 'text' and 'label'"):
        finetune.read_labelled(str(bad))
    missing = tmp_path / "m.csv"
    missing.write_text("text,label\nhello,x\nworld,\n")
    with pytest.raises(SystemExit, match="m.csv:3: missing text or label"):
        finetune.read_labelled(str(missing))
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n')
    with pytest.raises(SystemExit, match="need at least 2 distinct labels"):
        finetune.read_labelled(str(one))
