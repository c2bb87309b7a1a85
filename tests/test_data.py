"""Data loading: every source's layout gives the splits, images and references its files say;
splits are by image; every problem in images or caption files is named (file, line, what is
wrong) and either stops loading or, with strict=False (--skip-bad), is left out while the good
records stay; odd image modes become proper RGB; captions become input ids, targets and a mask."""

import json
import random
import re
import shutil

import numpy as np
import pytest
import torch
from corpora import (
    COCO_TRAIN,
    CSV_REFS,
    FOLDER_CASES,
    INSERT_AT,
    N_GOOD,
    all_records,
    assert_disjoint,
    assert_named,
    jsonl_line,
    karpathy_written,
    loaded,
    n_refs,
    norm,
    write_coco,
    write_good_images,
    write_jsonl_dataset,
)
from PIL import Image

import backbones
import data
import features
import shapes
import train
from conftest import kept_rng

# -----------------------------------------------------------------------------
# each source in its own layout


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
    # each image with all of its captions (the files are named by image, not by row number)
    by_captions = lambda named: {k: sorted(v.values()) for k, v in named.items()}
    assert by_captions(loaded(splits)) == by_captions(norm(written.splits))
    # the images were written out as files the rest of the pipeline can read
    for r in splits["train"]:
        assert r.image.is_file() and tmp_path in r.image.parents
        assert data.read_image(r.image).size == (shapes.CANVAS, shapes.CANVAS)


# -----------------------------------------------------------------------------
# splits: by image, never by caption row


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


def test_random_split_is_by_image_keeps_captions_together_and_is_reproducible(folder_dataset):
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

    # every caption of an image travels with it
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


def test_a_dataset_without_a_val_split_holds_some_training_images_out(folder_dataset, tmp_path):
    root, names = folder_dataset
    shutil.copytree(root, tmp_path / "d")
    (tmp_path / "d" / "splits.json").write_text(json.dumps({"train": names[:-2], "test": names[-2:]}))
    splits = data.load_splits("folder", tmp_path / "d", seed=0)
    assert len(splits["val"]) >= 1 and len(splits["train"]) + len(splits["val"]) == len(names) - 2
    assert not {r.image for r in splits["val"]} & {r.image for r in splits["train"]}


def three_splits(names):
    return {"train": names[:6], "val": names[6:8], "test": names[8:]}


@pytest.mark.parametrize("source", ["folder", "flickr8k"])
def test_split_naming_an_image_without_captions_is_named(source, tmp_path):
    """The folder loader (splits.json) and the Flickr8k one (its split files) check split names the same way."""
    if source == "folder":
        named = three_splits([f"g{i:02d}.png" for i in range(N_GOOD)])
        good, _ = write_jsonl_dataset(tmp_path, [], splits={**named, "train": named["train"] + ["ghost.png"]})
        split_file, captions_file = tmp_path / "splits.json", tmp_path / "captions.jsonl"
        expected = f"{split_file}: ghost.png (in train) has no caption in {captions_file}"
    else:
        good, named = write_small_flickr8k(tmp_path)
        split_file, captions_file = tmp_path / "Flickr_8k.devImages.txt", tmp_path / "Flickr8k.token.txt"
        split_file.write_text(split_file.read_text() + "ghost.jpg\n")
        expected = f"{split_file}: ghost.jpg (in val) has no caption in {captions_file}"
    with pytest.raises(data.DataError) as e:
        data.load_splits(source, tmp_path)
    assert expected in str(e.value), str(e.value)
    splits = data.load_splits(source, tmp_path, strict=False)
    assert {k: [r.image.name for r in v] for k, v in splits.items()} == named
    assert all_records(splits) == good


