"""
Decoding strategies over the Captioner protocol (encode_images, next_logits):
greedy, top-k, top-p, beam search, and captioning a list of images.

Kept as functions beside the models rather than methods on them: both variants
share every strategy through the same three calls, and the callers (generate.py,
evaluation, the app, the benchmarks) only need this module and a loaded run.
"""

import argparse
import math
import time

import torch
from PIL import Image
from tqdm import tqdm

import data


def index_state(state, index):
    """Select (or reorder) the rows of an encoded image batch."""
    if isinstance(state, tuple):
        return tuple(s[index] for s in state)
    return state[index]


def batch_size_of(state):
    return (state[0] if isinstance(state, tuple) else state).shape[0]


def device_of(state):
    return (state[0] if isinstance(state, tuple) else state).device


def strip_eos(rows, eos_id):
    return [row[: row.index(eos_id)] if eos_id in row else row for row in rows]


@torch.no_grad()
def decode(
    model,
    state,
    eos_id,
    max_new_tokens=30,
    strategy="greedy",
    top_k=50,
    top_p=0.9,
    temperature=1.0,
    use_cache=True,
    generator=None,
    beams=4,
    length_penalty=1.0,
    stop_at_eos=True,
):
    """Generate up to max_new_tokens for each image of an encoded batch.

    Every caption starts from the same one-token prompt ([BOS] = EOS), so the
    batch needs no left padding; a finished row keeps being fed EOS and its
    later tokens are dropped. Returns a list of token id lists (EOS excluded).
    stop_at_eos=False always runs max_new_tokens steps (for benchmarks)."""
    # a learned position table (self-attention) bounds how long a caption can get
    max_new_tokens = min(max_new_tokens, getattr(model, "max_text_tokens", max_new_tokens))
    if strategy == "beam":
        if beams > 1:
            return beam_search(model, state, eos_id, beams, max_new_tokens, length_penalty, use_cache)
        strategy = "greedy"  # one beam is greedy search
    B = batch_size_of(state)
    ids = torch.full((B, 1), eos_id, dtype=torch.long, device=device_of(state))
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    cache = None
    for _ in range(max_new_tokens):
        logits, cache = model.next_logits(state, ids, cache, use_cache)
        token = pick_token(logits, strategy, top_k, top_p, temperature, generator)
        if stop_at_eos:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        ids = torch.cat([ids, token[:, None]], 1)
        if done.all():
            break
    return strip_eos(ids[:, 1:].tolist(), eos_id)


@torch.no_grad()
def beam_search(model, state, eos_id, beams=4, max_new_tokens=30, length_penalty=1.0, use_cache=True):
    """The standard scheme (as transformers' generate does it): N live beams per image and a
    pool of finished hypotheses compared by log-probability / length**length_penalty.

    Each step ranks the 2N best expansions of the live beams; one ending in EOS joins the
    pool (when it ranks among the first N), the N best others stay live, so the search
    keeps its full width however many beams finish. An image is done once its pool holds
    N hypotheses and no live beam can still beat the worst of them at any later length.
    With a cache, the cache rows are reordered along with the beams, never recomputed."""
    B, N = batch_size_of(state), beams
    device = device_of(state)
    state = index_state(state, torch.arange(B, device=device).repeat_interleave(N))
    ids = torch.full((B * N, 1), eos_id, dtype=torch.long, device=device)
    scores = torch.full((B, N), float("-inf"), device=device)
    scores[:, 0] = 0  # all beams start identical: only the first one may expand
    pools = [[] for _ in range(B)]  # per image: (normalised score, tokens) of finished hypotheses
    done = [False] * B
    normalise = lambda score, length: score / length**length_penalty
    cache = None
    for length in range(1, max_new_tokens + 1):  # tokens generated, EOS included
        logits, cache = model.next_logits(state, ids, cache, use_cache)
        logprobs = logits.float().log_softmax(-1)
        V = logprobs.shape[-1]
        top, flat = (scores.view(B * N, 1) + logprobs).view(B, N * V).topk(min(2 * N, N * V), -1)
        origin, tokens, live = [], [], []
        for b in range(B):
            kept = []
            for rank, (score, f) in enumerate(zip(top[b].tolist(), flat[b].tolist())):
                row, token = b * N + f // V, f % V
                if token == eos_id:
                    if rank < N and not done[b] and score > float("-inf"):
                        pools[b].append((normalise(score, length), ids[row, 1:].tolist()))
                elif len(kept) < N:
                    kept.append((score, row, token))
            pools[b] = sorted(pools[b], key=lambda h: h[0], reverse=True)[:N]
            if len(pools[b]) == N and not done[b]:
                # scores only fall as tokens are added; the normalised score is best at the
                # longest length when length_penalty > 0, at the next length otherwise
                best_length = max_new_tokens if length_penalty > 0 else min(length + 1, max_new_tokens)
                done[b] = length == max_new_tokens or pools[b][-1][0] >= normalise(kept[0][0], best_length)
            live.append([score for score, _, _ in kept])
            origin += [row for _, row, _ in kept]
            tokens += [token for _, _, token in kept]
        if all(done):
            break
        origin = torch.tensor(origin, device=device)
        scores = torch.tensor(live, device=device)
        ids = torch.cat([ids[origin], torch.tensor(tokens, device=device)[:, None]], 1)
        if cache is not None:
            cache.reorder_cache(origin)
    for b in range(B):  # beams still running at the length limit compete as they are
        if not done[b]:
            pools[b] += [
                (normalise(s, ids.shape[1] - 1), ids[b * N + k, 1:].tolist())
                for k, s in enumerate(scores[b].tolist())
                if s > float("-inf")
            ]
    return [max(pool, key=lambda h: h[0])[1] for pool in pools]


