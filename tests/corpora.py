"""Datasets written to disk for the tests: each source in its own layout (test_data loads them,
test_train trains from them, test_generate captions from those runs), and folder datasets with
one planted problem of each kind (bad images, bad caption lines) among good records."""

import json
import random
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import shapes

# -----------------------------------------------------------------------------
# every source, tiny, in its own on-disk layout

PAIRS = [("red", "circle"), ("blue", "square"), ("green", "cross"), ("orange", "triangle"), ("purple", "circle")]


def make_image(i):
    scene = shapes.sample_scene(random.Random(i), PAIRS)
    return shapes.render_scene(scene), shapes.describe(scene)


def n_refs(i):
    """A different number of references for neighbouring images: 2, 3 or 4."""
    return 2 + i % 3


class Written:
    """What a fixture wrote: {split: {image file name: [captions]}} (order kept)."""

    def __init__(self):
        self.splits = {}

    def add(self, split, name, captions):
        self.splits.setdefault(split, {})[name] = list(captions)

    def sizes(self):
        return {k: len(v) for k, v in self.splits.items()}

    def describe(self):
        """The 'data (...)' line's account: '<split> N images (M captions), ...'."""
        return ", ".join(f"{k} {len(v)} images ({sum(map(len, v.values()))} captions)" for k, v in self.splits.items())


def write_flickr8k(root):
    """Flicker8k_Dataset/ with JPEGs, Flickr8k.token.txt and the three split files
    (5 train, 2 dev, 2 test; one more image in the folder that no split names)."""
    images = root / "Flicker8k_Dataset"
    images.mkdir(parents=True)
    written, tokens = Written(), []
    plan = ["train"] * 5 + ["val"] * 2 + ["test"] * 2 + [None]
    for i, split in enumerate(plan):
        image, captions = make_image(i)
        name = f"{1000 + i}_{i:04x}.jpg"
        image.save(images / name, quality=90)
        captions = captions[: n_refs(i)]
        tokens += [f"{name}#{k}\t{c}" for k, c in enumerate(captions)]
        if split:
            written.add(split, name, captions)
    random.Random(0).shuffle(tokens)  # captions of an image need not be adjacent
    (root / "Flickr8k.token.txt").write_text("\n".join(tokens) + "\n")
    for fname, split in (("trainImages", "train"), ("devImages", "val"), ("testImages", "test")):
        (root / f"Flickr_8k.{fname}.txt").write_text("\n".join(written.splits[split]) + "\n")
    return written


KARPATHY_PLAN = ["train"] * 4 + ["restval"] * 2 + ["val"] * 2 + ["test"] * 2


def write_karpathy(root):
    """dataset_flickr8k.json (4 train, 2 restval, 2 val, 2 test) and images/.
    Returns {karpathy split: {name: captions}}."""
    (root / "images").mkdir(parents=True)
    entries, by_split = [], {}
    for i, split in enumerate(KARPATHY_PLAN):
        image, captions = make_image(20 + i)
        name = f"k{i:03d}.jpg"
        image.save(root / "images" / name, quality=90)
        captions = captions[: n_refs(i)]
        entries.append(
            {
                "filename": name,
                "imgid": i,
                "split": split,
                "sentences": [
                    {"raw": c, "tokens": c.split(), "imgid": i, "sentid": 10 * i + k} for k, c in enumerate(captions)
                ],
            }
        )
        by_split.setdefault(split, {})[name] = captions
    (root / "dataset_flickr8k.json").write_text(json.dumps({"dataset": "flickr8k", "images": entries}))
    return by_split


def karpathy_written(by_split, restval):
    written = Written()
    for split in ("train", "val", "test"):
        for name, caps in by_split[split].items():
            written.add(split, name, caps)
        if restval == split:
            for name, caps in by_split["restval"].items():
                written.add(split, name, caps)
    return written


COCO_TRAIN, COCO_VAL = 10, 3