@pytest.mark.parametrize("source", ["folder", "flickr8k"])
def test_captions_of_images_in_no_split_are_counted_and_not_used(source, tmp_path, capsys):
    """Captioned images that no split names are left out and counted. For Flickr8k: the official
    token file names one image that no split uses and that does not exist."""
    if source == "folder":
        names = [f"g{i:02d}.png" for i in range(N_GOOD)]
        write_jsonl_dataset(tmp_path, [], splits=three_splits(names[:-1]))
        splits = data.load_splits("folder", tmp_path)
        assert names[-1] not in all_records(splits)
    else:
        (tmp_path / "Flicker8k_Dataset").mkdir()
        names = [f"{i}.jpg" for i in range(3)]
        for n in names:
            Image.new("RGB", (8, 8), (40 * names.index(n), 0, 0)).save(tmp_path / "Flicker8k_Dataset" / n)
        lines = [f"{n}#{k}\ta caption {k} of {n}" for n in names for k in range(2)] + ["gone.jpg.1#0\tno image"]
        (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
        for f, n in (("train", names[0]), ("dev", names[1]), ("test", names[2])):
            (tmp_path / f"Flickr_8k.{f}Images.txt").write_text(n + "\n")
        splits = data.load_splits("flickr8k", tmp_path)
        assert [len(splits[s]) for s in ("train", "val", "test")] == [1, 1, 1]
    printed = capsys.readouterr().out
    assert "captions of 1 image(s) in no split" in printed
    assert "1 image(s) in no split file are not used" in printed


@pytest.mark.parametrize(
    "text, description",
    [
        ('{"train": ["g00.png", ', "not valid JSON"),
        ('["g00.png", "g01.png"]', 'expected {"train"'),
        ('{"train": "g00.png"}', 'expected {"train"'),
    ],
)
def test_folder_splits_file_of_the_wrong_shape_is_named(tmp_path, text, description):
    write_jsonl_dataset(tmp_path, [])
    (tmp_path / "splits.json").write_text(text)
    with pytest.raises(data.DataError, match=re.escape(f"{tmp_path / 'splits.json'}: {description}")):
        data.load_splits("folder", tmp_path, strict=False)


# -----------------------------------------------------------------------------
# a dataset that is not there


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


# -----------------------------------------------------------------------------
# bad records: one kind of problem per case, among good records


@pytest.mark.parametrize("kind", list(FOLDER_CASES))
def test_folder_jsonl_problem_is_named_and_can_be_left_out(kind, tmp_path, capsys):
    bad = FOLDER_CASES[kind]()
    good, [(bad, line_no)] = write_jsonl_dataset(tmp_path, [bad])

    with pytest.raises(data.DataError) as e:
        data.load_splits("folder", tmp_path, strict=True)
    message = str(e.value)
    assert "1 problem(s)" in message, message
    assert_named(message, tmp_path, bad, line_no)
    assert "--skip-bad" in message, "the error says how to go on without the bad records"

    kept = all_records(data.load_splits("folder", tmp_path, strict=False))
    assert kept == good, "strict=False keeps exactly the good records, with all their good captions"
    printed = capsys.readouterr().out
    assert "1 problem(s)" in printed and str(tmp_path / bad.file) in printed


def test_folder_metadata_line_problem_is_named(tmp_path):
    good, _ = write_jsonl_dataset(tmp_path, [])
    lines = [json.dumps({"image": name, "objects": 1}) for name in good]
    lines[1] = '{"objects": 2}'
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(data.DataError) as e:
        data.load_splits("folder", tmp_path)
    assert f"{tmp_path / 'metadata.jsonl'}:2: expected " in str(e.value), str(e.value)
    records = [r for split in data.load_splits("folder", tmp_path, strict=False).values() for r in split]
    assert sorted(r.meta.get("objects", 0) for r in records) == [0] + [1] * (N_GOOD - 1)


def write_csv_dataset(root, header, bad_row=None):
    good = write_good_images(root)
    rows = [header] + [f'{name},"{c}"' for name, caps in good.items() for c in caps]
    if bad_row is not None:
        rows.insert(INSERT_AT, bad_row)
    (root / "captions.csv").write_text("\n".join(rows) + "\n")
    return good


def test_csv_with_a_wrong_header_is_named(tmp_path):
    write_csv_dataset(tmp_path, "file,text")
    with pytest.raises(data.DataError) as e:
        data.load_splits("folder", tmp_path)
    message = str(e.value)
    assert f"{tmp_path / 'captions.csv'}:1:" in message
    assert "header" in message and "image,caption" in message
    # nothing in a file with an unknown layout can be trusted: no records, not a guess
    assert all_records(data.load_splits("folder", tmp_path, strict=False)) == {}


def test_csv_row_with_an_empty_caption_is_named_with_its_line(tmp_path):
    good = write_csv_dataset(tmp_path, "image,caption", bad_row="g04.png,")
    with pytest.raises(data.DataError) as e:
        data.load_splits("folder", tmp_path)
    message = str(e.value)
    assert "1 problem(s)" in message
    assert f"{tmp_path / 'captions.csv'}:{INSERT_AT + 1}: empty caption for g04.png" in message
    assert all_records(data.load_splits("folder", tmp_path, strict=False)) == good


def test_csv_quoted_caption_over_two_lines_keeps_its_words_and_the_line_numbers(tmp_path):
    """A quoted CSV field may hold a line break: the caption keeps both its lines' words apart,
    and a problem after it is still reported at its own line of the file."""
    good = write_good_images(tmp_path)
    (tmp_path / "captions.csv").write_text(
        "image,caption\n"  # line 1
        'g00.png,"a red circle\n'  # line 2
        'on white"\n'  # line 3
        "g01.png,a blue square\n"  # line 4
        "g02.png,\n"
    )  # line 5: the problem
    with pytest.raises(data.DataError) as e:
        data.load_splits("folder", tmp_path)
    assert f"{tmp_path / 'captions.csv'}:5: empty caption for g02.png" in str(e.value), str(e.value)
    kept = all_records(data.load_splits("folder", tmp_path, strict=False))
    assert set(kept) == {"g00.png", "g01.png"} and set(good) >= set(kept)
    assert [re.sub(r"\s+", " ", c) for c in kept["g00.png"]] == ["a red circle on white"], kept["g00.png"]


def write_small_flickr8k(root, bad_token_line=None, extra_image_in_train=None):
    """The official layout with N_GOOD JPEGs (6 train, 2 dev, 2 test), two captions each."""
    good = write_good_images(root / "Flicker8k_Dataset", ext="jpg")
    names = list(good)
    lines = [f"{name}#{k}\t{c}".encode() for name, caps in good.items() for k, c in enumerate(caps)]
    if bad_token_line is not None:
        lines.insert(INSERT_AT, bad_token_line)
    (root / "Flickr8k.token.txt").write_bytes(b"\n".join(lines) + b"\n")
    train = names[:6] + ([extra_image_in_train] if extra_image_in_train else [])
    for fname, split in (("trainImages", train), ("devImages", names[6:8]), ("testImages", names[8:])):
        (root / f"Flickr_8k.{fname}.txt").write_text("\n".join(split) + "\n")
    return good, {"train": names[:6], "val": names[6:8], "test": names[8:]}


FLICKR_CASES = {
    "token line without TAB": (
        b"g01.jpg#2 a small red circle",
        None,
        re.escape("expected '<image>.jpg#<n><TAB><caption>'"),
    ),
    "token line without #n": (b"g01.jpg\ta small red circle", None, re.escape("expected '<image>.jpg#<n><TAB>")),
    "token line with undecodable bytes": (b"g01.jpg#3\ta caf\xe9", None, "undecodable bytes"),
    "missing image file": (b"g99.jpg#0\ta large blue square", "g99.jpg", "image file not found"),
}


@pytest.mark.parametrize("kind", list(FLICKR_CASES))
def test_flickr8k_token_problem_is_named_with_its_line(kind, tmp_path):
    line, missing, description = FLICKR_CASES[kind]
    good, split_names = write_small_flickr8k(tmp_path, line, extra_image_in_train=missing)
    token_file = tmp_path / "Flickr8k.token.txt"
    with pytest.raises(data.DataError) as e:
        data.load_splits("flickr8k", tmp_path)
    message = str(e.value)
    assert "1 problem(s)" in message, message
    assert f"{token_file}:{INSERT_AT + 1}" in message, message
    assert re.search(description, message), message
    if missing:
        assert str(tmp_path / "Flicker8k_Dataset" / missing) in message

    splits = data.load_splits("flickr8k", tmp_path, strict=False)
    assert {k: [r.image.name for r in v] for k, v in splits.items()} == split_names
    assert all_records(splits) == good


# -----------------------------------------------------------------------------
# reading images: a missing or truncated file is named; every mode becomes RGB, the way it looks


def test_missing_image_is_a_clear_error_not_a_substitute(tmp_path):
    with pytest.raises(data.DataError, match="nope.png"):
        data.read_image(tmp_path / "nope.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="broken.png"):
        data.read_image(tmp_path / "broken.png")


def test_truncated_images_pass_the_cheap_check_but_not_a_full_decode(truncated_dataset, vision_dir):
    root, good = truncated_dataset
    for name in ("cut.png", "cut.jpg"):
        assert data.check_image(root / name) is None, "the header of a truncated file still reads"
        with pytest.raises(data.DataError, match=re.escape(str(root / name)) + ".*truncated"):
            data.read_image(root / name)
    records = all_records(data.load_splits("folder", root))  # loading reads headers only
    assert set(records) == set(good) | {"cut.png", "cut.jpg"}

    paths = sorted(root.glob("*.png")) + sorted(root.glob("*.jpg"))
    processor = backbones.load_vision(vision_dir)[1]
    computed, bad = features.compute_features(lambda pixels: pixels.flatten(2), processor, paths, batch_size=4)
    assert computed.shape[0] == len(paths) - 2
    assert sorted(paths[i].name for i, _ in bad) == ["cut.jpg", "cut.png"]
    for i, message in bad:
        assert str(paths[i]) in message and "truncated" in message


def saved(image, path, **kw):
    image.save(path, **kw)
    return path


def test_grayscale_becomes_grey_rgb(tmp_path):
    out = data.read_image(saved(Image.new("L", (8, 8), 77), tmp_path / "grey.png"))
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (77, 77, 77)


@pytest.mark.parametrize("value, expected", [(0.5, 128), (1.0, 255), (200.0, 200)])
def test_a_float_image_of_values_up_to_1_is_read_on_that_range(tmp_path, value, expected):
    out = data.read_image(saved(Image.new("F", (8, 8), value), tmp_path / "float.tif"))
    assert out.getpixel((3, 3)) == (expected,) * 3


@pytest.mark.parametrize("size", [(5000, 10), (10, 5000)])
def test_an_image_far_longer_than_wide_is_refused_before_it_is_decoded(tmp_path, size):
    """CLIP scales the short side up to 224: 5000 x 10 would become 112,000 x 224 first."""
    path = saved(Image.new("L", size), tmp_path / "strip.png")
    problem = f"{size[0]} x {size[1]} pixels: more than 100 times as long as it is wide"
    assert data.check_image(path).startswith(problem)
    with pytest.raises(data.DataError, match=problem):
        data.read_image(path)
    assert data.check_image(saved(Image.new("L", (1000, 10)), tmp_path / "panorama.png")) is None


def test_palette_with_transparency_is_composited_on_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 200, 20, 20] + [0] * 762)
    image.paste(1, (0, 0, 4, 8))  # left half: palette entry 1 (red); right half: entry 0, transparent
    out = data.read_image(saved(image, tmp_path / "palette.png", transparency=0))
    assert out.mode == "RGB"
    assert out.getpixel((1, 4)) == (200, 20, 20)
    assert out.getpixel((6, 4)) == (255, 255, 255), "a transparent pixel is white, not its (black) colour"


