"""DeepNorm (DeepNet; Wang, Ma, Dong, Huang, Zhang, Wei, "DeepNet: Scaling Transformers to 1,000
Layers", 2022), the encoder-only constants, as pure math.

DeepNorm is a Post-LN scheme: every residual add is x_next = LN(alpha x + block(x)) with
alpha = (2N)^(1/4) for an encoder of N layers, and the weights of the value projection, the
attention output projection and both FFN linear maps are scaled down by beta = (8N)^(-1/4) after
their Xavier initialisation (DeepNet's beta is this init scale; the block is added unscaled); the
query and key projections are Xavier with gain 1/sqrt(2).

The constants were checked against microsoft/torchscale (commit 4d1e0e8, April 2024):

- ``torchscale/architecture/encoder.py``, ``EncoderLayer.__init__``: ``alpha = (2 *
  encoder_layers) ** 0.25`` for an encoder without a decoder; ``EncoderLayer.residual_connection``
  returns ``residual * alpha + x`` and ``EncoderLayer.forward`` applies the LayerNorm after it
  (``encoder_normalize_before`` is False under ``deepnorm``, ``torchscale/architecture/config.py``,
  ``EncoderConfig.__init__``).
- ``torchscale/architecture/encoder.py``, ``Encoder.__init__``: ``init_scale = (8 *
  encoder_layers) ** 0.25``; every parameter whose name contains ``fc1``, ``fc2``, ``out_proj`` or
  ``v_proj`` is divided by it.
- ``torchscale/component/multihead_attention.py``, ``MultiheadAttention.reset_parameters``:
  ``xavier_uniform_`` with gain 1/sqrt(2) for ``q_proj``, ``k_proj`` and ``v_proj`` (each d -> d)
  and gain 1 for ``out_proj``.

Differences from torchscale, on purpose or by necessity:

- torchscale draws from uniform distributions; :func:`deepnorm_stds` gives the stds of those
  uniforms and the model draws normals with the same variance.
- ``MultiheadAttention.reset_parameters`` is defined but not called by torchscale's own modules;
  its gains are DeepNet's intended attention init and are used here.
- torchscale's ``FeedForwardNetwork`` (``torchscale/component/feedforward_network.py``) keeps
  ``nn.Linear``'s default init (uniform, variance 1/(3 fan_in)) before the division; here the FFN is
  Xavier, sqrt(2/(d + d_f)), as the DeepNet paper describes it (Xavier init with gain beta for the
  two FFN maps, V and the output projection).
- torchscale also divides those layers' biases; here every bias is 0.
"""
from __future__ import annotations

import math


def deepnorm_alpha(n_layers: int) -> float:
    """The residual multiplier of an N-layer DeepNorm encoder, alpha = (2N)^(1/4)."""
    if n_layers <= 0:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    return (2.0 * n_layers) ** 0.25


def deepnorm_beta(n_layers: int) -> float:
    """DeepNet's beta = (8N)^(-1/4): the init down-scaling of the V, attention output and FFN
    weights (not the residual adds' beta, which DeepNorm leaves at 1)."""
    if n_layers <= 0:
        raise ValueError(f"n_layers must be positive, got {n_layers}")
    return (8.0 * n_layers) ** -0.25


def xavier_std(fan_in: int, fan_out: int, gain: float = 1.0) -> float:
    """Std of Xavier (Glorot) init: gain sqrt(2/(fan_in + fan_out)), for the normal and the uniform
    form alike."""
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def deepnorm_stds(d: int, d_f: int, n_layers: int) -> dict:
    """Stds of the encoder's weights under DeepNorm, keys ``qk``, ``v``, ``attn_out`` and ``ffn``
    (FFN in and out):

        Q, K:              xavier(d, d, gain 1/sqrt(2))        = sqrt(1/(2d))
        V:                 xavier(d, d, gain 1/sqrt(2)) * beta = sqrt(1/(2d)) (8N)^(-1/4)
        attention output:  xavier(d, d) * beta                 = sqrt(1/d) (8N)^(-1/4)
        FFN in, out:       xavier(d, d_f) * beta               = sqrt(2/(d + d_f)) (8N)^(-1/4)
    """
    beta = deepnorm_beta(n_layers)
    half = 1.0 / math.sqrt(2.0)
    return dict(qk=xavier_std(d, d, half), v=xavier_std(d, d, half) * beta,
                attn_out=xavier_std(d, d) * beta, ffn=xavier_std(d, d_f) * beta)
