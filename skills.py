"""
What a caption got right about a shapes scene, one skill at a time.

A scene is the generator's metadata: {"objects": [{"colour", "shape", "size", "x", "y"}, ...],
"relation": one of RELATIONS or None}, the relation being that of objects[0] to objects[1].
Every per-image figure is True, False or None (None: the figure does not apply to that image):

  objects               the set of (colour, shape) named equals the scene's
  objects_with_size     the set of (size, colour, shape) named equals the scene's
  colour, shape, size   the multiset of that attribute over the objects named equals the scene's
                        (an object named without a size counts as size None, which is wrong)
  axis                  pairs whose two objects are named right (objects True, exactly two named):
                        horizontal (left/right) or vertical (above/below) right
  direction             same images: the relation right, read in the order the caption names
                        the objects; a wrong axis or no relation read is a wrong direction
  direction_given_axis  direction, among the images whose axis is right
  flip_consistency      pairs with a mirrored caption: see flip_consistent. A captioner whose caption
                        does not change under the mirror scores 0 here, not 0.5
  direction_both_ways   pairs with a mirrored caption, both captions naming the two objects right on
                        the right axis: the mean of the direction's correctness on the image and on
                        its mirror (0, 0.5 or 1). The mirror differs from the image in the direction
                        alone, so a captioner that does not read the direction states the same
                        relation for both and scores exactly 0.5, whatever its naming order or
                        template; one that reads it scores 1 (exactly, when decoded greedily or
                        by beam search; on average, when sampled). DIRECTION_CHANCE and _CEILING.

category is "single", "pair_two_colours" or "pair_one_colour".
"""

import copy
import re
from collections import Counter

from PIL import ImageOps

from shapes import CANVAS, COLOURS, RELATIONS, SHAPES, SIZES, describe, phrase

FIGURES = (
    "objects",
    "objects_with_size",
    "colour",
    "shape",
    "size",
    "axis",
    "direction",
    "direction_given_axis",
    "flip_consistency",
    "direction_both_ways",
)
DIRECTION_CHANCE, DIRECTION_CEILING = 0.5, 1.0  # of direction_both_ways, see above
CATEGORIES = ("single", "pair_two_colours", "pair_one_colour")
HORIZONTAL = ("to the left of", "to the right of")

_OBJECT = re.compile(r"\b(?:({})\s+)?({})\s+({})\b".format("|".join(SIZES), "|".join(COLOURS), "|".join(SHAPES)))
_RELATION = re.compile(r"\b(?:(?:to|on) the\s+)?(left|right)\s+of\b|\b(above|below)\b")


def read_caption(caption):
    """(objects, relation) read from a caption.

    objects: [(size or None, colour, shape), ...] in order of mention.
    relation: one of RELATIONS ("left of" and "on the left of" read as "to the left of"), or None
    unless the caption holds exactly one relation phrase and, when it names two or more objects,
    that phrase sits between the first two (otherwise "first <relation> second" would misread it)."""
    text = " ".join(str(caption).lower().split())
    found = list(_OBJECT.finditer(text))
    objects = [m.groups() for m in found]
    phrases = list(_RELATION.finditer(text))
    if len(phrases) != 1:
        return objects, None
    m = phrases[0]
    relation = f"to the {m.group(1)} of" if m.group(1) else m.group(2)
    if len(found) >= 2 and not found[0].end() <= m.start() < m.end() <= found[1].start():
        relation = None
    return objects, relation


def category(scene):
    objs = scene["objects"]
    if len(objs) == 1:
        return "single"
    return "pair_one_colour" if objs[0]["colour"] == objs[1]["colour"] else "pair_two_colours"


def _axis(relation):
    return "horizontal" if relation in HORIZONTAL else "vertical"


def _claim(reading, first, second):
    """The relation of `first` to `second` (both (colour, shape)) that a two-object reading states."""
    objects, relation = reading
    named = [(c, s) for _, c, s in objects]
    if relation is None or named not in ([first, second], [second, first]):
        return None
    return relation if named[0] == first else RELATIONS[relation]


def flip_consistent(caption_original, caption_mirrored, scene):
    """Whether the caption's relation flipped with the image.

    None when the scene is a single object or either caption does not name exactly two objects with
    a relation. False when the two captions name different objects. Otherwise True when the mirrored
    caption states, of the original caption's first object to its second, the inverse of the
    relation the original caption states."""
    if scene["relation"] is None:
        return None
    original, mirrored = read_caption(caption_original), read_caption(caption_mirrored)
    if any(len(objs) != 2 or rel is None for objs, rel in (original, mirrored)):
        return None
    first, second = [(c, s) for _, c, s in original[0]]
    claim_original, claim_mirrored = _claim(original, first, second), _claim(mirrored, first, second)
    if claim_original is None or claim_mirrored is None:
        return False
    return claim_mirrored == RELATIONS[claim_original]


def _relation_read(reading, scene):
    """(axis right, direction right) of a caption's reading, or None unless it names exactly the
    scene's two objects ((colour, shape) is unique within a scene, so it says which is which)."""
    objects = reading[0]
    truth = [(o["colour"], o["shape"]) for o in scene["objects"]]
    if scene["relation"] is None or len(objects) != 2 or {(c, s) for _, c, s in objects} != set(truth):
        return None
    claim = _claim(reading, truth[0], truth[1])
    return claim is not None and _axis(claim) == _axis(scene["relation"]), claim == scene["relation"]


