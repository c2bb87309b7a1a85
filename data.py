"""
Datasets for captioning: where images and their reference captions come from,
how they are split (always by image), and how they become batches.

Every source yields Records: one image path with all of its reference captions
(and, for the generated shapes, the objects drawn in it). Sources:
  shapes    procedurally generated coloured shapes (the offline demo)
  folder    a folder of images + captions.jsonl ({"image", "caption"} per line) or captions.csv
  flickr8k  the official Flickr8k layout and splits
  karpathy  Karpathy's split JSON (Flickr8k, Flickr30k, COCO) and an image folder
  coco      COCO 2017 caption annotations and image folders
  hf:NAME   a Hugging Face dataset saved with save_to_disk (or a hub id, with --download)
"""

import csv
import hashlib
import io
import json
import os
import posixpath
import random
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm


def cache_root():
    """Where generated data, demo backbones, feature caches and materialised datasets live.
    Read at each call, so that DUOCAP_CACHE set by a test or a parent process is honoured."""
    return Path(os.environ.get("DUOCAP_CACHE", Path(__file__).resolve().parent / ".cache"))


@dataclass
class Record:
    image: Path
    captions: list
    meta: dict = field(default_factory=dict)


class DataError(ValueError):
    """Bad or missing input data; the message names the file and the problem."""


# what datasets call their validation split
SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}


def image_name(name):
    """An image's name as a caption file or a split file writes it, in one spelling: `./a.jpg`,
    `a.jpg` and `img/../a.jpg` are one image."""
    return posixpath.normpath(name) if isinstance(name, str) else name


# -----------------------------------------------------------------------------
# loading a dataset from disk
#
# Loaders never stop at the first bad line or file: they collect one line per
# problem ("file[:line]: what is wrong") so that a dataset can be fixed in one go,
# and load_splits either stops with the whole list or leaves those records out.


def _to_rgb(im):
    """RGB from any mode: alpha composited on white, 16/32-bit grey scaled down, CMYK converted."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit modes say their range; plain 32-bit ones do not, so judge by the values (a float
        # image of values up to 1 is in [0, 1])
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        top = 1.0 if im.mode == "F" and a.max() <= 1 else top
        im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "LA", "PA", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


# CLIP's processor scales the short side up to 224: a 4,000,000 x 1 strip (12 KB as a PNG) would
# need a 49 GB array. Panoramas stay well inside this.
MAX_ASPECT = 100


def too_thin(width, height):
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"{width} x {height} pixels: more than {MAX_ASPECT} times as long as it is wide, too thin to caption"
    return None


def read_image(path):
    """RGB image with its EXIF orientation applied; a DataError naming the file if unreadable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                problem = too_thin(*im.size)
                if problem:
                    raise DataError(f"{path}: {problem}")
                return _to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused as a possible decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot decode image ({e})") from None


def check_image(path):
    """What is wrong with an image file, or None. Cheap: header and size only; a
    truncated body is found when the feature cache decodes every image."""
    path = Path(path)
    if not path.is_file():
        return "image file not found"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return f"refused as a possible decompression bomb ({e})"
    except (OSError, ValueError, SyntaxError) as e:
        return f"not a readable image ({e})"
    if w * h <= 1:
        return f"{w}x{h} pixels: too small to caption"
    return too_thin(w, h)


def text_lines(path, problems):
    """[(line number, text)] of a UTF-8 file; undecodable lines are reported, never guessed at."""
    out = []
    for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{n}: undecodable bytes ({e.reason} at byte {e.start}); the file must be UTF-8")
            continue
        if line.strip():
            out.append((n, line))
    return out


def group_captions(root, rows, problems):
    """[(image name, caption, where)] -> {image name: Record} for the good images, in
    first-seen order."""
    by_image, first_seen = {}, {}
    for name, caption, where in rows:
        name = image_name(name)
        if caption is not None and not isinstance(caption, str):
            problems.append(f"{where}: the caption of {name} is a {type(caption).__name__}, expected a string")
            continue
        caption = (caption or "").strip()
        if not caption:
            problems.append(f"{where}: empty caption for {name}")
            continue
        by_image.setdefault(name, []).append(caption)
        first_seen.setdefault(name, where)
    records = {}
    for name, caps in by_image.items():
        path = Path(root) / name
        problem = check_image(path)
        if problem:
            problems.append(f"{path}: {problem} (named at {first_seen[name]})")
        else:
            records[name] = Record(path, caps)
    return records


