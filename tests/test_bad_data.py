"""Bad images and captions: every problem is named (file, line, what is wrong) and either
stops loading or, with --skip-bad / strict=False, is left out while the good records stay.
Also: odd image modes become proper RGB, and generate.py reports bad inputs one per line."""

import json
import random
import re
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import pytest
from PIL import Image

import backbones
import data
import features
import shapes
from conftest import TRAIN_SCRIPTS, Script
from features import cached_features

N_GOOD = 10
PAIRS = [("red", "circle"), ("blue", "square"), ("green", "cross"), ("orange", "triangle")]


def scene_image(i):
    scene = shapes.sample_scene(random.Random(i), PAIRS)
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


# -----------------------------------------------------------------------------
# the corpus: one kind of bad input per case, among good records


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


def three_splits(names):
    return {"train": names[:6], "val": names[6:8], "test": names[8:]}


def test_folder_split_naming_an_image_without_captions_is_named(tmp_path):
    named = three_splits([f"g{i:02d}.png" for i in range(N_GOOD)])
    good, _ = write_jsonl_dataset(tmp_path, [], splits={**named, "train": named["train"] + ["ghost.png"]})
    with pytest.raises(data.DataError) as e:
        data.load_splits("folder", tmp_path)
    expected = f"{tmp_path / 'splits.json'}: ghost.png (in train) has no caption in {tmp_path / 'captions.jsonl'}"
    assert expected in str(e.value), str(e.value)
    splits = data.load_splits("folder", tmp_path, strict=False)
    assert {k: [r.image.name for r in v] for k, v in splits.items()} == named
    assert all_records(splits) == good


def test_folder_captions_in_no_split_are_counted(tmp_path, capsys):
    names = [f"g{i:02d}.png" for i in range(N_GOOD)]
    write_jsonl_dataset(tmp_path, [], splits=three_splits(names[:-1]))
    splits = data.load_splits("folder", tmp_path)
    assert names[-1] not in all_records(splits)
    assert "captions of 1 image(s) in no split" in capsys.readouterr().out


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


def write_flickr8k(root, bad_token_line=None, extra_image_in_train=None):
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
    good, split_names = write_flickr8k(tmp_path, line, extra_image_in_train=missing)
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


def test_flickr8k_split_naming_an_image_without_captions_is_named(tmp_path):
    good, split_names = write_flickr8k(tmp_path)
    dev = tmp_path / "Flickr_8k.devImages.txt"
    dev.write_text(dev.read_text() + "ghost.jpg\n")
    with pytest.raises(data.DataError) as e:
        data.load_splits("flickr8k", tmp_path)
    assert f"{dev}: ghost.jpg (in val) has no caption in {tmp_path / 'Flickr8k.token.txt'}" in str(e.value), str(
        e.value
    )
    splits = data.load_splits("flickr8k", tmp_path, strict=False)
    assert {k: [r.image.name for r in v] for k, v in splits.items()} == split_names


# -----------------------------------------------------------------------------
# truncated images: the header reads, so only a full decode (the feature cache) finds them


@pytest.fixture()
def truncated_dataset(tmp_path):
    good, _ = write_jsonl_dataset(tmp_path, [], truncated_images=["cut.png", "cut.jpg"])
    return tmp_path, good


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


@pytest.mark.parametrize("strict", [True, False])
def test_feature_cache_stops_on_or_leaves_out_truncated_images(
    truncated_dataset, make_config, strict, capsys, duocap_cache, monkeypatch
):
    from runs import build_model

    root, good = truncated_dataset
    records = [r for split in data.load_splits("folder", root).values() for r in split]
    config = make_config("explained")
    config["data_options"] = {**config["data_options"], "strict": strict}
    model, processor, _ = build_model(config)
    if strict:
        with pytest.raises(data.DataError) as e:
            cached_features(model, processor, config["vision"], records, "cpu", config["data_options"]["strict"])
        message = str(e.value)
        assert "2 image(s) failed to decode" in message and "--skip-bad" in message
        assert str(root / "cut.png") in message and str(root / "cut.jpg") in message
    else:
        kept, features = cached_features(
            model, processor, config["vision"], records, "cpu", config["data_options"]["strict"]
        )
        assert sorted(r.image.name for r in kept) == sorted(good)
        assert features.shape[0] == len(kept)
        printed = capsys.readouterr().out
        assert printed.count("--skip-bad: left out") == 2 and "cut.png" in printed and "cut.jpg" in printed


def test_a_strict_run_stops_on_a_feature_cache_built_with_skip_bad(
    truncated_dataset, make_config, tmp_path, monkeypatch
):
    monkeypatch.setenv("DUOCAP_CACHE", str(tmp_path / "own-cache"))
    from runs import build_model

    root, good = truncated_dataset
    records = [r for split in data.load_splits("folder", root).values() for r in split]
    config = make_config("explained")
    model, processor, _ = build_model(config)
    config["data_options"] = {**config["data_options"], "strict": False}
    kept, _ = cached_features(model, processor, config["vision"], records, "cpu", config["data_options"]["strict"])
    assert sorted(r.image.name for r in kept) == sorted(good)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(features, "compute_features", no_decoding)
    config["data_options"] = {**config["data_options"], "strict": True}
    with pytest.raises(data.DataError) as e:
        cached_features(model, processor, config["vision"], records, "cpu", config["data_options"]["strict"])
    message = str(e.value)
    assert "2 image(s) failed to decode" in message and "truncated" in message
    assert str(root / "cut.png") in message and str(root / "cut.jpg") in message


