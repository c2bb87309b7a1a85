"""skills.py: captions scored against hand-made scenes, and the flip control on rendered scenes."""

import random

import numpy as np
import pytest
from PIL import ImageOps

import shapes
import skills


def obj(size, colour, shape, x=32, y=32):
    return {"size": size, "colour": colour, "shape": shape, "x": x, "y": y}


# truth: a small red circle to the left of a large blue square
PAIR = {
    "objects": [obj("small", "red", "circle", 15, 30), obj("large", "blue", "square", 45, 32)],
    "relation": "to the left of",
}
# truth: a large green cross above a small green triangle (one colour, two shapes)
SAME_COLOUR = {
    "objects": [obj("large", "green", "cross", 30, 15), obj("small", "green", "triangle", 32, 48)],
    "relation": "above",
}
SINGLE = {"objects": [obj("large", "green", "cross")], "relation": None}


def test_read_caption_objects_sizes_and_relation():
    assert skills.read_caption("a small red circle to the left of a large blue square") == (
        [("small", "red", "circle"), ("large", "blue", "square")],
        "to the left of",
    )
    assert skills.read_caption("there is a large green cross") == ([("large", "green", "cross")], None)
    assert skills.read_caption("a small red circle is above a small red square") == (
        [("small", "red", "circle"), ("small", "red", "square")],
        "above",
    )
    assert skills.read_caption("a single small blue triangle") == ([("small", "blue", "triangle")], None)
    assert skills.read_caption("a large blue square to the right of a small red circle") == (
        [("large", "blue", "square"), ("small", "red", "circle")],
        "to the right of",
    )
    assert skills.read_caption("a purple cross below an orange square") == (
        [(None, "purple", "cross"), (None, "orange", "square")],
        "below",
    )


def test_read_caption_is_robust():
    assert skills.read_caption("") == ([], None)
    assert skills.read_caption("zzz qq the of") == ([], None)
    assert skills.read_caption(None) == ([], None)
    # case, spacing, and "left of" without "to the"
    assert skills.read_caption("A Small  RED circle left of a blue Square") == (
        [("small", "red", "circle"), (None, "blue", "square")],
        "to the left of",
    )
    assert skills.read_caption("a red circle on the right of a blue square")[1] == "to the right of"
    three = skills.read_caption("a red circle to the left of a blue square and a green cross")
    assert three == ([(None, "red", "circle"), (None, "blue", "square"), (None, "green", "cross")], "to the left of")
    # two relation phrases: which one is meant is unknown
    assert skills.read_caption("a red circle to the left of a blue square above a green cross")[1] is None
    # a relation that is not between the first two objects would be misread as "first <rel> second"
    assert skills.read_caption("to the left of a blue square is a red circle")[1] is None
    # a colour or shape alone, or a size not next to the colour, is not an object / not a size
    assert skills.read_caption("a red thing near a square") == ([], None)
    assert skills.read_caption("a small bright red circle")[0] == [(None, "red", "circle")]


def score(caption, scene=PAIR, mirrored=None):
    row = skills.image_skills(caption, scene, mirrored)
    return {
        k: row[k]
        for k in (
            "objects",
            "objects_with_size",
            "colour",
            "shape",
            "size",
            "axis",
            "direction",
            "direction_given_axis",
        )
    }


def test_right_direction():
    assert score("a small red circle to the left of a large blue square") == dict(
        objects=True,
        objects_with_size=True,
        colour=True,
        shape=True,
        size=True,
        axis=True,
        direction=True,
        direction_given_axis=True,
    )


def test_swapped_order_with_inverse_relation_is_right():
    assert score("there is a large blue square to the right of a small red circle") == dict(
        objects=True,
        objects_with_size=True,
        colour=True,
        shape=True,
        size=True,
        axis=True,
        direction=True,
        direction_given_axis=True,
    )
    # the same holds for the inverse in the truth's order
    assert score("a small red circle is to the left of a large blue square")["direction"] is True


def test_wrong_direction_right_axis():
    for caption in (
        "a large blue square to the left of a small red circle",
        "a small red circle to the right of a large blue square",
    ):
        s = score(caption)
        assert (s["objects"], s["axis"], s["direction"], s["direction_given_axis"]) == (True, True, False, False)


def test_wrong_axis_is_a_wrong_direction_not_counted_given_axis():
    for caption in ("a small red circle above a large blue square", "a large blue square below a small red circle"):
        s = score(caption)
        assert (s["objects"], s["axis"], s["direction"], s["direction_given_axis"]) == (True, False, False, None)


