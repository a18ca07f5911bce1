"""Whole-model signal propagation predicted from the component moments (THEORY.md sections 1-3).

:func:`predict` walks a BERT built from a :class:`dslm.model.BertConfig` layer by layer with the
formulas of :mod:`dslm.theory.components` and the init stds of :func:`dslm.theory.schemes.scheme_stds`
(the same numbers the model is initialised with), and returns per layer:

- ``forward_variance`` and ``correlation`` of the residual stream after the layer (for Post-LN, the
  sum after the second residual add, before the next LayerNorm), as the probe measures them;
- ``grad_variance`` / ``grad_correlation`` of d loss / d (layer output), relative to the top;
- ``grad_norms[name]`` (q, k, v, attn_out, ffn_in, ffn_out) and ``grad_norm`` (the six together),
  the L2 norms of the weight-matrix gradients, relative to the same top gradient.

Forward. A signal is (variance, cross-token covariance) with zero mean, plus how much its tokens'
norms fluctuate relative to a Gaussian's (``phi``): :func:`layernorm_corr`'s O(1/d) correction
assumes a Gaussian input, whose token norms fluctuate; a Post-LN stream is mostly the previous
LayerNorm's output, whose norms are fixed, and applying the full correction twice per layer would
lose ~N/d of the correlation that the measurement keeps, so the correction is scaled by phi.
Embeddings: ``config.embedding_tables`` tables (BERT: 3, the default; GPT: 2) of std s_e, summed
(variance tables s_e^2, correlation r0), then dropout. A
sub-layer is LayerNorm (:func:`layernorm`), the block, hidden dropout (:func:`dropout`) and the residual mix
x <- lam x + beta block with the config's (lam^2, beta^2) (:meth:`BertConfig.residual_variances`:
plain adds, DSLM scaling or DeepNorm's alpha), whose variances and covariances add (the block's
weights are independent of x). The attention block is :func:`attention_head` (per head: Q/K/V
d -> d_h, softmax over the L real tokens, attention dropout) followed by the output :func:`linear`;
the FFN is :func:`ffn_block` with the scheme's input and output stds (``ffn``, ``ffn_out``: GPT-2
scales the output matrix down); a tanh GeLU takes the erf GeLU's moments.

Decoders (``config.causal``): query t attends to keys 1..t. The heads' forward moments are
:func:`dslm.theory.causal.attention_head_masked` under the causal :class:`MaskSums` (exact row
softmax second moments, first order in the logits otherwise); for a batch of unequal ``lengths`` the
sums are pooled over its sequences (per-token sums weighted by n_b, per-pair sums by n_b (n_b - 1),
and L = 1 + pairs / tokens, so that a pair average is a per-token sum over L - 1). The walk still
tracks one variance and one correlation per stream: in a decoder early positions carry more variance
(token t's head output keeps (1 - r) S_t, S_1 = 1) and pairs of tokens correlate by their shared
prefix, so the predicted curves are averages over positions and pairs, as the probe measures them.

Backward. A gradient is (variance g2, cross-token covariance), pushed from the top of the stack down
with the backward moments of the same components: dropout, linear (fan-out times s_w^2), ReLU/GeLU
(gate correlation included), LayerNorm (divide by the input variance), and the residual mix
(lam^2 on the identity path plus the branch). Through attention the value path passes the
probability-weighted token sum (:func:`attention_head`'s backward, with the softmax second moment of
:func:`softmax` in place of its small-logit 1/L^2); the query/key path (which :func:`attention_head`
leaves out) adds, per feature of q and k,

    var(dq) = L E[P^2] g_y var(v) var(q) (1 - r)^2
    var(dk) = var(dq) + g_y r_g r (1 - r) var(v) var(q)

with E[P^2] = softmax var + 1/L^2 and r, r_g the correlations of the attention input and of the
gradient at the heads' output. The score gradient is dS_ij = P_ij G_i . (v_j - y_i); for dq_i it is
summed against the centred keys (1/L), but for dk_j the queries' common part survives and
sum_i P_ij G_i keeps the gradient's common part, so dk_j ~ (G_mean . (v_j - v_mean)) q_mean: of the
order of the value path itself where r and r_g are high (Post-LN), and uncorrelated across tokens
(it lowers the gradient correlation). Both are taken as uncorrelated across tokens.

Decoder backward: the value path is :func:`attention_head_masked`'s (query rows averaged where the
bidirectional path uses L: sum_t S_t / L for L E[P^2], (1/L) sum_{t != t'} |K_t & K_t'| / (t t') for
(L - 1)/L, exact for uniform attention given S_t); the query/key path to the input is
:func:`dslm.theory.causal.attention_qk_gradient` (approximate, first order in the logits, with the
Q path's cross-token covariance). For the weight norms it is split per feature as
var(dq) = g_y var(v) var(q) (1 - r) [(1 - r) seen / d + c seen2], c = (1 - r + r p_a)/(1 - p_a),
the Q path's row average (the modelled covariance is all the Q path's), and var(dk) the rest. Every
softmax row's logit gradient sums to 0, so a sequence's key gradients sum to 0 (exact): their mean
covariance is -var(dk) tokens / pairs, in the W_k norm and in the input gradient. The walk pools
the stream over positions; a decoder's gradient piles onto the first positions (every query sees
token 1), which the pooled variance misses: measured, the bottom layers' gradient variance comes out
20-30 % low on 8 layers (THEORY.md, "DSLM init for decoders").

Weight gradients. For y = x W summed over the T real tokens of the batch,
E ||dL/dW||^2 = d_in d_out [T E[x^2] g2 + P cov_x cov_g], with P = sum over sequences of
n (n - 1) token pairs: the second term (the input's and the gradient's cross-token covariances)
dominates wherever both are correlated, which is how xavier Pre-LN's 1/sqrt(layer) shape arises.

Scale. Forward variance and correlation are absolute predictions. Gradients are relative: the top
gradient (d loss / d stream below the final LayerNorm) is given variance 1 and correlation
``top_grad_corr`` (default 0: the masked-LM gradient lives on ~15 % of the tokens with unrelated
targets). Its absolute size depends on the loss (vocabulary, logits), which the component theory
does not model, so compare shapes: :func:`normalise` puts a predicted curve on a measured one with
the single constant that matches their geometric means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dslm.theory.causal import MaskSums, attention_head_masked, attention_qk_gradient, causal_mask_sums
from dslm.theory.components import (
    attention_head, dropout, ffn_block, gelu, layernorm, linear, relu, softmax,
)
from dslm.theory.profile import GRAD_MATRICES, SignalProfile
from dslm.theory.schemes import scheme_stds

@dataclass
class Prediction(SignalProfile):
    """Predicted per-layer moments (bottom first); gradient quantities are relative to the top gradient."""

    attention_input_correlation: np.ndarray = None   # r entering each layer's attention (after LN)
    seq_len: float = float("nan")                      # effective L (mean real tokens per sequence)


def _token_counts(seq_len, batch_size, lengths):
    """(T, P, L_eff, n): real tokens, ordered same-sequence token pairs, mean real length, and the
    real length of every sequence."""
    if lengths is None:
        if seq_len is None or seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len!r}")
        n = np.full(int(batch_size or 1), float(seq_len))
    else:
        n = np.asarray(lengths, dtype=float).reshape(-1)
        if n.size == 0 or (n < 1).any():
            raise ValueError("lengths must be positive token counts, one per sequence")
    tokens = float(n.sum())
    pairs = float((n * (n - 1)).sum())
    # the token-weighted mean of 1/n_b is exactly 1/mean(n_b): the 1/L terms use the mean length
    return tokens, pairs, tokens / n.size, n


def _pooled_causal_sums(lengths, logit_var, r) -> MaskSums:
    """The causal :class:`MaskSums` of a batch of sequences of the given real lengths: per-token
    sums weighted by tokens, per-pair sums by ordered pairs, L = 1 + pairs / tokens (module
    docstring). Equal lengths n give :func:`causal_mask_sums` at n."""
    n, count = np.unique(np.asarray(lengths, dtype=np.int64), return_counts=True)
    sums = causal_mask_sums(n, logit_var, r)
    tokens, pairs = count * n, count * n * (n - 1)
    per_token = ("sq", "seen", "seen2", "overlap_total", "shared_total")

    def pool(name):
        w = tokens if name in per_token else pairs
        if w.sum() == 0:
            return 0.0
        return float(np.sum(w * np.where(w > 0, getattr(sums, name), 0.0)) / w.sum())

    fields = {name: pool(name) for name in MaskSums._fields if name != "L"}
    return MaskSums(L=1.0 + pairs.sum() / tokens.sum(), **fields)


class _Signal:
    """Forward moments (zero mean): variance, mean cross-token covariance, and ``phi``, the variance
    of a token's mean square over d features relative to a Gaussian vector's (1 for block outputs,
    0 right after a LayerNorm, which fixes every token's norm)."""

    __slots__ = ("var", "cov", "phi")

    def __init__(self, var, cov, phi=1.0):
        self.var, self.cov, self.phi = float(var), float(cov), float(phi)

    @property
    def corr(self):
        return self.cov / self.var


def _mix(x: _Signal, blk: _Signal, lam2, beta2) -> _Signal:
    """x <- lam x + beta blk for independent x and blk. The token mean square of the sum has
    variance (2/d)(phi_x A^2 + phi_b B^2 + 2 A B) with A = lam^2 var_x, B = beta^2 var_b."""
    a, b = lam2 * x.var, beta2 * blk.var
    phi = (x.phi * a * a + blk.phi * b * b + 2 * a * b) / (a + b) ** 2
    return _Signal(a + b, lam2 * x.cov + beta2 * blk.cov, phi)


def predict(config, seq_len=None, batch_size=None, r0=None, lengths=None,
            top_grad_corr: float = 0.0, ln_corr_mode: str = "delta",
            softmax_variant: str = "approx") -> Prediction:
    """Predict per-layer forward variance, correlation and relative gradient norms of a freshly
    initialised BERT of ``config`` in training mode (dropout on); a decoder (causal attention) when
    ``config.causal`` is true, with ``config.embedding_tables`` summed embedding tables (default 3).

    ``seq_len``/``batch_size``: an unpadded batch shape; or ``lengths``: the real-token count of each
    sequence of the batch (the attention sees only real keys). ``r0``: cross-token correlation of
    the summed input embeddings before dropout (default ``config.r0``; measure it with
    :func:`dslm.probe.measure_r0` for the actual model and batch). ``top_grad_corr``: correlation
    of the gradient arriving at the top of the stack. ``ln_corr_mode`` / ``softmax_variant``: the
    component variants (see :func:`layernorm_corr`, :func:`softmax_var`); a decoder's softmax rows are
    exact (:func:`dslm.theory.causal.causal_mask_sums`) and ignore ``softmax_variant``.
    """
    walk = _Walk(config, _token_counts(seq_len, batch_size, lengths), ln_corr_mode, softmax_variant)
    emb, saved = walk.forward(float(config.r0 if r0 is None else r0))
    g_var, g_corr, norms = walk.backward(saved, float(top_grad_corr))
    return Prediction(
        forward_variance=np.array([rec["out"].var for rec in saved]),
        correlation=np.array([rec["out"].corr for rec in saved]),
        grad_norm=np.sqrt(sum(v ** 2 for v in norms.values())), grad_norms=norms,
        grad_variance=g_var, grad_correlation=g_corr,
        embedding_variance=emb.var, embedding_correlation=emb.corr,
        attention_input_correlation=np.array([rec["a"].corr for rec in saved]), seq_len=walk.L,
    )


class _Walk:
    """One model's layer-by-layer walk: the forward pass saves each layer's signals, the backward
    pass pushes the relative gradient down through them (see the module docstring)."""

    def __init__(self, config, counts, ln_corr_mode: str, softmax_variant: str):
        self.tokens, self.pairs, self.L, self.lengths = counts
        self.causal = bool(getattr(config, "causal", False))
        self.tables = int(getattr(config, "embedding_tables", 3))
        self._sums_cache = {}
        self.d, self.d_f = config.hidden_size, config.ffn_size
        self.d_h, self.N = config.head_dim, config.num_layers
        self.p, self.pa = float(config.hidden_dropout), float(config.attention_dropout)
        # tanh GeLU takes the erf GeLU's moments: the two differ by at most 5e-4 pointwise
        self.act = "gelu" if config.activation == "gelu_tanh" else config.activation
        self.pre = config.ln == "pre"
        self.lam2, self.beta2 = config.residual_variances()
        self.stds = scheme_stds(config)
        self.s_qk, self.s_f, self.s_f_out = self.stds["qk"], self.stds["ffn"], self.stds["ffn_out"]
        self.ln_corr_mode, self.softmax_variant = ln_corr_mode, softmax_variant

    # ------------------------------------------------------------------ forward
    def forward(self, r0: float) -> tuple[_Signal, list[dict]]:
        """The embedding signal and, per layer, its input ``x``, attention input ``a``, head output
        ``y``, mid-layer stream ``h``, FFN input ``b`` and output stream ``out``."""
        m = dropout(0.0, self.tables * self.stds["embedding"] ** 2, r0, self.p)
        emb = x = _Signal(m.var, m.cov)
        saved = []
        for i in range(self.N):
            rec = self._layer_forward(x, i)
            saved.append(rec)
            x = rec["out"]
        return emb, saved

    def _layer_forward(self, x: _Signal, i: int) -> dict:
        a = self._ln(x)
        att, y = self._attention_forward(a, i)
        h = _mix(x if self.pre else a, att, self.lam2, self.beta2)
        b = self._ln(h)
        out = _mix(h if self.pre else b, self._ffn_forward(b), self.lam2, self.beta2)
        return {"x": x, "a": a, "y": y, "h": h, "b": b, "out": out}

    def _ln(self, x: _Signal) -> _Signal:
        m = layernorm(x.var, x.corr, self.d, corr_mode=self.ln_corr_mode)
        if self.ln_corr_mode == "delta":
            # the O(1/d) loss comes from dividing by each token's random norm: scale it by how much
            # the input's token norms fluctuate (a Gaussian: phi 1; a LayerNorm output: phi 0)
            return _Signal(m.var, x.corr + x.phi * (m.cov - x.corr), 0.0)
        return _Signal(m.var, m.cov, 0.0)

    def _attention_forward(self, a: _Signal, i: int) -> tuple[_Signal, _Signal]:
        """(the block output after hidden dropout, the heads' concatenated output)."""
        s_v, s_o = self.stds["v"][i], self.stds["attn_out"][i]
        head = self._head(a, s_v)
        out = linear(0.0, head.var, head.cov / head.var, self.d, self.d, s_o ** 2)
        m = dropout(0.0, out.var, out.cov / out.var, self.p)
        return _Signal(m.var, m.cov), _Signal(head.var, head.cov)

    def _mask_sums(self, a: _Signal) -> MaskSums:
        """The batch's causal :class:`MaskSums` at the attention input ``a`` (logit variance
        d^2 s_qk^4 var^2), computed once per input (the softmax rows need a quadrature)."""
        key = (a.var, a.corr)
        if key not in self._sums_cache:
            logit_var = self.d ** 2 * self.s_qk ** 4 * a.var ** 2
            self._sums_cache[key] = _pooled_causal_sums(self.lengths, logit_var, a.corr)
        return self._sums_cache[key]

    def _head(self, a: _Signal, s_v, g2=1.0, r_g=0.0):
        """One head's moments at input ``a``: bidirectional over the L real tokens, or causal."""
        if not self.causal:
            return attention_head(a.var, a.corr, self.d, self.d_h, self.L, self.s_qk, self.s_qk, s_v,
                                  self.pa, g2, r_g)
        return attention_head_masked(a.var, a.corr, self.d, self.d_h, self._mask_sums(a), self.s_qk,
                                     self.s_qk, s_v, self.pa, g2, r_g, qk_paths=False)

    def _ffn_forward(self, b: _Signal) -> _Signal:
        blk = ffn_block(b.var, b.corr, self.d, self.d_f, self.s_f, self.s_f_out, activation=self.act)
        m = dropout(0.0, blk.var, blk.cov / blk.var, self.p)
        return _Signal(m.var, m.cov)

    # ------------------------------------------------------------------ backward
    def backward(self, saved: list[dict], top_grad_corr: float):
        """Per layer (bottom first): gradient variance and correlation at the layer's output, and the
        six weight-gradient norms, all relative to a unit-variance gradient at the top."""
        norms = {name: np.empty(self.N) for name in GRAD_MATRICES}
        g_var, g_corr = np.empty(self.N), np.empty(self.N)
        g, gc = 1.0, top_grad_corr
        for i in reversed(range(self.N)):
            g_var[i], g_corr[i] = g, gc / g
            g, gc, n2 = self._layer_backward(saved[i], i, g, gc)
            for name, value in zip(GRAD_MATRICES, n2):
                norms[name][i] = math.sqrt(max(value, 0.0))
        return g_var, g_corr, norms

    def _layer_backward(self, rec: dict, i: int, g, gc):
        """The gradient (var, cov) at the layer's input from that at its output, and the squared
        norms of q, k, v, attn_out, ffn_in, ffn_out."""
        lam2, d = self.lam2, self.d
        a, y, h, b, xin = rec["a"], rec["y"], rec["h"], rec["b"], rec["x"]
        fb, fbc, nf_in, nf_out = self._ffn_backward(b, g, gc)
        if self.pre:
            lnb = layernorm(h.var, h.corr, d, fb, fbc / fb)
            g, gc = lam2 * g + lnb.grad_var, lam2 * gc + lnb.grad_cov          # at h
            ab, abc, n_q, n_k, n_v, n_o = self._attention_backward(a, y, i, g, gc)
            lnb = layernorm(xin.var, xin.corr, d, ab, abc / ab)
            g, gc = lam2 * g + lnb.grad_var, lam2 * gc + lnb.grad_cov          # at x
        else:
            g, gc = lam2 * g + fb, lam2 * gc + fbc                              # at b
            lnb = layernorm(h.var, h.corr, d, g, gc / g)
            g, gc = lnb.grad_var, lnb.grad_cov                                  # at h
            ab, abc, n_q, n_k, n_v, n_o = self._attention_backward(a, y, i, g, gc)
            g, gc = lam2 * g + ab, lam2 * gc + abc                              # at a
            lnb = layernorm(xin.var, xin.corr, d, g, gc / g)
            g, gc = lnb.grad_var, lnb.grad_cov                                  # at x
        return g, gc, (n_q, n_k, n_v, n_o, nf_in, nf_out)

    def _wnorm2(self, d_in, d_out, x2, xc, gv, gcv):
        """E ||dL/dW||^2 for y = x W over the batch's tokens (module docstring)."""
        return d_in * d_out * (self.tokens * x2 * gv + self.pairs * xc * gcv)

    def _activation_moments(self, b: _Signal):
        """(E[act^2], cross-token E[act act'], the activation's backward gains) at the FFN."""
        h2 = self.d * self.s_f ** 2 * b.var                  # pre-activation variance
        if self.act == "relu":
            x2 = h2 / 2
            xc = x2 * float(ffn_block(b.var, b.corr, self.d, self.d_f, self.s_f, self.s_f).corr)
            return x2, xc, relu(h2, b.corr, 1.0, 1.0)
        gm = gelu(h2, b.corr)
        return gm.var + gm.mean ** 2, gm.cov + gm.mean ** 2, gelu(h2, b.corr, 1.0, 1.0)

    def _ffn_backward(self, b: _Signal, g_out, gc_out):
        """Gradient (var, cov) at the FFN input from the block-output gradient (after the residual
        scale and dropout), and the squared FFN weight-gradient norms (in, out)."""
        d, d_f, s_f = self.d, self.d_f, self.s_f
        dm = dropout(0.0, 1.0, 0.0, self.p, self.beta2 * g_out, gc_out / g_out if g_out else 0.0)
        g_f, gc_f = dm.grad_var, self.beta2 * gc_out
        x2, xc, am = self._activation_moments(b)
        nf_out = self._wnorm2(d_f, d, x2, xc, g_f, gc_f)
        lo = linear(0.0, 1.0, 0.0, d_f, d, self.s_f_out ** 2, g_f, gc_f / g_f)
        g_u, gc_u = lo.grad_var * am.grad_var, lo.grad_cov * am.grad_cov   # gate gains
        nf_in = self._wnorm2(d, d_f, b.var, b.cov, g_u, gc_u)
        li = linear(0.0, 1.0, 0.0, d, d_f, s_f ** 2, g_u, gc_u / g_u)
        return li.grad_var, li.grad_cov, nf_in, nf_out

    def _attention_backward(self, a: _Signal, y: _Signal, i: int, g_out, gc_out):
        """Gradient (var, cov) at the attention input, and the squared Q/K/V/out weight-gradient norms."""
        d, s_qk = self.d, self.s_qk
        s_v, s_o = self.stds["v"][i], self.stds["attn_out"][i]
        g_o, gc_o = self.beta2 * g_out / (1 - self.p), self.beta2 * gc_out  # hidden dropout
        n_out = self._wnorm2(d, d, y.var, y.cov, g_o, gc_o)
        lo = linear(0.0, 1.0, 0.0, d, d, s_o ** 2, g_o, gc_o / g_o)        # through W_o^T
        g_y, r_gy = lo.grad_var, lo.grad_cov / lo.grad_var
        paths = self._causal_paths if self.causal else self._bidirectional_paths
        g_v, gc_v, g_q, gc_q, g_k, gc_k = paths(a, s_v, g_y, r_gy)
        n_v = self._wnorm2(d, d, a.var, a.cov, g_v, gc_v)
        n_q = self._wnorm2(d, d, a.var, a.cov, g_q, gc_q)
        n_k = self._wnorm2(d, d, a.var, a.cov, g_k, gc_k)
        gx = d * s_v ** 2 * g_v + d * s_qk ** 2 * (g_q + g_k)               # W_v^T, W_q^T, W_k^T
        gcx = d * s_v ** 2 * gc_v + d * s_qk ** 2 * (gc_q + gc_k)
        return gx, gcx, n_q, n_k, n_v, n_out

    def _bidirectional_paths(self, a: _Signal, s_v, g_y, r_gy):
        """Per feature of v, q and k: gradient (var, cov) of v, of q and of k, from
        the heads' output gradient (g_y, r_gy); bidirectional attention (module docstring)."""
        d, L, pa, s_qk = self.d, self.L, self.pa, self.s_qk
        # softmax second moment: logits q k^T / sqrt(d_h) have variance d^2 s_q^2 s_k^2 s2^2
        sm = softmax(d * d * s_qk ** 4 * a.var ** 2, a.corr, L, variant=self.softmax_variant)
        p2_sum = L * (sm.var + sm.mean ** 2)           # sum_i E[P_ij^2] over the L queries
        # value path: dL/dV_j = sum_i P~_ij G_i (attention_head's backward without W_v^T, with
        # the softmax second moment in place of 1/L^2)
        unit = attention_head(a.var, a.corr, d, self.d_h, L, s_qk, s_qk, 1.0 / math.sqrt(self.d_h), pa,
                              g_y, r_gy)
        g_v = g_y * (p2_sum / (1 - pa) + (L - 1) / L * r_gy)
        # query/key path (not in attention_head), see the module docstring
        v_var = d * s_v ** 2 * a.var
        k_var = d * s_qk ** 2 * a.var                   # = var(q): s_q = s_k
        r, one_r = a.corr, max(1.0 - a.corr, 0.0)
        g_q = p2_sum * g_y * v_var * k_var * one_r ** 2
        g_k = g_q + g_y * max(r_gy, 0.0) * r * one_r * v_var * k_var
        return g_v, unit.grad_cov, g_q, 0.0, g_k, 0.0

    def _causal_paths(self, a: _Signal, s_v, g_y, r_gy):
        """As :meth:`_bidirectional_paths` for causal attention: the value path of
        :func:`attention_head_masked`, the Q/K paths of :func:`attention_qk_gradient` split into
        q and k per feature (module docstring)."""
        d, d_h, pa, s_qk = self.d, self.d_h, self.pa, self.s_qk
        sums = self._mask_sums(a)
        unit = self._head(a, 1.0 / math.sqrt(d_h), g_y, r_gy)
        qk_var, qk_cov = attention_qk_gradient(a.var, a.corr, d, d_h, sums, s_qk, s_qk, s_v, pa, g_y, r_gy)
        v_var, k_var = d * s_v ** 2 * a.var, d * s_qk ** 2 * a.var
        one_r, c = 1.0 - a.corr, (1.0 - a.corr + a.corr * pa) / (1.0 - pa)
        g_q = g_y * v_var * k_var * one_r * (one_r * sums.seen / d + c * sums.seen2)
        per_feature = d_h * s_qk ** 2                    # input gradient of one head's W_q^T per unit
        g_k = float(qk_var) / per_feature - float(g_q)
        # every softmax row's logit gradient sums to 0, so the key gradients of a sequence sum to 0
        # (exact): their mean covariance over the batch's pairs is -g_k tokens / pairs
        gc_k = -g_k * self.tokens / self.pairs if self.pairs else 0.0
        return (float(unit.grad_var), float(unit.grad_cov), float(g_q), float(qk_cov) / per_feature,
                g_k, gc_k)


# ---------------------------------------------------------------------------------------------
# Comparing a prediction with a measurement


def normalise(predicted, measured) -> np.ndarray:
    """``predicted`` times the one constant that makes its geometric mean equal ``measured``'s:
    the gradient's absolute scale (set by the loss) is outside the component theory."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    ok = (p > 0) & (m > 0) & np.isfinite(p) & np.isfinite(m)
    if not ok.any():
        return p.copy()
    return p * math.exp(float(np.mean(np.log(m[ok]) - np.log(p[ok]))))


def agreement(predicted, measured, log: bool = False) -> dict:
    """R^2 of the prediction as a model of the measurement, 1 - SS_res / SS_tot about the
    measurement's mean (of log values with ``log``), and the largest relative error
    max |p - m| / |m|. A flat measured curve (max/min < 1.2) makes R^2 uninformative (its
    variance is mostly sampling noise): ``flat`` says so."""
    p, m = np.asarray(predicted, float), np.asarray(measured, float)
    rel = float(np.max(np.abs(p - m) / np.abs(m)))
    pp, mm = (np.log(p), np.log(m)) if log else (p, m)
    ss_tot = float(np.sum((mm - mm.mean()) ** 2))
    r2 = 1.0 - float(np.sum((mm - pp) ** 2)) / ss_tot if ss_tot > 0 else float("nan")
    ratio = float(np.max(np.abs(m)) / np.min(np.abs(m))) if np.min(np.abs(m)) > 0 else float("inf")
    return {"r2": r2, "max_rel_error": rel, "log": bool(log), "flat": bool(ratio < 1.2)}