def test_rgba_transparent_pixels_become_white_not_black(tmp_path):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.paste((0, 0, 255, 255), (0, 0, 4, 4))
    image.paste((255, 0, 0, 128), (4, 4, 8, 8))
    out = data.read_image(saved(image, tmp_path / "alpha.png"))
    assert out.mode == "RGB"
    assert out.getpixel((7, 0)) == (255, 255, 255)
    assert out.getpixel((1, 1)) == (0, 0, 255)
    r, g, b = out.getpixel((6, 6))  # half-transparent red over white: pink
    assert r == 255 and 120 <= g <= 135 and 120 <= b <= 135


@pytest.mark.parametrize("suffix", [".jpg", ".tif"])
def test_cmyk_becomes_rgb(tmp_path, suffix):
    path = saved(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / f"cmyk{suffix}")
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = data.read_image(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r > 220 and g < 40 and b < 40, "0% cyan, 100% magenta and yellow is red"


def grey16(tmp_path, value):
    path = saved(Image.fromarray(np.full((8, 8), value, dtype=np.uint16)), tmp_path / f"grey16-{value}.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I"), im.mode
    return data.read_image(path)


@pytest.mark.parametrize("value16, value8", [(32768, 128), (65535, 255), (0, 0), (16384, 64)])
def test_16_bit_grey_is_scaled_down_not_clipped(tmp_path, value16, value8):
    out = grey16(tmp_path, value16)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r == g == b and abs(r - value8) <= 1, (value16, r)


def test_dark_16_bit_grey_stays_dark(tmp_path):
    """A 16-bit PNG is 0..65535 whatever its brightest pixel: 200/65535 is near black, not 200/255."""
    out = grey16(tmp_path, 200)
    assert out.getpixel((4, 4))[0] <= 2, out.getpixel((4, 4))


@pytest.mark.parametrize("orientation, marker", [(6, "top right"), (8, "bottom left")])
def test_exif_orientation_is_applied(tmp_path, orientation, marker):
    """Stored 40x20 with a red block at the top left; 6 = rotate 90 deg clockwise to view, 8 = anticlockwise."""
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = data.read_image(saved(image, tmp_path / "rotated.jpg", exif=exif, quality=95))
    assert out.mode == "RGB" and out.size == (20, 40)
    corners = {"top left": (2, 2), "top right": (17, 2), "bottom left": (2, 37), "bottom right": (17, 37)}
    for where, xy in corners.items():
        r, g, b = out.getpixel(xy)
        red = r > 200 and b < 60
        assert red == (where == marker), f"orientation {orientation}: {where} is {(r, g, b)}"


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


def write_hf_rows_per_caption(root, n_images=20, captions_per_image=5, id_column=None, row_ids=False):
    """A Dataset of one row per caption, as many hub caption datasets are stored; the id column
    numbers the images, or with row_ids the rows."""
    import datasets

    images, captions, ids = [], [], []
    for i in range(n_images):
        image = Image.new("RGB", (16, 16), (i * 12 % 256, 40, 200 - i * 7 % 200))
        for k in range(captions_per_image):
            images.append(image)
            captions.append(f"picture {i} caption {k}")
            ids.append(len(ids) if row_ids else 1000 + i)
    columns = {"image": images, "caption": captions}
    features = {"image": datasets.Image(), "caption": datasets.Value("string")}
    if id_column:
        columns[id_column], features[id_column] = ids, datasets.Value("int64")
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).save_to_disk(str(root))
    return root