def test_no_relation_read_is_wrong_axis_and_direction():
    s = score("a small red circle and a large blue square")
    assert (s["objects"], s["axis"], s["direction"], s["direction_given_axis"]) == (True, False, False, None)


def test_one_object_missing():
    s = score("a small red circle to the left of a large green square")
    assert s["objects"] is False and s["axis"] is None and s["direction"] is None
    s = score("there is a small red circle")
    assert s == dict(
        objects=False,
        objects_with_size=False,
        colour=False,
        shape=False,
        size=False,
        axis=None,
        direction=None,
        direction_given_axis=None,
    )


def test_three_objects_named_is_not_scored_for_direction():
    # the set of objects is right (the red circle repeats) but there are three: no two-object reading
    s = score("a small red circle to the left of a large blue square and a small red circle")
    assert s["objects"] is True and s["colour"] is False and s["direction"] is None


def test_sizes_swapped_between_objects():
    s = score("a large red circle to the left of a small blue square")
    assert s["objects"] is True and s["objects_with_size"] is False
    # the multiset of sizes, colours and shapes is still right: only their attachment is wrong
    assert s["size"] is True and s["colour"] is True and s["shape"] is True
    assert s["direction"] is True


def test_attribute_multisets():
    s = score("a small red square to the left of a large blue circle")  # shapes swapped
    assert (s["objects"], s["colour"], s["shape"], s["size"]) == (False, True, True, True)
    s = score("a small red circle to the left of a small blue square")  # one size wrong
    assert (s["objects"], s["objects_with_size"], s["size"], s["colour"]) == (True, False, False, True)
    s = score("a small red circle to the left of a large red square")  # one colour wrong
    assert (s["colour"], s["shape"], s["size"]) == (False, True, True)
    s = score("a red circle to the left of a blue square")  # sizes not stated
    assert (s["objects"], s["objects_with_size"], s["size"], s["direction"]) == (True, False, False, True)


def test_same_colour_pair_identified_by_colour_and_shape():
    assert skills.category(SAME_COLOUR) == "pair_one_colour"
    assert skills.category(PAIR) == "pair_two_colours"
    assert skills.category(SINGLE) == "single"
    right = score("a small green triangle below a large green cross", SAME_COLOUR)
    assert right["objects_with_size"] and right["direction"] and right["axis"]
    wrong = score("a large green cross below a small green triangle", SAME_COLOUR)
    assert (wrong["objects"], wrong["axis"], wrong["direction"]) == (True, True, False)
    # both named green but one shape wrong: objects wrong, colour right
    s = score("a large green cross above a small green circle", SAME_COLOUR)
    assert (s["objects"], s["colour"], s["shape"], s["direction"]) == (False, True, False, None)


def test_single_object_scene():
    s = score("there is a large green cross", SINGLE)
    assert s == dict(
        objects=True,
        objects_with_size=True,
        colour=True,
        shape=True,
        size=True,
        axis=None,
        direction=None,
        direction_given_axis=None,
    )
    assert score("a large green cross to the left of a large green cross", SINGLE)["colour"] is False
    assert score("a small green cross", SINGLE)["objects_with_size"] is False


def test_per_image_columns_and_figures():
    scenes = [PAIR, PAIR, PAIR, PAIR, SAME_COLOUR, SINGLE, SINGLE]
    captions = [
        "a small red circle to the left of a large blue square",  # all right
        "a large blue square to the left of a small red circle",  # wrong direction, right axis
        "a small red circle above a large blue square",  # wrong axis
        "a small red circle",  # object missing
        "a small green triangle below a large green cross",  # all right
        "a large green cross",  # all right
        "a small green cross",
    ]  # size wrong
    columns = skills.per_image_skills(captions, scenes)
    assert set(columns) == set(skills.FIGURES) | {"category"}
    assert columns["category"] == ["pair_two_colours"] * 4 + ["pair_one_colour", "single", "single"]
    assert columns["objects"] == [1, 1, 1, 0, 1, 1, 1]
    assert columns["objects_with_size"] == [1, 1, 1, 0, 1, 1, 0]
    assert columns["axis"] == [1, 1, 0, None, 1, None, None]
    assert columns["direction"] == [1, 0, 0, None, 1, None, None]
    assert columns["direction_given_axis"] == [1, 0, None, None, 1, None, None]
    assert columns["flip_consistency"] == [None] * 7

    figures = skills.skill_figures(captions, scenes)
    assert figures["n_images"] == 7
    assert figures["objects"] == {"accuracy": 6 / 7, "n": 7}
    assert figures["axis"] == {"accuracy": 3 / 4, "n": 4}
    assert figures["direction"] == {"accuracy": 2 / 4, "n": 4}
    assert figures["direction_given_axis"] == {"accuracy": 2 / 3, "n": 3}
    assert figures["flip_consistency"] == {"accuracy": None, "n": 0}
    by = figures["by_category"]
    assert set(by) == {"single", "pair_two_colours", "pair_one_colour"}
    assert by["single"]["n_images"] == 2
    assert by["single"]["objects_with_size"] == {"accuracy": 0.5, "n": 2}
    assert by["single"]["direction"] == {"accuracy": None, "n": 0}
    assert by["pair_two_colours"]["direction"] == {"accuracy": 1 / 3, "n": 3}
    assert by["pair_one_colour"]["direction"] == {"accuracy": 1.0, "n": 1}

    with pytest.raises(ValueError):
        skills.per_image_skills(captions[:3], scenes)