def jsonl_objects(path, problems, keys):
    """[(line number, object)] of a JSON-lines file whose objects have a string "image" and `keys`;
    any other line is reported."""
    out = []
    for n, line in text_lines(path, problems):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not valid JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or not isinstance(row.get("image"), str) or not all(k in row for k in keys):
            fields = ", ".join(f'"{k}": "..."' for k in ["image", *keys])
            problems.append(f"{path}:{n}: expected {{{fields}}}")
            continue
        out.append((n, row))
    return out


def read_jsonl_captions(path, problems):
    return [(row["image"], row["caption"], f"{path}:{n}") for n, row in jsonl_objects(path, problems, ["caption"])]


def read_csv_captions(path, problems):
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        text_lines(path, problems)  # names each undecodable line
        return []
    reader = csv.DictReader(io.StringIO(text, newline=""))  # quoted fields may span lines
    if not reader.fieldnames or not {"image", "caption"} <= set(reader.fieldnames):
        problems.append(f"{path}:1: expected a header with the columns image,caption")
        return []
    return [(row["image"], row["caption"], f"{path}:{reader.line_num}") for row in reader]


def read_split_names(path):
    """{split: [image name]} from splits.json; a file of any other shape is a DataError."""
    named = read_json(path)
    if not (
        isinstance(named, dict)
        and all(isinstance(v, list) and all(isinstance(n, str) for n in v) for v in named.values())
    ):
        raise DataError(f'{path}: expected {{"train": ["image name", ...], "val": [...], "test": [...]}}')
    if "val" not in named:
        named = {SPLIT_ALIASES.get(split, split): names for split, names in named.items()}
    return {split: [image_name(n) for n in names] for split, names in named.items()}


