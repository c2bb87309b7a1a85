"""
Caption images with a trained checkpoint; prints path<TAB>caption per image.

    python generate.py --checkpoint RUN_DIR images/ photo.jpg ... [--strategy greedy|top-k|top-p|beam]

The variant is read from the checkpoint. Decoding is batched and uses Qwen's KV
cache, with the image side computed once per image; --no-kv-cache recomputes
the whole sequence for every token (slow; for checking). A missing or
unreadable input is reported on stderr, the others are still captioned, and the
exit status is 1 if any input failed.
"""

import argparse
import sys
from pathlib import Path

import torch

import data
import decoding
from runs import load_run

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def expand_paths(paths):
    """(image files, errors): folders become their image files, sorted."""
    files, errors = [], []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
            files += found
            if not found:
                errors.append(f"{p}: no images in this folder")
        elif p.exists():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory written by a training script")
    p.add_argument("paths", nargs="+", help="image files or folders")
    decoding.add_options(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence at every step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    try:
        model, processor, tokenizer, config = load_run(args.checkpoint)
    except (ValueError, OSError) as e:  # not a run, the other variant, missing backbones: one line
        raise SystemExit(f"error: {e}") from None

    files, errors = expand_paths(args.paths)
    images, good = [], []
    for f in files:
        try:
            images.append(data.read_image(f))
            good.append(f)
        except data.DataError as e:
            errors.append(str(e))
    for e in errors:
        print(e, file=sys.stderr)
    if images:
        model.to(args.device)
        generator = torch.Generator(args.device).manual_seed(args.seed)
        captions = decoding.caption_images(
            model,
            processor,
            tokenizer,
            images,
            args.batch_size,
            args.device,
            use_cache=not args.no_kv_cache,
            generator=generator,
            **decoding.options(args, config),
        )
        for f, c in zip(good, captions):
            print(f"{f}\t{c}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
