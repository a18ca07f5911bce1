"""Data: corpora, WordPiece vocabulary, memory-mapped token store, BERT pretraining samples and
next-token windows.

``prepare_dataset`` (the ``dslm prepare-data`` command) turns a text source into a dataset
directory; ``PretrainingDataset`` reads BERT samples of one split from it and ``make_loader``
batches them for training (sharded over ranks, resumable); ``NextTokenDataset`` reads the same
split as next-token windows for a decoder; ``load_tokenizer`` gives the directory's
tokenizer; ``ensure_embedded_dataset`` prepares the shipped corpus once for jobs that need data
without a download.

The names are imported on first use, so preparing data (and its worker processes) never loads torch.
"""
import importlib

_EXPORTS = {
    "PretrainingDataset": "dslm.data.dataset",
    "NextTokenDataset": "dslm.data.nexttoken",
    "make_loader": "dslm.data.loader",
    "prepare_dataset": "dslm.data.prepare",
    "ensure_embedded_dataset": "dslm.data.prepare",
    "Tokenizer": "dslm.data.vocab",
    "load_tokenizer": "dslm.data.vocab",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dslm.data' has no attribute {name!r}")
