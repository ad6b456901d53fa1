"""jlora.tokens: a long text's token ids, tokenized in windows, equal those of one call."""

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from jlora.tokens import token_ids

WORDS = ["the", "film", "was", "very", "good", "Bad", "café", "naïve", "中文", "🙂", "x2", "1999", "don't", "e-mail",
         "A.B."]
GAPS = [" ", " ", " ", "  ", "\n", "\n\n", ", ", ". ", "\t", " \n"]


def _text(n_words, seed):
    rng = np.random.default_rng(seed)
    return "".join(WORDS[rng.integers(len(WORDS))] + GAPS[rng.integers(len(GAPS))] for _ in range(n_words))


_TRAIN = [_text(50, seed) for seed in range(200)]


def _byte_level():  # GPT-2's kind: byte-level BPE, offsets trimmed of the leading space
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_TRAIN, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _metaspace(merged_across_words=False):
    """Llama 2's kind: SentencePiece BPE over the whole text (no split), a dummy prefix at its
    start, a BOS token. Trained as SentencePiece trains, word by word, no token holds ``▁`` but at
    its start; ``merged_across_words``: trained on the whole text, some do (',▁film')."""
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=merged_across_words is False)
    tok.decoder = decoders.Metaspace()
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(_TRAIN, trainers.BpeTrainer(vocab_size=400, special_tokens=special))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


def _unigram():  # T5's, XLM-R's kind: SentencePiece Unigram, words split at spaces
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(_TRAIN + ["ab" * 50, "aab" * 30, "a" * 200],
                            trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>"], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def _word_piece():  # BERT's kind: lower-cased WordPiece between [CLS] and [SEP]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_TRAIN, trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[CLS]", "[SEP]"]))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[(t, tok.token_to_id(t)) for t in ("[CLS]", "[SEP]")])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]")


class _Spy:
    """The tokenizer, noting the length of every text it is given."""

    is_fast = True

    def __init__(self, tokenizer):
        self.tokenizer, self.lengths = tokenizer, []

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)

    def get_vocab(self):
        return self.tokenizer.get_vocab()


KINDS = {"byte-level BPE": _byte_level, "SentencePiece BPE": _metaspace, "SentencePiece Unigram": _unigram,
         "WordPiece": _word_piece}


@pytest.mark.parametrize("kind", list(KINDS))
def test_windows_give_the_ids_of_one_call(kind):
    tokenizer, text = KINDS[kind](), _text(6000, seed=1234)  # 30k characters, 14 joints
    spy = _Spy(tokenizer)
    got = token_ids(spy, text, chunk_chars=2000, context_chars=200)
    assert got.dtype == np.int32
    assert got.tolist() == tokenizer(text)["input_ids"]
    assert max(spy.lengths) < 2 * 2000 + 2 * 200  # never the whole text: at most the last window


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_word_longer_than_a_window_gives_way_to_one_call(kind):
    """Tokens of a long word depend on all of it (Unigram's best split, BPE's merges of 'ab'
    pairs): with no word starting near a joint, the windows cannot be joined there."""
    tokenizer = KINDS[kind]()
    for word in ("ab" * 2500, "a" * 5001):
        text = _text(1000, seed=0) + " " + word + " " + _text(2000, seed=1)  # the word across the first joint
        spy = _Spy(tokenizer)
        assert token_ids(spy, text, chunk_chars=2000, context_chars=200).tolist() == tokenizer(text)["input_ids"]
        assert len(text) in spy.lengths


def test_a_sentencepiece_vocabulary_with_tokens_across_words_gives_way_to_one_call():
    """Merges learned across ▁ (',▁film'): a ▁ starts no word the tokenizer keeps apart."""
    tokenizer, text = _metaspace(merged_across_words=True), _text(6000, seed=5)
    spy = _Spy(tokenizer)
    assert token_ids(spy, text, chunk_chars=2000, context_chars=200).tolist() == tokenizer(text)["input_ids"]
    assert len(text) in spy.lengths


class _Encoding(dict):
    def __init__(self, ids, offsets, words):
        super().__init__(input_ids=ids, offset_mapping=offsets)
        self.words = words

    def word_ids(self):
        return self.words

    def tokens(self):
        return [""] * len(self.words)


class _ReadsTheWholeText:
    """A token per letter, words split at spaces, but each id shifted by the text's length: windows
    agree on where words start, not on their tokens."""

    is_fast = True

    def __call__(self, text, add_special_tokens=True, **kwargs):
        letters = [k for k, c in enumerate(text) if c != " "]
        words = [text[:k].count(" ") for k in letters]
        return _Encoding([ord(text[k]) + len(text) % 7 for k in letters], [(k, k + 1) for k in letters], words)


def test_windows_that_disagree_on_tokens_give_way_to_one_call():
    text = _text(6000, seed=6)
    assert token_ids(_ReadsTheWholeText(), text, chunk_chars=2000, context_chars=200).tolist() == \
        _ReadsTheWholeText()(text)["input_ids"]


def test_a_short_text_or_a_slow_tokenizer_is_tokenized_in_one_call():
    tokenizer = _Spy(_word_piece())
    text = _text(300, seed=2)
    assert token_ids(tokenizer, text, chunk_chars=len(text), context_chars=10).tolist() == tokenizer.tokenizer(text)["input_ids"]
    tokenizer.is_fast = False  # no offsets to join windows by
    assert token_ids(tokenizer, text * 10, chunk_chars=400, context_chars=10).size > 0
    assert tokenizer.lengths[1:] == [len(text) * 10]
    with pytest.raises(ValueError, match=r"chunk_chars \(100\) must be at least 4 × context_chars \(50\)"):
        token_ids(tokenizer, text, chunk_chars=100, context_chars=50)
    for args, got in (((None, text), "got NoneType and str"), ((tokenizer, None), r"got _Spy and NoneType"),
                      ((tokenizer, [text]), "got _Spy and list")):
        with pytest.raises(ValueError, match=r"takes a tokenizer \(a transformers tokenizer, called on the text\) and "
                                             "a str, " + got):
            token_ids(*args)