def read_json(path):
    """A JSON file (a UTF-8 byte-order mark allowed); anything else is a DataError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def check_split_names(rows, named, split_files, captions_file, problems):
    """Each split ({split: [image name]}, read from split_files[split]) against the caption
    rows: a named image with no caption is a problem, captioned images that no split names
    are counted. Returns the names in some split."""
    in_a_split = {n for names in named.values() for n in names}
    captioned = {image_name(name) for name, _, _ in rows}
    for split, names in named.items():
        problems += [
            f"{split_files[split]}: {n} (in {split}) has no caption in {captions_file}"
            for n in names
            if n not in captioned
        ]
    unused = captioned - in_a_split
    if unused:
        print(f"{captions_file}: captions of {len(unused)} image(s) in no split file are not used")
    return in_a_split


def load_folder(root, problems):
    """Images + captions.jsonl (or captions.csv); splits.json, when present, names the splits,
    and metadata.jsonl, when present, adds facts about each image (the shapes data's scenes)."""
    root = Path(root)
    jsonl, csv_file = root / "captions.jsonl", root / "captions.csv"
    if jsonl.is_file():
        captions_file, rows = jsonl, read_jsonl_captions(jsonl, problems)
    elif csv_file.is_file():
        captions_file, rows = csv_file, read_csv_captions(csv_file, problems)
    else:
        raise DataError(
            f"{root}: no captions.jsonl or captions.csv here. A folder dataset is images plus "
            'captions.jsonl with one {"image": "relative/path.jpg", "caption": "..."} per line, '
            "or captions.csv with the columns image,caption"
        )
    splits_file = root / "splits.json"
    named = read_split_names(splits_file) if splits_file.is_file() else None
    if named is not None:
        check_split_names(rows, named, dict.fromkeys(named, splits_file), captions_file, problems)
    by_name = group_captions(root, rows, problems)
    meta_file = root / "metadata.jsonl"
    if meta_file.is_file():
        meta = {image_name(row["image"]): row for _, row in jsonl_objects(meta_file, problems, [])}
        for name, r in by_name.items():
            r.meta = meta.get(name, {})
    if named is None:
        return {"all": list(by_name.values())}
    return {split: [by_name[n] for n in names if n in by_name] for split, names in named.items()}


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def require(paths, what, hint):
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(f"{what} is not complete; missing: {', '.join(missing)}. {hint}")


def load_flickr8k(root, problems):
    root = Path(root)
    token_file, image_dir = root / "Flickr8k.token.txt", root / "Flicker8k_Dataset"
    split_files = {
        "train": "Flickr_8k.trainImages.txt",
        "val": "Flickr_8k.devImages.txt",
        "test": "Flickr_8k.testImages.txt",
    }
    require(
        [token_file, image_dir] + [root / f for f in split_files.values()],
        f"Flickr8k under {root}",
        "Put the images in Flicker8k_Dataset/ (the official, misspelled name) and Flickr8k.token.txt and "
        "the Flickr_8k.*Images.txt split files beside it, or pass --data-dir",
    )
    names = {
        split: [image_name(line.strip()) for _, line in text_lines(root / f, problems)]
        for split, f in split_files.items()
    }
    rows = []
    for n, line in text_lines(token_file, problems):
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            problems.append(f"{token_file}:{n}: expected '<image>.jpg#<n><TAB><caption>'")
            continue
        rows.append((key.split("#")[0], caption, f"{token_file}:{n}"))
    in_a_split = check_split_names(rows, names, {s: root / f for s, f in split_files.items()}, token_file, problems)
    # the official token file names one image (2258277193_586949ec62.jpg.1) that no split uses
    # and that is not on disk: left out before its file is checked
    rows = [row for row in rows if image_name(row[0]) in in_a_split]
    by_name = group_captions(image_dir, rows, problems)
    return {split: [by_name[n] for n in split_names if n in by_name] for split, split_names in names.items()}


def load_karpathy(root, problems, image_root=None, restval="train"):
    """Karpathy's split JSON (dataset_flickr8k.json, dataset_flickr30k.json, dataset_coco.json);
    images under image_root (default DIR/images if it exists, else DIR) / filepath / filename."""
    root = Path(root)
    found = sorted(root.glob("dataset_*.json"))
    if len(found) != 1:
        raise DataError(
            f"{root}: expected one Karpathy split file dataset_<name>.json here, found "
            f"{[f.name for f in found] or 'none'}"
        )
    image_root = Path(image_root) if image_root else (root / "images" if (root / "images").is_dir() else root)
    entries = read_json(found[0])
    if not isinstance(entries, dict) or not isinstance(entries.get("images"), list):
        raise DataError(f'{found[0]}: expected {{"images": [{{"filename", "split", "sentences"}}, ...]}}')
    rows, split_of = [], {}
    for k, e in enumerate(entries["images"]):
        where = f"{found[0]} images[{k}]"
        try:
            name = image_name(posixpath.join(e.get("filepath", ""), e["filename"]))
            split, sentences = e["split"], [s["raw"] for s in e["sentences"]]
        except (AttributeError, KeyError, TypeError) as err:
            problems.append(f'{where}: expected {{"filename", "split", "sentences": [{{"raw"}}, ...]}} ({err!r})')
            continue
        if split not in ("train", "val", "test", "restval"):
            problems.append(f"{where}: {name} is in an unknown split {split!r} (train, val, test or restval)")
            continue
        if not sentences:
            problems.append(f"{where}: {name} has no captions")
            continue
        split_of[name] = restval if split == "restval" else split
        rows += [(name, raw, where) for raw in sentences]
    splits = {"train": [], "val": [], "test": []}
    for name, r in group_captions(image_root, rows, problems).items():
        if split_of[name] in splits:  # restval "drop" leaves those images out
            splits[split_of[name]].append(r)
    return splits


def load_coco(root, problems, seed=0):
    """COCO 2017 captions: train2017 (a seeded 5% of its images held out for validation)
    and val2017 as the test split, since the 2017 test images have no public captions."""
    root = Path(root)
    ann = {s: root / "annotations" / f"captions_{s}2017.json" for s in ("train", "val")}
    require(
        list(ann.values()) + [root / "train2017", root / "val2017"],
        f"COCO under {root}",
        "Expected annotations/captions_{train,val}2017.json and the image folders train2017/ and val2017/",
    )
    out = {}
    for split, path in ann.items():
        d = read_json(path)
        try:
            names = {im["id"]: im["file_name"] for im in d["images"]}
            rows = [
                (
                    names.get(a["image_id"], f"<unknown image id {a['image_id']}>"),
                    a["caption"],
                    f"{path} annotation {a.get('id', k)}",
                )
                for k, a in enumerate(d["annotations"])
            ]
        except (AttributeError, KeyError, TypeError) as e:
            raise DataError(
                f'{path}: expected {{"images": [{{"id", "file_name"}}], "annotations": [{{"image_id", "caption"}}]}} '
                f"({e!r})"
            ) from None
        captioned = {a["image_id"] for a in d["annotations"]}
        problems += [f"{path}: {n} (image id {i}) has no caption" for i, n in names.items() if i not in captioned]
        out[split] = list(group_captions(root / f"{split}2017", rows, problems).values())
    held = split_by_image(out["train"], seed, val_fraction=0.05, test_fraction=0.0)
    return {"train": held["train"], "val": held["val"], "test": out["val"]}


# columns that name the image of a row, when a dataset stores one row per caption
HF_ID_COLUMNS = ("image_id", "img_id", "imgid", "cocoid")


def hf_image_bytes(value):
    """The encoded bytes of an undecoded image value: datasets.Image(decode=False) gives
    {"bytes", "path"}; a plain column gives a path."""
    if isinstance(value, dict):
        return value["bytes"] if value.get("bytes") is not None else Path(value["path"]).read_bytes()
    return Path(value).read_bytes()


def load_hf(name, problems, cache_dir, image_column="image", caption_columns=("caption",), download=False):
    """A Hugging Face dataset (a save_to_disk folder, or a hub id with --download). Its images
    are written once to cache_dir as files, so the rest of the pipeline sees paths.

    Many caption datasets store one row per caption. Rows are grouped into one record per
    image, by an image id column when there is one (HF_ID_COLUMNS; a plain "id" often numbers
    the rows, and is never taken for one) whose values some rows share, else by the image's
    bytes, so that one picture is never split across train and test or scored against one
    reference instead of all of its captions."""
    import datasets

    if Path(name).exists():
        ds = datasets.load_from_disk(name)
    elif download:
        ds = datasets.load_dataset(name)
    else:
        raise DataError(f"hf:{name}: no such folder, and hub datasets are only fetched with --download")
    ds = ds if isinstance(ds, datasets.DatasetDict) else {"all": ds}
    splits = {}
    for split, part in ds.items():
        missing = [c for c in (image_column, *caption_columns) if c not in part.column_names]
        if missing:
            raise DataError(
                f"hf:{name} split {split}: no column {missing[0]!r} (it has {part.column_names}); "
                "pass --image-column / --caption-column"
            )
        id_column = next((c for c in HF_ID_COLUMNS if c in part.column_names), None)
        if id_column and len(set(part[id_column])) == len(part):
            # an id that no two rows share groups nothing, and may number the caption rows
            # rather than the images: the bytes say which rows show one picture
            print(f"hf:{name} split {split}: no two rows share a value of {id_column}; rows are grouped by image bytes")
            id_column = None
        if isinstance(part.features[image_column], datasets.Image):
            part = part.cast_column(image_column, datasets.Image(decode=False))  # hashed and written as stored
        folder = Path(cache_dir) / f"hf-{part._fingerprint}"
        grouped_by = f"id {id_column}" if id_column else "bytes"  # the files are named by what groups the rows
        written = (folder / "done").is_file() and (folder / "done").read_text() == grouped_by
        folder.mkdir(parents=True, exist_ok=True)
        columns = [image_column, *caption_columns, *([id_column] if id_column else [])]
        rows, names = [], set()
        for i, row in enumerate(
            tqdm(part.select_columns(columns), desc=f"hf:{name} {split}: images", leave=False, disable=None)
        ):
            try:
                encoded = None if id_column else hf_image_bytes(row[image_column])
                key = f"id {row[id_column]}" if id_column else hashlib.sha256(encoded).hexdigest()
                file_name = hashlib.sha256(key.encode()).hexdigest()[:20] + ".png"
                if file_name not in names and not written:
                    with Image.open(io.BytesIO(encoded or hf_image_bytes(row[image_column]))) as im:
                        _to_rgb(ImageOps.exif_transpose(im)).save(folder / file_name)
            except (OSError, ValueError, SyntaxError, TypeError, KeyError) as e:  # no image, or not one
                problems.append(f"hf:{name} {split}[{i}].{image_column}: not a readable image ({e!r})")
                continue
            names.add(file_name)
            for col in caption_columns:
                values = row[col] if isinstance(row[col], list) else [row[col]]
                rows += [(file_name, v, f"hf:{name} {split}[{i}].{col}") for v in values]
        (folder / "done").write_text(grouped_by)
        splits[SPLIT_ALIASES.get(split, split)] = list(group_captions(folder, rows, problems).values())
    return splits


def picture_groups(records):
    """Records in groups of one picture each: files of the same bytes under any names, in
    first-seen order. Only files of a size another shares are opened, and read whole only when
    their first 64 KiB are another's too (a COCO-sized folder is not hashed in full)."""
    keys = {r.image: ("size", os.path.getsize(r.image)) for r in records}
    for step in (head_digest, file_digest):
        count = Counter(keys.values())
        keys = {p: (step.__name__, k, step(p)) if count[k] > 1 else k for p, k in keys.items()}
    groups = {}
    for r in records:
        groups.setdefault(keys[r.image], []).append(r)
    return list(groups.values())


def split_by_image(records, seed=0, val_fraction=0.05, test_fraction=0.05):
    """Shuffle pictures (never caption rows) with a seed and cut them into splits. One picture
    saved under several names goes to one split with all its copies, or check_disjoint would
    refuse the split drawn here; without copies the split is the plain shuffle of the records."""
    groups = picture_groups(records)
    repeated = [g for g in groups if len(g) > 1]
    if repeated:
        print(
            f"{len(repeated)} picture(s) appear under more than one name ({sum(map(len, repeated))} files); "
            "each group kept in one split"
        )
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(groups) * val_fraction))
    n_test = max(1, int(len(groups) * test_fraction)) if test_fraction else 0
    pick = lambda idx: [r for i in idx for r in groups[i]]
    return {
        "train": pick(order[n_val + n_test :]),
        "val": pick(order[:n_val]),
        "test": pick(order[n_val : n_val + n_test]),
    }


