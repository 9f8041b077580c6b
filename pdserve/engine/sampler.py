"""Turns a batch of logits into one token per row: penalties, filtering, seeded sampling, logprobs.

Reproducibility contract: a row's token depends only on its logits, its params and
(seed, choice_index, position) -- never on the other rows, their order, or the engine's history.
So there is no shared RNG: each row draws one uniform from a hash of those three integers and
picks its token by inverse CDF over the filtered distribution, walking token ids in order.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pdserve.engine.sampling_params import SamplingParams

_CDF_BLOCK = 256
"""Tokens per block in the two-level inverse CDF (block masses first, then one block's tokens)."""
_CANDIDATES = (64, 1024, 8192)
"""Candidate counts tried for top_k/top_p before sorting the whole row; real nuclei are small."""


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one row of the logits batch."""

    params: SamplingParams
    """The request's sampling parameters."""
    seed: int
    """Resolved seed: the request's seed, or one drawn at admission when it had none."""
    choice_index: int
    """Which of the request's n choices this row is."""
    position: int
    """Index of the token being sampled within this choice's output (0 = first output token)."""
    prompt_token_ids: Sequence[int]
    """The prompt; only read when repetition_penalty != 1."""
    output_token_ids: Sequence[int]
    """Tokens this choice generated so far."""
    blocked_token_ids: tuple[int, ...] = ()
    """Ids that must not be sampled now (EOS + stop ids while the output is below min_tokens)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocked_token_ids", tuple(self.blocked_token_ids))
        if self.choice_index < 0 or self.position < 0:
            raise ValueError(
                f"choice_index and position must be >= 0, got {self.choice_index}, {self.position}"
            )


@dataclass(frozen=True)
class SampledToken:
    """The token chosen for one row, with its logprobs when the request asked for them."""

    token_id: int
    logprob: float | None
    """Set when params.logprobs is not None."""
    top_logprobs: tuple[tuple[int, float], ...] | None
    """The top params.logprobs alternatives as (id, logprob), best first; () for logprobs=0."""
    error: str | None = None
    """Why this row could not be sampled (token_id is then -1): the engine fails its request
    alone, and the rest of the batch goes on."""
    error_is_clients: bool = False
    """Whether the request's own parameters caused the error (a 4xx), not the model (a 5xx)."""


NO_FINITE_LOGIT = "the model's logits for this request are not finite (NaN or inf)"
ALL_BLOCKED = "no token can be sampled: every token is blocked, or penalized to -inf or NaN"


class Sampler:
    """Picks one token per row of a logits batch. Stateless apart from the vocabulary size.

    Per row, in this order:
      1. blocked ids get -inf;
      2. repetition_penalty (HF): every token in prompt + output has its logit divided by the
         penalty if positive, multiplied by it otherwise;
      3. frequency/presence penalties (OpenAI): logit -= frequency * count + presence * (count > 0),
         counting output tokens only;
      4. temperature below GREEDY_BELOW (1e-5): argmax (ties go to the lowest id). Otherwise the
         distribution softmax(logits / temperature) is filtered by top_k, then top_p on what
         top_k kept (renormalized), then min_p relative to the most likely token, and one token
         is drawn.

    Ties at a filter's boundary are kept together: top_k keeps every token at least as likely as
    the k-th, top_p keeps every token at least as likely as the one where the sorted mass first
    reaches top_p. That makes each kept set a function of the values alone (no tie-breaking order),
    and the most likely token always survives. So top_k=1 equals greedy unless the max is tied.

    A row that cannot be sampled (NaN or inf among its logits, or none left finite by its blocked
    ids and penalties) gets a token with ``error`` set; the other rows are sampled as if it were
    not there.

    Logprobs are log_softmax of the logits after steps 1-3 but before temperature and the filters:
    the model's distribution as the request's penalties and blocked ids shape it, independent of
    the sampling knobs, so greedy and sampled requests report comparable numbers and a filtered
    token still gets a finite logprob. Blocked ids report -inf.
    """

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self.vocab_size = vocab_size

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        # logits: [num_rows, vocab_size], any float dtype and device; computed in float32
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [num_rows={len(rows)}, vocab], got {tuple(logits.shape)}"
            )
        if logits.shape[1] != self.vocab_size:
            raise ValueError(
                f"logits have {logits.shape[1]} columns, vocab_size is {self.vocab_size}"
            )
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        if not rows:
            return []
        if not any(_needs_full_path(row) for row in rows):
            # The every-decode-step case: one batched max, no copy for float32 input. A NaN
            # anywhere in a row makes its max NaN, so a bad row costs nothing to find.
            best, argmax = logits.float().max(dim=-1)
            bad = (~torch.isfinite(best)).nonzero().flatten().tolist()
            tokens = [SampledToken(t, None, None) for t in argmax.tolist()]
            for i in bad:
                tokens[i] = SampledToken(-1, None, None, error=NO_FINITE_LOGIT)
            return tokens

        # x: [num_rows, vocab], a private contiguous float32 copy, modified in place below
        x = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
        raw_finite = torch.isfinite(x.amax(dim=-1))  # a NaN anywhere makes the max NaN
        _apply_blocked(x, rows)
        _apply_repetition_penalty(x, rows)
        _apply_frequency_presence(x, rows)
        row_max = x.amax(dim=-1)  # [num_rows]; NaN anywhere in a row makes it NaN
        bad = (~torch.isfinite(row_max) | ~raw_finite).nonzero().flatten().tolist()
        if bad:
            return self._without_bad_rows(logits, rows, bad, raw_finite.tolist())

        logprob_rows = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
        logprobs = torch.log_softmax(_select(x, logprob_rows), dim=-1) if logprob_rows else None

        token_ids = torch.empty(len(rows), dtype=torch.long, device=x.device)
        greedy_rows = [i for i, row in enumerate(rows) if row.params.is_greedy]
        sampled_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if greedy_rows:
            token_ids[greedy_rows] = _select(x, greedy_rows).argmax(dim=-1)
        if sampled_rows:
            # Rows may be consumed in place now that logprobs are taken.
            sub = _select(x, sampled_rows)
            token_ids[sampled_rows] = _sample(sub, [rows[i] for i in sampled_rows])
        return _assemble(token_ids, rows, logprob_rows, logprobs)

    def _without_bad_rows(self, logits: torch.Tensor, rows: Sequence[SamplingRow], bad: list[int],
                          raw_finite: list[bool]) -> list[SampledToken]:
        """An error token for each bad row, the others sampled alone (as they would have been)."""
        bad_set = set(bad)
        good = [i for i in range(len(rows)) if i not in bad_set]
        sampled = iter(self(logits[good], [rows[i] for i in good]) if good else [])
        return [
            (SampledToken(-1, None, None, error=ALL_BLOCKED, error_is_clients=True) if raw_finite[i]
             else SampledToken(-1, None, None, error=NO_FINITE_LOGIT))
            if i in bad_set else next(sampled)
            for i in range(len(rows))
        ]


