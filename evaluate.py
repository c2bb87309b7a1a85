"""
Evaluate a checkpoint on a split: caption every image, then score.

    python evaluate.py --checkpoint RUN_DIR [--split test] [--strategy greedy] [--out FILE]

For the shapes data the figures say what the captions get right about the
image: attribute accuracy (the predicted set of (colour, shape) objects equals
the truth), relation accuracy (pairs), exact match (any reference), and the same
with every image's features swapped for another image's (the blind control:
how much the captions depend on the image at all).
"""
import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

import data
from captioner import decode, load_run


def caption_images(model, processor, tokenizer, images, batch_size=64, device="cpu", desc="captioning",
                   **decode_kwargs):
    """Captions (strings) for a list of PIL images, batched and KV-cached by default."""
    captions = []
    for k in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, unit="batch"):
        pixels = processor(images=images[k:k + batch_size], return_tensors="pt")["pixel_values"].to(device)
        state = model.encode_images(pixel_values=pixels)
        ids = decode(model, state, tokenizer.eos_token_id, **decode_kwargs)
        captions += [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
    return captions


def shapes_figures(records, captions):
    """Attribute / relation accuracy and exact match of captions against the scenes drawn."""
    attr = rel = pairs = exact = 0
    for r, c in zip(records, captions):
        truth_objects, truth_relation = data.scene_truth(r.meta)
        attr += data.parse_objects(c) == truth_objects
        exact += c in r.captions
        if truth_relation is not None:
            pairs += 1
            rel += data.parse_relation(c) == truth_relation
    n = len(records)
    return {"attribute_accuracy": attr / n, "relation_accuracy": rel / max(pairs, 1), "exact_match": exact / n}


def evaluate_split(model, processor, tokenizer, records, device="cpu", batch_size=64, **decode_kwargs):
    """(figures, predictions) for a split; shapes data also gets the blind control."""
    images = [data.read_image(r.image) for r in records]
    captions = caption_images(model, processor, tokenizer, images, batch_size, device, **decode_kwargs)
    predictions = [{"image": str(r.image), "caption": c, "references": r.captions}
                   for r, c in zip(records, captions)]
    figures = {"n_images": len(records),
               "exact_match": sum(c in r.captions for r, c in zip(records, captions)) / len(records)}
    if all(r.meta.get("objects") for r in records):
        figures.update(shapes_figures(records, captions))
        # each image captioned from the next image's pixels, scored against its own scene
        blind = caption_images(model, processor, tokenizer, images[1:] + images[:1], batch_size, device,
                               desc="blind control", **decode_kwargs)
        figures.update({f"blind_{k}": v for k, v in shapes_figures(records, blind).items()})
    return figures, predictions


def evaluate_run(model, processor, tokenizer, splits, run_dir, split="test", device="cpu", out=None,
                 **decode_kwargs):
    """Write eval_<split>.json (with the compositional split nested, when there is one)
    and predictions_<split>.jsonl; returns the figures."""
    run_dir = Path(run_dir)
    model.eval()
    figures, predictions = evaluate_split(model, processor, tokenizer, splits[split], device, **decode_kwargs)
    figures = {"split": split, **figures}
    data.write_jsonl(run_dir / f"predictions_{split}.jsonl", predictions)
    if split == "test" and "compositional" in splits:
        comp, comp_predictions = evaluate_split(model, processor, tokenizer, splits["compositional"], device,
                                                **decode_kwargs)
        figures["compositional"] = comp
        data.write_jsonl(run_dir / "predictions_compositional.jsonl", comp_predictions)
    Path(out or run_dir / f"eval_{split}.json").write_text(json.dumps(figures, indent=2))
    return figures


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory written by a training script")
    p.add_argument("--split", default="test")
    p.add_argument("--strategy", default="greedy", choices=["greedy", "top-k", "top-p"])
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="where to write the JSON (default RUN_DIR/eval_<split>.json)")
    args = p.parse_args()
    model, processor, tokenizer, config = load_run(args.checkpoint)
    model.to(args.device)
    splits = data.load_splits(config["data"], config["data_dir"], config["seed"])
    if args.split not in splits:
        raise SystemExit(f"{config['data_dir']} has no split {args.split!r} (it has {', '.join(splits)})")
    figures = evaluate_run(model, processor, tokenizer, splits, args.checkpoint, args.split, args.device, args.out,
                           strategy=args.strategy, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
