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


def _metaspace():  # Llama's kind: SentencePiece BPE with a dummy prefix at the text's start, a BOS token
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Metaspace()
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(_TRAIN, trainers.BpeTrainer(vocab_size=400, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>")


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


KINDS = {"byte-level BPE": _byte_level, "SentencePiece BPE": _metaspace, "WordPiece": _word_piece}


@pytest.mark.parametrize("kind", list(KINDS))
def test_windows_give_the_ids_of_one_call(kind):
    tokenizer, text = KINDS[kind](), _text(6000, seed=1234)  # 30k characters, 14 joints
    spy = _Spy(tokenizer)
    got = token_ids(spy, text, chunk_chars=2000, context_chars=200)
    assert got.dtype == np.int32
    assert got.tolist() == tokenizer(text)["input_ids"]
    assert max(spy.lengths) < 2 * 2000 + 2 * 200  # never the whole text: at most the last window


@pytest.mark.parametrize("kind", list(KINDS))
def test_windows_that_disagree_give_way_to_one_call(kind):
    # a 3000-character word: WordPiece makes it one [UNK] whole, [UNK]s in pieces, so no joint holds
    tokenizer, text = KINDS[kind](), _text(1000, seed=0) + "a" * 3000 + _text(2000, seed=1)
    assert token_ids(_Spy(tokenizer), text, chunk_chars=2000, context_chars=200).tolist() == tokenizer(text)["input_ids"]


def test_a_short_text_or_a_slow_tokenizer_is_tokenized_in_one_call():
    tokenizer = _Spy(_word_piece())
    text = _text(300, seed=2)
    assert token_ids(tokenizer, text, chunk_chars=len(text), context_chars=10).tolist() == tokenizer.tokenizer(text)["input_ids"]
    tokenizer.is_fast = False  # no offsets to join windows by
    assert token_ids(tokenizer, text * 10, chunk_chars=400, context_chars=10).size > 0
    assert tokenizer.lengths[1:] == [len(text) * 10]
    with pytest.raises(ValueError, match=r"chunk_chars \(100\) must be at least 4 × context_chars \(50\)"):
        token_ids(tokenizer, text, chunk_chars=100, context_chars=50)
