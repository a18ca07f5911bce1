"""Pretraining jobs on the training engine: BERT (:mod:`dslm.pretrain.bert`), a GPT decoder
(:mod:`dslm.pretrain.gpt`), what they share (:mod:`dslm.pretrain.shared`) and the ``dslm pretrain``
command that chooses between them (:mod:`dslm.pretrain.command`)."""
