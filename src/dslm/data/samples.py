"""BERT pretraining samples from the token store (THEORY.md section 4), built with numpy.

Chunks. Each document of the split is cut greedily into chunks of consecutive sentences: sentences
are added until the chunk reaches its target length, which is ``L - 3`` (room for [CLS] and two
[SEP]) or, with probability ``short_seq_prob``, a uniform length in [2, L - 3]. A chunk needs two
sentences (one per segment); documents with fewer, and a single sentence left at a document's end,
are dropped. The chunking is drawn once per (seed, split) and is vectorised over documents.

Samples. Sample ``i`` reads chunk ``perm_e[i mod N]`` (a fresh permutation per epoch
``e = i div N``) and draws everything else from a Philox generator keyed by (seed, i), so it is the
same in any process, batch or worker count and differs between epochs:

* segment A is the chunk's first ``k`` sentences (``k`` uniform in 1..n-1), B the rest; with
  probability 0.5 they are swapped (``binary_labels`` = 1);
* the pair is truncated to ``L - 3`` tokens by removing tokens one at a time from the longer segment
  (ties: the second), each from its front or back with probability 1/2 (the net effect is computed
  in closed form: a binomial number from the front);
* ``[CLS] A [SEP] B [SEP]`` then [PAD]; token types 0 up to the first [SEP], 1 after;
* masking: ``round(mask_prob * n)`` of the n text tokens are predicted (at most
  ``round(mask_prob * L)``), chosen as whole-word n-grams: every word starts a candidate span of
  ``n <= max_ngram`` words of its segment with P(n) proportional to 1/n (renormalised where fewer words
  remain); candidates are visited in a random order, dropping any that overlaps one already taken
  (as drawn), and each is cut to the words that still fit the budget, or skipped if none does. (The
  Megatron loop checks overlaps after the cut; the two differ only at the budget's edge.)
  A predicted token becomes [MASK] with probability 0.8, a uniformly random non-special token with
  0.1, and stays with 0.1; ``mlm_labels`` holds the original id there and -100 elsewhere.

The sequential "take spans in random order unless they overlap" is computed for a whole batch at
once: it equals the greedy maximal independent set of the overlap graph by priority, which rounds of
"accept every span whose priority beats all its undecided neighbours, reject their neighbours"
reach exactly (spans of at most ``max_ngram`` words only overlap spans starting fewer than
``max_ngram`` words away, so each round is a few shifted comparisons).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from dslm.data.vocab import SpecialIds
from dslm.errors import UsageError

MASK_TOKEN_PROB, RANDOM_TOKEN_PROB = 0.8, 0.1
_DRAWS_PER_TOKEN = 3  # per position: span priority, n-gram size, 80/10/10 action


@dataclass(frozen=True)
class SampleConfig:
    """Shape and randomness of the samples."""
    seq_len: int = 512
    short_seq_prob: float = 0.1
    mask_prob: float = 0.15
    max_ngram: int = 3

    @property
    def max_tokens(self) -> int:
        """Text tokens of a sample: L minus [CLS] and two [SEP]."""
        return self.seq_len - 3

    @property
    def max_predictions(self) -> int:
        return int(np.floor(self.mask_prob * self.seq_len + 0.5))


EPOCH_ORDER_STREAM = 0x70726D   # domain tag of the per-epoch sample orders (see dataset.CHUNKING_STREAM)


def build_chunks(doc_index: np.ndarray, sent_offsets: np.ndarray, docs: np.ndarray, max_tokens: int,
                 short_seq_prob: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cut documents ``docs`` into chunks of consecutive sentences; returns (first sentence, end
    sentence exclusive) per chunk, sorted. One round per chunk position, vectorised over documents:
    each round finds, for every unfinished document at once, the first sentence boundary at which the
    chunk reaches its target length (a binary search in the token offsets)."""
    start = np.asarray(doc_index[docs], dtype=np.int64)
    end = np.asarray(doc_index[docs + 1], dtype=np.int64)
    live = end - start >= 2
    start, end = start[live], end[live]
    firsts, ends = [], []
    while start.size:
        target = np.full(start.size, max_tokens, dtype=np.int64)
        short = rng.random(start.size) < short_seq_prob
        target[short] = rng.integers(2, max_tokens + 1, int(short.sum()))
        stop = np.searchsorted(sent_offsets, sent_offsets[start] + target, side="left")
        stop = np.minimum(np.maximum(stop, start + 2), end)
        firsts.append(start)
        ends.append(stop)
        live = end - stop >= 2
        start, end = stop[live], end[live]
    firsts = np.concatenate(firsts) if firsts else np.zeros(0, np.int64)
    ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
    order = np.argsort(firsts, kind="stable")
    return firsts[order], ends[order]