# -----------------------------------------------------------------------------
# the training script on the whole corpus

CORPUS_TRUNCATED = ["cut.png", "cut.jpg"]


@pytest.fixture(scope="module")
def corpus_runs(vision_dir, language_dir, duocap_cache, explained_run, tmp_path_factory):
    """Every folder problem in one dataset (truncated images in train); the script run strict and
    with --skip-bad; and a dataset whose test split holds a truncated image, evaluated."""
    root = tmp_path_factory.mktemp("bad-corpus")
    cases = [make() for make in FOLDER_CASES.values()]
    names = [f"g{i:02d}.png" for i in range(N_GOOD)]
    good, planted = write_jsonl_dataset(
        root,
        cases,
        truncated_images=CORPUS_TRUNCATED,
        splits={
            "train": names[:8] + CORPUS_TRUNCATED + [b.file for b in cases if b.image is not None],
            "val": names[8:9],
            "test": names[9:],
        },
    )

    evaluated = tmp_path_factory.mktemp("bad-test-split")
    write_jsonl_dataset(
        evaluated,
        [],
        truncated_images=["cut.jpg"],
        splits={"train": names[:7], "val": names[7:8], "test": names[8:] + ["cut.jpg"]},
    )

    base = [
        TRAIN_SCRIPTS["explained"],
        "--vision",
        vision_dir,
        "--language",
        language_dir,
        "--data",
        "folder",
        "--batch-size",
        4,
    ]
    runs_root = tmp_path_factory.mktemp("bad-runs")
    scripts = {
        "strict": Script(
            base + ["--data-dir", root, "--max-steps", 3, "--no-eval", "--out", runs_root / "strict"], duocap_cache
        ),
        "skip": Script(
            base + ["--data-dir", root, "--max-steps", 3, "--no-eval", "--skip-bad", "--out", runs_root / "skip"],
            duocap_cache,
        ),
        "evaluated": Script(
            base + ["--data-dir", evaluated, "--max-steps", 1, "--skip-bad", "--out", runs_root / "evaluated"],
            duocap_cache,
            hide_java=True,
        ),
    }
    results = {k: s.wait() for k, s in scripts.items()}
    return root, good, planted, runs_root, results


def test_strict_training_lists_every_problem_without_a_traceback(corpus_runs):
    root, good, planted, _, results = corpus_runs
    rc, stdout, stderr = results["strict"]
    output = stdout + stderr
    assert rc != 0
    assert "Traceback" not in output, output[-3000:]
    assert f"{len(planted)} problem(s) in the folder data" in output, output[-3000:]
    for bad, line_no in planted:
        assert_named(output, root, bad, line_no)
    assert "--skip-bad" in output


def test_skip_bad_training_leaves_the_problems_out_and_trains(corpus_runs):
    root, good, planted, runs_root, results = corpus_runs
    rc, stdout, stderr = results["skip"]
    output = stdout + stderr
    assert rc == 0, output[-5000:]
    assert "Traceback" not in output
    assert (runs_root / "skip" / "model.safetensors").is_file()
    assert f"{len(planted)} problem(s) in the folder data; --skip-bad leaves them out" in output
    left_out = [line for line in output.splitlines() if line.startswith("--skip-bad: left out")]
    assert len(left_out) == len(CORPUS_TRUNCATED)
    for name in CORPUS_TRUNCATED:
        assert any(str(root / name) in line for line in left_out), left_out
    summary = json.loads((runs_root / "skip" / "summary.json").read_text())
    assert summary["steps"] == 3


def test_skip_bad_run_with_a_truncated_test_image_evaluates_without_a_traceback(corpus_runs):
    """The feature cache decodes only train and val: a truncated test image must still be
    reported (or left out) cleanly, not crash the evaluation after training."""
    _, _, _, runs_root, results = corpus_runs
    rc, stdout, stderr = results["evaluated"]
    output = stdout + stderr
    assert "Traceback" not in output, output[-3000:]
    assert rc == 0, output[-3000:]
    assert "cut.jpg" in output, "the truncated test image is reported"
    assert (runs_root / "evaluated" / "eval_test.json").is_file()


# -----------------------------------------------------------------------------
# image modes: everything becomes RGB, the way it looks


def saved(image, path, **kw):
    image.save(path, **kw)
    return path


def test_grayscale_becomes_grey_rgb(tmp_path):
    out = data.read_image(saved(Image.new("L", (8, 8), 77), tmp_path / "grey.png"))
    assert out.mode == "RGB" and out.getpixel((3, 3)) == (77, 77, 77)


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
# generate.py with bad inputs


def test_generate_reports_each_bad_input_and_captions_the_good_one(explained_run, splits, duocap_cache, tmp_path):
    missing = tmp_path / "no-such-photo.jpg"
    empty = tmp_path / "an-empty-folder"
    empty.mkdir()
    unreadable = tmp_path / "not-really.png"
    unreadable.write_text("this is text, not a PNG")
    good = splits["test"][0].image
    rc, stdout, stderr = Script(
        ["generate.py", "--checkpoint", explained_run.path(), "--strategy", "greedy", missing, empty, unreadable, good],
        duocap_cache,
    ).wait()
    assert rc == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    for bad in (missing, empty, unreadable):
        naming = [line for line in lines if str(bad) in line]
        assert len(naming) == 1, f"{bad}: {naming}"
        assert str(bad) not in stdout
    out_lines = stdout.splitlines()
    assert len(out_lines) == 1 and out_lines[0].startswith(f"{good}\t"), stdout
    assert out_lines[0].split("\t", 1)[1].strip(), "the good image gets a caption"
