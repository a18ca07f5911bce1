"""Finetuning a pretrained BERT on MNLI, QQP and RACE (THEORY.md section 4), on the shared engine.

* :mod:`dslm.finetune.readers`  -- GLUE TSV files, the RACE tree and the HF hub datasets -> examples,
  with malformed rows counted (:class:`~dslm.finetune.readers.ReadReport`)
* :mod:`dslm.finetune.features` -- tokenisation into [CLS] a [SEP] b [SEP] arrays, cached on disk
* :mod:`dslm.finetune.heads`    -- classification and multiple-choice heads on the pooled output;
  loading the encoder from our checkpoints or a local HF BERT directory
* :mod:`dslm.finetune.metrics`  -- accuracy, F1, RACE per-level accuracy
* :mod:`dslm.finetune.tasks`    -- the engine's ``Task`` for each job, predictions files
* :mod:`dslm.finetune.command`  -- ``dslm finetune``;  :mod:`dslm.finetune.sweep` -- ``dslm finetune-sweep``
"""
