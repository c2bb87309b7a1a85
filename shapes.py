"""
The shapes world of the offline demo: 6 colours x 4 shapes x 2 sizes, one object
or a pair in one of 4 spatial relations, drawn on a 64x64 canvas.

Sampling and rendering scenes, their reference captions, the dataset written to
disk (images, captions.jsonl, metadata.jsonl, splits.json), and reading a
caption back into the objects and relation it names, for scoring.
"""

import json
import random
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

import data

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 0),
    "purple": (140, 40, 170),
    "orange": (245, 130, 0),
}
SHAPES = ["circle", "square", "triangle", "cross"]
SIZES = {"small": 7, "large": 12}  # radius in pixels on a 64x64 canvas
RELATIONS = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
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
        return [
            a,
            f"there is {a}",
            f"{a} on a white background",
            f"a picture of {a}",
            f"a single {o['size']} {o['colour']} {o['shape']}",
        ]
    a, b = phrase(objs[0]), phrase(objs[1])
    rel, inv = scene["relation"], RELATIONS[scene["relation"]]
    return [f"{a} {rel} {b}", f"{b} {inv} {a}", f"there is {a} {rel} {b}", f"{a} is {rel} {b}", f"{b} is {inv} {a}"]


def make_shapes_dataset(root, n_train=4000, n_val=250, n_test=500, n_compositional=500, seed=0):
    """Write PNG images, captions.jsonl, metadata.jsonl and splits.json under root.

    The compositional split only has images with at least one held-out
    (colour, shape) pair; no other split ever draws one. Two scenes can render to
    the same pixels (a lone object lands on the same pixels), so a scene whose image
    another split already holds is drawn again: no image is in two splits."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT]
    everything = [(c, s) for c in COLOURS for s in SHAPES]
    splits = {"train": n_train, "val": n_val, "test": n_test, "compositional": n_compositional}
    names, captions, metadata = {k: [] for k in splits}, [], []
    index, split_of_pixels = 0, {}
    for split, count in splits.items():
        while len(names[split]) < count:
            scene = sample_scene(rng, everything if split == "compositional" else seen)
            pairs = {(o["colour"], o["shape"]) for o in scene["objects"]}
            if split == "compositional" and not pairs & HELD_OUT:
                continue
            image = render_scene(scene)
            if split_of_pixels.setdefault(image.tobytes(), split) != split:
                continue
            name = f"images/{index:05d}.png"
            index += 1
            image.save(root / name)
            names[split].append(name)
            captions += [{"image": name, "caption": c} for c in describe(scene)]
            metadata.append({"image": name, **scene})
    data.write_jsonl(root / "captions.jsonl", captions)
    data.write_jsonl(root / "metadata.jsonl", metadata)
    (root / "splits.json").write_text(json.dumps(names))
    return root


# -----------------------------------------------------------------------------
# the (colour, shape) pairs a caption names and a scene holds: a check on skills.py's reading,
# written apart from it

_OBJECT = re.compile(r"\b({})\s+({})\b".format("|".join(COLOURS), "|".join(SHAPES)))


def parse_objects(caption):
    return set(_OBJECT.findall(caption.lower()))


def scene_objects(meta):
    return {(o["colour"], o["shape"]) for o in meta["objects"]}
