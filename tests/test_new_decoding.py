import itertools
import math

import pytest
import torch
from test_beam import ToyLM

from decoding import decode

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