def test_flip_consistent_cases():
    original = "a small red circle to the left of a large blue square"
    # the relation flips: said either way round
    assert skills.flip_consistent(original, "a small red circle to the right of a large blue square", PAIR) is True
    assert skills.flip_consistent(original, "a large blue square to the left of a small red circle", PAIR) is True
    # the relation stays put although the image flipped (said either way round)
    assert skills.flip_consistent(original, original, PAIR) is False
    assert skills.flip_consistent(original, "a large blue square to the right of a small red circle", PAIR) is False
    # a change of axis is not the inverse
    assert skills.flip_consistent(original, "a small red circle above a large blue square", PAIR) is False
    # the mirrored caption names other objects
    assert skills.flip_consistent(original, "a small red circle to the right of a large green cross", PAIR) is False
    # not applicable: a caption without two objects and a relation, or a single-object scene
    assert skills.flip_consistent(original, "a small red circle", PAIR) is None
    assert skills.flip_consistent("a red circle and a blue square", original, PAIR) is None
    assert skills.flip_consistent(original, "a small red circle to the right of", PAIR) is None
    assert skills.flip_consistent(original, "a small red circle to the right of a large blue square", SINGLE) is None
    # the scene's own objects are not required: a consistently wrong pair still flips
    assert skills.flip_consistent("a red cross above a blue circle", "a blue circle above a red cross", PAIR) is True

    figures = skills.skill_figures(
        [original, original, original, "there is a large green cross"],
        [PAIR, PAIR, PAIR, SINGLE],
        mirrored_captions=[original.replace("left", "right"), original, "a red circle", "a large green cross"],
    )
    assert figures["flip_consistency"] == {"accuracy": 0.5, "n": 2}
    assert figures["by_category"]["single"]["flip_consistency"] == {"accuracy": None, "n": 0}


def rendered_scenes(n_pairs=24, seed=0):
    rng = random.Random(seed)
    everything = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    pairs, singles = [], []
    while len(pairs) < n_pairs or not singles:
        scene = shapes.sample_scene(rng, everything)
        (pairs if scene["relation"] else singles).append(scene)
    return pairs, singles


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=int)


def consistent_with_positions(scene):
    a, b = scene["objects"]
    return {
        "to the left of": a["x"] < b["x"],
        "to the right of": a["x"] > b["x"],
        "above": a["y"] < b["y"],
        "below": a["y"] > b["y"],
    }[scene["relation"]]


def test_mirror_flips_the_true_relation_and_moves_the_pixels():
    pairs, singles = rendered_scenes()
    horizontal = [s for s in pairs if s["relation"] in skills.HORIZONTAL]
    assert horizontal and len(horizontal) < len(pairs)  # both axes are exercised
    upside_down = 0
    for scene in pairs:
        image = shapes.render_scene(scene)
        before = {k: [dict(o) for o in scene["objects"]] if k == "objects" else v for k, v in scene.items()}
        mirrored_image, mirrored = skills.mirror(image, scene)
        assert scene == before  # the input scene is left alone
        assert mirrored["relation"] == shapes.RELATIONS[scene["relation"]]
        assert consistent_with_positions(scene) and consistent_with_positions(mirrored)
        is_horizontal = scene["relation"] in skills.HORIZONTAL
        # the objects stay; only the coordinate along the relation's axis moves
        moved, kept = ("x", "y") if is_horizontal else ("y", "x")
        same = ("colour", "shape", "size", kept)
        for o, m in zip(scene["objects"], mirrored["objects"]):
            assert {k: o[k] for k in same} == {k: m[k] for k in same}
            assert m[moved] == pytest.approx(shapes.CANVAS - o[moved])
        flip = ImageOps.mirror if is_horizontal else ImageOps.flip
        assert (pixels(mirrored_image) == pixels(flip(image))).all()
        redrawn = pixels(shapes.render_scene(mirrored))
        different = (redrawn != pixels(mirrored_image)).any(-1)
        has_triangle = any(o["shape"] == "triangle" for o in scene["objects"])
        if is_horizontal or not has_triangle:
            assert not different.any(), scene
        else:
            # a top-bottom flip turns a triangle upside down: the redrawn scene differs there only
            upside_down += 1
            triangles = np.zeros_like(different)
            for o in mirrored["objects"]:
                if o["shape"] == "triangle":
                    r = shapes.SIZES[o["size"]]
                    y0, x0 = int(o["y"] - r - 2), int(o["x"] - r - 2)
                    triangles[max(y0, 0) : y0 + 2 * r + 5, max(x0, 0) : x0 + 2 * r + 5] = True
            assert different.any() and not (different & ~triangles).any()
    assert upside_down  # the exception is exercised
    for scene in singles:
        assert skills.mirror(shapes.render_scene(scene), scene) is None


