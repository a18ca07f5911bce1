"""Pretraining jobs on the training engine: BERT (:mod:`dslm.pretrain.bert`) and the ``dslm pretrain``
command (:mod:`dslm.pretrain.command`)."""
