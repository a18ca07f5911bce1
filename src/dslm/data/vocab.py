"""The WordPiece vocabulary and tokenizer (BERT uncased conventions).

A vocabulary is a BERT ``vocab.txt``: one token per line, the line number is the id, ``##`` marks a
word continuation, and the five special tokens below must be present. Reading and validating it
needs only the standard library, so the sample builder can use it without the ``tokenizers``
package; encoding and training text use the fast Rust tokenizer of ``tokenizers`` (imported lazily;
it is the ``data`` extra).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from dslm.errors import UsageError

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
VOCAB_FILE = "vocab.txt"


def read_vocab(path: str | Path) -> list[str]:
    """The tokens of a ``vocab.txt`` (index = id), after checking it is a usable BERT vocabulary:
    UTF-8, no duplicate tokens, and all of [PAD] [UNK] [CLS] [SEP] [MASK] present."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{path}: cannot read vocabulary ({e.strerror or e})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{path}: vocabulary is not UTF-8 (invalid byte at line {line})") from None
    tokens = text.split("\n")
    if tokens and tokens[-1] == "":
        tokens.pop()
    tokens = [t.rstrip("\r") for t in tokens]
    if not tokens:
        raise UsageError(f"{path}: vocabulary is empty")
    missing = [t for t in SPECIAL_TOKENS if t not in set(tokens)]
    if missing:
        raise UsageError(f"{path}: vocabulary lacks the special token(s) {' '.join(missing)}")
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise UsageError(f"{path}: token {t!r} appears twice (lines {seen[t] + 1} and {i + 1})")
        seen[t] = i
    return tokens


def write_vocab(tokens: list[str], path: Path) -> None:
    """Write ``tokens`` as a vocab.txt (one per line, id order)."""
    path.write_text("".join(t + "\n" for t in tokens), encoding="utf-8")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the special tokens in one vocabulary."""
    pad: int
    unk: int
    cls: int
    sep: int
    mask: int

    @classmethod
    def of(cls, tokens: list[str]) -> "SpecialIds":
        index = {t: i for i, t in enumerate(tokens) if t in SPECIAL_TOKENS}
        return cls(index[PAD], index[UNK], index[CLS], index[SEP], index[MASK])


def require_tokenizers() -> None:
    """Raise the one-line :class:`UsageError` naming the ``data`` extra when ``tokenizers`` is not
    installed (call it before starting processes that would need it)."""
    _tokenizers()


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise UsageError("the 'tokenizers' package is needed to tokenize text: "
                         "pip install 'dslm[data]' (or pip install tokenizers)") from None
    return tokenizers


def _bert_pipeline(model, lowercase: bool = True):
    """A ``tokenizers.Tokenizer`` around ``model`` with BERT's normalization (control characters
    removed, CJK characters split; uncased: lower case and accents stripped, as BERT's uncased
    models; cased: the text as written) and pre-tokenization."""
    tk = _tokenizers()
    backend = tk.Tokenizer(model)
    backend.normalizer = tk.normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                       strip_accents=lowercase, lowercase=lowercase)
    backend.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    backend.decoder = tk.decoders.WordPiece(prefix="##")
    return backend


class Tokenizer:
    """BERT WordPiece tokenizer over one vocabulary: ``encode``/``encode_batch`` give token ids
    without special tokens (the sample builder adds [CLS]/[SEP]), ``decode`` joins word pieces.
    ``backend`` is the underlying ``tokenizers.Tokenizer`` for anything else (pairs, offsets).
    ``lowercase``: uncased (BERT's default) or cased normalization."""

    def __init__(self, tokens: list[str], lowercase: bool = True):
        tk = _tokenizers()
        self.tokens, self.lowercase = tokens, lowercase
        self.special = SpecialIds.of(tokens)
        model = tk.models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token=UNK,
                                    max_input_chars_per_word=100)
        self.backend = _bert_pipeline(model, lowercase)

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        """The tokenizer of a ``vocab.txt``; an HF model folder's ``tokenizer_config.json`` beside it
        decides the casing (``do_lower_case``, default true), so a cased model stays cased."""
        path = Path(path)
        return cls(read_vocab(path), lowercase=_hf_lower_case(path.parent / "tokenizer_config.json"))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        return [self.tokens[int(i)] for i in ids]


def _hf_lower_case(config_path: Path) -> bool:
    """``do_lower_case`` of an HF ``tokenizer_config.json`` (true when the file or the key is absent)."""
    if not config_path.is_file():
        return True
    try:
        value = json.loads(config_path.read_text(encoding="utf-8")).get("do_lower_case", True)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UsageError(f"{config_path}: not a readable tokenizer config ({e.__class__.__name__})") from None
    if not isinstance(value, bool):
        raise UsageError(f"{config_path}: do_lower_case is {value!r}, expected true or false")
    return value


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer of a prepared dataset directory (its ``vocab.txt``)."""
    path = Path(data_dir) / VOCAB_FILE
    if not path.is_file():
        raise UsageError(f"{data_dir}: no {VOCAB_FILE}; is this a dataset prepared by 'dslm prepare-data'?")
    return Tokenizer.from_file(path)


def train_vocab(texts: Iterator[str], vocab_size: int) -> list[str]:
    """Train a WordPiece vocabulary of at most ``vocab_size`` tokens on ``texts`` (streamed), with
    the special tokens first ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4)."""
    tk = _tokenizers()
    backend = _bert_pipeline(tk.models.WordPiece(unk_token=UNK))
    trainer = tk.trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                           continuing_subword_prefix="##", show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    vocab = backend.get_vocab()
    return sorted(vocab, key=vocab.__getitem__)