def _needs_full_path(row: SamplingRow) -> bool:
    """False when a plain argmax of the raw logits is the whole answer."""
    p = row.params
    return bool(
        not p.is_greedy
        or p.logprobs is not None
        or row.blocked_token_ids
        or p.repetition_penalty != 1.0
        or p.frequency_penalty != 0.0
        or p.presence_penalty != 0.0
    )


def _row_uniform(seed: int, choice_index: int, position: int) -> float:
    """A uniform in [0, 1) that depends only on the three integers (53 random bits).

    blake2b rather than hash(): stable across processes and Python versions, and well mixed, so
    neighbouring positions and choices give independent-looking draws. Any int seed is accepted.
    """
    key = f"{seed}:{choice_index}:{position}".encode()
    digest = hashlib.blake2b(key, digest_size=8, person=b"pdserve-sampler").digest()
    return (int.from_bytes(digest, "little") >> 11) * 2.0**-53


def _flatten_ids(
    id_lists: Sequence[Sequence[int]], vocab_size: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate token id lists; also return each list's length. Rejects out-of-range ids."""
    # numpy's fromiter is ~8x faster than torch.tensor on long Python lists.
    lengths = np.fromiter((len(ids) for ids in id_lists), dtype=np.int64, count=len(id_lists))
    flat = np.fromiter(
        itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lengths.sum())
    )
    if flat.size and (flat.min() < 0 or flat.max() >= vocab_size):
        raise ValueError(f"{what} token ids must be in [0, {vocab_size})")
    return flat, lengths


