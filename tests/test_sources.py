"""Every data source, from a tiny dataset in its own on-disk layout: the splits, image counts and
references per image are what the files say; a few training steps and a caption work from each;
a missing dataset says which files are missing and where they belong."""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import shapes
from conftest import TRAIN_SCRIPTS, Script

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


# -----------------------------------------------------------------------------
# the fixtures, written once; the training runs started side by side


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    coco_train, coco_val = write_coco(root / "coco")
    return {
        "flickr8k": (root / "flickr8k", write_flickr8k(root / "flickr8k")),
        "karpathy": (root / "karpathy", write_karpathy(root / "karpathy")),
        "coco": (root / "coco", (coco_train, coco_val)),
        "folder": (root / "folder", write_csv_folder(root / "folder")),
        "hf": (root / "hf", write_hf(root / "hf")),
    }


def cli_source(name, where):
    return ["--data", f"hf:{where}"] if name == "hf" else ["--data", name, "--data-dir", where]


@pytest.fixture(scope="module")
def trained(sources, vision_dir, language_dir, duocap_cache, tmp_path_factory):
    """{source: (run dir, exit status, stdout, stderr)}: 2 steps with each source, then the test
    evaluation (java hidden: the plain-tokenizer metrics are enough here and much quicker)."""
    runs = tmp_path_factory.mktemp("source-runs")
    scripts = {}
    for name, (where, _) in sources.items():
        scripts[name] = Script(
            [
                TRAIN_SCRIPTS["explained"],
                "--vision",
                vision_dir,
                "--language",
                language_dir,
                *cli_source(name, where),
                "--max-steps",
                2,
                "--batch-size",
                4,
                "--out",
                runs / name,
            ],
            duocap_cache,
            hide_java=True,
        )
    return {name: (runs / name, *s.wait()) for name, s in scripts.items()}


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
# loading, in this process


def test_flickr8k_official_layout(sources):
    root, written = sources["flickr8k"]
    splits = data.load_splits("flickr8k", root)
    assert_disjoint(splits)
    assert loaded(splits) == norm(written.splits), "splits, images and every reference as the files say"
    assert {k: len(v) for k, v in splits.items()} == {"train": 5, "val": 2, "test": 2}
    assert sorted(len(r.captions) for v in splits.values() for r in v) == sorted(n_refs(i) for i in range(9)), (
        "references per image"
    )
    assert all(r.image.parent == root / "Flicker8k_Dataset" for v in splits.values() for r in v)


@pytest.mark.parametrize("restval", ["train", "val", "drop"])
def test_karpathy_json_and_restval(sources, restval):
    root, by_split = sources["karpathy"]
    splits = data.load_splits("karpathy", root, restval=restval)
    assert_disjoint(splits)
    written = karpathy_written(by_split, restval)
    assert loaded(splits) == norm({k: written.splits.get(k, {}) for k in ("train", "val", "test")})
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 4 + 2 * (restval == "train"), "val": 2 + 2 * (restval == "val"), "test": 2}
    restval_names = set(by_split["restval"])
    found = {r.image.name for v in splits.values() for r in v} & restval_names
    assert found == (set() if restval == "drop" else restval_names)


def test_karpathy_restval_joins_train_by_default(sources):
    root, by_split = sources["karpathy"]
    default = loaded(data.load_splits("karpathy", root))
    assert set(by_split["restval"]) <= set(default["train"])
    assert default == loaded(data.load_splits("karpathy", root, restval="train"))


def test_coco_2017_layout(sources):
    root, (coco_train, coco_val) = sources["coco"]
    splits = data.load_splits("coco", root)
    assert_disjoint(splits)
    got = loaded(splits)
    # val2017 is the test split; 5% of train2017 (at least one image) is held out for validation
    assert got["test"] == norm({"x": coco_val})["x"]
    assert len(got["val"]) == max(1, int(COCO_TRAIN * 0.05)) == 1
    assert len(got["train"]) == COCO_TRAIN - 1
    assert {**got["train"], **got["val"]} == norm({"x": coco_train})["x"], (
        "every train2017 image, with all its references, is in train or val"
    )
    assert all(r.image.parent == root / "val2017" for r in splits["test"])
    assert all(r.image.parent == root / "train2017" for r in splits["train"] + splits["val"])
    assert loaded(data.load_splits("coco", root)) == got, "the held-out images are the same every time"


def test_folder_with_captions_csv(sources):
    root, written = sources["folder"]
    splits = data.load_splits("folder", root)
    assert_disjoint(splits)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8, "val": 1, "test": 1}
    got = {str(r.image.relative_to(root)): r.captions for v in splits.values() for r in v}
    assert got == written, "quoted captions with commas and quotes come back exactly"
    assert all(len(r.captions) == CSV_REFS for v in splits.values() for r in v)


def test_hugging_face_dataset_saved_to_disk(sources, tmp_path):
    root, written = sources["hf"]
    splits = data.load_splits(f"hf:{root}", root, cache_dir=tmp_path)
    assert_disjoint(splits)
    assert list(splits) == ["train", "val", "test"], "'validation' is called val"
    assert loaded(splits) == norm(written.splits)
    assert sorted(len(r.captions) for v in splits.values() for r in v) == sorted(
        len(c) for v in written.splits.values() for c in v.values()
    )
    # the images were written out as files the rest of the pipeline can read
    for r in splits["train"]:
        assert r.image.is_file() and tmp_path in r.image.parents
        assert data.read_image(r.image).size == (shapes.CANVAS, shapes.CANVAS)


