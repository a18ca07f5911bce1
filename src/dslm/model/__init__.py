"""The models: BERT (encoder) and GPT (decoder) on shared blocks, their configs, init schemes
(megatron / xavier / dslm / deepnorm / gpt2), the saved-model directory and HF interop
(:mod:`dslm.model.hf` and :mod:`dslm.model.hf_gpt2`, imported on demand since they need
``transformers``)."""
from dslm.model.config import BertConfig, GPTConfig, TransformerConfig  # noqa: F401
from dslm.model.bert import BertForPreTraining, BertModel, BertOutput, PreTrainingOutput  # noqa: F401
from dslm.model.gpt import CausalLMOutput, GPTLMHeadModel, GPTModel, GPTOutput  # noqa: F401
from dslm.model.init import InitEntry, init_plan, init_weights, scheme_stds  # noqa: F401
from dslm.model.saved import from_pretrained, load_config  # noqa: F401
