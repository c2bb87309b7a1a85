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
import os
import sys
from pathlib import Path

import torch
from PIL import Image

import data
import decoding
from runs import load_run

# photo and bitmap formats, of those this Pillow can open (not its stubs: HDF5, GRIB, EPS without
# Ghostscript, MPEG, which would fail on every file of a mixed folder)
PHOTO_SUFFIXES = ".jpg .jpeg .jpe .jfif .png .apng .bmp .gif .webp .tif .tiff .ppm .pgm .pbm .pnm .tga .ico .avif .qoi"
Image.init()
IMAGE_SUFFIXES = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN} & set(
    PHOTO_SUFFIXES.split()
)


def folder_files(folder):
    """(image files, how many other files) under a folder and its sub-folders, symlinked ones
    included (each real folder once); hidden files and folders (.git, macOS ._ files) left out."""
    images, others, seen = [], 0, set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a symlink back up the tree
            dirs.clear()
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            path = Path(root) / name
            if name.startswith(".") or not path.is_file():
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path)
            else:
                others += 1
    return sorted(images), others


def expand_paths(paths):
    """(image files, errors, notes): folders become their image files, sorted."""
    files, errors, notes = [], [], []
    for p in map(Path, paths):
        if p.is_dir():
            found, others = folder_files(p)
            files += found
            if not found:
                errors.append(f"{p}: no images in this folder")
            elif others:
                notes.append(f"{p}: {others} file(s) without an image suffix left out")
        elif p.exists():
            files.append(p)
        else:
            errors.append(f"{p}: no such file or folder")
    return files, errors, notes


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
        generator = torch.Generator(args.device).manual_seed(args.seed)
    except RuntimeError as e:  # no such device here, or no driver for it
        raise SystemExit(f"error: --device {args.device}: {' '.join(str(e).split())}") from None
    try:
        model, processor, tokenizer, config = load_run(args.checkpoint)
    except (ValueError, OSError) as e:  # not a run, the other variant, missing backbones: one line
        raise SystemExit(f"error: {e}") from None
    model.to(args.device)

    files, errors, notes = expand_paths(args.paths)
    for line in errors + notes:
        print(line, file=sys.stderr)
    failed = bool(errors)
    # a batch at a time: a folder of photos is never all in memory at once
    for start in range(0, len(files), args.batch_size):
        images, good = [], []
        for f in files[start : start + args.batch_size]:
            try:
                images.append(data.read_image(f))
                good.append(f)
            except data.DataError as e:
                print(e, file=sys.stderr)
                failed = True
        if not images:
            continue
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
            print(f"{f}\t{c}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
