"""Decoding: the KV cache changes nothing, sampling does what it says, and beam search finds what
greedy misses, reduces to greedy with one beam, and neither the KV cache nor the batch changes what
it finds."""

import argparse
import itertools
import math

import pytest
import torch

import decoding
from conftest import VARIANTS, perturb, pixels_for
from decoding import batch_size_of, decode, index_state, pick_token

MAX_NEW = 12


# -----------------------------------------------------------------------------
# the tiny models, with EOS ending the rows at different steps


class EosWhen:
    """An LM-head hook that makes EOS win wherever the hidden state leans far enough along a
    fixed random direction: a deterministic function of the model's own state, so a row ends
    when its content says so and different rows end at different lengths."""

    def __init__(self, lm_head, eos, hidden_size, threshold=None, seed=0):
        self.eos, self.threshold, self.seen = eos, threshold, []
        self.direction = torch.randn(hidden_size, generator=torch.Generator().manual_seed(seed))
        self.handle = lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, out):
        score = inputs[0].float() @ self.direction  # [B, L]
        self.seen.append(score[:, -1].clone())
        if self.threshold is None:
            return out
        out = out.clone()
        out[..., self.eos] = out.max(-1).values + 100 * (score - self.threshold)
        return out

    def remove(self):
        self.handle.remove()


def pick_threshold(scores):
    """The threshold among quantiles of the recorded scores that ends the rows at the most different steps."""
    scores = torch.stack(scores, 1)  # [B, steps]
    best, best_spread = None, 0
    for q in (0.97, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6, 0.5):
        thr = scores.flatten().quantile(q).item()
        over = scores > thr
        ends = [int(row.nonzero()[0]) if row.any() else scores.shape[1] for row in over]
        if len(set(ends)) > best_spread:
            best, best_spread = thr, len(set(ends))
    return best


@pytest.fixture(scope="module", params=VARIANTS)
def decoding_setup(request, make_model, splits):
    model, processor, tokenizer, _ = make_model(request.param)
    perturb(model, seed=1)
    records = splits["test"] + splits["compositional"][:2]
    state = model.encode_images(pixel_values=pixels_for(processor, records))
    eos = tokenizer.eos_token_id
    hook = EosWhen(model.lm.lm_head, eos, model.lm.config.hidden_size)
    decode(model, state, eos, max_new_tokens=MAX_NEW)
    hook.threshold = pick_threshold(hook.seen)
    yield model, state, eos
    hook.remove()


def one_row(state, b):
    return index_state(state, slice(b, b + 1))


def test_greedy_with_kv_cache_equals_full_recomputation(decoding_setup):
    model, state, eos = decoding_setup
    cached = decode(model, state, eos, max_new_tokens=MAX_NEW, use_cache=True)
    full = decode(model, state, eos, max_new_tokens=MAX_NEW, use_cache=False)
    lengths = [len(row) for row in cached]
    # the batch is a real test: rows end at different steps and say different things
    assert len(set(lengths)) >= 2, f"all rows ended at the same length {lengths}"
    assert min(lengths) < MAX_NEW and max(lengths) > min(lengths)
    assert len({tuple(row) for row in cached}) >= 2, "every row produced the same caption"
    assert all(eos not in row for row in cached), "EOS is excluded from the returned tokens"
    assert cached == full


def test_greedy_batched_equals_one_image_at_a_time(decoding_setup):
    model, state, eos = decoding_setup
    batched = decode(model, state, eos, max_new_tokens=MAX_NEW)
    for b in range(len(batched)):
        one = one_row(state, b)
        alone = decode(model, one, eos, max_new_tokens=MAX_NEW, use_cache=True)
        assert alone == decode(model, one, eos, max_new_tokens=MAX_NEW, use_cache=False)
        assert alone[0] == batched[b], f"row {b} decodes differently alone than in the batch"


def test_one_beam_is_greedy(decoding_setup):
    model, state, eos = decoding_setup
    greedy = decode(model, state, eos, max_new_tokens=MAX_NEW)
    assert len({tuple(r) for r in greedy}) >= 2, "every image got the same caption"
    assert decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=1) == greedy
    assert decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=1, use_cache=False) == greedy


@pytest.mark.parametrize("beams", [2, 3])
def test_beam_with_kv_cache_equals_beam_without(decoding_setup, beams):
    model, state, eos = decoding_setup
    cached = decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=beams, use_cache=True)
    full = decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=beams, use_cache=False)
    assert len(cached) == batch_size_of(state) and all(eos not in r for r in cached)
    assert len({len(r) for r in cached}) >= 2, "the rows should end at different lengths"
    assert cached == full