def draw_ngram_sizes(u: np.ndarray, words_left: np.ndarray, max_ngram: int) -> np.ndarray:
    """n in 1..min(max_ngram, words_left) with P(n) proportional to 1/n, by inversion of uniform ``u``."""
    cum = np.cumsum(1.0 / np.arange(1, max_ngram + 1))
    limit = np.clip(words_left, 1, max_ngram)
    scaled = u * cum[limit - 1]
    n = 1 + sum((scaled >= cum[k]).astype(np.int64) for k in range(max_ngram - 1))
    return np.minimum(n, limit)


def _from_left(x: np.ndarray, d: int, fill) -> np.ndarray:
    """y[:, i] = x[:, i - d] (``fill`` where i < d)."""
    y = np.full_like(x, fill)
    y[:, d:] = x[:, :-d]
    return y


def _from_right(x: np.ndarray, d: int, fill) -> np.ndarray:
    """y[:, i] = x[:, i + d] (``fill`` past the end)."""
    y = np.full_like(x, fill)
    y[:, :-d] = x[:, d:]
    return y


def choose_spans(valid: np.ndarray, priority: np.ndarray, n: np.ndarray, word_len: np.ndarray,
                 budget: np.ndarray) -> np.ndarray:
    """Which candidate spans are masked, for rows of words: the span starting at word i covers
    ``n[:, i]`` words; spans are taken by decreasing ``priority`` (uniform in [0, 1)), skipping any that
    overlaps one taken; a span that would overflow the ``budget`` of tokens (``word_len`` per word) is
    cut to the words that fit, or skipped if none does. Returns the taken size per start word (0 = not
    taken).

    Only the highest priorities matter, and the greedy decisions about them do not depend on lower
    ones: so the spans are first solved among the top ``4 * budget / tokens`` fraction of priorities,
    and only rows whose budget that leaves unfilled are solved again with every span."""
    tokens = np.maximum(word_len.sum(axis=1), 1)
    floor = 1.0 - np.minimum(1.0, 4.0 * budget / tokens)
    size, room = _greedy_spans(valid & (priority >= floor[:, None]), priority, n, word_len, budget)
    again = np.nonzero((room > 0) & (floor > 0))[0]
    if again.size:
        size[again] = _greedy_spans(valid[again], priority[again], n[again], word_len[again], budget[again])[0]
    return size


def _greedy_spans(valid, priority, n, word_len, budget) -> tuple[np.ndarray, np.ndarray]:
    """``choose_spans`` among the spans marked ``valid``; also returns the budget left per row."""
    max_n = int(n.max(initial=1))
    reaches = [valid & (n > d) for d in range(1, max_n)]  # reaches[d-1][i]: span i overlaps span i+d
    undecided, taken = valid.copy(), np.zeros_like(valid)
    while undecided.any():
        rival = np.full(priority.shape, -1.0)
        open_priority = np.where(undecided, priority, -1.0)
        for d, reach in enumerate(reaches, 1):
            rival = np.maximum(rival, np.where(reach, _from_right(open_priority, d, -1.0), -1.0))
            rival = np.maximum(rival, _from_left(np.where(reach, open_priority, -1.0), d, -1.0))
        won = undecided & (priority > rival)
        lost = np.zeros_like(won)
        for d, reach in enumerate(reaches, 1):
            lost |= reach & _from_right(won, d, False)
            lost |= _from_left(won & reach, d, False)
        taken |= won
        undecided &= ~won & ~lost
    # budget: the taken spans by decreasing priority; a prefix of them fits whole (one cumsum)...
    B, W = valid.shape
    prefix = np.zeros((B, W + max_n), np.int64)
    prefix[:, 1:W + 1] = np.cumsum(word_len, axis=1)
    prefix[:, W + 1:] = prefix[:, W:W + 1]
    row = np.arange(B)[:, None]
    whole = prefix[row, np.arange(W)[None, :] + n] - prefix[:, :W]  # tokens of each span
    order = np.argsort(np.where(taken, -priority, np.inf), axis=1, kind="stable")
    n_sorted, taken_sorted = n[row, order], taken[row, order]
    used = np.cumsum(np.where(taken_sorted, whole[row, order], 0), axis=1)
    size_sorted = np.where(taken_sorted & (used <= budget[:, None]), n_sorted, 0)
    n_fit = (size_sorted > 0).sum(axis=1)
    room = budget - np.where(n_fit > 0, used[np.arange(B), np.maximum(n_fit - 1, 0)], 0)
    # ...then, as in the sequential loop, each later span is cut to the words that fit, or skipped
    first_word = word_len[row, order]
    position = np.arange(W)[None, :]
    start = n_fit
    while True:
        fits = taken_sorted & (position >= start[:, None]) & (first_word <= room[:, None])
        rows = np.nonzero(fits.any(axis=1))[0]
        if rows.size == 0:
            break
        j = fits[rows].argmax(axis=1)
        i = order[rows, j]
        m = np.ones_like(j)  # the first word fits; add words while they do
        for extra in range(2, max_n + 1):
            m = np.where((extra <= n[rows, i]) & (prefix[rows, i + extra] - prefix[rows, i] <= room[rows]), extra, m)
        size_sorted[rows, j] = m
        room[rows] -= prefix[rows, i + m] - prefix[rows, i]
        start[rows] = j + 1
    size = np.zeros_like(n)
    size[row, order] = size_sorted
    return size, room