@pytest.mark.parametrize("id_column, row_ids", [(None, False), ("image_id", False), ("id", True), ("image_id", True)])
def test_hf_rows_of_one_image_become_one_record_with_all_its_captions(tmp_path, capsys, id_column, row_ids):
    """Grouped by an image id column, else by the image bytes. An id of each caption row (a plain
    "id", or even one named as the image's but never shared by two rows) is not the image's."""
    root = write_hf_rows_per_caption(tmp_path / "hf", id_column=id_column, row_ids=row_ids)
    splits = data.load_splits(f"hf:{root}", root, cache_dir=tmp_path / "cache")
    if id_column == "image_id" and row_ids:
        assert "no two rows share a value of image_id; rows are grouped by image bytes" in capsys.readouterr().out
    records = [r for split in splits.values() for r in split]
    assert len(records) == 20, "one record per image, not per caption row"
    for r in records:
        picture = {c.split(" caption")[0] for c in r.captions}
        assert len(r.captions) == 5 and len(picture) == 1, r.captions
    pictures = {split: {r.captions[0].split(" caption")[0] for r in rs} for split, rs in splits.items()}
    assert not (pictures["train"] & pictures["test"]) and not (pictures["train"] & pictures["val"])
    assert len(splits["test"]) >= 1 and len(splits["val"]) >= 1


