"""Closed-form signal-propagation theory: component moments (:mod:`.components`), the DSLM
initialisation recursion (:mod:`.dslm_init`), DeepNorm's constants (:mod:`.deepnorm`) and the
whole-model predictor (:mod:`.predictor`)."""
from dslm.theory.components import (  # noqa: F401
    Moments, attention_block, attention_head, dropout, ffn_block, ffn_corr, ffn_corr_approx, gelu,
    layernorm, layernorm_corr, layernorm_feature_cov, linear, relu, relu_corr, relu_corr_approx,
    softmax, softmax_var,
)
from dslm.theory.deepnorm import deepnorm_alpha, deepnorm_beta, deepnorm_stds  # noqa: F401
from dslm.theory.dslm_init import REFERENCE_R0, DSLMStds, dslm_stds, residual_scales  # noqa: F401
from dslm.theory.predictor import Prediction, agreement, normalise, predict  # noqa: F401
from dslm.theory.profile import GRAD_MATRICES, SignalProfile  # noqa: F401