SOURCES = ("shapes", "folder", "flickr8k", "karpathy", "coco", "hf:<name or path>")


def load_splits(
    source,
    data_dir,
    seed=0,
    strict=True,
    cache_dir=None,
    image_root=None,
    restval="train",
    image_column="image",
    caption_columns=("caption",),
    download=False,
):
    """{split: [Record]} for a source. Every problem found is one line naming the file
    (and line) and what is wrong; strict stops with all of them, otherwise the bad
    records are left out and counted. Nothing is silently replaced."""
    problems = []
    if source in ("folder", "shapes"):
        splits = load_folder(data_dir, problems)
    elif source == "flickr8k":
        splits = load_flickr8k(data_dir, problems)
    elif source == "karpathy":
        splits = load_karpathy(data_dir, problems, image_root, restval)
    elif source == "coco":
        splits = load_coco(data_dir, problems, seed)
    elif source.startswith("hf:"):
        splits = load_hf(source[3:], problems, cache_dir or cache_root(), image_column, caption_columns, download)
    else:
        raise DataError(f"unknown data source {source!r} (one of {', '.join(SOURCES)})")
    if problems:
        listing = "\n".join(f"  {p}" for p in problems)
        if strict:
            raise DataError(
                f"{len(problems)} problem(s) in the {source} data at {data_dir}:\n{listing}\n"
                "Fix them, or pass --skip-bad to leave those records out."
            )
        print(f"{len(problems)} problem(s) in the {source} data; --skip-bad leaves them out:\n{listing}")
    if set(splits) == {"all"}:
        splits = split_by_image(splits["all"], seed)
    elif set(splits) == {"train"}:  # as many hub datasets are
        splits = split_by_image(splits["train"], seed)
        print(f"only a train split: {len(splits['val'])} val and {len(splits['test'])} test images drawn (seed {seed})")
    if "train" not in splits:
        raise DataError(f"the {source} data at {data_dir} has no train split (it has {', '.join(splits)})")
    if "val" not in splits:  # e.g. a Hugging Face dataset with train and test only
        held = split_by_image(splits["train"], seed, val_fraction=0.05, test_fraction=0.0)
        splits.update(train=held["train"], val=held["val"])
        print(f"no val split: {len(held['val'])} training images (5%, seed {seed}) held out for validation")
    check_disjoint(splits)
    return splits


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def head_digest(path, size=1 << 16):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