def test_the_same_image_under_two_names_in_two_splits_is_refused(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    shutil.copy(tmp_path / "a.png", tmp_path / "copy-of-a.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "c.png")
    rows = [{"image": n, "caption": f"caption of {n}"} for n in ("a.png", "copy-of-a.png", "b.png", "c.png")]
    data.write_jsonl(tmp_path / "captions.jsonl", rows)
    named = {"train": ["a.png", "b.png"], "val": ["c.png"], "test": ["copy-of-a.png"]}
    (tmp_path / "splits.json").write_text(json.dumps(named))
    with pytest.raises(data.DataError, match="are the same image") as e:
        data.load_splits("folder", tmp_path)
    assert "copy-of-a.png" in str(e.value) and "a.png (in train)" in str(e.value)


def test_a_split_file_naming_one_image_in_two_splits_is_refused(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "b.png")
    Image.new("RGB", (8, 8), (10, 10, 200)).save(tmp_path / "c.png")
    data.write_jsonl(tmp_path / "captions.jsonl", [{"image": n, "caption": "c"} for n in ("a.png", "b.png", "c.png")])
    named = {"train": ["a.png", "b.png"], "val": ["c.png"], "test": ["a.png"]}
    (tmp_path / "splits.json").write_text(json.dumps(named))
    with pytest.raises(data.DataError, match="is in both the train and the test split"):
        data.load_splits("folder", tmp_path)


def test_the_split_follows_the_data_seed_not_the_training_seed(tmp_path, vision_dir, language_dir):
    for i in range(40):
        Image.new("RGB", (8, 8), (i * 6, 100, 50)).save(tmp_path / f"{i:02d}.png")
    data.write_jsonl(tmp_path / "captions.jsonl", [{"image": f"{i:02d}.png", "caption": "c"} for i in range(40)])

    def test_set(*options):
        args = train.parse_args(
            "explained",
            [
                "--data",
                "folder",
                "--data-dir",
                str(tmp_path),
                "--vision",
                str(vision_dir),
                "--language",
                str(language_dir),
                *options,
            ],
        )
        return data.split_id(data.splits_for(train.run_config("explained", args))["test"])

    assert test_set("--seed", "0") == test_set("--seed", "1") == test_set("--seed", "7")
    assert test_set("--data-seed", "1") != test_set("--data-seed", "0")


# -----------------------------------------------------------------------------
# one picture saved under several names: a split drawn here keeps its copies together


def write_folder_with_copies(root):
    """N_GOOD pictures, each also saved as copies/<name>, g00.png a third time as again.png."""
    good = write_good_images(root)
    (root / "copies").mkdir()
    rows = []
    for name, caps in good.items():
        shutil.copy(root / name, root / "copies" / name)
        rows += [{"image": n, "caption": c} for n in (name, f"copies/{name}") for c in caps]
    shutil.copy(root / "g00.png", root / "again.png")
    rows.append({"image": "again.png", "caption": "the first picture once more"})
    data.write_jsonl(root / "captions.jsonl", rows)
    return N_GOOD, 2 * N_GOOD + 1


def write_coco_with_copies(root):
    """The tiny COCO layout, every train2017 picture also under a second id and file name (the
    real train2017 holds such pairs); val2017 is the test split and is left as it is."""
    write_coco(root)
    path = root / "annotations" / "captions_train2017.json"
    d = json.loads(path.read_text())
    for im in list(d["images"]):
        copy = {**im, "id": im["id"] + 10000, "file_name": f"{im['id'] + 10000:012d}.jpg"}
        shutil.copy(root / "train2017" / im["file_name"], root / "train2017" / copy["file_name"])
        d["images"].append(copy)
        d["annotations"] += [
            {**a, "id": a["id"] + 10000, "image_id": copy["id"]} for a in d["annotations"] if a["image_id"] == im["id"]
        ]
    path.write_text(json.dumps(d))
    return COCO_TRAIN, 2 * COCO_TRAIN


def write_hf_with_copies(root):
    """One row per caption, no splits: each picture under two image ids, two captions each."""
    import datasets

    images, captions, ids = [], [], []
    for i in range(N_GOOD):
        image = Image.new("RGB", (16, 16), (i * 20, 40, 200 - i * 15))
        for image_id in (100 + i, 200 + i):
            images += [image, image]
            captions += [f"picture {i} caption {k}" for k in range(2)]
            ids += [image_id, image_id]
    features = datasets.Features(
        {"image": datasets.Image(), "caption": datasets.Value("string"), "image_id": datasets.Value("int64")}
    )
    datasets.Dataset.from_dict({"image": images, "caption": captions, "image_id": ids}, features=features).save_to_disk(
        str(root)
    )
    return N_GOOD, 2 * N_GOOD


def splits_of_each_picture(splits):
    """{content digest: set of splits its files are in}."""
    where = {}
    for split, records in splits.items():
        for r in records:
            where.setdefault(data.file_digest(r.image), set()).add(split)
    return where


def test_picture_groups_are_files_of_the_same_bytes(tmp_path):
    """Equal size and an equal first 64 KiB are only reasons to read on: files that differ after
    that are two pictures."""
    contents = {"a": b"x" * 70000 + b"a", "b": b"x" * 70000 + b"b", "copy-of-a": b"x" * 70000 + b"a", "c": b"y"}
    records = []
    for name, content in contents.items():
        (tmp_path / name).write_bytes(content)
        records.append(data.Record(tmp_path / name, [f"caption of {name}"]))
    groups = data.picture_groups(records)
    assert [[r.image.name for r in g] for g in groups] == [["a", "copy-of-a"], ["b"], ["c"]]


WITH_COPIES = {"folder": write_folder_with_copies, "coco": write_coco_with_copies, "hf": write_hf_with_copies}


@pytest.mark.parametrize("source", list(WITH_COPIES))
def test_a_split_drawn_here_keeps_every_copy_of_a_picture_in_one_split(tmp_path, capsys, source):
    """Copies are refused in a split someone wrote (test_the_same_image_under_two_names_...), but
    a split the loader draws itself (a folder without splits.json, an hf dataset without one,
    COCO's validation hold-out) puts every copy of a picture where the picture goes."""
    root = tmp_path / source
    pictures, files = WITH_COPIES[source](root)
    name = f"hf:{root}" if source == "hf" else source
    splits = data.load_splits(name, root, cache_dir=tmp_path / "cache")
    drawn = ["train", "val"] if source == "coco" else ["train", "val", "test"]
    assert sum(len(splits[s]) for s in drawn) == files, "every copy is kept, as a record of its own"
    where = splits_of_each_picture({s: splits[s] for s in drawn})
    assert len(where) == pictures
    assert all(len(s) == 1 for s in where.values()), where
    assert all(splits[s] for s in splits), "every split still gets a picture"
    printed = capsys.readouterr().out
    assert f"{pictures} picture(s) appear under more than one name ({files} files)" in printed, printed
    again = data.load_splits(name, root, cache_dir=tmp_path / "cache")
    assert {k: [r.image for r in v] for k, v in again.items()} == {k: [r.image for r in v] for k, v in splits.items()}


def test_without_copies_the_drawn_split_is_the_plain_shuffle_of_the_records(folder_dataset):
    """Grouping copies moves nothing else: a dataset without copies is split as it was before
    copies were grouped, so the runs made since keep their test set."""
    root, names = folder_dataset
    order = list(range(len(names)))
    random.Random(5).shuffle(order)
    n = max(1, int(len(names) * 0.05))
    plain = {"train": order[2 * n :], "val": order[:n], "test": order[n : 2 * n]}
    expected = {k: [names[i] for i in idx] for k, idx in plain.items()}
    assert split_names(data.load_splits("folder", root, seed=5), root) == expected


def test_skip_bad_training_on_a_folder_with_bad_records_and_copies_trains(tmp_path, vision_dir, language_dir, capsys):
    """--skip-bad leaves the bad records out, the split keeps the copies together, and training runs."""
    cases = [FOLDER_CASES[k]() for k in ("zero-byte file", "text file named .jpg", "empty caption", "invalid JSON")]
    root = tmp_path / "mine"
    good, planted = write_jsonl_dataset(root, cases, truncated_images=["cut.png"])
    lines = (root / "captions.jsonl").read_bytes()
    (root / "copies").mkdir()
    for name, caps in {**good, "cut.png": ["a small green cross"]}.items():  # the truncated one too
        shutil.copy(root / name, root / "copies" / name)
        lines += b"".join(jsonl_line(f"copies/{name}", c) + b"\n" for c in caps)
    (root / "captions.jsonl").write_bytes(lines)
    argv = ["--vision", str(vision_dir), "--language", str(language_dir), "--data", "folder", "--data-dir", str(root)]
    argv += ["--batch-size", "4", "--max-steps", "2", "--no-eval", "--out", str(tmp_path / "run")]
    with kept_rng(), pytest.raises(SystemExit, match=r"problem\(s\) in the folder data"):
        train.main("explained", argv + ["--strict"])
    with kept_rng():
        run_dir = train.main("explained", argv + ["--skip-bad"])
    printed = capsys.readouterr().out
    assert f"{len(planted)} problem(s) in the folder data; --skip-bad leaves them out" in printed, printed
    assert f"{N_GOOD + 1} picture(s) appear under more than one name" in printed, printed
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    config = json.loads((run_dir / "config.json").read_text())
    where = splits_of_each_picture(data.splits_for(config))
    assert all(len(s) == 1 for s in where.values()), where
    # training decodes train and val: both copies of the truncated picture are left out there
    decoded = where[data.file_digest(root / "cut.png")] <= {"train", "val"}
    assert printed.count("--skip-bad: left out") == 2 * decoded, printed


# -----------------------------------------------------------------------------
# files as other tools write them: names spelled differently, a byte-order mark, other split
# names, entries with a field missing or of the wrong type, one unreadable hub image


def caption_line(image, caption):
    return json.dumps({"image": image, "caption": caption}) + "\n"


def test_names_spelled_with_dot_slash_are_the_same_images(tmp_path):
    """`find .` writes ./a.png: the caption file, splits.json and metadata.jsonl may each spell a
    name either way, and a.png and ./a.png are one image with both captions."""
    good = sorted(write_good_images(tmp_path))
    lines = [caption_line(f"./{n}" if k % 2 else n, f"caption {k}") for k, n in enumerate(good)]
    lines.append(caption_line(f"./{good[0]}", "another caption of the first"))
    (tmp_path / "captions.jsonl").write_text("".join(lines))
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"image": f"./{good[1]}", "objects": ["x"]}) + "\n")
    third = len(good) // 3
    named = {"train": good[: 2 * third], "val": good[2 * third : -1], "test": good[-1:]}
    (tmp_path / "splits.json").write_text(json.dumps({s: [f"./{n}" for n in ns] for s, ns in named.items()}))
    splits = data.load_splits("folder", tmp_path)
    assert {s: [r.image.name for r in rs] for s, rs in splits.items()} == named
    first = splits["train"][0]
    assert first.captions == ["caption 0", "another caption of the first"]
    assert splits["train"][1].meta == {"image": f"./{good[1]}", "objects": ["x"]}


