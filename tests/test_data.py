"""Splits, caption encoding, caption parsing and the shapes figures."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import data
import shapes
from data import Record
from evaluate import shapes_figures

# -----------------------------------------------------------------------------
# splits: by image, never by caption row


def test_shapes_splits_share_no_image(splits, shapes_dir):
    assert set(splits) == {"train", "val", "test", "compositional"}
    sizes = {k: len(v) for k, v in splits.items()}
    assert sizes == {"train": 64, "val": 8, "test": 8, "compositional": 8}
    seen = {}
    for name, records in splits.items():
        paths = [r.image.resolve() for r in records]
        assert len(paths) == len(set(paths)), f"{name} lists an image twice"
        for p in paths:
            assert p not in seen, f"{p} is in both {seen[p]} and {name}"
            seen[p] = name
    # every caption of an image travels with it: no image's captions are split apart
    rows = [json.loads(line) for line in (shapes_dir / "captions.jsonl").read_text().splitlines()]
    by_image = {}
    for row in rows:
        by_image.setdefault((shapes_dir / row["image"]).resolve(), []).append(row["caption"])
    for records in splits.values():
        for r in records:
            assert r.captions == by_image[r.image.resolve()]


def test_compositional_split_holds_every_held_out_pair_and_no_other_split_does(splits):
    for name, records in splits.items():
        for r in records:
            pairs = {(o["colour"], o["shape"]) for o in r.meta["objects"]}
            assert pairs, f"{r.image} has no metadata"
            # the captions say the same thing as the metadata
            assert set().union(*(shapes.parse_objects(c) for c in r.captions)) == pairs
            if name == "compositional":
                assert pairs & shapes.HELD_OUT, f"{r.image} in the compositional split has no held-out pair"
            else:
                assert not pairs & shapes.HELD_OUT, (
                    f"{r.image} in {name} draws a held-out pair {pairs & shapes.HELD_OUT}"
                )


@pytest.fixture(scope="module")
def folder_dataset(shapes_dir, tmp_path_factory):
    """A folder dataset (no splits.json, no metadata) of 40 images, two captions each, rows interleaved."""
    root = tmp_path_factory.mktemp("folder")
    (root / "pics").mkdir()
    images = sorted((shapes_dir / "images").glob("*.png"))[:40]
    names = []
    for k, src in enumerate(images):
        name = f"pics/img{k:03d}.png"
        shutil.copy(src, root / name)
        names.append(name)
    rows = [{"image": n, "caption": f"caption {j} of {n}"} for j in range(2) for n in names]
    data.write_jsonl(root / "captions.jsonl", rows)
    return root, names


def split_names(splits, root):
    return {k: [str(r.image.relative_to(root)) for r in v] for k, v in splits.items()}


def test_random_split_is_by_image_and_reproducible(folder_dataset):
    root, names = folder_dataset
    assert not (root / "splits.json").exists()
    a = split_names(data.load_splits("folder", root, seed=0), root)
    b = split_names(data.load_splits("folder", root, seed=0), root)
    c = split_names(data.load_splits("folder", root, seed=1), root)
    assert a == b, "the same seed must give the same split"
    assert a != c, "another seed must give another split"
    for s in (a, c):
        assert set(s) == {"train", "val", "test"}
        assert all(s[k] for k in s), "every split gets at least one image"
        flat = [n for v in s.values() for n in v]
        assert len(flat) == len(set(flat)), "an image is in two splits"
        assert sorted(flat) == sorted(names), "every image is in exactly one split"


def test_split_by_image_keeps_all_captions_of_an_image_together(folder_dataset):
    root, names = folder_dataset
    problems = []
    records = data.load_folder(root, problems)["all"]
    assert problems == []
    assert len(records) == len(names)
    for r in records:
        rel = str(r.image.relative_to(root))
        assert r.captions == [f"caption 0 of {rel}", f"caption 1 of {rel}"]
    parts = data.split_by_image(records, seed=3)
    ids = [id(r) for v in parts.values() for r in v]
    assert len(ids) == len(set(ids)) == len(records)
    again = data.split_by_image(records, seed=3)
    assert all([r.image for r in parts[k]] == [r.image for r in again[k]] for k in parts)


def test_missing_image_is_a_clear_error_not_a_substitute(tmp_path):
    with pytest.raises(data.DataError, match="nope.png"):
        data.read_image(tmp_path / "nope.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="broken.png"):
        data.read_image(tmp_path / "broken.png")


# -----------------------------------------------------------------------------
# captions -> input ids, targets, attention mask


def test_encode_captions_layout(tokenizer):
    eos = tokenizer.eos_token_id
    assert eos is not None and tokenizer.pad_token_id == eos
    captions = ["a small red circle", "a large blue square to the left of a small green triangle", "a cross"]
    toks = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
    assert all(eos not in t for t in toks)
    lengths = [len(t) for t in toks]
    assert len(set(lengths)) == 3, "captions of different lengths exercise the padding"
    input_ids, targets, mask = data.encode_captions(tokenizer, captions, max_tokens=64)
    T = max(lengths) + 1
    assert input_ids.shape == targets.shape == mask.shape == (3, T)
    for i, (t, n) in enumerate(zip(toks, lengths)):
        assert input_ids[i, 0].item() == eos, "EOS stands in as BOS"
        assert input_ids[i, 1 : n + 1].tolist() == t
        assert targets[i, :n].tolist() == t
        assert targets[i, n].item() == eos, "EOS is the target right after the caption, before any padding"
        assert (targets[i, n + 1 :] == -100).all(), "padding targets are -100, never the pad id"
        assert mask[i, : n + 1].tolist() == [1] * (n + 1), "the mask covers BOS .. the last caption token"
        assert (mask[i, n + 1 :] == 0).all()
        # targets are the inputs shifted by one wherever the mask is on
        assert targets[i, :n].tolist() == input_ids[i, 1 : n + 1].tolist()
    # exactly one EOS target per caption
    assert ((targets == eos).sum(1) == 1).all()
    assert (mask.sum(1) == torch.tensor(lengths) + 1).all()


def test_a_truncated_caption_gets_no_eos_target(tokenizer):
    eos = tokenizer.eos_token_id
    caption = "a large blue square to the left of a small green triangle"
    toks = tokenizer(caption, add_special_tokens=False)["input_ids"]
    short = tokenizer("a", add_special_tokens=False)["input_ids"]
    assert len(toks) > 4 and len(short) < 4
    input_ids, targets, mask = data.encode_captions(tokenizer, [caption, "a"], max_tokens=4)
    assert input_ids.shape == (2, 5)
    assert input_ids[0].tolist() == [eos] + toks[:4]
    # cut mid-sentence: the model must not learn to stop there
    assert targets[0].tolist() == toks[:4] + [-100]
    assert mask[0].tolist() == [1] * 5
    # a caption that fits still ends with EOS
    assert targets[1].tolist() == short + [eos] + [-100] * (4 - len(short))


# -----------------------------------------------------------------------------
# what a caption says


def test_parse_objects():
    assert shapes.parse_objects("a small red circle to the left of a large blue square") == {
        ("red", "circle"),
        ("blue", "square"),
    }
    assert shapes.parse_objects("there is a large yellow cross") == {("yellow", "cross")}
    assert shapes.parse_objects("a single small purple triangle") == {("purple", "triangle")}
    assert shapes.parse_objects("a red thing near a square") == set()
    assert shapes.parse_objects("") == set()


def test_parse_relation_normalises_inverse_relations():
    right = shapes.parse_relation("a red circle to the right of a blue square")
    left = shapes.parse_relation("a blue square to the left of a red circle")
    assert right == left == (("blue", "square"), "to the left of", ("red", "circle"))
    below = shapes.parse_relation("a large green cross is below a small orange triangle")
    above = shapes.parse_relation("there is a small orange triangle above a large green cross")
    assert below == above == (("orange", "triangle"), "above", ("green", "cross"))
    # a different relation, or the same words with the objects swapped, is not the same
    assert shapes.parse_relation("a red circle to the left of a blue square") != right
    assert shapes.parse_relation("a red circle above a blue square") != right
    # no relation, or not exactly two objects: nothing to compare
    assert shapes.parse_relation("a small red circle") is None
    assert shapes.parse_relation("a red circle and a blue square") is None
    assert shapes.parse_relation("a red circle to the left of a blue square above a green cross") is None


def test_scene_truth_matches_what_the_generator_draws():
    scene = {
        "objects": [
            {"colour": "red", "shape": "circle", "size": "small", "x": 50, "y": 30},
            {"colour": "blue", "shape": "square", "size": "large", "x": 15, "y": 30},
        ],
        "relation": "to the right of",
    }
    objects, relation = shapes.scene_truth(scene)
    assert objects == {("red", "circle"), ("blue", "square")}
    assert relation == (("blue", "square"), "to the left of", ("red", "circle"))


# -----------------------------------------------------------------------------
# the figures evaluate.py reports for shapes


def obj(colour, shape, size, x=32, y=32):
    return {"colour": colour, "shape": shape, "size": size, "x": x, "y": y}


def test_shapes_figures_on_hand_built_records():
    records = [
        Record(
            Path("a.png"),
            ["a small red circle", "there is a small red circle"],
            {"image": "a.png", "objects": [obj("red", "circle", "small")], "relation": None},
        ),
        Record(
            Path("b.png"),
            ["a large blue square to the left of a small green triangle"],
            {
                "image": "b.png",
                "objects": [obj("blue", "square", "large", 15), obj("green", "triangle", "small", 50)],
                "relation": "to the left of",
            },
        ),
        Record(
            Path("c.png"),
            ["a small yellow cross above a large purple circle"],
            {
                "image": "c.png",
                "objects": [obj("yellow", "cross", "small", 32, 10), obj("purple", "circle", "large", 32, 50)],
                "relation": "above",
            },
        ),
        Record(
            Path("d.png"),
            ["a large orange triangle"],
            {"image": "d.png", "objects": [obj("orange", "triangle", "large")], "relation": None},
        ),
    ]
    captions = [
        "there is a small red circle",  # objects right, exact match
        "a small green triangle to the right of a large blue square",  # objects right, relation right (inverse wording)
        "a small yellow cross below a large purple circle",  # objects right, relation wrong
        "a large orange square",  # objects wrong
    ]
    figures = shapes_figures(records, captions)
    assert figures["attribute_accuracy"] == pytest.approx(3 / 4)
    assert figures["relation_accuracy"] == pytest.approx(1 / 2)
    assert figures["exact_match"] == pytest.approx(1 / 4)

    # a blind control scored against the wrong scenes gets nothing right
    blind = shapes_figures(records, captions[1:] + captions[:1])
    assert blind["attribute_accuracy"] == 0
    assert blind["exact_match"] == 0
    # images without pairs: relation accuracy is 0, not a division by zero
    singles = shapes_figures([records[0], records[3]], [captions[0], "a large orange triangle"])
    assert singles == {"attribute_accuracy": 1.0, "relation_accuracy": 0.0, "exact_match": 1.0}


def test_a_dataset_without_a_val_split_holds_some_training_images_out(folder_dataset, tmp_path):
    root, names = folder_dataset
    shutil.copytree(root, tmp_path / "d")
    (tmp_path / "d" / "splits.json").write_text(json.dumps({"train": names[:-2], "test": names[-2:]}))
    splits = data.load_splits("folder", tmp_path / "d", seed=0)
    assert len(splits["val"]) >= 1 and len(splits["train"]) + len(splits["val"]) == len(names) - 2
    assert not {r.image for r in splits["val"]} & {r.image for r in splits["train"]}


def test_flickr8k_captions_of_images_in_no_split_are_ignored(tmp_path, capsys):
    """The official token file names one image that no split uses and that does not exist."""
    from PIL import Image

    (tmp_path / "Flicker8k_Dataset").mkdir()
    names = [f"{i}.jpg" for i in range(3)]
    for n in names:
        Image.new("RGB", (8, 8)).save(tmp_path / "Flicker8k_Dataset" / n)
    lines = [f"{n}#{k}\ta caption {k} of {n}" for n in names for k in range(2)] + ["gone.jpg.1#0\tno image"]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for f, n in (("train", names[0]), ("dev", names[1]), ("test", names[2])):
        (tmp_path / f"Flickr_8k.{f}Images.txt").write_text(n + "\n")
    splits = data.load_splits("flickr8k", tmp_path)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    assert "1 image(s) in no split file are not used" in capsys.readouterr().out
