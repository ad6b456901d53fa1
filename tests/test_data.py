import collections
import csv

import numpy as np
import pytest

from jlora import data


def test_builtin_data_sets():
    texts, labels = data.tweet_sentiment()
    assert len(texts) == 6000 and len(set(texts)) == 6000
    assert collections.Counter(labels) == {"negative": 2982, "neutral": 2262, "positive": 756}
    texts, labels = data.bbc_news()
    assert len(texts) == 2127 == len(set(texts)) and sorted(set(labels)) == ["business", "entertainment", "politics", "sports", "tech"]


def test_split_is_fixed_and_disjoint():
    a = data.split_indices(1000)
    b = data.split_indices(1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert [len(x) for x in a] == [700, 150, 150]
    assert len(set(np.concatenate(a))) == 1000


def test_csv_data_and_its_errors(tmp_path):
    good = tmp_path / "d.csv"
    good.write_text('text,label\n"a, quoted text",x\nplain,y\n')
    assert data.read_labelled(str(good)) == (["a, quoted text", "plain"], ["x", "y"])
    bad = tmp_path / "bad.csv"
    bad.write_text("body,label\nhello,x\n")
    with pytest.raises(ValueError, match="bad.csv:1: the header must name 'text' and 'label'"):
        data.read_labelled(str(bad))
    missing = tmp_path / "m.csv"
    missing.write_text("text,label\nhello,x\nworld,\n")
    with pytest.raises(ValueError, match="m.csv:3: missing label"):
        data.read_labelled(str(missing))
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "a", "label": "x"}\n')
    with pytest.raises(ValueError, match="need at least 2 distinct labels"):
        data.read_labelled(str(one))


def test_data_files_as_users_write_them(tmp_path):
    def read(name, content, encoding="utf-8"):
        file = tmp_path / name
        file.write_bytes(content.encode(encoding))
        return data.read_labelled(str(file))

    # Excel's UTF-8 BOM, an upper-case extension, U+2028 inside a text, integer labels
    assert read("bom.csv", "\ufefftext,label\nhi,x\nyo,y\n") == (["hi", "yo"], ["x", "y"])
    texts, labels = read("u.JSONL", '{"text": "a\u2028b", "label": 10}\n{"text": "c\u0085d", "label": 2}\n')
    assert texts == ["a\u2028b", "c\u0085d"] and labels == ["10", "2"]
    assert data.class_order(["10", "2", "0"]) == ["0", "2", "10"]
    assert read("f.jsonl", '{"text": "a", "label": 1.0}\n{"text": "b", "label": 0}\n')[1] == ["1", "0"]  # pandas' 1.0
    assert read("f.csv", "text,label\na,1.0\nb,0\nc,-2.\nd,1.5\ne,01\nf,-0\ng,+1\n")[1] == ["1", "0", "-2", "1.5", "1", "0", "1"]
    with pytest.raises(ValueError, match=r"2.csv:1: the header names 'text' 2 times; name one column so"):
        read("2.csv", "text,text,label\ntitle,body,x\n")  # the reader kept the last, silently
    with pytest.raises(ValueError, match=r"s.jsonl:2: the text is not valid Unicode \(surrogates not allowed at "
                                         r"character 4\)"):  # a cut emoji: the tokenizer failed deep inside
        read("s.jsonl", '{"text": "ok", "label": "x"}\n{"text": "cut \\ud83d", "label": "y"}\n')
    assert read("t.csv", "text,label\nhi,x,\nyo,y\n") == (["hi", "yo"], ["x", "y"])  # a trailing empty field
    assert read("w.csv", "text,label\nhi,pos\nyo,pos \nho, neg\n")[1] == ["pos", "pos", "neg"]  # one class each
    for row, what in (('{"text": null, "label": "x"}', "missing text"), ('{"text": "a", "label": null}', "missing label"),
                      ('{"text": "a", "label": NaN}', "not a label"), ('{"text": "a", "label": 1.5}', "not a label"),
                      ('{"text": "  ", "label": "x"}', "missing text"),
                      ('{"text": "a", "label": true}', r"not a label \(a label is a non-empty string or an integer\), got True"),
                      ('{"text": 3, "label": "x"}', r"not a text \(a text is a non-empty string\), got 3")):
        with pytest.raises(ValueError, match=f"n.jsonl:2: {what}"):
            read("n.jsonl", '{"text": "ok", "label": "y"}\n' + row + "\n")
    with pytest.raises(ValueError, match=r"c.csv:4: 3 fields for 2 columns \(quote a text that holds a comma\)"):
        read("c.csv", 'text,label\n"two\nlines",x\ngood, very good film,pos\n')
    with pytest.raises(ValueError, match=r"h.csv:1: the header must name 'text' and 'label' columns, found \['text', ' label'\]"):
        read("h.csv", "text, label\na,x\n")
    limit = csv.field_size_limit()
    assert read("long.csv", f"text,label\n{'word ' * 40_000},x\nshort,y\n")[1] == ["x", "y"]  # a 200 kB text
    assert csv.field_size_limit() == limit  # the reader's limit left as it was
    for name, content in (("e.jsonl", ""), ("e.csv", "text,label\n")):
        with pytest.raises(ValueError, match=f"{name}: no rows"):
            read(name, content)
    with pytest.raises(ValueError, match="l.csv: not UTF-8 text"):
        read("l.csv", "text,label\ncaf\u00e9,x\n", encoding="latin-1")
    with pytest.raises(ValueError, match="built-in sets: bbc-news, tweet-sentiment"):
        data.read_labelled(str(tmp_path / "tweet_sentiment"))


