"""The shapes world: its splits share no image and hold the held-out colour-shape pairs only in the
compositional split, and captions parse back into the objects and the relation they state."""

import copy
import json

import data
import shapes


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


# -----------------------------------------------------------------------------
# what a caption says


def test_parse_objects():
    assert shapes.parse_objects("a small red circle to the left of a large blue square") == {
        ("red", "circle"),
        ("blue", "square"),
    }
    assert shapes.parse_objects("there is a large yellow cross") == {("yellow", "cross")}
    assert shapes.parse_objects("A Red Circle to the left of a Blue Square.") == {("red", "circle"), ("blue", "square")}
    assert shapes.parse_objects("a single small purple triangle") == {("purple", "triangle")}
    assert shapes.parse_objects("a red thing near a square") == set()
    assert shapes.parse_objects("") == set()


def test_scene_objects_are_the_colour_shape_pairs_drawn():
    scene = {
        "objects": [
            {"colour": "red", "shape": "circle", "size": "small", "x": 50, "y": 30},
            {"colour": "blue", "shape": "square", "size": "large", "x": 15, "y": 30},
        ],
        "relation": "to the right of",
    }
    assert shapes.scene_objects(scene) == {("red", "circle"), ("blue", "square")}


def test_no_image_is_drawn_into_two_splits(tmp_path, monkeypatch):
    """Two scenes can render to the same pixels; the generator must not put such a pair in two splits."""
    real, calls = shapes.sample_scene, iter(range(10**6))
    lone = {"objects": [{"colour": "red", "shape": "square", "size": "large", "x": 30.0, "y": 30.0}], "relation": None}

    def every_other_scene_is_the_same(rng, allowed, pair_fraction=0.6):
        scene = real(rng, allowed, pair_fraction)
        return copy.deepcopy(lone) if next(calls) % 2 == 0 else scene

    monkeypatch.setattr(shapes, "sample_scene", every_other_scene_is_the_same)
    root = shapes.make_shapes_dataset(tmp_path, n_train=6, n_val=3, n_test=3, n_compositional=0, seed=0)
    splits = data.load_splits("shapes", root)  # refuses an image in two splits, by content
    lone_pixels = shapes.render_scene(lone).tobytes()
    in_split = {k: sum(data.read_image(r.image).tobytes() == lone_pixels for r in v) for k, v in splits.items()}
    assert in_split["train"] >= 1 and in_split["val"] == in_split["test"] == 0, in_split