def check_disjoint(splits):
    """No image in two splits: neither the same file, nor the same bytes under two names (only
    files of equal size in different splits are read and compared)."""
    split_of, by_size = {}, {}
    for split, records in splits.items():
        for r in records:
            if split_of.setdefault(r.image, split) != split:
                raise DataError(f"{r.image} is in both the {split_of[r.image]} and the {split} split")
            by_size.setdefault(os.path.getsize(r.image), []).append((split, r.image))
    for group in by_size.values():
        if len({split for split, _ in group}) < 2:
            continue
        first = {}
        for split, path in group:
            other_split, other = first.setdefault(file_digest(path), (split, path))
            if other_split != split:
                raise DataError(f"{path} (in {split}) and {other} (in {other_split}) are the same image")


def split_id(records):
    """A short hash of a split's image contents, independent of paths and order: two runs were
    scored on the same test set exactly when their ids agree."""
    digests = sorted(file_digest(r.image) for r in records)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:16]


def splits_for(config, strict=None, cache_dir=None):
    """The splits a run's config names (its source, folder and data options)."""
    opts = config.get("data_options", {})
    return load_splits(
        config["data"],
        config["data_dir"],
        config.get("data_seed", config["seed"]),  # runs made before --data-seed split with --seed
        strict=opts.get("strict", True) if strict is None else strict,
        cache_dir=cache_dir,
        image_root=opts.get("image_root"),
        restval=opts.get("restval", "train"),
        image_column=opts.get("image_column", "image"),
        caption_columns=opts.get("caption_columns", ["caption"]),
        download=opts.get("download", False),
    )