def test_beam_batch_equals_each_image_alone(decoding_setup):
    model, state, eos = decoding_setup
    batched = decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=3)
    for b in range(batch_size_of(state)):
        alone = decode(model, one_row(state, b), eos, max_new_tokens=MAX_NEW, strategy="beam", beams=3)
        assert alone == [batched[b]], f"image {b} decodes differently alone than in the batch"


def test_decoding_stops_at_the_end_of_the_position_table(make_model, splits, tokenizer):
    """A short position table bounds the caption instead of crashing the evaluation after training."""
    model, processor, _, _ = make_model("self_attention", max_caption_tokens=4)
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:3]))
    eos = tokenizer.eos_token_id
    out = decode(model, state, eos, max_new_tokens=30, stop_at_eos=False)  # would need 30 text positions
    assert len(out) == 3
    assert max(len(t) for t in out) <= model.max_text_tokens == 5


# -----------------------------------------------------------------------------
# beam search on a toy model with a hand-made next-token table


class HistoryCache:
    """What a KV cache is to the toy: the ids seen so far, one row per beam, reordered with the beams."""

    def __init__(self, ids):
        self.ids = ids.clone()
        self.reorders = 0

    def reorder_cache(self, index):
        self.ids = self.ids[index]
        self.reorders += 1


class ToyLM:
    """next_logits(state, ids, cache, use_cache) of a Markov-like table: `table(prefix)` gives
    {token: probability} for the continuation of the generated tokens `prefix` (BOS excluded);
    the rest of the mass is spread evenly over the other tokens of the vocabulary.

    With a cache it only trusts the cache for the history, and checks that the history the
    cache holds is the one the caller's ids say (so a cache not reordered with the beams fails)."""

    def __init__(self, table, vocab_size):
        self.table, self.V = table, vocab_size
        self.calls = []  # (rows, ids length, cached?)

    def probs(self, prefix):
        given = self.table(tuple(prefix))
        rest = 1.0 - sum(given.values())
        others = self.V - len(given)
        assert rest > 0 and others > 0
        p = torch.full((self.V,), rest / others, dtype=torch.float64)
        for tok, q in given.items():
            p[tok] = q
        return p

    def next_logits(self, state, ids, cache=None, use_cache=True):
        assert state.shape[0] == ids.shape[0]
        self.calls.append((ids.shape[0], ids.shape[1], cache is not None))
        if cache is not None:
            assert torch.equal(cache.ids, ids[:, :-1]), "the cache holds another history than the ids"
            history = torch.cat([cache.ids, ids[:, -1:]], 1)
        else:
            history = ids
        logits = torch.stack([self.probs(row[1:].tolist()).log() for row in history]).float()
        return logits, (HistoryCache(history) if use_cache else None)


EOS, A, B = 0, 1, 2


def greedy_trap(prefix):
    """First step A 0.58, B 0.4. After A: a spread-out next word (the best, token 3, only 0.2;
    eight others 0.09), then EOS. After B: EOS 0.95."""
    if prefix == ():
        return {A: 0.58, B: 0.4}
    if prefix == (A,):
        return {3: 0.2, **{t: 0.09 for t in range(4, 12)}}
    if len(prefix) == 2 and prefix[0] == A:
        return {EOS: 0.99}
    if prefix == (B,):
        return {EOS: 0.95}
    return {EOS: 0.9}


def sequence_logprob(model, tokens):
    """log P(tokens + EOS) under the toy's table, by hand."""
    total, prefix = 0.0, []
    for t in list(tokens) + [EOS]:
        total += math.log(model.probs(prefix)[t].item())
        prefix.append(t)
    return total, len(tokens) + 1


@pytest.mark.parametrize("use_cache", [True, False])
def test_beam_finds_the_more_probable_caption_that_greedy_misses(use_cache):
    model = ToyLM(greedy_trap, vocab_size=16)
    state = torch.zeros(1, 1, 1)
    greedy = decode(model, state, EOS, max_new_tokens=MAX_NEW, strategy="greedy", use_cache=use_cache)
    model.calls.clear()
    beam = decode(model, state, EOS, max_new_tokens=MAX_NEW, strategy="beam", beams=2, use_cache=use_cache)

    # by hand: greedy takes A (0.58), then its best follower 3 (0.2), then EOS (0.99): 0.58 * 0.2 * 0.99 = 0.115;
    # B then EOS is 0.4 * 0.95 = 0.38, more probable in total and per token
    p_greedy, n_greedy = sequence_logprob(model, [A, 3])
    p_beam, n_beam = sequence_logprob(model, [B])
    assert p_greedy == pytest.approx(math.log(0.58 * 0.2 * 0.99))
    assert p_beam == pytest.approx(math.log(0.4 * 0.95))
    assert p_beam > p_greedy and p_beam / n_beam > p_greedy / n_greedy

    assert greedy == [[A, 3]]
    assert beam == [[B]]
    if use_cache:  # the cached path was taken: one prefill, then one new token per step
        assert len(model.calls) >= 2
        assert [c[2] for c in model.calls] == [False] + [True] * (len(model.calls) - 1)
    else:
        assert not any(c[2] for c in model.calls)