@pytest.mark.parametrize("key", ["validation", "dev"])
def test_a_splits_file_may_call_its_val_split_validation_or_dev(tmp_path, key, capsys):
    good = sorted(write_good_images(tmp_path))
    (tmp_path / "captions.jsonl").write_text("".join(caption_line(n, "a caption") for n in good))
    named = {"train": good[:-2], key: good[-2:-1], "test": good[-1:]}
    (tmp_path / "splits.json").write_text("\ufeff" + json.dumps(named))  # a byte-order mark too
    splits = data.load_splits("folder", tmp_path)
    assert set(splits) == {"train", "val", "test"}
    assert [r.image.name for r in splits["val"]] == named[key]
    assert "no val split" not in capsys.readouterr().out


@pytest.mark.parametrize("caption, kind", [(["a dog", "a brown dog"], "list"), (1984, "int")])
def test_a_caption_that_is_not_a_string_is_named_as_such(tmp_path, caption, kind):
    good = sorted(write_good_images(tmp_path))
    rows = [{"image": n, "caption": "a caption"} for n in good] + [{"image": good[0], "caption": caption}]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DataError) as e:
        data.load_splits("folder", tmp_path)
    assert f"captions.jsonl:{len(rows)}: the caption of {good[0]} is a {kind}, expected a string" in str(e.value)