class SampleBuilder:
    """Builds batches of samples (numpy arrays) from chunks of a token store; see the module doc."""

    def __init__(self, tokens: np.ndarray, sent_offsets: np.ndarray, chunk_first: np.ndarray,
                 chunk_end: np.ndarray, vocab: list[str], config: SampleConfig, seed: int, shuffle: bool = True):
        if not 0 <= seed < 1 << 63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.tokens, self.sent_offsets = tokens, sent_offsets
        self.chunk_first, self.chunk_end = chunk_first, chunk_end
        self.config, self.seed, self.shuffle = config, seed, shuffle
        self.special = SpecialIds.of(vocab)
        self.continuation = np.array([t.startswith("##") for t in vocab])
        bracketed = re.compile(r"^\[.*\]$")
        self.replacements = np.array([i for i, t in enumerate(vocab) if not bracketed.match(t)], dtype=np.int64)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.chunk_first)

    def chunks_of(self, indices: np.ndarray) -> np.ndarray:
        """The chunk each sample index reads (epoch-wise permutations when shuffling)."""
        n = len(self)
        if not self.shuffle:
            return indices % n
        chunks = np.empty_like(indices)
        for epoch in np.unique(indices // n):
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (int(epoch), np.random.default_rng([self.seed, EPOCH_ORDER_STREAM, int(epoch)]).permutation(n))
            here = indices // n == epoch
            chunks[here] = self._perm[1][indices[here] % n]
        return chunks

    def build(self, indices) -> dict[str, np.ndarray]:
        """Samples ``indices`` as a batch: input_ids, token_type_ids, attention_mask, mlm_labels
        ([B, L] int64) and binary_labels ([B] int64)."""
        cfg = self.config
        L, M = cfg.seq_len, cfg.max_tokens
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and indices.min() < 0:
            raise IndexError(f"negative sample index {int(indices.min())}")
        chunks = self.chunks_of(indices)
        first, end = self.chunk_first[chunks], self.chunk_end[chunks]
        rngs = [np.random.Generator(np.random.Philox(key=(self.seed << 64) | int(i))) for i in indices]
        cut = np.array([rng.integers(1, n) for rng, n in zip(rngs, (end - first).tolist())], dtype=np.int64) + first
        swap = np.array([rng.random() < 0.5 for rng in rngs], dtype=bool)
        draws = np.stack([rng.random((_DRAWS_PER_TOKEN, L)) for rng in rngs])
        off = self.sent_offsets
        a0, a1, b1 = off[first], off[cut], off[end]
        s1_start, s1_len = np.where(swap, a1, a0), np.where(swap, b1 - a1, a1 - a0)
        s2_start, s2_len = np.where(swap, a0, a1), np.where(swap, a1 - a0, b1 - a1)
        cut1, cut2 = _truncation(s1_len, s2_len, M)
        front1 = np.array([rng.binomial(c, 0.5) for rng, c in zip(rngs, cut1.tolist())], dtype=np.int64)
        front2 = np.array([rng.binomial(c, 0.5) for rng, c in zip(rngs, cut2.tolist())], dtype=np.int64)
        s1_start, s1_len = s1_start + front1, s1_len - cut1
        s2_start, s2_len = s2_start + front2, s2_len - cut2

        pos = np.arange(L)[None, :]
        l1, l2 = s1_len[:, None], s2_len[:, None]
        in1 = (pos >= 1) & (pos <= l1)
        in2 = (pos >= l1 + 2) & (pos < l1 + 2 + l2)
        source = np.where(in1, s1_start[:, None] + pos - 1, np.where(in2, s2_start[:, None] + pos - l1 - 2, 0))
        text = np.asarray(self.tokens[source], dtype=np.int64)
        if text.max(initial=0) >= len(self.continuation):   # the store changed after it was verified
            raise UsageError(f"token id {int(text.max())} outside the {len(self.continuation)}-token vocabulary: "
                             "tokens.bin changed after it was verified; re-run 'dslm prepare-data --force'")
        sep = (pos == l1 + 1) | (pos == l1 + l2 + 2)
        sp = self.special
        ids = np.where(in1 | in2, text, np.where(pos == 0, sp.cls, np.where(sep, sp.sep, sp.pad)))
        token_type = ((pos >= l1 + 2) & (pos <= l1 + l2 + 2)).astype(np.int64)
        attention = (pos <= l1 + l2 + 2).astype(np.int64)
        text_mask = in1 | in2
        budget = np.minimum(cfg.max_predictions,
                            np.maximum(1, np.floor((s1_len + s2_len) * cfg.mask_prob + 0.5).astype(np.int64)))
        segment_start = (pos == 1) | (pos == l1 + 2)
        predicted = self._predicted(ids, text_mask, segment_start, token_type, draws, budget)
        action = draws[:, 2]
        # given action in [0.8, 0.9), its place in that interval is uniform: it picks the random token
        pick = ((action - MASK_TOKEN_PROB) / RANDOM_TOKEN_PROB * len(self.replacements)).astype(np.int64)
        random_token = self.replacements[np.clip(pick, 0, len(self.replacements) - 1)]
        masked = np.where(predicted & (action < MASK_TOKEN_PROB), sp.mask,
                          np.where(predicted & (action < MASK_TOKEN_PROB + RANDOM_TOKEN_PROB), random_token, ids))
        return {"input_ids": masked, "token_type_ids": token_type, "attention_mask": attention,
                "mlm_labels": np.where(predicted, ids, -100), "binary_labels": swap.astype(np.int64)}

    def _predicted(self, ids, text_mask, segment_start, token_type, draws, budget) -> np.ndarray:
        """Which positions are predicted: whole-word n-gram spans (see ``choose_spans``)."""
        B = ids.shape[0]
        word_start = text_mask & (~self.continuation[ids] | segment_start)
        word_of = np.cumsum(word_start, axis=1) - 1
        n_words = word_start.sum(axis=1)
        W = max(int(n_words.max(initial=0)), 1)
        r, c = np.nonzero(word_start)
        word_pos = np.zeros((B, W), dtype=np.int64)
        word_pos[r, word_of[r, c]] = c
        r, c = np.nonzero(text_mask)
        word_len = np.bincount(r * W + word_of[r, c], minlength=B * W).reshape(B, W)
        w = np.arange(W)[None, :]
        valid = w < n_words[:, None]
        words_first = (word_start & (token_type == 0)).sum(axis=1)[:, None]
        words_left = np.where(w < words_first, words_first - w, n_words[:, None] - w)
        priority = np.take_along_axis(draws[:, 0], word_pos, axis=1)
        n = np.where(valid, draw_ngram_sizes(np.take_along_axis(draws[:, 1], word_pos, axis=1), words_left,
                                             self.config.max_ngram), 1)
        size = choose_spans(valid, priority, n, word_len, budget)
        covered = size > 0
        for d in range(1, self.config.max_ngram):
            covered |= _from_left(size > d, d, False)
        return text_mask & np.take_along_axis(covered, np.maximum(word_of, 0), axis=1)


def _truncation(len1: np.ndarray, len2: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens removed from each segment when removing one at a time from the longer one (the second
    on ties) until the pair fits: first the gap between them, then alternately, second first."""
    excess = np.maximum(len1 + len2 - max_tokens, 0)
    gap = len1 - len2
    even1 = np.where(gap > 0, np.minimum(gap, excess), 0)
    even2 = np.where(gap <= 0, np.minimum(-gap, excess), 0)
    rest = excess - even1 - even2
    return even1 + rest // 2, even2 + rest - rest // 2