def pick_token(logits, strategy, top_k, top_p, temperature, generator):
    if strategy == "greedy":
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)
    if strategy == "top-k":
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif strategy == "top-p":
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    else:
        raise ValueError(f"unknown strategy {strategy!r} (greedy, top-k, top-p, beam)")
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def caption_images(
    model, processor, tokenizer, images, batch_size=64, device="cpu", desc="captioning", stats=None, **decode_kwargs
):
    """Captions (strings) for a list of PIL images or image paths, batched and KV-cached by default.
    A `stats` dict gets the number of tokens generated (EOS included when emitted) and the seconds taken."""
    captions, tokens, t0 = [], 0, time.time()
    for k in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch", disable=None):
        batch = [im if isinstance(im, Image.Image) else data.read_image(im) for im in images[k : k + batch_size]]
        pixels = processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        state = model.encode_images(pixel_values=pixels)
        ids = decode(model, state, tokenizer.eos_token_id, **decode_kwargs)
        captions += [" ".join(tokenizer.decode(t, skip_special_tokens=True).split()) for t in ids]
        tokens += sum(len(t) + (len(t) < decode_kwargs.get("max_new_tokens", 30)) for t in ids)
    if stats is not None:
        stats.update(tokens=tokens, seconds=time.time() - t0)
    return captions


# -----------------------------------------------------------------------------
# the decoding options of the command-line tools

STRATEGIES = ("greedy", "top-k", "top-p", "beam")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def unit_interval(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], not {value}")
    return value


def fraction(text):
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], not {value}")
    return value


def non_negative_float(text):
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number of 0 or more, not {value}")
    return value


def positive_float(text):
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {value}")
    return value


def add_options(parser):
    """The decoding options generate.py and evaluate.py share, checked when parsed. Greedy is the
    default: top-k at k=50 lost about 2 CIDEr to it in both variants (docs/claims.md, claim 7)."""
    parser.add_argument("--strategy", default="greedy", choices=STRATEGIES)
    parser.add_argument("--beams", type=positive_int, default=4)
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam score = log-prob / length**this")
    parser.add_argument("--top-k", type=positive_int, default=50)
    parser.add_argument("--top-p", type=unit_interval, default=0.9)
    parser.add_argument("--temperature", type=positive_float, default=1.0)
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        help="default: what the run was trained on (its --max-caption-tokens, plus EOS)",
    )
    parser.add_argument("--batch-size", type=positive_int, default=64)


def options(args, config):
    """decode()'s keyword arguments from parsed options; the length follows the run unless given."""
    return dict(
        strategy=args.strategy,
        beams=args.beams,
        length_penalty=args.length_penalty,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens or config["max_caption_tokens"] + 1,
    )