def test_beam_search_of_a_toy_batch_is_row_by_row():
    """Two images of the toy (the table ignores the image): both rows find the same, and the cache
    rows of the two images never mix."""
    model = ToyLM(greedy_trap, vocab_size=16)
    assert decode(model, torch.zeros(2, 1, 1), EOS, max_new_tokens=MAX_NEW, strategy="beam", beams=3) == [[B], [B]]
    assert model.calls[0][0] == 2 * 3, "every image is expanded to `beams` rows"


S, L, X = 1, 2, 3


def short_or_long(prefix):
    """A short caption [S] (S 0.55, then EOS almost surely) against a long one [L, X, X, X, X]
    (L 0.45, then X almost surely four times, then EOS almost surely)."""
    if prefix == ():
        return {S: 0.55, L: 0.44}
    if prefix == (S,):
        return {EOS: 0.98}
    if prefix[0] == L and len(prefix) < 5:
        return {X: 0.98}
    return {EOS: 0.98}


@pytest.mark.parametrize("length_penalty", [0.0, 0.5, 1.0, 3.0])
def test_length_penalty_trades_total_log_prob_for_length(length_penalty):
    model = ToyLM(short_or_long, vocab_size=8)
    short, long_ = [S], [L, X, X, X, X]
    (lp_short, n_short), (lp_long, n_long) = sequence_logprob(model, short), sequence_logprob(model, long_)
    assert (n_short, n_long) == (2, 6)  # EOS counts in the length
    assert lp_short > lp_long, "the short caption is the more probable one in total"
    expected = short if lp_short / n_short**length_penalty > lp_long / n_long**length_penalty else long_
    got = decode(
        model,
        torch.zeros(1, 1, 1),
        EOS,
        max_new_tokens=MAX_NEW,
        strategy="beam",
        beams=2,
        length_penalty=length_penalty,
    )
    assert got == [expected]
    if length_penalty == 0.0:
        assert got == [short]
    if length_penalty >= 1.0:
        assert got == [long_]


# -----------------------------------------------------------------------------
# pick_token and sampling


def test_greedy_is_argmax():
    logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pick_token(logits, "greedy", 5, 0.9, 1.0, None), logits.argmax(-1))
    # temperature does not matter to greedy
    assert torch.equal(pick_token(logits, "greedy", 5, 0.9, 0.01, None), logits.argmax(-1))


def test_top_k_never_picks_outside_the_top_k():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 40, generator=gen)
    k = 5
    allowed = logits.topk(k, -1).indices
    picks = torch.stack([pick_token(logits, "top-k", k, 0.9, 2.0, gen) for _ in range(300)], 1)  # [4, 300]
    for row in range(4):
        got = set(picks[row].tolist())
        assert got <= set(allowed[row].tolist()), f"row {row} picked {got - set(allowed[row].tolist())}"
        assert len(got) > 1, "top-k with a high temperature should sample, not always pick the same token"
    # k = 1 is greedy
    assert torch.equal(pick_token(logits, "top-k", 1, 0.9, 1.0, gen), logits.argmax(-1))


