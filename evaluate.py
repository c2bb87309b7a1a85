"""
Evaluate a checkpoint on a split: caption every image, then score.

    python evaluate.py --checkpoint RUN_DIR [--split test] [--strategy greedy] [--out FILE]

For the shapes data the figures say what the captions get right about the
image: attribute accuracy (the predicted set of (colour, shape) objects equals
the truth), relation accuracy (pairs), exact match (any reference), and the same
with every image's features swapped for another image's (the blind control:
how much the captions depend on the image at all).

Every split also gets the standard caption metrics of the COCO caption
evaluation (pycocoevalcap): BLEU-1..4, METEOR, ROUGE_L and CIDEr against all
reference captions of each image, after PTB tokenisation. SPICE is reported
as null: it downloads Stanford CoreNLP models at run time.
"""

import argparse
import functools
import json
import re
import shutil
import sys
from pathlib import Path

import torch
import transformers
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import data
import decoding
import shapes
import skills
from runs import load_run

SPICE_NOTE = "SPICE is not computed: it downloads Stanford CoreNLP models at run time"


def plain_tokenize(captions_by_image):
    """The fallback when Java (needed by the PTB tokenizer) is missing: lowercase, words only."""
    return {
        k: [" ".join(re.findall(r"[a-z0-9]+", c["caption"].lower())) for c in v] for k, v in captions_by_image.items()
    }


@functools.cache
def meteor_scorer():
    """One METEOR scorer per process: each is a Java process that takes seconds to start."""
    return Meteor()


