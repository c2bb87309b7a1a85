"""
Datasets for captioning: where images and their reference captions come from,
how they are split (always by image), and how they become batches.

Every source yields Records: one image path with all of its reference captions
(and, for the generated shapes, the objects drawn in it). Sources:
  shapes    procedurally generated coloured shapes (the offline demo)
  folder    a folder of images + captions.jsonl ({"image", "caption"} per line)
  flickr8k  the official Flickr8k layout and splits
"""
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from tqdm import tqdm


@dataclass
class Record:
    image: Path
    captions: list
    meta: dict = field(default_factory=dict)


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the problem."""


# -----------------------------------------------------------------------------
# the shapes world: 6 colours x 4 shapes x 2 sizes, one object or a pair

COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 60, 220),
           "yellow": (235, 205, 0), "purple": (140, 40, 170), "orange": (245, 130, 0)}
SHAPES = ["circle", "square", "triangle", "cross"]
SIZES = {"small": 7, "large": 12}  # radius in pixels on a 64x64 canvas
RELATIONS = {"to the left of": "to the right of", "to the right of": "to the left of",
             "above": "below", "below": "above"}
# (colour, shape) pairs never drawn in train/val: the compositional test holds them
HELD_OUT = {("red", "triangle"), ("blue", "cross"), ("green", "circle"), ("yellow", "square")}
CANVAS = 64


def draw_object(draw, shape, cx, cy, r, fill):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
    elif shape == "cross":
        w = r * 0.38
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def sample_object(rng, allowed_pairs):
    colour, shape = allowed_pairs[rng.randrange(len(allowed_pairs))]
    return {"colour": colour, "shape": shape, "size": rng.choice(list(SIZES))}


def place_pair(rng, a, b, relation):
    """Centres for a and b so that 'a <relation> b' is unambiguous on the canvas."""
    ra, rb = SIZES[a["size"]], SIZES[b["size"]]
    horizontal = relation in ("to the left of", "to the right of")
    while True:
        xa, ya = rng.uniform(ra + 1, CANVAS - ra - 1), rng.uniform(ra + 1, CANVAS - ra - 1)
        xb, yb = rng.uniform(rb + 1, CANVAS - rb - 1), rng.uniform(rb + 1, CANVAS - rb - 1)
        along, across = (xb - xa, yb - ya) if horizontal else (yb - ya, xb - xa)
        if relation in ("to the right of", "below"):
            along = -along
        if along >= ra + rb + 3 and abs(across) < along / 2:
            return (xa, ya), (xb, yb)


def sample_scene(rng, allowed_pairs, pair_fraction=0.6):
    """One or two objects, their centres and (for pairs) the relation of the first to the second."""
    a = sample_object(rng, allowed_pairs)
    if rng.random() >= pair_fraction:
        r = SIZES[a["size"]]
        a["x"], a["y"] = rng.uniform(r + 1, CANVAS - r - 1), rng.uniform(r + 1, CANVAS - r - 1)
        return {"objects": [a], "relation": None}
    while True:
        b = sample_object(rng, allowed_pairs)
        if (b["colour"], b["shape"]) != (a["colour"], a["shape"]):
            break
    relation = rng.choice(list(RELATIONS))
    (a["x"], a["y"]), (b["x"], b["y"]) = place_pair(rng, a, b, relation)
    return {"objects": [a, b], "relation": relation}


def render_scene(scene):
    image = Image.new("RGB", (CANVAS, CANVAS), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for o in scene["objects"]:
        draw_object(draw, o["shape"], o["x"], o["y"], SIZES[o["size"]], COLOURS[o["colour"]])
    return image


def object_masks(scene):
    """One boolean CANVAS x CANVAS mask per object (for the vision tower's pretraining)."""
    masks = []
    for o in scene["objects"]:
        m = Image.new("L", (CANVAS, CANVAS), 0)
        draw_object(ImageDraw.Draw(m), o["shape"], o["x"], o["y"], SIZES[o["size"]], 255)
        masks.append(np.asarray(m) > 127)
    return masks


def phrase(o):
    return f"a {o['size']} {o['colour']} {o['shape']}"


def describe(scene):
    """About five reference captions for a scene, all in the same small vocabulary."""
    objs = scene["objects"]
    if len(objs) == 1:
        a = phrase(objs[0])
        o = objs[0]
        return [a, f"there is {a}", f"{a} on a white background", f"a picture of {a}",
                f"a single {o['size']} {o['colour']} {o['shape']}"]
    a, b = phrase(objs[0]), phrase(objs[1])
    rel, inv = scene["relation"], RELATIONS[scene["relation"]]
    return [f"{a} {rel} {b}", f"{b} {inv} {a}", f"there is {a} {rel} {b}",
            f"{a} is {rel} {b}", f"{b} is {inv} {a}"]


def make_shapes_dataset(root, n_train=4000, n_val=250, n_test=500, n_compositional=500, seed=0):
    """Write PNG images, captions.jsonl, metadata.jsonl and splits.json under root.

    The compositional split only has images with at least one held-out
    (colour, shape) pair; no other split ever draws one."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    everything = [(c, s) for c in COLOURS for s in SHAPES]
    splits = {"train": n_train, "val": n_val, "test": n_test, "compositional": n_compositional}
    names, captions, metadata = {k: [] for k in splits}, [], []
    index = 0
    for split, count in splits.items():
        while len(names[split]) < count:
            scene = sample_scene(rng, everything if split == "compositional" else seen)
            pairs = {(o["colour"], o["shape"]) for o in scene["objects"]}
            if split == "compositional" and not pairs & HELD_OUT:
                continue
            name = f"images/{index:05d}.png"
            index += 1
            render_scene(scene).save(root / name)
            names[split].append(name)
            captions += [{"image": name, "caption": c} for c in describe(scene)]
            metadata.append({"image": name, **scene})
    write_jsonl(root / "captions.jsonl", captions)
    write_jsonl(root / "metadata.jsonl", metadata)
    (root / "splits.json").write_text(json.dumps(names))
    return root


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


# -----------------------------------------------------------------------------
# reading what a caption says about the shapes (for attribute accuracy)

_OBJECT = re.compile(r"\b(%s)\s+(%s)\b" % ("|".join(COLOURS), "|".join(SHAPES)))
_RELATION = re.compile(r"(%s)" % "|".join(sorted(RELATIONS, key=len, reverse=True)))


def parse_objects(caption):
    return set(_OBJECT.findall(caption))


def parse_relation(caption):
    """(first object, relation, second object) normalised so 'left of' and 'right of' agree."""
    objs = _OBJECT.findall(caption)
    rel = _RELATION.search(caption)
    if len(objs) != 2 or rel is None:
        return None
    (a, b), r = objs, rel.group(1)
    if r in ("to the right of", "below"):
        a, b, r = b, a, RELATIONS[r]
    return (a, r, b)


def scene_truth(meta):
    objs = [(o["colour"], o["shape"]) for o in meta["objects"]]
    return set(objs), (parse_relation(describe(meta)[0]) if meta["relation"] else None)


# -----------------------------------------------------------------------------
# loading a dataset from disk

def read_image(path):
    """RGB image with its EXIF orientation applied; a clear error if unreadable."""
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read image ({e})") from None


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "image" not in row or "caption" not in row:
                raise DataError(f'{path}:{n}: expected {{"image": ..., "caption": ...}}')
            rows.append(row)
    return rows


def group_captions(root, pairs, where):
    """[(image name, caption)] -> one Record per image, in first-seen order."""
    by_image = {}
    for name, caption in pairs:
        by_image.setdefault(name, []).append(caption.strip())
    records = []
    for name, caps in by_image.items():
        path = root / name
        if not path.is_file():
            raise DataError(f"{where}: names image {name}, which is not at {path}")
        records.append(Record(path, caps))
    return records


def load_folder(root):
    root = Path(root)
    captions_file = root / "captions.jsonl"
    if not captions_file.is_file():
        raise DataError(f"{root}: no captions.jsonl here. A folder dataset is images plus "
                        'captions.jsonl with one {"image": "relative/path.jpg", "caption": "..."} per line')
    rows = read_jsonl(captions_file)
    records = group_captions(root, [(r["image"], r["caption"]) for r in rows], captions_file)
    meta_file = root / "metadata.jsonl"
    if meta_file.is_file():
        meta = {m["image"]: m for m in map(json.loads, meta_file.read_text().splitlines())}
        for r in records:
            r.meta = meta.get(str(r.image.relative_to(root)), {})
    return records


def load_flickr8k(root):
    root = Path(root)
    token_file, image_dir = root / "Flickr8k.token.txt", root / "Flicker8k_Dataset"
    split_files = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                   "test": "Flickr_8k.testImages.txt"}
    needed = [token_file, image_dir] + [root / f for f in split_files.values()]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise DataError(f"Flickr8k is not complete under {root}; missing: {', '.join(missing)}. "
                        "Put the images in Flicker8k_Dataset/ (the official, misspelled name) and the "
                        "text files beside it, or pass --data-dir")
    pairs = []
    for n, line in enumerate(token_file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            raise DataError(f"{token_file}:{n}: expected '<image>.jpg#<n><TAB><caption>'")
        pairs.append((key.split("#")[0], caption))
    records = group_captions(image_dir, pairs, token_file)
    by_name = {r.image.name: r for r in records}
    splits = {}
    for split, fname in split_files.items():
        names = [n.strip() for n in (root / fname).read_text().splitlines() if n.strip()]
        splits[split] = [by_name[n] for n in names if n in by_name]
    return splits


def split_by_image(records, seed=0, val_fraction=0.05, test_fraction=0.05):
    """Shuffle images (never caption rows) with a seed and cut them into splits."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(records) * val_fraction))
    n_test = max(1, int(len(records) * test_fraction))
    pick = lambda idx: [records[i] for i in idx]
    return {"train": pick(order[n_val + n_test:]), "val": pick(order[:n_val]),
            "test": pick(order[n_val:n_val + n_test])}


def load_splits(source, data_dir, seed=0):
    """{split name: [Record]} for a source; a folder's splits.json wins over a random split."""
    data_dir = Path(data_dir)
    if source == "flickr8k":
        return load_flickr8k(data_dir)
    if source not in ("folder", "shapes"):
        raise DataError(f"unknown data source {source!r} (expected shapes, folder or flickr8k)")
    records = load_folder(data_dir)
    splits_file = data_dir / "splits.json"
    if not splits_file.is_file():
        return split_by_image(records, seed)
    by_name = {str(r.image.relative_to(data_dir)): r for r in records}
    splits = {}
    for split, names in json.loads(splits_file.read_text()).items():
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise DataError(f"{splits_file}: split {split!r} names {unknown[0]}, which has no caption")
        splits[split] = [by_name[n] for n in names]
    return splits


# -----------------------------------------------------------------------------
# captions -> model inputs

def encode_captions(tokenizer, captions, max_tokens):
    """input ids = [BOS] + caption, targets = caption + [EOS], right-padded.

    Qwen base models have no BOS token, so EOS stands in for it. Padding
    targets are -100, never the pad id: pad == EOS and EOS must be learned."""
    eos = tokenizer.eos_token_id
    token_lists = [tokenizer(c, add_special_tokens=False)["input_ids"][:max_tokens] for c in captions]
    T = max(len(t) for t in token_lists) + 1
    input_ids = torch.full((len(captions), T), eos, dtype=torch.long)
    targets = torch.full((len(captions), T), -100, dtype=torch.long)
    mask = torch.zeros((len(captions), T), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        n = len(toks) + 1
        input_ids[i, 1:n] = torch.tensor(toks, dtype=torch.long)
        targets[i, :n] = torch.tensor(toks + [eos], dtype=torch.long)
        mask[i, :n] = 1
    return input_ids, targets, mask


class CaptionRows(torch.utils.data.Dataset):
    """One item per (image, reference caption) pair of a split.

    Items carry the image's index so that cached features can be looked up;
    without a feature cache the image itself is loaded."""

    def __init__(self, records, load_pixels):
        self.records = records
        self.rows = [(i, c) for i, r in enumerate(records) for c in r.captions]
        self.load_pixels = load_pixels

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        i, caption = self.rows[k]
        image = read_image(self.records[i].image) if self.load_pixels else None
        return i, image, caption


# -----------------------------------------------------------------------------
# the frozen vision tower's features, computed once per image

def compute_features(encode, processor, paths, batch_size=64, desc="image features"):
    """[N, P, D] fp16 patch features for image paths, in order, under no_grad."""
    chunks = []
    for k in tqdm(range(0, len(paths), batch_size), desc=desc, leave=False, unit="batch"):
        images = [read_image(p) for p in paths[k:k + batch_size]]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            chunks.append(encode(pixels).to(torch.float16).cpu())
    return torch.cat(chunks)
