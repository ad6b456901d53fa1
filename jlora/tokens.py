"""The token ids of a long text (a causal-LM corpus), tokenized piece by piece.

A fast tokenizer given a whole corpus in one call holds about 140 bytes per character (a
19.1 M-character text: +2.5 GB). ``token_ids`` tokenizes overlapping windows instead. A HF fast
tokenizer splits its text into words (its pre-tokenizer: at spaces, punctuation) and tokenizes
each word on its own, whatever its model (BPE, WordPiece, Unigram); so two windows are joined at
the start of a word, where both see the same words around it. A SentencePiece tokenizer that does
not split (Llama 2's ``Metaspace`` without ``split``) has words all the same: no token holds its
space mark ``▁`` but at its start, so none spans a word that starts with one. A slow tokenizer (no
word offsets), or a word as long as a window: the whole text in one call. The ids are those of
``tokenizer(text)``.

Example:
    >>> import jlora
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> from transformers import PreTrainedTokenizerFast
    >>> words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> tokenizer = PreTrainedTokenizerFast(tokenizer_object=words)
    >>> ids = jlora.tokens.token_ids(tokenizer, "a b " * 3000, chunk_chars=2048, context_chars=256)
    >>> ids.tolist() == tokenizer("a b " * 3000)["input_ids"], ids[:4]
    (True, array([0, 1, 0, 1], dtype=int32))
"""

from __future__ import annotations

from typing import Any

import numpy as np


def token_ids(tokenizer: Any, text: str, chunk_chars: int = 1 << 20, context_chars: int = 4096) -> np.ndarray:
    """``tokenizer(text)["input_ids"]`` as int32, tokenized in windows of about ``chunk_chars``
    characters, each reaching ``2 * context_chars`` into its neighbours; two windows are joined at
    the first word that starts at or after their nominal joint (within ``context_chars // 2``)
    where both hold the same tokens for ``context_chars // 2`` characters either side. A slow
    tokenizer, a short text, or no such word: the whole text in one call.

    Example:
        >>> import jlora
        >>> from tokenizers import Tokenizer, models, pre_tokenizers
        >>> from transformers import PreTrainedTokenizerFast
        >>> words = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
        >>> words.pre_tokenizer = pre_tokenizers.Whitespace()
        >>> jlora.tokens.token_ids(PreTrainedTokenizerFast(tokenizer_object=words), "a b " * 3000, 2048, 256).size
        6000
    """
    if not isinstance(text, str) or not callable(tokenizer):
        raise ValueError(f"token_ids: takes a tokenizer (a transformers tokenizer, called on the text) and a str, "
                         f"got {type(tokenizer).__name__} and {type(text).__name__}")
    if chunk_chars < 4 * context_chars or context_chars < 2:
        raise ValueError(f"token_ids: chunk_chars ({chunk_chars}) must be at least 4 × context_chars ({context_chars}), "
                         "and context_chars at least 2")
    whole = lambda: np.asarray(tokenizer(text)["input_ids"], np.int32)
    if len(text) <= 2 * chunk_chars or not getattr(tokenizer, "is_fast", False):
        return whole()
    specials = _specials(tokenizer, text[:context_chars])
    if specials is None:
        return whole()
    joints = range(chunk_chars, len(text) - chunk_chars + 1, chunk_chars)  # where windows meet, about
    reach, marked = 2 * context_chars, _words_marked(tokenizer)
    window = lambda k: _Window(tokenizer, text, joints[k - 1] - reach if k else 0,
                               joints[k] + reach if k < len(joints) else len(text), marked)
    pieces, pos = [], 0  # the tokens that start before pos are taken
    here = window(0)
    for k, nominal in enumerate(joints):
        after = window(k + 1)
        cut = _joint(here, after, nominal, context_chars // 2)
        if cut is None:
            return whole()
        pieces.append(here.ids[(here.starts >= pos) & (here.starts < cut)])
        here, pos = after, cut
    pieces.append(here.ids[here.starts >= pos])
    return np.concatenate([np.asarray(specials[0], np.int32), *pieces, np.asarray(specials[1], np.int32)])


class _Window:
    """The tokens of ``text[lo:hi]`` (no special tokens): their ids, where in ``text`` each starts,
    and whether each begins a word (a piece of the pre-tokenizer's split; with ``marked``, also a
    token that starts with SentencePiece's ``▁``)."""

    def __init__(self, tokenizer: Any, text: str, lo: int, hi: int, marked: bool):
        enc = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True,
                        return_attention_mask=False, return_token_type_ids=False)
        self.ids = np.asarray(enc["input_ids"], np.int32)
        self.starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64).reshape(-1) + lo
        words = enc.word_ids() if hasattr(enc, "word_ids") else [None] * len(self.ids)
        tokens = enc.tokens() if marked else [""] * len(self.ids)
        self.word_starts = np.array([k > 0 and w is not None and (w != words[k - 1] or tokens[k].startswith(_MARK))
                                     for k, w in enumerate(words)], bool)


_MARK = "\u2581"  # ▁, SentencePiece's mark of a space


def _words_marked(tokenizer: Any) -> bool:
    """Whether the tokenizer's vocabulary marks words SentencePiece's way: tokens that start with
    ``▁`` and none that hold it later, so no token spans the start of a marked word (BPE's merges
    and Unigram's pieces stay within words, whatever its pre-tokenizer splits)."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    return any(t.startswith(_MARK) for t in vocab) and not any(_MARK in t[1:] for t in vocab)


def _joint(here: _Window, after: _Window, nominal: int, margin: int) -> int | None:
    """The start of the first word at or after ``nominal`` (within ``margin``) that both windows
    begin a word at and around which they hold the same tokens for ``margin`` characters either
    side, or ``None``."""
    begins_after = set(after.starts[after.word_starts].tolist())
    for k in np.flatnonzero(here.word_starts & (here.starts >= nominal) & (here.starts < nominal + margin)):
        cut = int(here.starts[k])
        if cut not in begins_after:
            continue
        near = lambda s: (s >= cut - margin) & (s < cut + margin)
        mine, theirs = near(here.starts), near(after.starts)
        if np.array_equal(here.ids[mine], after.ids[theirs]) and np.array_equal(here.starts[mine], after.starts[theirs]):
            return cut
    return None


def _specials(tokenizer: Any, sample: str) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer puts before and after a text's own (a BOS token, BERT's [CLS] and
    [SEP]), or ``None`` where they are not simply around them."""
    full = list(tokenizer(sample)["input_ids"])
    bare = list(tokenizer(sample, add_special_tokens=False)["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    return None
