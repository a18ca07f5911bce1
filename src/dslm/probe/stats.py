"""Streaming token statistics: variance and mean cross-token correlation of (batch, seq, d) tensors.

The correlation is the one of THEORY.md: for one feature, the correlation between two different
tokens of the same sequence, averaged over token pairs, features and sequences; pad tokens are left
out. It is pooled as (mean off-diagonal covariance) / (variance), both about the overall mean, and
computed from per-sequence sums in O(L) (sum_{i != j} x_i x_j = (sum_i x_i)^2 - sum_i x_i^2), so no
L x L matrix is formed. Sums accumulate on the device (float64) across calls, so micro-batches
combine exactly and nothing syncs with the host until :meth:`TokenMoments.result`.
"""
from __future__ import annotations

import torch


class TokenMoments:
    """Accumulates sums of x over non-pad tokens; ``result()`` -> (mean, variance, correlation)."""

    # sums: n_tokens, sum_b n_b^2, sum x, sum x^2, sum_{b,f} A_bf^2, sum_b n_b sum_f A_bf
    def __init__(self, device=None):
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.d = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x = x.detach().float()
        b, s, d = x.shape
        self.d = d
        if mask is None:
            n = torch.full((b,), float(s), device=x.device)
            col = x.sum(1)                                      # A_bf, (b, d)
            sq = x.square().sum()
        else:
            m = mask.to(device=x.device, dtype=x.dtype)
            n = m.sum(1)
            col = torch.einsum("bs,bsd->bd", m, x)
            sq = torch.einsum("bs,bsd->", m, x.square())
        n, col = n.double(), col.double()
        self.sums += torch.stack([
            n.sum(), n.square().sum(), col.sum(), sq.double(), col.square().sum(),
            (n * col.sum(1)).sum()])

    def result(self) -> tuple[float, float, float]:
        n, n2, sx, sx2, sa2, sna = self.sums.tolist()
        d = self.d
        if n == 0:
            return float("nan"), float("nan"), float("nan")
        mu = sx / (n * d)
        centred_sq = sx2 - 2 * mu * sx + mu * mu * n * d              # sum (x - mu)^2
        var = centred_sq / (n * d)
        col_sq = sa2 - 2 * mu * sna + mu * mu * d * n2                # sum_{b,f} (A_bf - n_b mu)^2
        pairs = d * (n2 - n)                                          # sum_b n_b (n_b - 1) per feature
        if pairs <= 0 or var <= 0:
            return mu, var, float("nan")
        cov = (col_sq - centred_sq) / pairs
        return mu, var, cov / var


def token_moments(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(mean, variance, mean cross-token correlation) of ``x`` (batch, seq, d) over non-pad tokens."""
    acc = TokenMoments(x.device)
    acc.add(x, mask)
    return acc.result()
