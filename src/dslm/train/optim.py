"""AdamW with decoupled weight decay (none on biases, LayerNorm parameters and other 1-d tensors)
and global-norm gradient clipping."""
from __future__ import annotations

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices (embeddings included) decay; biases, LayerNorm gains/biases and any other
    parameter with fewer than 2 dimensions do not. Tied parameters appear once."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if p.ndim < 2 or isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name == "bias":
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW; ``fused`` (default: when every parameter is on CUDA or the CPU, i.e. always for us) uses
    the single-kernel implementation, which also lets :func:`skip_if_nonfinite` skip a step on the
    device without a host sync."""
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def clip_grad_norm(parameters, max_norm: float, optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
    """Global L2 norm of all gradients (a device tensor, no host sync; a plain tensor also under
    FSDP2); the gradients are scaled by min(1, max_norm / (norm + 1e-6)) (``max_norm`` <= 0: no
    clipping, the norm is still returned), as ``torch.nn.utils.clip_grad_norm_`` does.

    With a fused ``optimizer`` the scaling is left to its next ``step()``: its kernel divides each
    gradient by ``optimizer.grad_scale`` = max(1, (norm + 1e-6) / max_norm) as it loads it (the
    hook AMP's GradScaler uses) and writes the clipped gradient back, which saves the separate
    rescaling pass's read of every gradient. Clear ``optimizer.grad_scale`` after the step (as
    ``found_inf``); this function sets it to None whenever it does not fold."""
    if optimizer is not None:
        optimizer.grad_scale = None
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    fold = max_norm > 0 and optimizer is not None and optimizer.defaults.get("fused")
    if max_norm > 0 and not fold:
        norm = nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_norm, foreach=True)
    elif hasattr(nn.utils, "get_total_norm"):
        norm = nn.utils.get_total_norm(grads, foreach=True)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    # FSDP2: sharded gradients give a DTensor norm; materialise the global value (an all-reduce)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    if fold:
        optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)
    return norm


def skip_if_nonfinite(optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor) -> torch.Tensor:
    """Arrange for the next ``optimizer.step()`` to be a no-op when ``grad_norm`` is not finite (a NaN or
    inf loss gives a non-finite norm). Returns the 0-dim float flag (1 = skipped), still on the device.
    With a fused optimizer the check happens inside the kernel (no host sync); otherwise the flag is
    read here."""
    found = (~torch.isfinite(grad_norm)).float()
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = found
    elif found.item():
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
    return found
