"""Beam search: it finds what greedy misses, reduces to greedy with one beam, and neither the KV cache,
the batch, nor the command line changes what it finds."""

import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, VARIANTS, perturb, pixels_for
from decoding import decode
from runs import load_run, save_run

MAX_NEW = 10


# -----------------------------------------------------------------------------
# a toy model with a hand-made next-token table


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
# the real tiny models


class EosBias:
    """Adds `bias` to the EOS logit (an LM-head hook), so that captions end at different lengths."""

    def __init__(self, lm_head, eos, bias):
        self.eos, self.bias = eos, bias
        self.handle = lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, out):
        out = out.clone()
        out[..., self.eos] += self.bias
        return out

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module", params=VARIANTS)
def beam_setup(request, make_model, splits):
    """(model, state, eos, records) with EOS biased so that greedy captions end at several lengths."""
    model, processor, tokenizer, _ = make_model(request.param, seed=5)
    perturb(model, seed=7)
    records = splits["test"][:6]
    state = model.encode_images(pixel_values=pixels_for(processor, records))
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        logits, _ = model.next_logits(state, torch.full((len(records), 1), eos))
    gap = logits.max(-1).values - logits[:, eos]  # how far EOS is from winning at the first step
    hook = None
    for q in (0.5, 0.3, 0.7, 0.2, 0.8, 0.1, 0.9):
        hook = EosBias(model.lm.lm_head, eos, gap.quantile(q).item())
        lengths = [len(r) for r in decode(model, state, eos, max_new_tokens=MAX_NEW)]
        if len(set(lengths)) >= 3:
            break
        hook.remove()
        hook = None
    assert hook is not None, "no EOS bias gave greedy captions of several lengths"
    yield model, state, eos, records
    hook.remove()


def one_row(state, b):
    return tuple(s[b : b + 1] for s in state) if isinstance(state, tuple) else state[b : b + 1]


def test_one_beam_is_greedy(beam_setup):
    model, state, eos, _ = beam_setup
    greedy = decode(model, state, eos, max_new_tokens=MAX_NEW)
    assert len({tuple(r) for r in greedy}) >= 2, "every image got the same caption"
    assert decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=1) == greedy
    assert decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=1, use_cache=False) == greedy


@pytest.mark.parametrize("beams", [2, 3])
def test_beam_with_kv_cache_equals_beam_without(beam_setup, beams):
    model, state, eos, _ = beam_setup
    cached = decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=beams)
    full = decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=beams, use_cache=False)
    assert len(cached) == batch_rows(state) and all(eos not in r for r in cached)
    assert len({len(r) for r in cached}) >= 2, "the rows should end at different lengths"
    assert cached == full


def test_beam_batch_equals_each_image_alone(beam_setup):
    model, state, eos, _ = beam_setup
    batched = decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=3)
    for b in range(batch_rows(state)):
        alone = decode(model, one_row(state, b), eos, max_new_tokens=MAX_NEW, strategy="beam", beams=3)
        assert alone == [batched[b]], f"image {b} decodes differently alone than in the batch"


def batch_rows(state):
    return (state[0] if isinstance(state, tuple) else state).shape[0]


# -----------------------------------------------------------------------------
# generate.py --strategy beam


def test_generate_with_beam_search_prints_one_caption_per_image(make_model, splits, duocap_cache, tmp_path):
    model, processor, tokenizer, config = make_model("explained", seed=3)
    perturb(model, seed=11)
    run_dir = tmp_path / "run"
    save_run(model, config, run_dir)
    records = splits["test"][:4]
    env = dict(
        os.environ,
        DUOCAP_CACHE=str(duocap_cache),
        PYTHONIOENCODING="utf-8",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "generate.py",
            "--checkpoint",
            str(run_dir),
            "--strategy",
            "beam",
            "--beams",
            "3",
            "--max-new-tokens",
            "12",
            *[str(r.image) for r in records],
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        timeout=300,
    )
    stdout, stderr = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, stderr[-5000:]
    lines = stdout.split("\n")
    assert lines[-1] == "" and len(lines) == len(records) + 1, stdout

    # the captions are beam search's, here in-process on the same checkpoint
    loaded, processor, tokenizer, _ = load_run(run_dir)
    state = loaded.encode_images(pixel_values=pixels_for(processor, records))
    expected = decode(loaded, state, tokenizer.eos_token_id, max_new_tokens=12, strategy="beam", beams=3)
    for line, r, ids in zip(lines, records, expected):
        path, caption = line.split("\t")
        assert path == str(r.image)
        assert caption == tokenizer.decode(ids, skip_special_tokens=True).strip()
