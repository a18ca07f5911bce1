"""dslm: DeepScaleLM, an end-to-end signal-propagation theory for transformers and its method.

Subpackages: ``theory`` (closed-form moments), ``sim`` (Monte-Carlo checks), ``model`` (BERT with
megatron / xavier / dslm init), ``probe`` (measure a model), ``data`` (corpora and samples),
``train`` (one training engine). The ``dslm`` command (``dslm.cli``) fronts every job.
"""

__version__ = "0.1.0"