@pytest.mark.parametrize("top_p, keep", [(0.4, 1), (0.7, 2), (0.8, 3), (0.95, 4), (0.999, 5)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, keep):
    probs = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    # a vocabulary order that is not the probability order, so the mapping back is tested too
    order = torch.tensor([3, 0, 4, 1, 2])
    logits = torch.empty(5)
    logits[order] = probs.log()
    logits = logits[None].repeat(2, 1)
    expected = set(order[:keep].tolist())
    gen = torch.Generator().manual_seed(0)
    picks = torch.cat([pick_token(logits, "top-p", 50, top_p, 1.0, gen) for _ in range(800)])
    assert set(picks.tolist()) == expected


@pytest.mark.parametrize("temperature, keep", [(2.0, 3), (0.5, 1), (1.0, 2)])
def test_top_p_chooses_the_nucleus_of_the_tempered_distribution(temperature, keep):
    """logits / T first, then the smallest prefix of those probabilities reaching p, sampled in
    proportion to them. p = 0.7 keeps 2 tokens of [0.5, 0.3, 0.1, 0.06, 0.04] itself, 3 at T = 2
    (0.351 + 0.272 + 0.157) and 1 at T = 0.5 (0.704): a nucleus chosen before the temperature,
    or a temperature that multiplies, keeps the wrong tokens."""
    probs = [0.5, 0.3, 0.1, 0.06, 0.04]
    tempered = [q ** (1 / temperature) for q in probs]
    tempered = [q / sum(tempered) for q in tempered]
    nucleus = tempered[:keep]
    expected = [q / sum(nucleus) for q in nucleus] + [0.0] * (len(probs) - keep)
    order = torch.tensor([2, 4, 0, 3, 1])  # vocabulary position of each probability
    logits = torch.empty(len(probs))
    logits[order] = torch.tensor(probs).log()
    n = 40000
    picks = pick_token(logits[None].repeat(n, 1), "top-p", 50, 0.7, temperature, torch.Generator().manual_seed(0))
    counts = torch.bincount(picks, minlength=len(probs))[order]
    assert set(picks.tolist()) == set(order[:keep].tolist())
    for got, want in zip((counts / n).tolist(), expected):
        assert abs(got - want) < 0.015, ((counts / n).tolist(), expected)


def test_seeded_sampling_is_reproducible():
    logits = torch.zeros(3, 100)  # flat: anything may come
    for strategy in ("top-k", "top-p"):
        draw = lambda seed: torch.stack(
            [
                pick_token(logits, strategy, 50, 0.9, 1.0, g)
                for g in [torch.Generator().manual_seed(seed)]
                for _ in range(20)
            ]
        )
        assert torch.equal(draw(7), draw(7))
        assert not torch.equal(draw(7), draw(8))


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="beam-of-lies"):
        pick_token(torch.zeros(1, 3), "beam-of-lies", 5, 0.9, 1.0, None)


@pytest.mark.parametrize("variant", VARIANTS)
def test_seeded_sampled_decoding_is_reproducible(make_model, splits, variant):
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model, seed=3)
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:3]))
    run = lambda seed, strategy: decode(
        model,
        state,
        tokenizer.eos_token_id,
        max_new_tokens=8,
        strategy=strategy,
        temperature=1.5,
        generator=torch.Generator().manual_seed(seed),
    )
    for strategy in ("top-k", "top-p"):
        assert run(0, strategy) == run(0, strategy)
        assert run(0, strategy) != run(1, strategy)


# -----------------------------------------------------------------------------
# beam search keeps its width when beams finish (the standard scheme)

END, A2, B2, F2, H2, G2 = 0, 1, 2, 3, 4, 5


def short_finishers(prefix):
    """Both first words are likely to end the caption at once; only A then F H goes on, and
    that long caption has the best log-probability per token."""
    table = {
        (): {A2: 0.59, B2: 0.4},
        (A2,): {END: 0.6, F2: 0.39},
        (B2,): {END: 0.9, G2: 0.09},
        (A2, F2): {H2: 0.99},
        (A2, F2, H2): {END: 0.99},
    }
    return table.get(prefix, {END: 0.99})


def exhaustive_best(lm, max_len, length_penalty):
    """The caption with the best log-probability / length**length_penalty among every sequence
    of up to max_len tokens that ends in EOS (or reaches max_len), by brute force."""
    best, best_tokens = -math.inf, None
    for n in range(1, max_len + 1):
        for seq in itertools.product(range(lm.V), repeat=n):
            if END in seq[:-1] or (seq[-1] != END and n < max_len):
                continue
            logp = sum(math.log(lm.probs(list(seq[:i]))[t]) for i, t in enumerate(seq))
            score = logp / n**length_penalty
            if score > best:
                best, best_tokens = score, [t for t in seq if t != END]
    return best_tokens


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_beam_search_returns_the_best_normalised_caption_when_short_beams_finish(length_penalty):
    lm = ToyLM(short_finishers, vocab_size=6)
    state = torch.zeros(1, 1)
    found = decode(lm, state, END, max_new_tokens=4, strategy="beam", beams=2, length_penalty=length_penalty)
    expected = exhaustive_best(lm, 4, length_penalty)
    assert found == [expected], f"length penalty {length_penalty}: beam search found {found}, the best is {expected}"
    if length_penalty >= 1.0:
        assert expected == [A2, F2, H2], "the long caption must be the best one for this test to mean anything"


def test_generated_length_follows_the_run_unless_given():
    parser = argparse.ArgumentParser()
    decoding.add_options(parser)
    config = {"max_caption_tokens": 40}
    assert decoding.options(parser.parse_args([]), config)["max_new_tokens"] == 41, "caption + EOS, as trained"
    assert decoding.options(parser.parse_args(["--max-new-tokens", "7"]), config)["max_new_tokens"] == 7
