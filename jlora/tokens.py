"""The token ids of a long text (a causal-LM corpus), tokenized piece by piece.

A fast tokenizer given a whole corpus in one call holds about 200 bytes per character (an 18.8 MB
text peaked at 4.1 GB). ``token_ids`` tokenizes overlapping windows instead, and joins them where
two windows agree on every token around the joint; where they do not (a tokenizer whose tokens
depend on text far away), it tokenizes the whole text. The ids are those of ``tokenizer(text)``.

Example:
    >>> from transformers import AutoTokenizer
    >>> tokenizer = AutoTokenizer.from_pretrained("gpt2-dir")  # doctest: +SKIP
    >>> token_ids(tokenizer, corpus).tolist() == tokenizer(corpus)["input_ids"]  # doctest: +SKIP
    True
"""

from __future__ import annotations

from typing import Any

import numpy as np


def token_ids(tokenizer: Any, text: str, chunk_chars: int = 1 << 20, context_chars: int = 4096) -> np.ndarray:
    """``tokenizer(text)["input_ids"]`` as int32, tokenized in windows of about ``chunk_chars``
    characters, each reaching ``2 * context_chars`` into its neighbours; two windows are joined at
    a token where both agree on every token within ``context_chars // 2`` of it. A slow tokenizer
    (no offsets), a short text or windows that disagree: the whole text in one call.

    Example:
        >>> token_ids(tokenizer, "a long corpus ...", chunk_chars=4096)  # doctest: +SKIP
        array([  64,  890, 35789, 2644], dtype=int32)
    """
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
    reach = 2 * context_chars
    window = lambda k: _window(tokenizer, text, joints[k - 1] - reach if k else 0,
                               joints[k] + reach if k < len(joints) else len(text))
    pieces, pos = [], 0  # the tokens that start before pos are taken
    ids, starts = window(0)
    for k, nominal in enumerate(joints):
        next_ids, next_starts = window(k + 1)
        cut = _joint(ids, starts, next_ids, next_starts, nominal, context_chars // 2)
        if cut is None:
            return whole()
        pieces.append(ids[(starts >= pos) & (starts < cut)])
        ids, starts, pos = next_ids, next_starts, cut
    pieces.append(ids[starts >= pos])
    return np.concatenate([np.asarray(specials[0], np.int32), *pieces, np.asarray(specials[1], np.int32)])


def _window(tokenizer: Any, text: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids of ``text[lo:hi]`` (no special tokens) and where in ``text`` each starts."""
    enc = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False,
                    return_token_type_ids=False)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], np.int64).reshape(-1) + lo
    return np.asarray(enc["input_ids"], np.int32), starts


def _joint(ids: np.ndarray, starts: np.ndarray, nxt_ids: np.ndarray, nxt_starts: np.ndarray, nominal: int,
           margin: int) -> int | None:
    """The first token start at or after ``nominal`` (not inside a character that several tokens
    share) around which two windows hold the same tokens for ``margin`` characters either side."""
    after = np.flatnonzero((starts >= nominal) & (starts < nominal + margin))
    candidates = [k for k in after if k > 0 and starts[k] > starts[k - 1]]
    if not candidates:
        return None
    cut = int(starts[candidates[0]])
    near = lambda s: (s >= cut - margin) & (s < cut + margin)
    mine, theirs = near(starts), near(nxt_starts)
    same = (np.array_equal(ids[mine], nxt_ids[theirs]) and np.array_equal(starts[mine], nxt_starts[theirs]))
    return cut if same else None


def _specials(tokenizer: Any, sample: str) -> tuple[list[int], list[int]] | None:
    """The ids the tokenizer puts before and after a text's own (a BOS token, BERT's [CLS] and
    [SEP]), or ``None`` where they are not simply around them."""
    full = list(tokenizer(sample)["input_ids"])
    bare = list(tokenizer(sample, add_special_tokens=False)["input_ids"])
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return full[:k], full[k + len(bare):]
    return None