def test_karpathy_entries_without_captions_or_in_an_unknown_split_are_named(tmp_path):
    from corpora import write_karpathy

    write_karpathy(tmp_path)
    path = tmp_path / "dataset_flickr8k.json"
    d = json.loads(path.read_text())
    d["images"][0]["sentences"] = []
    d["images"][1]["split"] = "extra"
    del d["images"][2]["sentences"]
    path.write_text("\ufeff" + json.dumps(d))  # and a byte-order mark, which is allowed
    with pytest.raises(data.DataError) as e:
        data.load_splits("karpathy", tmp_path)
    message = str(e.value)
    assert f"{path} images[0]: k000.jpg has no captions" in message
    assert f"{path} images[1]: k001.jpg is in an unknown split 'extra'" in message
    assert f"{path} images[2]: expected" in message and "sentences" in message
    kept = all_records(data.load_splits("karpathy", tmp_path, strict=False))
    assert len(kept) == len(d["images"]) - 3 and not {"k000.jpg", "k001.jpg", "k002.jpg"} & set(kept)


def test_karpathy_json_that_is_not_json_is_named(tmp_path):
    (tmp_path / "dataset_coco.json").write_text('{"images": [')
    with pytest.raises(data.DataError, match=f"{tmp_path / 'dataset_coco.json'}: not valid JSON"):
        data.load_splits("karpathy", tmp_path)