def test_mirror_of_a_mirror_is_the_original():
    pairs, _ = rendered_scenes(n_pairs=6, seed=1)
    for scene in pairs:
        image = shapes.render_scene(scene)
        back_image, back = skills.mirror(*skills.mirror(image, scene))
        assert (pixels(back_image) == pixels(image)).all()
        assert back["relation"] == scene["relation"]
        for o, b in zip(scene["objects"], back["objects"]):
            assert (b["x"], b["y"]) == pytest.approx((o["x"], o["y"]))


def test_describe_of_a_mirrored_scene_is_flip_consistent():
    """Captions that are right on both images are flip consistent; the same caption twice is not."""
    pairs, _ = rendered_scenes(n_pairs=12, seed=2)
    for scene in pairs:
        _, mirrored = skills.mirror(shapes.render_scene(scene), scene)
        for original, flipped in zip(shapes.describe(scene), shapes.describe(mirrored)):
            assert skills.flip_consistent(original, flipped, scene) is True
            assert skills.flip_consistent(original, original, scene) is False
            assert skills.image_skills(flipped, mirrored)["direction"] is True
            assert skills.image_skills(original, mirrored)["direction"] is False


# direction_both_ways: its chance level (a captioner that does not read the direction) is exactly
# DIRECTION_CHANCE and its ceiling DIRECTION_CEILING


def test_direction_both_ways_is_one_half_without_the_direction_and_one_with_it():
    pairs, singles = rendered_scenes(n_pairs=200)
    levels = skills.direction_reference(pairs + singles)
    assert levels == {"perfect": skills.DIRECTION_CEILING, "blind to the direction": skills.DIRECTION_CHANCE}
    assert (skills.DIRECTION_CHANCE, skills.DIRECTION_CEILING) == (0.5, 1.0)

    # any captioner that ignores the direction says the same of an image and its mirror: one of the
    # two is right, whichever relation it picks and in whichever order it names the objects
    rng = random.Random(1)
    for scene in pairs:
        a, b = (shapes.phrase(o) for o in scene["objects"])
        horizontal = scene["relation"] in skills.HORIZONTAL
        relation = rng.choice(["to the left of", "to the right of"] if horizontal else ["above", "below"])
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        caption = f"{first} {relation} {second}"
        assert skills.direction_both_ways(caption, caption, scene) == 0.5
        right = shapes.describe(scene)[0]
        mirrored = shapes.describe(skills.mirrored_scene(scene, shapes.CANVAS, shapes.CANVAS))[0]
        assert skills.direction_both_ways(right, mirrored, scene) == 1.0
        assert skills.direction_both_ways(mirrored, right, scene) == 0.0  # backwards both times


def test_direction_both_ways_applies_only_where_both_captions_name_the_objects_on_the_right_axis():
    right, mirrored = (
        "a small red circle to the left of a large blue square",
        "a small red circle to the right of a large blue square",
    )
    assert skills.direction_both_ways(right, mirrored, PAIR) == 1.0
    assert skills.direction_both_ways(right, "a small red circle above a large blue square", PAIR) is None  # axis
    assert skills.direction_both_ways(right, "a small red circle to the right of a green cross", PAIR) is None
    assert skills.direction_both_ways(right, None, PAIR) is None
    assert skills.direction_both_ways("a large green cross", "a large green cross", SINGLE) is None
    row = skills.image_skills(right, PAIR, mirrored)
    assert row["direction_both_ways"] == 1.0 and row["flip_consistency"] is True
    columns = skills.per_image_skills([right, right], [PAIR, PAIR], [mirrored, right])
    assert columns["direction_both_ways"] == [1.0, 0.5]
