"""dslm.model.ops.linear_relu (GEMM with a fused bias + ReLU epilogue) against relu(linear(x))."""
import pytest
import torch
import torch.nn.functional as F

from dslm.model.ops import linear_relu


def _inputs(dtype, shape=(3, 5, 7), out=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(out, shape[-1], generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(out, generator=g, dtype=dtype, requires_grad=True)
    return x, w, b


def test_gradcheck_fp64():
    assert torch.autograd.gradcheck(linear_relu, _inputs(torch.float64, (4, 6), 5))


def test_forward_and_gradients_equal_relu_of_linear_fp32():
    x, w, b = _inputs(torch.float32)
    grad = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1))
    y = linear_relu(x, w, b)
    ref = F.relu(F.linear(x, w, b))
    assert (y > 0).any() and (y == 0).any()          # both sides of the ReLU are exercised
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    for a, r in zip(torch.autograd.grad(y, (x, w, b), grad), torch.autograd.grad(ref, (x, w, b), grad)):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)


def test_autocast_bf16_matches_autocast_linear_and_keeps_fp32_gradients():
    x, w, b = _inputs(torch.float32, (64, 32), 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = linear_relu(x, w, b)
        ref = F.relu(F.linear(x, w, b))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    grads = torch.autograd.grad(y.float().sum(), (x, w, b))
    refs = torch.autograd.grad(ref.float().sum(), (x, w, b))
    for a, r, t in zip(grads, refs, (x, w, b)):
        assert a.dtype == t.dtype == torch.float32
        torch.testing.assert_close(a, r, rtol=2e-2, atol=2e-2)


def test_only_requested_gradients_are_computed():
    """With W frozen the backward runs one GEMM (for x), not two (counted in FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x, w, b = _inputs(torch.float32)
    w.requires_grad_(False)
    y = linear_relu(x, w, b)
    with FlopCounterMode(display=False) as counter:
        gx, gb = torch.autograd.grad(y.sum(), (x, b))
    assert counter.get_total_flops() == 2 * 15 * 11 * 7          # grad_x = g @ W only
    torch.testing.assert_close(gb, (F.linear(x, w, b) > 0).float().sum((0, 1)))
    assert gx.shape == x.shape


def test_double_backward_is_refused():
    x, w, b = _inputs(torch.float64, (4, 6), 5)
    gx, = torch.autograd.grad(linear_relu(x, w, b).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|marked with"):
        torch.autograd.grad(gx.sum(), w)


def test_compiled_matches_eager():
    pytest.importorskip("torch._inductor")
    x, w, b = _inputs(torch.float32)
    compiled = torch.compile(linear_relu)
    y = compiled(x, w, b)
    torch.testing.assert_close(y, F.relu(F.linear(x, w, b)))
    gx, = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, torch.autograd.grad(F.relu(F.linear(x, w, b)).sum(), x)[0])


def test_attention_bias_matches_boolean_mask_and_never_gives_nan():
    from dslm.model.ops import attention_bias

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    bias = attention_bias(mask, torch.float32)
    assert bias.shape == (3, 1, 1, 4) and bias.dtype == torch.float32
    assert torch.equal(bias == 0, mask[:, None, None, :] == 1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 4, 8, generator=g) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q[:2], k[:2], v[:2], attn_mask=mask[:2, None, None, :].bool())
    torch.testing.assert_close(out[:2], ref)
    # the row without any real key attends uniformly (-inf would give NaN or, in recent math
    # backends, zeros)
    torch.testing.assert_close(out[2], v[2].mean(1, keepdim=True).expand_as(v[2]))
    assert attention_bias(mask, torch.bfloat16).dtype == torch.bfloat16