def test_a_coco_image_without_a_caption_is_named(tmp_path):
    write_coco(tmp_path)
    path = tmp_path / "annotations" / "captions_val2017.json"
    d = json.loads(path.read_text())
    lonely = d["images"][0]
    d["annotations"] = [a for a in d["annotations"] if a["image_id"] != lonely["id"]]
    path.write_text("\ufeff" + json.dumps(d))
    with pytest.raises(data.DataError) as e:
        data.load_splits("coco", tmp_path)
    assert f"{path}: {lonely['file_name']} (image id {lonely['id']}) has no caption" in str(e.value)
    test = data.load_splits("coco", tmp_path, strict=False)["test"]
    assert len(test) == len(d["images"]) - 1 and lonely["file_name"] not in {r.image.name for r in test}


def test_an_unreadable_hub_image_is_named_and_left_out_with_skip_bad(tmp_path):
    import datasets

    images = [Image.new("RGB", (16, 16), (i * 20, 40, 90)) for i in range(11)]
    columns = {"image": [*images, {"bytes": b"not an image", "path": None}], "caption": [f"c {i}" for i in range(12)]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    root = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(root))
    with pytest.raises(data.DataError) as e:
        data.load_splits(f"hf:{root}", root, cache_dir=tmp_path / "cache")
    assert f"hf:{root} train[11].image: not a readable image" in str(e.value)
    splits = data.load_splits(f"hf:{root}", root, strict=False, cache_dir=tmp_path / "cache")
    # only a train split: val and test are drawn from it, not left out
    assert sorted(len(s) for s in splits.values()) == [1, 1, 9]
    assert sorted(c for s in splits.values() for r in s for c in r.captions) == sorted(f"c {i}" for i in range(11))