def write_coco(root):
    """annotations/captions_{train,val}2017.json, train2017/ (10 images) and val2017/ (3 images).
    Returns ({name: captions} of train2017, {name: captions} of val2017)."""
    (root / "annotations").mkdir(parents=True)
    out, ann_id = [], 1
    for split, n, offset in (("train", COCO_TRAIN, 40), ("val", COCO_VAL, 60)):
        folder = root / f"{split}2017"
        folder.mkdir()
        images, annotations, captions_of = [], [], {}
        for i in range(n):
            image, captions = make_image(offset + i)
            image_id = 500 + offset + i
            name = f"{image_id:012d}.jpg"
            image.save(folder / name, quality=90)
            captions = captions[: n_refs(i)]
            images.append({"id": image_id, "file_name": name, "width": 64, "height": 64})
            for c in captions:
                annotations.append({"id": ann_id, "image_id": image_id, "caption": c})
                ann_id += 1
            captions_of[name] = captions
        random.Random(1).shuffle(annotations)
        (root / "annotations" / f"captions_{split}2017.json").write_text(
            json.dumps({"info": {}, "licenses": [], "images": images, "annotations": annotations})
        )
        out.append(captions_of)
    return tuple(out)


CSV_IMAGES, CSV_REFS = 10, 3


def write_csv_folder(root):
    """Images and captions.csv (image,caption), captions quoted with commas and quotes in them;
    no splits.json, so the loader splits by image. Returns {name: captions}."""
    (root / "imgs").mkdir(parents=True)
    rows, written = ["image,caption"], {}
    for i in range(CSV_IMAGES):
        image, captions = make_image(80 + i)
        name = f"imgs/p{i}.png"
        image.save(root / name)
        captions = [f'{c}, "seen" {k}' for k, c in enumerate(captions[:CSV_REFS])]
        rows += [f'{name},"{c.replace(chr(34), chr(34) * 2)}"' for c in captions]
        written[name] = captions
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return written


def write_hf(root):
    """A DatasetDict train/validation/test saved with save_to_disk: image (datasets.Image) and
    caption (a list of references). Returns the Written account (validation named val)."""
    import datasets

    written, parts = Written(), {}
    for split, n, offset in (("train", 6, 100), ("validation", 2, 120), ("test", 2, 130)):
        images, captions = [], []
        for i in range(n):
            image, caps = make_image(offset + i)
            images.append(image)
            captions.append(caps[: n_refs(i)])
            written.add("val" if split == "validation" else split, f"{i:07d}.png", caps[: n_refs(i)])
        features = datasets.Features(
            {"image": datasets.Image(), "caption": datasets.Sequence(datasets.Value("string"))}
        )
        parts[split] = datasets.Dataset.from_dict({"image": images, "caption": captions}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(root))
    return written


SOURCE_NAMES = ["flickr8k", "karpathy", "coco", "folder", "hf"]


def cli_source(name, where):
    return ["--data", f"hf:{where}"] if name == "hf" else ["--data", name, "--data-dir", where]


def loaded(splits):
    """{split: {image file name: sorted captions}} (a caption file need not keep an image's captions together)."""
    return {k: {r.image.name: sorted(r.captions) for r in v} for k, v in splits.items()}


def norm(by_split):
    """The same shape from what a fixture wrote."""
    return {k: {n: sorted(c) for n, c in v.items()} for k, v in by_split.items()}


def assert_disjoint(splits):
    seen = {}
    for split, records in splits.items():
        for r in records:
            key = Path(r.image).resolve()
            assert key not in seen, f"{r.image} is in both {seen[key]} and {split}"
            seen[key] = split


# -----------------------------------------------------------------------------
# folder datasets with planted problems: one kind of bad input per case, among good records

N_GOOD = 10
BAD_PAIRS = [("red", "circle"), ("blue", "square"), ("green", "cross"), ("orange", "triangle")]


def scene_image(i):
    scene = shapes.sample_scene(random.Random(i), BAD_PAIRS)
    return shapes.render_scene(scene), shapes.describe(scene)[:2]


