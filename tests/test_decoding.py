"""Decoding: the KV cache changes nothing, and the sampling strategies do what they say."""

import pytest
import torch

from conftest import VARIANTS, perturb, pixels_for
from decoding import decode, pick_token

MAX_NEW = 12


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
        one = state[b : b + 1] if not isinstance(state, tuple) else tuple(s[b : b + 1] for s in state)
        alone = decode(model, one, eos, max_new_tokens=MAX_NEW, use_cache=True)
        assert alone == decode(model, one, eos, max_new_tokens=MAX_NEW, use_cache=False)
        assert alone[0] == batched[b], f"row {b} decodes differently alone than in the batch"


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_steps_give_the_logits_of_full_recomputation(make_model, splits, tokenizer, variant):
    model, processor, _, _ = make_model(variant)
    perturb(model, seed=2)
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:3]))
    ids = torch.randint(len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tokenizer.eos_token_id
    with torch.no_grad():
        logits, cache = model.next_logits(state, ids[:, :2])  # a two-token prefill
        for t in range(2, ids.shape[1] + 1):
            full, _ = model.next_logits(state, ids[:, :t], None, use_cache=False)
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
            if t < ids.shape[1]:
                logits, cache = model.next_logits(state, ids[:, : t + 1], cache)


# -----------------------------------------------------------------------------
# pick_token


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


def test_beam_search_with_kv_cache_equals_full_recomputation(decoding_setup):
    model, state, eos = decoding_setup
    cached = decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=3, use_cache=True)
    full = decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=3, use_cache=False)
    assert len(cached) == batch_rows(state)
    assert all(eos not in row for row in cached)
    assert cached == full


def test_beam_search_with_one_beam_is_greedy(decoding_setup):
    model, state, eos = decoding_setup
    greedy = decode(model, state, eos, max_new_tokens=MAX_NEW)
    assert decode(model, state, eos, max_new_tokens=MAX_NEW, strategy="beam", beams=1) == greedy


def batch_rows(state):
    return (state[0] if isinstance(state, tuple) else state).shape[0]