def caption_metrics(predictions):
    """BLEU-1..4, METEOR, ROUGE_L, CIDEr of predictions ({"caption", "references"} each),
    computed by pycocoevalcap exactly as the COCO caption evaluation does. CIDEr's IDF
    comes from the evaluated set: it is only comparable on a whole split."""

    # one caption per line for the PTB tokenizer: no line breaks of any kind inside a caption
    one_line = lambda text: " ".join(text.split())
    gts = {i: [{"caption": one_line(r)} for r in p["references"]] for i, p in enumerate(predictions)}
    res = {i: [{"caption": one_line(p["caption"])}] for i, p in enumerate(predictions)}
    java = shutil.which("java") is not None
    tokenize = PTBTokenizer().tokenize if java else plain_tokenize
    gts, res = tokenize(gts), tokenize(res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    scores["METEOR"] = meteor_scorer().compute_score(gts, res)[0] if java else None
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["SPICE"] = None
    scores["notes"] = [SPICE_NOTE] + (
        []
        if java
        else [
            "no java found: METEOR skipped, and BLEU/ROUGE_L/CIDEr use a plain lowercase word tokenizer "
            "instead of the PTB tokenizer, so they are not comparable with published figures"
        ]
    )
    return scores


def shapes_figures(records, captions):
    """attribute_accuracy (the set of (colour, shape) named is the scene's), relation_accuracy
    (pairs: both objects named and the relation right, in the order named) and exact match."""
    columns = skills.per_image_skills(captions, [r.meta for r in records])
    pairs = [d for d, r in zip(columns["direction"], records) if r.meta["relation"] is not None]
    return {
        "attribute_accuracy": sum(columns["objects"]) / len(records),
        "relation_accuracy": sum(d or 0 for d in pairs) / max(len(pairs), 1),
        "exact_match": sum(c in r.captions for r, c in zip(records, captions)) / len(records),
    }


def quick_score(model, processor, tokenizer, records, device, **decode_kwargs):
    """A cheap validation score for curves during training, from greedy captions of a few images:
    on the shapes data the object and direction accuracies, elsewhere BLEU-4 (plain tokenizer,
    no Java)."""
    captions = decoding.caption_images(
        model,
        processor,
        tokenizer,
        [r.image for r in records],
        len(records),
        device,
        desc="validation score",
        **decode_kwargs,
    )
    if all(r.meta.get("objects") for r in records):
        figures = skills.skill_figures(captions, [r.meta for r in records])
        return {"objects": figures["objects"]["accuracy"], "direction": figures["direction"]["accuracy"]}
    gts = plain_tokenize({i: [{"caption": c} for c in r.captions] for i, r in enumerate(records)})
    res = plain_tokenize({i: [{"caption": c}] for i, c in enumerate(captions)})
    return {"bleu4": Bleu(4).compute_score(gts, res, verbose=0)[0][3]}


OBJECT_WORDS = re.compile(rf"\b({'|'.join(shapes.COLOURS)})\s+({'|'.join(shapes.SHAPES)})\b")


def patch_cover(mask, grid):
    """Which of the grid x grid patches a CANVAS x CANVAS object mask touches ([grid * grid] bool)."""
    cell = mask.shape[0] // grid
    return mask.reshape(grid, cell, grid, cell).any((1, 3)).reshape(-1)


def attention_shares(weights, named, other=None):
    """One object word's attention over the patches ([P], summing to 1) split by object.

    weights is a numpy array; named and other are [P] bool covers of the object the word names and of the pair's other
    object. {"named", "area"} and, for a pair, {"other", "selectivity", "equal"}: selectivity is
    named / (named + other) (None when neither object gets any attention), equal is what
    attention spread evenly over both objects' patches would give (the named object's share of
    their patches)."""
    row = {"named": float(weights[named].sum()), "area": float(named.mean())}
    if other is not None:
        row["other"] = float(weights[other].sum())
        both = row["named"] + row["other"]
        row["selectivity"] = row["named"] / both if both > 0 else None
        row["equal"] = float(named.sum() / (named.sum() + other.sum()))
    return row


def summarise_shares(rows):
    """The mean of each share over the words it applies to, and how many words that is."""
    pairs = [r for r in rows if "other" in r]
    selective = [r for r in pairs if r["selectivity"] is not None]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {
        "object_words": len(rows),
        "attention_on_object": mean([r["named"] for r in rows]),
        "object_area": mean([r["area"] for r in rows]),
        "pair_words": len(pairs),
        "on_named_object": mean([r["named"] for r in pairs]),
        "on_other_object": mean([r["other"] for r in pairs]),
        "selectivity": mean([r["selectivity"] for r in selective]),
        "selectivity_if_equal": mean([r["equal"] for r in selective]),
    }


@torch.no_grad()
def attention_on_objects(model, processor, tokenizer, records, device="cpu", max_new_tokens=33):
    """Where each object word looks, as numbers (attention_shares, summarised).

    For each shapes image the greedy caption is generated; for every shape word that names one
    of the scene's objects (by colour and shape), the attention of the position that produced it
    (model.image_attention) is summed over the patches of the object it names and, on pairs, of
    the other object. On pairs, attention that finds the object it names gives a selectivity
    near 1; attention on both objects alike gives selectivity_if_equal, whatever it does with the
    background."""
    eos = tokenizer.eos_token_id
    rows = []
    for r in records:
        pixels = processor(images=[data.read_image(r.image)], return_tensors="pt")["pixel_values"].to(device)
        state = model.encode_images(pixel_values=pixels)
        tokens = decoding.decode(model, state, eos, max_new_tokens)[0]
        if not tokens:
            continue
        weights = model.image_attention(state, torch.tensor([[eos] + tokens[:-1]], device=device))[0]  # [T, P]
        grid = int(weights.shape[-1] ** 0.5)
        ends = [len(tokenizer.decode(tokens[: k + 1])) for k in range(len(tokens))]  # where each token's text ends
        text = tokenizer.decode(tokens)
        covers = [patch_cover(m, grid) for m in shapes.object_masks(r.meta)]
        named = {(o["colour"], o["shape"]): k for k, o in enumerate(r.meta["objects"])}
        for match in OBJECT_WORDS.finditer(text):
            j = named.get(match.groups())
            if j is None:
                continue
            k = next(k for k, end in enumerate(ends) if end >= match.end(2))  # the token completing the shape word
            other = covers[1 - j] if len(covers) == 2 else None
            rows.append(attention_shares(weights[k].float().cpu().numpy(), covers[j], other))
    return summarise_shares(rows)


def mirrored_captions(model, processor, tokenizer, records, batch_size, device, **decode_kwargs):
    """The flip control: each pair drawn mirrored (left-right pairs horizontally, above-below
    pairs vertically, so the true relation inverts) and captioned; None for single objects.
    The mirrored scene is drawn afresh rather than the pixels flipped, so that a triangle
    stays upright, as the generator draws every triangle."""
    scenes = [skills.mirror(shapes.render_scene(r.meta), r.meta) for r in records]
    pairs = [k for k, m in enumerate(scenes) if m is not None]
    images = [shapes.render_scene(scenes[k][1]) for k in pairs]
    captions = decoding.caption_images(
        model, processor, tokenizer, images, batch_size, device, desc="flip control", **decode_kwargs
    )
    out = [None] * len(records)
    for k, c in zip(pairs, captions):
        out[k] = c
    return out


def evaluate_split(model, processor, tokenizer, records, device="cpu", batch_size=64, metrics=True, **decode_kwargs):
    """(figures, predictions) for a split. Shapes data also gets the skills one by one
    (skills.py), the flip control and the blind control, and each prediction its per-image
    skills (for paired comparisons). An image that fails to decode is reported and left out."""
    records, bad = data.decode_check(records)
    for message in bad:
        print(f"left out of the evaluation: {message}")
    if not records:
        raise data.DataError(f"no image to evaluate ({len(bad)} left out as unreadable)")
    images = [r.image for r in records]  # decoded a batch at a time: a whole split may not fit in memory
    stats = {}
    captions = decoding.caption_images(
        model, processor, tokenizer, images, batch_size, device, stats=stats, **decode_kwargs
    )
    predictions = [{"image": str(r.image), "caption": c, "references": r.captions} for r, c in zip(records, captions)]
    figures = {
        "n_images": len(records),
        "generate_tokens_per_s": stats["tokens"] / stats["seconds"],
        "exact_match": sum(c in r.captions for r, c in zip(records, captions)) / len(records),
    }
    if metrics:
        figures.update(caption_metrics(predictions))
    if all(r.meta.get("objects") for r in records):
        scenes = [r.meta for r in records]
        mirrored = mirrored_captions(model, processor, tokenizer, records, batch_size, device, **decode_kwargs)
        figures.update(shapes_figures(records, captions))
        figures["skills"] = skills.skill_figures(captions, scenes, mirrored)
        columns = skills.per_image_skills(captions, scenes, mirrored)
        for k, p in enumerate(predictions):
            p["mirrored_caption"] = mirrored[k]
            p["skills"] = {f: columns[f][k] for f in (*skills.FIGURES, "category")}
        # the blind control: each image captioned from the next image's pixels, scored against its own scene
        blind = decoding.caption_images(
            model,
            processor,
            tokenizer,
            images[1:] + images[:1],
            batch_size,
            device,
            desc="blind control",
            **decode_kwargs,
        )
        figures.update({f"blind_{k}": v for k, v in shapes_figures(records, blind).items()})
        figures["blind_skills"] = skills.skill_figures(blind, scenes)
    return figures, predictions


def evaluate_run(model, processor, tokenizer, splits, run_dir, split="test", device="cpu", out=None, **decode_kwargs):
    """Write eval_<split>.json (or `out`) with the compositional split nested, when there is one,
    and predictions_<split>.jsonl beside it; returns the figures. With `out` the run's own
    files are left as they are: its predictions stay those of its own evaluation."""
    where = Path(out).parent if out else Path(run_dir)
    model.eval()
    figures, predictions = evaluate_split(model, processor, tokenizer, splits[split], device, **decode_kwargs)
    figures = {"split": split, "split_id": data.split_id(splits[split]), **figures}
    data.write_jsonl(where / f"predictions_{split}.jsonl", predictions)
    if split == "test" and splits.get("compositional"):
        comp, comp_predictions = evaluate_split(
            model, processor, tokenizer, splits["compositional"], device, **decode_kwargs
        )
        figures["compositional"] = comp
        data.write_jsonl(where / "predictions_compositional.jsonl", comp_predictions)
    Path(out or where / f"eval_{split}.json").write_text(json.dumps(figures, indent=2))
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory written by a training script")
    p.add_argument("--split", default="test")
    decoding.add_options(p)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--out",
        help="where to write the JSON, the predictions going beside it (default RUN_DIR/eval_<split>.json)",
    )
    args = p.parse_args(argv)
    if args.out and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):
        raise SystemExit(f"error: --out {args.out}: expected a file name in an existing folder")
    if not sys.stderr.isatty():  # a log wants lines, not progress-bar refreshes: an error stays one line
        transformers.utils.logging.disable_progress_bar()
    try:
        model, processor, tokenizer, config = load_run(args.checkpoint)
        splits = data.splits_for(config, strict=False)
    except (ValueError, OSError) as e:  # a bad run folder or missing data: one line, no traceback
        raise SystemExit(f"error: {e}") from None
    if not splits.get(args.split):
        what = "no split" if args.split not in splits else "no image in its split"
        raise SystemExit(f"error: {config['data_dir']} has {what} {args.split!r} (it has {', '.join(splits)})")
    model.to(args.device)
    try:
        figures = evaluate_run(
            model,
            processor,
            tokenizer,
            splits,
            args.checkpoint,
            args.split,
            args.device,
            args.out,
            **decoding.options(args, config),
        )
    except data.DataError as e:
        raise SystemExit(f"error: {config['data_dir']} split {args.split!r}: {e}") from None
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