def test_a_stray_quote_or_joined_files_are_refused_not_read_as_fewer_rows(tmp_path):
    """A quote the writer left open made one field of the rows after it: fewer rows, a new class."""
    def read(name, content):
        file = tmp_path / name
        file.write_text(content)
        return data.read_labelled(str(file))

    rows = "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(8))
    with pytest.raises(ValueError, match=r"q.csv:3: the label spans lines, to line 6 \('pos\\nreview 0,neg\\nreview 1,pos\\nend,neg'"
                                         r"\): a quote left open in this row, closed on line 6\? A label is one line"):
        read("q.csv", "text,label\nfine,neg\nok text,\"pos\nreview 0,neg\nreview 1,pos\nend,neg\"\n" + rows)
    with pytest.raises(ValueError, match=r"s.csv:2: not CSV the reader can read \(a quoted field holds text after its "
                                         r"closing quote"):
        read("s.csv", 'text,label\n"oops a stray quote,pos\nsecond,neg\n"third",pos\nfourth,neg\n')
    with pytest.raises(ValueError, match=r"u.csv:3: a quote opened in this row is never closed"):
        read("u.csv", 'text,label\na,1\n"b,2\nc,1\n')
    for joined in ("text,label\nc,1\n", "\ufefftext,label\nc,1\n"):  # the second file's own BOM (Excel's) kept
        with pytest.raises(ValueError, match=r"j.csv:4: the header again \(files joined\?\)"):
            read("j.csv", "text,label\na,1\nb,2\n" + joined)
    # blank rows are skipped as in JSONL: spaces, a tab, a spreadsheet's empty row ','
    assert read("b.csv", "text,label\na,1\n   \n\t\n,\nb,2\n") == (["a", "b"], ["1", "2"])
    assert read("m.csv", 'text,label\n"two\nlines",x\nb,y\n') == (["two\nlines", "b"], ["x", "y"])  # a text may span
    with pytest.raises(ValueError, match=r"d.jsonl:2: the object names 'label' more than once; name it once"):
        read("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 1, "label": 2}\n')
    nested = '{"text": "b", "label": 2, "meta": {"label": "x", "label": "y"}}'  # a nested object's keys are its own
    assert read("o.jsonl", '{"text": "a", "label": 1}\n' + nested + "\n") == (["a", "b"], ["1", "2"])
    with pytest.raises(ValueError, match=r"l.csv:3: the label spans lines, to line 5 \('p\\nq'\): "):
        read("l.csv", 'text,label\na,x\n"two\nlines","p\nq"\n')  # short: shown whole
    with pytest.raises(ValueError, match=r"--data .*: a directory; give a .csv or .jsonl file in it"):
        data.read_labelled(str(tmp_path))