def write_good_images(folder, ext="png"):
    """{file name: [2 captions]} of N_GOOD readable images written into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    good = {}
    for i in range(N_GOOD):
        image, captions = scene_image(i)
        name = f"g{i:02d}.{ext}"
        image.save(folder / name)
        good[name] = captions
    return good


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels (and has no image data)."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def truncated(path):
    """Cut an image file in half: the header still reads, the body does not decode."""
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def jsonl_line(image, caption):
    return json.dumps({"image": image, "caption": caption}).encode()


@dataclass
class Bad:
    """One planted problem: the file the message must name, the line (for line-level
    problems), the description it must contain, and the line to put in the caption file."""

    file: str  # relative to the dataset root
    description: str  # a regex
    line: bytes = None  # a caption-file line to plant (None: the builder writes what it needs)
    image: bytes = None  # content of `file` when it is a bad image to write


def bad_image(name, content, description):
    return Bad(name, description, line=jsonl_line(name, "a small red circle"), image=content)


def one_pixel_png():
    import io

    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def big_mode_1_png():
    """A real image over Image.MAX_IMAGE_PIXELS (but under twice that): 1 bit a pixel, ~11 kB."""
    import io

    side = int((Image.MAX_IMAGE_PIXELS * 1.01) ** 0.5) + 1
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, "PNG")
    return buf.getvalue()


FOLDER_CASES = {
    "missing image file": lambda: Bad("g10.png", "image file not found", line=jsonl_line("g10.png", "a red circle")),
    "image in a folder that does not exist": lambda: Bad(
        "photos/2019/none.jpg", "image file not found", line=jsonl_line("photos/2019/none.jpg", "a blue square")
    ),
    "zero-byte file": lambda: bad_image("empty.png", b"", r"empty file \(0 bytes\)"),
    "text file named .jpg": lambda: bad_image("notes.jpg", b"these are my holiday notes\n", "not a readable image"),
    "1x1 image": lambda: bad_image("dot.png", one_pixel_png(), "1x1 pixels: too small"),
    "decompression bomb (header)": lambda: bad_image("bomb.png", png_header_only(30000, 30000), "decompression bomb"),
    "decompression bomb (mode 1 image)": lambda: bad_image("huge.png", big_mode_1_png(), "decompression bomb"),
    "empty caption": lambda: Bad("captions.jsonl", "empty caption for g01.png", line=jsonl_line("g01.png", "")),
    "whitespace-only caption": lambda: Bad(
        "captions.jsonl", "empty caption for g02.png", line=jsonl_line("g02.png", " \t  ")
    ),
    "null caption": lambda: Bad(
        "captions.jsonl", "empty caption for g03.png", line=b'{"image": "g03.png", "caption": null}'
    ),
    "invalid JSON": lambda: Bad("captions.jsonl", "not valid JSON", line=b'{"image": "g04.png", "caption": "a red'),
    "JSON line without caption": lambda: Bad(
        "captions.jsonl",
        re.escape('expected {"image": "...", "caption": "..."}'),
        line=b'{"image": "g05.png", "text": "a red circle"}',
    ),
    "JSON line that is not an object": lambda: Bad(
        "captions.jsonl", re.escape('expected {"image"'), line=b'["g05.png", "a red circle"]'
    ),
    "undecodable UTF-8": lambda: Bad(
        "captions.jsonl", "undecodable bytes.*must be UTF-8", line=b'{"image": "g06.png", "caption": "caf\xe9 au lait"}'
    ),
}


INSERT_AT = 6  # planted lines go mid-file, after a blank line, so that line numbers are tested


def write_jsonl_dataset(root, cases, truncated_images=(), splits=None):
    """Good images, the planted problems, captions.jsonl; returns (good, [(Bad, line number)])."""
    good = write_good_images(root)
    lines = [jsonl_line(name, c) for name, caps in good.items() for c in caps]
    lines.insert(2, b"")
    planted = []
    for k, bad in enumerate(cases):
        if bad.image is not None:
            (root / bad.file).write_bytes(bad.image)
        lines.insert(INSERT_AT + k, bad.line)
    for bad in cases:
        planted.append((bad, lines.index(bad.line) + 1))
    for name in truncated_images:
        image, _ = scene_image(100 + len(name))
        image.save(root / name, quality=90)
        truncated(root / name)
        lines.append(jsonl_line(name, "a small green cross"))
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    if splits is not None:
        (root / "splits.json").write_text(json.dumps(splits))
    return good, planted


def all_records(splits):
    out = {}
    for records in splits.values():
        for r in records:
            assert r.image.name not in out, f"{r.image} is in two splits"
            out[r.image.name] = r.captions
    return out


def assert_named(message, root, bad, line_no):
    """The message names the file and the problem, and the caption-file line: where the problem is,
    or (for an image) the line that named the image."""
    path = root / bad.file
    assert str(path) in message, f"{path} not named in:\n{message}"
    caption_file = bad.file in ("captions.jsonl", "captions.csv", "Flickr8k.token.txt")
    where = f"{path}:{line_no}" if caption_file else f"{root / 'captions.jsonl'}:{line_no}"
    assert where in message, f"{where} not in:\n{message}"
    assert re.search(bad.description, message), f"{bad.description!r} not in:\n{message}"
