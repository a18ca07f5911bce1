"""Fused operations the model uses where PyTorch has no differentiable fused form, and the
attention mask in the form the attention kernels read fastest.

``linear_relu(x, W, b) = relu(x W^T + b)`` runs as one GEMM whose epilogue adds the bias and applies
the ReLU (``aten._addmm_activation``: cuBLASLt's RELU_BIAS epilogue on CUDA), instead of a GEMM and
a separate pass that reads the pre-activation back, writes the ReLU and (under torch.compile) a
saved mask. The forward equals ``F.relu(F.linear(x, W, b))``: the epilogue rounds the fp32
accumulator plus bias once, and ReLU commutes with rounding (bit-identical on the CPU, tested; on
CUDA cuBLASLt may choose another GEMM kernel for the epilogue, i.e. another summation order).
``aten._addmm_activation`` has no autograd formula, so the backward is written here: it takes the
ReLU mask from the saved output, which the next linear layer keeps for its own weight gradient
anyway (no extra memory), and sums the bias gradient in fp32 (autocast's path sums it in the
compute dtype). A one-pass Triton kernel for the masked gradient and its column sums was measured
on an H100 and gained nothing over torch.compile's two passes (BERT-base: 520-521k vs 523k tokens/s).
"""
from __future__ import annotations

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on ``x`` runs in: autocast's where it is on for x's device, else x's own
    (autocast does not list ``_addmm_activation``, so the cast is done here as autocast would)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind) and x.dtype != torch.float64:   # autocast leaves fp64 alone
        return torch.get_autocast_dtype(kind)
    return x.dtype


class _LinearReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        dtype = compute_dtype(x)
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w = weight.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = torch._addmm_activation(bias.to(dtype), x2, w.t())
        ctx.save_for_backward(x2, w, y)
        ctx.dtypes, ctx.x_shape = (x.dtype, weight.dtype, bias.dtype), x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    @torch.autograd.function.once_differentiable     # no double backward: a clear error, not wrong values
    def backward(ctx, grad):
        x2, w, y = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = grad.reshape(y.shape).to(y.dtype) * (y > 0)      # d relu(z) / dz = 1[z > 0] = 1[y > 0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ w).view(ctx.x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ x2).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g.sum(0, dtype=torch.promote_types(g.dtype, torch.float32)).to(b_dtype)
        return grad_x, grad_w, grad_b


def linear_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(x @ weight.T + bias)`` for x of shape (..., in), as one fused GEMM + epilogue."""
    return _LinearReLU.apply(x, weight, bias)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Key-padding mask (batch, seq) of 1 (real token) / 0 (padding) as the additive bias
    (batch, 1, 1, seq) that SDPA adds to every head's scores: 0 for real keys, the most negative
    finite ``dtype`` value for padding (exp underflows to exactly 0, as with -inf, but a row with no
    real key cannot turn into NaN in any backend: it attends uniformly to its padding). Made once
    per forward in the attention's dtype: given a boolean mask, SDPA's cuDNN path would build this
    bias again in every layer."""
    bias = torch.zeros(attention_mask.shape[0], 1, 1, attention_mask.shape[1], dtype=dtype,
                       device=attention_mask.device)
    return bias.masked_fill(attention_mask[:, None, None, :] == 0, torch.finfo(dtype).min)


def causal_attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The causal mask and a key-padding mask (batch, seq) together, as one additive bias
    (batch, 1, seq, seq): 0 where key j <= query i is a real token, the most negative finite
    ``dtype`` value elsewhere (see :func:`attention_bias`). Needed only with padding: without it the
    attention takes SDPA's causal path, which builds no mask at all."""
    seq = attention_mask.shape[1]
    future = torch.ones(seq, seq, dtype=torch.bool, device=attention_mask.device).triu(1)
    blocked = future[None, None] | (attention_mask[:, None, None, :] == 0)
    bias = torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(blocked, torch.finfo(dtype).min)