def describe_splits(splits):
    return ", ".join(f"{k} {len(v)} images ({sum(len(r.captions) for r in v)} captions)" for k, v in splits.items())


# -----------------------------------------------------------------------------
# captions -> model inputs


def encode_captions(tokenizer, captions, max_tokens):
    """input ids = [BOS] + caption, targets = caption + [EOS], right-padded.

    Qwen base models have no BOS token, so EOS stands in for it. Padding
    targets are -100, never the pad id: pad == EOS and EOS must be learned.
    A caption cut at max_tokens gets no EOS target: it did not end there, and
    teaching the model to stop mid-sentence would be wrong."""
    eos = tokenizer.eos_token_id
    full = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
    T = min(max(len(t) for t in full), max_tokens) + 1
    input_ids = torch.full((len(captions), T), eos, dtype=torch.long)
    targets = torch.full((len(captions), T), -100, dtype=torch.long)
    mask = torch.zeros((len(captions), T), dtype=torch.long)
    for i, toks in enumerate(full):
        cut = len(toks) > max_tokens
        toks = toks[:max_tokens]
        n = len(toks) + 1
        input_ids[i, 1:n] = torch.tensor(toks, dtype=torch.long)
        targets[i, : n - cut] = torch.tensor(toks if cut else toks + [eos], dtype=torch.long)
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


def decode_check(records):
    """(records whose image fully decodes, [problem]); the cheap check at loading only reads headers."""
    good, bad = [], []
    for r in tqdm(records, desc="checking images", leave=False, unit="image", disable=None):
        try:
            read_image(r.image)
            good.append(r)
        except DataError as e:
            bad.append(str(e))
    return good, bad


def stop_or_skip(problems, strict):
    """Images that failed to decode: a DataError listing them all, or (strict False) a line for each left out."""
    if problems and strict:
        listing = "\n".join(f"  {message}" for message in problems)
        raise DataError(
            f"{len(problems)} image(s) failed to decode:\n{listing}\nFix them, or pass --skip-bad to leave them out."
        )
    for message in problems:
        print(f"--skip-bad: left out {message}")


class Collate:
    """Caption rows -> a batch: token ids and targets, and cached features or pixels.
    A class rather than a closure, so that DataLoader workers can be spawned too."""

    def __init__(self, tokenizer, processor, features, max_tokens):
        self.tokenizer, self.processor, self.features, self.max_tokens = tokenizer, processor, features, max_tokens

    def __call__(self, items):
        idx, images, captions = zip(*items)
        input_ids, targets, mask = encode_captions(self.tokenizer, captions, self.max_tokens)
        batch = {"input_ids": input_ids, "targets": targets, "attention_mask": mask}
        if self.features is not None:
            batch["features"] = self.features[list(idx)]
        else:
            batch["pixel_values"] = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return batch


def make_loader(
    records, features, processor, tokenizer, *, batch_size, max_tokens, order=None, workers=0, pin_memory=False, seed=0
):
    """Batches of caption rows, in `order` (a list of row indices; None = as stored), from cached
    features when given, else from the images decoded in the loader."""
    rows = CaptionRows(records, load_pixels=features is None)
    collate = Collate(tokenizer, processor, features, max_tokens)
    # its own generator: worker seeds must not consume the global RNG, or a resumed run would drift
    return torch.utils.data.DataLoader(
        rows,
        batch_size=batch_size,
        sampler=order,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )
