"""SDPA kernels on a padded BERT-base attention batch (B 32, 12 heads, L 512, d_h 64, attention
dropout 0.1, 10 % of the rows padded as in bench_pretrain.py): milliseconds of forward + backward per
call for cuDNN, FlashAttention-2 and memory-efficient attention with the padding mask (boolean, and
for cuDNN also as the model's additive bf16 bias) and without any mask, nested (jagged) tensors, and
varlen attention without dropout where this PyTorch has it. Prints one JSON object (``fill`` =
fraction of real tokens); needs a GPU. The H100 result is
``results/pretrain/attention_kernels_h100.json`` (docs/train.md)."""
import argparse
import json

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from dslm.model.ops import attention_bias

argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
if not torch.cuda.is_available():
    raise SystemExit("bench_attention.py needs a CUDA GPU")
torch.manual_seed(0)
B, H, L, D, p = 32, 12, 512, 64, 0.1
dev = "cuda"
lengths = torch.full((B,), L)
short = torch.rand(B) < 0.1
lengths[short] = torch.randint(L // 4, L, (int(short.sum()),))
fill = lengths.sum().item() / (B * L)
mask = torch.arange(L)[None] < lengths[:, None]
q, k, v = (torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
g = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16)
bias = mask.to(dev)[:, None, None, :]
res = {"fill": fill}
def timeit(fn, n=20):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(n): fn()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n
def run(backend, attn_mask):
    def f():
        with sdpa_kernel([backend]):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        torch.autograd.grad(y, (q, k, v), g)
    return f
additive = attention_bias(mask.long(), torch.bfloat16).to(dev)   # the model's own bias
for name, be, m in [("cudnn_mask", SDPBackend.CUDNN_ATTENTION, bias), ("efficient_mask", SDPBackend.EFFICIENT_ATTENTION, bias),
                    ("cudnn_additive_bf16", SDPBackend.CUDNN_ATTENTION, additive),
                    ("flash_nomask", SDPBackend.FLASH_ATTENTION, None), ("cudnn_nomask", SDPBackend.CUDNN_ATTENTION, None),
                    ("efficient_nomask", SDPBackend.EFFICIENT_ATTENTION, None)]:
    try:
        res[name] = timeit(run(be, m))
    except Exception as ex:
        res[name] = f"fails: {str(ex)[:200]}"
# varlen through nested jagged tensors: (T, H, D) packed tokens
T = int(lengths.sum())
offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(dev)
qp, kp, vp = (torch.randn(T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
gp = torch.randn(T, H, D, device=dev, dtype=torch.bfloat16)
def nested():
    def nt(x):
        return torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=L).transpose(1, 2)
    y = F.scaled_dot_product_attention(nt(qp), nt(kp), nt(vp), dropout_p=p)
    y = y.transpose(1, 2).values()
    torch.autograd.grad(y, (qp, kp, vp), gp)
try:
    res["nested_jagged"] = timeit(nested)
except Exception as ex:
    res["nested_jagged"] = f"fails: {str(ex)[:300]}"
try:
    from torch.nn.attention.varlen import varlen_attn
    cu = offsets.int()
    def vl():
        y = varlen_attn(qp, kp, vp, cu, cu, L, L)
        torch.autograd.grad(y, (qp, kp, vp), gp)
    res["varlen_attn_nodropout"] = timeit(vl)
except Exception as ex:
    res["varlen_attn_nodropout"] = f"fails: {str(ex)[:300]}"
print(json.dumps(res, indent=1))