def direction_both_ways(caption, mirrored_caption, scene):
    """See the module's docstring: 0, 0.5 or 1, or None where it does not apply."""
    if scene["relation"] is None or mirrored_caption is None:
        return None
    here = _relation_read(read_caption(caption), scene)
    there = _relation_read(read_caption(mirrored_caption), mirrored_scene(scene, CANVAS, CANVAS))
    if here is None or there is None or not (here[0] and there[0]):
        return None
    return (here[1] + there[1]) / 2


def image_skills(caption, scene, mirrored_caption=None):
    """{figure: True/False/None (0/0.5/1 for direction_both_ways) for each of FIGURES, "category": str}."""
    objects, relation = reading = read_caption(caption)
    truth = [(o["size"], o["colour"], o["shape"]) for o in scene["objects"]]
    row = {
        "category": category(scene),
        "objects": {(c, s) for _, c, s in objects} == {(c, s) for _, c, s in truth},
        "objects_with_size": set(objects) == set(truth),
        "size": Counter(o[0] for o in objects) == Counter(o[0] for o in truth),
        "colour": Counter(o[1] for o in objects) == Counter(o[1] for o in truth),
        "shape": Counter(o[2] for o in objects) == Counter(o[2] for o in truth),
        "axis": None,
        "direction": None,
        "direction_given_axis": None,
        "flip_consistency": None,
        "direction_both_ways": None,
    }
    read = _relation_read(reading, scene)
    if read is not None:
        row["axis"], row["direction"] = read
        row["direction_given_axis"] = row["direction"] if row["axis"] else None
    if mirrored_caption is not None:
        row["flip_consistency"] = flip_consistent(caption, mirrored_caption, scene)
        row["direction_both_ways"] = direction_both_ways(caption, mirrored_caption, scene)
    return row


def per_image_skills(captions, scenes, mirrored_captions=None):
    """Columns over the images, in order: {figure: [1, 0 or None per image] for each of FIGURES,
    "category": [str per image]}. mirrored_captions[i] (or None) is the caption of mirror(image i)."""
    if len(captions) != len(scenes) or (mirrored_captions is not None and len(mirrored_captions) != len(scenes)):
        raise ValueError(
            f"{len(captions)} captions, {len(scenes)} scenes"
            + ("" if mirrored_captions is None else f", {len(mirrored_captions)} mirrored captions")
        )
    mirrored_captions = mirrored_captions or [None] * len(scenes)
    rows = [image_skills(c, s, m) for c, s, m in zip(captions, scenes, mirrored_captions)]
    columns = {f: [int(r[f]) if isinstance(r[f], bool) else r[f] for r in rows] for f in FIGURES}
    columns["category"] = [r["category"] for r in rows]
    return columns


def _means(columns, keep):
    out = {}
    for f in FIGURES:
        values = [v for v, k in zip(columns[f], keep) if k and v is not None]
        out[f] = {"accuracy": sum(values) / len(values) if values else None, "n": len(values)}
    return out


def skill_figures(captions, scenes, mirrored_captions=None):
    """{"n_images": int, figure: {"accuracy": float or None, "n": int} for each of FIGURES,
    "by_category": {category: {"n_images": int, figure: {...}} for each of CATEGORIES}}.

    accuracy is the mean over the images where the figure applies (n of them); None when n is 0."""
    columns = per_image_skills(captions, scenes, mirrored_captions)
    result = {"n_images": len(scenes), **_means(columns, [True] * len(scenes)), "by_category": {}}
    for cat in CATEGORIES:
        keep = [c == cat for c in columns["category"]]
        result["by_category"][cat] = {"n_images": sum(keep), **_means(columns, keep)}
    return result


def mirror(image, scene):
    """(mirrored image, mirrored scene) for a pair, None for a single object.

    A left/right pair is mirrored left-right (x -> W - x), an above/below pair top-bottom
    (y -> H - y), so the true relation inverts while the objects stay; the scene is copied with
    its relation inverted. With Pillow's drawing, render_scene(mirrored scene) equals the mirrored
    image pixel for pixel, except that a top-bottom flip turns a triangle upside down, a shape the
    generator never draws; render_scene(mirrored scene) is that scene with upright triangles."""
    if scene["relation"] is None:
        return None
    horizontal = scene["relation"] in HORIZONTAL
    return (ImageOps.mirror(image) if horizontal else ImageOps.flip(image)), mirrored_scene(scene, *image.size)


def mirrored_scene(scene, width, height):
    """The scene of a pair mirrored left-right (a left/right pair) or top-bottom (above/below)."""
    mirrored = copy.deepcopy(scene)
    horizontal = scene["relation"] in HORIZONTAL
    for o in mirrored["objects"]:
        if horizontal:
            o["x"] = width - o["x"]
        else:
            o["y"] = height - o["y"]
    mirrored["relation"] = RELATIONS[scene["relation"]]
    return mirrored


def direction_reference(scenes):
    """direction_both_ways of two reference captioners on these scenes' pairs: "perfect" (each
    image's and each mirror's first reference caption) and "blind to the direction" (the objects
    named right in the scene's order, on the right axis, always "to the left of" or "above").
    The levels a trained run sits between: DIRECTION_CEILING and DIRECTION_CHANCE."""
    pairs = [s for s in scenes if s["relation"] is not None]
    mirrors = [mirrored_scene(s, CANVAS, CANVAS) for s in pairs]

    def blind(scene):
        a, b = scene["objects"]
        return f"{phrase(a)} {'to the left of' if scene['relation'] in HORIZONTAL else 'above'} {phrase(b)}"

    result = {}
    for name, captioner in (("perfect", lambda s: describe(s)[0]), ("blind to the direction", blind)):
        values = [direction_both_ways(captioner(s), captioner(m), s) for s, m in zip(pairs, mirrors)]
        values = [v for v in values if v is not None]
        result[name] = sum(values) / len(values) if values else None
    return result
