"""An HF model folder's tokenizer_config.json decides the casing, as in HF's BertTokenizerFast."""
import json

import pytest

from dslm.data.vocab import Tokenizer
from dslm.errors import UsageError

transformers = pytest.importorskip("transformers")

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "Hello", "world", "World", "cafe", "Café", "!"]
TEXT = "Hello World! Café hello"


def _folder(tmp_path, config):
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path / "vocab.txt"


@pytest.mark.parametrize("config, lower", [(None, True), ({"do_lower_case": True}, True),
                                           ({"do_lower_case": False}, False), ({}, True)])
def test_casing_follows_tokenizer_config_like_hf(tmp_path, config, lower):
    tok = Tokenizer.from_file(_folder(tmp_path, config))
    hf = transformers.BertTokenizerFast(str(tmp_path / "vocab.txt"), do_lower_case=lower)
    assert tok.lowercase is lower
    assert tok.encode(TEXT) == hf(TEXT, add_special_tokens=False)["input_ids"]
    assert ("Hello" in tok.convert_ids_to_tokens(tok.encode(TEXT))) is (not lower)


def test_bad_tokenizer_config_is_one_line(tmp_path):
    with pytest.raises(UsageError, match="do_lower_case is 'no'"):
        Tokenizer.from_file(_folder(tmp_path, {"do_lower_case": "no"}))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UsageError, match="not a readable tokenizer config"):
        Tokenizer.from_file(tmp_path / "vocab.txt")


def test_the_finetuning_cache_key_sees_the_casing(tmp_path):
    from dslm.finetune.features import vocab_checksum

    cased = Tokenizer.from_file(_folder(tmp_path, {"do_lower_case": False}))
    assert vocab_checksum(cased) != vocab_checksum(Tokenizer(VOCAB))
