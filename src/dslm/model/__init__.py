"""The BERT model: config, modules, init schemes (megatron / xavier / dslm /
deepnorm) and HF interop
(:mod:`dslm.model.hf`, imported on demand since it needs ``transformers``)."""
from dslm.model.config import BertConfig  # noqa: F401
from dslm.model.bert import (  # noqa: F401
    BertForPreTraining, BertModel, BertOutput, PreTrainingOutput, from_pretrained, load_config,
)
from dslm.model.init import InitEntry, init_plan, init_weights, scheme_stds  # noqa: F401