def _apply_blocked(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    # x: [num_rows, vocab]; out-of-range ids are skipped: a token that does not exist is never
    # sampled anyway, and a bad user stop_token_id must not fail the whole batch.
    vocab = x.shape[1]
    pairs = [(i, t) for i, row in enumerate(rows) for t in row.blocked_token_ids if 0 <= t < vocab]
    if pairs:
        index = torch.tensor(pairs, dtype=torch.long).to(x.device)  # [num_pairs, 2]
        x[index[:, 0], index[:, 1]] = float("-inf")


def _apply_repetition_penalty(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    # Touches only the (row, token) pairs seen, so cost scales with tokens, not vocab.
    # Repeated ids write the same value, so duplicates need no dedup.
    chosen = [i for i, row in enumerate(rows) if row.params.repetition_penalty != 1.0]
    if not chosen:
        return
    vocab = x.shape[1]
    prompts = [rows[i].prompt_token_ids for i in chosen]
    outputs = [rows[i].output_token_ids for i in chosen]
    prompt_ids, prompt_lengths = _flatten_ids(prompts, vocab, "prompt")
    output_ids, output_lengths = _flatten_ids(outputs, vocab, "output")
    chosen_index = np.asarray(chosen, dtype=np.int64)
    row_index = np.concatenate(
        [np.repeat(chosen_index, prompt_lengths), np.repeat(chosen_index, output_lengths)]
    )
    penalty = np.ones(len(rows), dtype=np.float32)
    penalty[chosen_index] = [rows[i].params.repetition_penalty for i in chosen]
    row_t = torch.from_numpy(row_index).to(x.device)  # [num_seen]
    token_t = torch.from_numpy(np.concatenate([prompt_ids, output_ids])).to(x.device)
    per_token = torch.from_numpy(penalty[row_index]).to(x.device)  # [num_seen]
    values = x[row_t, token_t]
    x[row_t, token_t] = torch.where(values > 0, values / per_token, values * per_token)


def _apply_frequency_presence(x: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    # logit -= frequency * count + presence, for each distinct (row, output token).
    chosen = [
        i
        for i, row in enumerate(rows)
        if row.params.frequency_penalty != 0.0 or row.params.presence_penalty != 0.0
    ]
    if not chosen:
        return
    vocab = x.shape[1]
    flat, lengths = _flatten_ids([rows[i].output_token_ids for i in chosen], vocab, "output")
    if not flat.size:
        return
    keys = np.repeat(np.asarray(chosen, dtype=np.int64), lengths) * vocab + flat
    unique_keys, counts = np.unique(keys, return_counts=True)
    row_index = unique_keys // vocab
    frequency = np.zeros(len(rows), dtype=np.float64)
    presence = np.zeros(len(rows), dtype=np.float64)
    for i in chosen:
        frequency[i] = rows[i].params.frequency_penalty
        presence[i] = rows[i].params.presence_penalty
    delta = (frequency[row_index] * counts + presence[row_index]).astype(np.float32)
    row_t = torch.from_numpy(row_index).to(x.device)
    token_t = torch.from_numpy(unique_keys % vocab).to(x.device)
    x[row_t, token_t] -= torch.from_numpy(delta).to(x.device)


def _sample(x: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """One token id per row of penalized logits x: [num_sampled, vocab], consumed in place.

    Rows with top_k or top_p draw among a few top candidates; the others (temperature and
    min_p only) walk the whole vocabulary. Which way a row goes depends only on its params.
    """
    device = x.device
    num_rows, vocab = x.shape
    temperature = torch.tensor([r.params.temperature for r in rows], device=device)
    # weights: [num_sampled, vocab], softmax(x / T) scaled so each row's max is exactly 1. The
    # scale is harmless (every filter and the draw are scale-free) and makes min_p a plain
    # threshold. A tiny temperature underflows everything but the max to 0, i.e. near-greedy.
    weights = x.sub_(x.amax(dim=-1, keepdim=True)).div_(temperature[:, None]).exp_()
    # The uniforms are plain Python floats, so CPU and CUDA runs draw the same numbers.
    uniforms = torch.tensor(
        [_row_uniform(r.seed, r.choice_index, r.position) for r in rows], dtype=torch.float64
    ).to(device)

    token_ids = torch.empty(num_rows, dtype=torch.long, device=device)
    truncates = [0 < r.params.top_k < vocab or r.params.top_p < 1.0 for r in rows]
    truncated = [i for i, t in enumerate(truncates) if t]
    whole = [i for i, t in enumerate(truncates) if not t]
    if truncated:
        token_ids[truncated] = _sample_truncated(
            _select(weights, truncated), [rows[i].params for i in truncated], uniforms[truncated]
        )
    if whole:
        sub = _select(weights, whole)
        min_p = torch.tensor([rows[i].params.min_p for i in whole], device=device)
        if bool((min_p > 0).any()):
            sub = _keep_at_least(sub, min_p)  # min_p * (max weight = 1)
        token_ids[whole] = _inverse_cdf(sub, uniforms[whole])
    return token_ids


def _select(t: torch.Tensor, row_ids: list[int]) -> torch.Tensor:
    """t[row_ids] without a copy when every row is selected (in order)."""
    return t if len(row_ids) == t.shape[0] else t[row_ids]


def _keep_at_least(weights: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """weights with entries below their row's threshold zeroed: [n, vocab], [n] -> [n, vocab].

    sign(w - t') with t' the float just below t is 1 exactly when w >= t; four vectorized
    passes are ~4x faster on CPU than masked_fill's branchy loop.
    """
    below = torch.nextafter(threshold, torch.full_like(threshold, -1.0))
    keep = torch.sign(weights - below[:, None]).clamp_(min=0.0)
    return weights.mul_(keep)


def _sample_truncated(
    weights: torch.Tensor, params: Sequence[SamplingParams], uniforms: torch.Tensor
) -> torch.Tensor:
    """Sampling for rows with top_k and/or top_p, from their top candidates only.

    weights: [n, vocab] (max 1 per row); uniforms: [n] float64 -> token ids [n].
    Tries max(64, largest top_k + 1) candidates, then 1024, 8192, then a sort of the whole row
    (~0.1, 0.5, 1 and 5 ms a row at vocab 49152 on one slow core), so each row pays for the
    width of its own kept set. A row's token does not depend on which candidate count settled
    it (see _draw_from_candidates), so batch-mates that raise the count cannot change it.
    """
    num_rows, vocab = weights.shape
    device = weights.device
    top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else 0 for p in params], device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float64, device=device)
    min_p = torch.tensor([p.min_p for p in params], device=device)
    # top_p without top_k renormalizes over the whole row: [n] float64, unused for top_k rows
    if bool((top_k == 0).any()):
        mass = _block_mass(weights).sum(dim=-1)
    else:
        mass = torch.zeros(num_rows, dtype=torch.float64, device=device)

    result = torch.empty(num_rows, dtype=torch.long, device=device)
    pending = torch.arange(num_rows, device=device)
    # One more than top_k: seeing the next weight is what proves no tie spills past the k-th.
    first = max(_CANDIDATES[0], int(top_k.max()) + 1)
    for count in sorted({min(c, vocab) for c in (first, *_CANDIDATES[1:], vocab) if c >= first}):
        rows = weights if pending.numel() == num_rows else weights[pending]
        if count < vocab:
            values, indices = rows.topk(count, dim=-1)  # [p, count], descending
        else:
            values, indices = rows.sort(dim=-1, descending=True)  # faster than topk(vocab)
        settled, token_ids = _draw_from_candidates(
            values,
            indices,
            vocab,
            top_k[pending],
            top_p[pending],
            min_p[pending],
            mass[pending],
            uniforms[pending],
        )
        result[pending[settled]] = token_ids[settled]
        pending = pending[~settled]
        if pending.numel() == 0:
            break
    return result


def _draw_from_candidates(
    values: torch.Tensor,
    indices: torch.Tensor,
    vocab: int,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    mass: torch.Tensor,
    uniforms: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter and draw using a row's top `count` weights; say which rows they were enough for.

    values, indices: [p, count] from topk; the rest: [p]. Returns (settled [p] bool, ids [p]).
    Everything below is a prefix sum over values in descending order, or over the kept tokens
    in id order, padded with zeros. Zeros leave float sums bit-identical, so a settled row gets
    the same answer from any larger count; tie order inside topk never matters either, as tied
    values are equal and the kept set always holds whole tie groups.
    """
    count = values.shape[1]
    complete = count == vocab
    smallest = values[:, -1]  # [p]; a token outside the candidates weighs at most this

    has_k = top_k > 0
    kth = values.gather(1, (top_k - 1).clamp(min=0, max=count - 1)[:, None]).squeeze(1)
    kth = torch.where(has_k, kth, torch.zeros_like(kth))
    in_top_k = values * (values >= kth[:, None])  # [p, count], descending, zeros trail
    cumulative = in_top_k.double().cumsum(dim=-1)  # [p, count]
    # top_k's set must lie inside the candidates for its mass (and top_p's cut) to be right.
    settled = ~has_k | (kth > smallest) | complete

    has_p = top_p < 1.0
    renormalized = torch.where(has_k, cumulative[:, -1], mass)
    reach = torch.searchsorted(cumulative, (top_p * renormalized)[:, None]).squeeze(1)
    found = reach < count  # first candidate where the kept mass reaches top_p
    cut = values.gather(1, reach.clamp(max=count - 1)[:, None]).squeeze(1)
    # Not found in the whole row only through rounding (top_p ~ 1): keep everything.
    cut = torch.where(has_p & found, cut, torch.zeros_like(cut))
    settled &= ~has_p | found | complete

    threshold = torch.maximum(torch.maximum(kth, cut), min_p)  # min_p * (max weight = 1)
    settled &= (threshold > smallest) | complete  # every kept token is a candidate

    kept = values >= threshold[:, None]
    if complete:
        # Every id is a candidate: scatter back to id order (zeros in between) instead of sorting.
        in_id_order = torch.arange(vocab, device=values.device).expand_as(indices)
        kept_weights = torch.zeros_like(values).scatter_(1, indices, values * kept).double()
    else:
        in_id_order, order = torch.where(kept, indices, vocab).sort(dim=-1)  # dropped ones last
        kept_weights = (values * kept).gather(1, order).double()  # [p, count]
    cumulative = kept_weights.cumsum(dim=-1)
    pick = torch.searchsorted(cumulative, (uniforms * cumulative[:, -1])[:, None], right=True)
    pick = torch.minimum(pick.squeeze(1), _last_positive(kept_weights))
    return settled, in_id_order.gather(1, pick[:, None]).squeeze(1)


def _block_mass(weights: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive blocks of _CDF_BLOCK tokens: [n, vocab] -> [n, num_blocks] float64.

    Every block is summed the same way whatever the batch, unlike one long reduction that
    torch may split across threads when there are few rows. Summing in float32 (then widening)
    is 5x faster than a float64 reduction and errs ~1e-7 relative, the precision of the weights.
    """
    return _blocks(weights).sum(dim=-1).double()


def _blocks(weights: torch.Tensor) -> torch.Tensor:
    # [n, vocab] -> [n, num_blocks, block], zero-padded at the end
    num_rows, vocab = weights.shape
    block = min(_CDF_BLOCK, vocab)
    padding = -vocab % block
    if padding:
        weights = F.pad(weights, (0, padding))
    return weights.view(num_rows, -1, block)


def _inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index i with probability weights[i] / sum(weights), per row, for one uniform per row.

    weights: [n, vocab] >= 0 with a positive entry per row; uniforms: [n] float64 in [0, 1).
    Walks token ids in order in two levels -- pick a block by its mass, then a token inside it
    by the leftover fraction of the uniform -- so one O(vocab) pass plus O(block) work. This is
    exact sampling up to float32 rounding of the weights. A zero-weight token is never
    returned: it does not move a cumulative sum, and rounding overshoot is clamped to the last
    positive entry.
    """
    blocks = _blocks(weights)  # [n, num_blocks, block]
    block_size = blocks.shape[2]
    block_mass = _block_mass(weights)  # [n, num_blocks]
    cumulative = block_mass.cumsum(dim=-1)
    target = uniforms * cumulative[:, -1]  # [n]
    block = torch.searchsorted(cumulative, target[:, None], right=True).squeeze(1)
    block = torch.minimum(block, _last_positive(block_mass))
    before = cumulative.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1)
    before = torch.where(block > 0, before, torch.zeros_like(before))
    # Where the target falls inside the chosen block, as a fraction of the block's mass; rescaled
    # to the in-block float64 cumsum so the two levels' rounding cannot bias tokens in the block.
    fraction = (target - before) / block_mass.gather(1, block[:, None]).squeeze(1)

    rows = torch.arange(blocks.shape[0], device=weights.device)
    inside = blocks[rows, block].double().cumsum(dim=-1)  # [n, block]
    offset = torch.searchsorted(inside, (fraction * inside[:, -1])[:, None], right=True).squeeze(1)
    offset = torch.minimum(offset, _last_positive(blocks[rows, block]))
    return block * block_size + offset


def _last_positive(values: torch.Tensor) -> torch.Tensor:
    # values: [n, m] -> [n], index of each row's last entry > 0
    flipped_first = (values.flip(-1) > 0).to(torch.uint8).argmax(dim=-1)
    return values.shape[-1] - 1 - flipped_first


def _assemble(
    token_ids: torch.Tensor,
    rows: Sequence[SamplingRow],
    logprob_rows: list[int],
    logprobs: torch.Tensor | None,
) -> list[SampledToken]:
    # token_ids: [num_rows]; logprobs: [len(logprob_rows), vocab] or None
    ids: list[int] = token_ids.tolist()
    if logprobs is None:
        return [SampledToken(t, None, None) for t in ids]
    chosen = torch.tensor([ids[i] for i in logprob_rows], device=logprobs.device)
    chosen_lp: list[float] = logprobs.gather(1, chosen[:, None]).squeeze(1).tolist()
    num_top = min(max(rows[i].params.logprobs or 0 for i in logprob_rows), logprobs.shape[1])
    top_lp: list[list[float]] = []
    top_ids: list[list[int]] = []
    if num_top:
        top = logprobs.topk(num_top, dim=-1)
        top_lp, top_ids = top.values.tolist(), top.indices.tolist()

    result = [SampledToken(t, None, None) for t in ids]
    for j, i in enumerate(logprob_rows):
        wanted = rows[i].params.logprobs or 0
        pairs = zip(top_ids[j][:wanted], top_lp[j][:wanted], strict=True) if wanted else ()
        # topk leaves tied values in no particular order; lowest id first makes output stable.
        best = tuple(sorted(pairs, key=lambda pair: (-pair[1], pair[0])))
        result[i] = SampledToken(ids[i], chosen_lp[j], best)
    return result