# -----------------------------------------------------------------------------
# training and captioning from each source


SOURCE_NAMES = ["flickr8k", "karpathy", "coco", "folder", "hf"]


def expected_data_line(name, sources):
    where, written = sources[name]
    if name == "karpathy":
        return karpathy_written(written, "train").describe()
    if name == "coco":
        coco_train, coco_val = written
        splits = data.load_splits("coco", where)  # which train image is held out is the loader's (seeded) choice
        return (
            f"train {COCO_TRAIN - 1} images ({sum(map(len, coco_train.values())) - len(splits['val'][0].captions)}"
            f" captions), val 1 images ({len(splits['val'][0].captions)} captions), "
            f"test {COCO_VAL} images ({sum(map(len, coco_val.values()))} captions)"
        )
    if name == "folder":
        return (
            f"train 8 images ({8 * CSV_REFS} captions), val 1 images ({CSV_REFS} captions), "
            f"test 1 images ({CSV_REFS} captions)"
        )
    return written.describe()


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_training_from_each_source(trained, sources, name):
    run, rc, stdout, stderr = trained[name]
    assert rc == 0, f"{name}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    where = Path(sources[name][0]).resolve()
    source = f"hf:{sources[name][0]}" if name == "hf" else name
    line = next((line for line in stdout.splitlines() if line.startswith("data (")), None)
    assert line == f"data ({source} at {where}): {expected_data_line(name, sources)}", stdout[:2000]
    for f in ("model.safetensors", "config.json", "eval_test.json", "predictions_test.jsonl", "summary.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    figures = json.loads((run / "eval_test.json").read_text())
    predictions = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    test_split = data.splits_for(json.loads((run / "config.json").read_text()), cache_dir=run.parent)["test"]
    assert figures["n_images"] == len(predictions) == len(test_split)
    assert [p["references"] for p in predictions] == [r.captions for r in test_split]
    assert 0 <= figures["BLEU-1"] <= 1 and figures["CIDEr"] >= 0


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_generate_captions_an_image_of_each_source(trained, name, capsys):
    """generate.py's main, in this process (a fresh process each would cost seconds of imports;
    test_bad_data runs the script itself)."""
    import generate

    run, rc, _, stderr = trained[name]
    assert rc == 0, stderr[-3000:]
    image = json.loads((run / "predictions_test.jsonl").read_text().splitlines()[0])["image"]
    status = generate.main(["--checkpoint", str(run), "--strategy", "greedy", "--device", "cpu", image])
    out = capsys.readouterr().out
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{image}\t"), out
    predictions = {
        json.loads(line)["image"]: json.loads(line)["caption"]
        for line in (run / "predictions_test.jsonl").read_text().splitlines()
    }
    assert lines[0] == f"{image}\t{predictions[image]}", "greedy captions match the run's evaluation"


# -----------------------------------------------------------------------------
# a dataset that is not there


def run_training_main(argv):
    """train.main in this process up to its data error (its RNG seeding undone afterwards)."""
    import train

    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        with pytest.raises(SystemExit) as e:
            train.main("explained", argv)
    finally:
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
    return e.value.code


@pytest.mark.parametrize(
    "name, missing",
    [
        (
            "flickr8k",
            [
                "Flickr8k.token.txt",
                "Flicker8k_Dataset",
                "Flickr_8k.trainImages.txt",
                "Flickr_8k.devImages.txt",
                "Flickr_8k.testImages.txt",
            ],
        ),
        ("coco", ["annotations/captions_train2017.json", "annotations/captions_val2017.json", "train2017", "val2017"]),
    ],
)
def test_missing_dataset_lists_the_missing_files(name, missing, vision_dir, language_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = run_training_main(
        [
            "--vision",
            str(vision_dir),
            "--language",
            str(language_dir),
            "--data",
            name,
            "--data-dir",
            str(empty),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert isinstance(message, str) and message.startswith("error:"), message
    assert str(empty.resolve()) in message
    for f in missing:
        assert str(empty.resolve() / f) in message, f"{f} not listed:\n{message}"
    assert "Traceback" not in message


def test_partly_missing_flickr8k_lists_only_what_is_missing(sources, tmp_path):
    import shutil

    root = tmp_path / "flickr8k"
    shutil.copytree(sources["flickr8k"][0], root)
    (root / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(data.DataError) as e:
        data.load_splits("flickr8k", root)
    message = str(e.value)
    assert str(root / "Flickr_8k.devImages.txt") in message
    assert message.count(f"{root}/") == 1, f"only the one missing file is listed:\n{message}"
    assert "Flicker8k_Dataset/" in message, "the message says where the files belong"


@pytest.mark.parametrize("name, expected", [("karpathy", "dataset_<name>.json"), ("folder", "captions.jsonl")])
def test_missing_karpathy_or_folder_dataset_says_what_is_expected(name, expected, tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_splits(name, tmp_path)
    assert str(tmp_path) in str(e.value) and expected in str(e.value)


def test_missing_hf_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load_splits(f"hf:{tmp_path / 'nowhere'}", tmp_path, cache_dir=tmp_path)
    assert str(tmp_path / "nowhere") in str(e.value) and "--download" in str(e.value)
