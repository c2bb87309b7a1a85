"""Evaluation: caption_metrics is pycocoevalcap's COCO evaluation, with and without Java; the shapes
figures count what the captions get right; evaluate_run writes figures that the saved predictions
reproduce; and evaluate.py refuses a bad run folder, missing data or a bad value in one line.

Each METEOR scorer starts a JVM (several seconds), so the tests share one where they can."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor import meteor as meteor_module
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

import data
import evaluate
import shapes
import skills
import train
from conftest import assert_refused, loader_for, pixels_for, start_refusals, started_first, training_parts
from data import Record
from decoding import decode
from evaluate import shapes_figures

METRICS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE_L", "CIDEr"]


PREDICTIONS = [
    {
        "image": "images/surf.jpg",
        "caption": "A man riding a wave on top of a surfboard.",
        "references": [
            "A man riding a wave on a surfboard.",
            "A surfer rides a LARGE wave in the ocean!",
            "Man surfing on a big, blue wave.",
        ],
    },
    {
        "image": "images/dogs.jpg",
        "caption": "Two dogs play in the snow",
        "references": [
            "Two dogs are playing in the snow.",
            "A couple of dogs run through snow, chasing a ball.",
            "Dogs playing together in the SNOW",
            "two brown dogs in the snow",
            "Two dogs; one is jumping.",
        ],
    },
    {
        "image": "images/kite.jpg",
        "caption": "A child's red kite flies over the beach.",
        "references": ["A kid's kite flying high above a sandy beach.", "A red kite in the sky over the beach"],
    },
    {
        "image": "images/umbrella.jpg",
        "caption": "A woman doesn't hold an umbrella!",
        "references": [
            "A woman holds a pink umbrella in the rain.",
            "Woman with an umbrella, walking.",
            "A lady isn't getting wet: she's under an umbrella.",
            "A person holding an umbrella",
        ],
    },
    {
        "image": "images/cake.jpg",
        "caption": "a two-year-old eats cake at a party",
        "references": [
            "A two-year-old boy eating birthday cake.",
            "A toddler eats cake at a birthday party!",
            "Little kid with cake on his face",
            "A small child enjoys a piece of cake.",
        ],
    },
    {
        "image": "images/street.jpg",
        "caption": "Cars parked along a city street; it's raining.",
        "references": ["Cars are parked on a wet city street.", "A rainy street with parked cars..."],
    },
]


def write_and_read(path, predictions):
    """Round trip through a predictions file as evaluate.py saves it."""
    data.write_jsonl(path, predictions)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert rows == predictions
    return rows


def as_coco(predictions):
    gts = {p["image"]: [{"caption": r} for r in p["references"]] for p in predictions}
    res = {p["image"]: [{"caption": p["caption"]}] for p in predictions}
    return gts, res


def direct_scores(gts, res, meteor=None):
    """The scorers of pycocoevalcap called directly on tokenized {id: [str]} dicts."""
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    if meteor is not None:
        scores["METEOR"] = meteor.compute_score(gts, res)[0]
    return scores


def assert_scores_equal(got, expected, keys):
    for k in keys:
        assert got[k] == pytest.approx(expected[k], abs=1e-6, rel=0), k


@pytest.fixture(scope="module")
def meteor():
    """One METEOR scorer (one JVM) for the module."""
    scorer = meteor_module.Meteor()
    yield scorer


@pytest.fixture
def shared_meteor(monkeypatch, meteor):
    """caption_metrics gets the module's METEOR scorer instead of starting a JVM of its own
    (evaluate holds its own name for the class: patching pycocoevalcap's would not reach it)."""
    monkeypatch.setattr(evaluate, "Meteor", lambda: meteor)
    return meteor


def test_caption_metrics_are_the_coco_evaluation(tmp_path, shared_meteor):
    assert shutil.which("java"), "this test needs Java (the PTB tokenizer and METEOR run on it)"
    predictions = write_and_read(tmp_path / "predictions_test.jsonl", PREDICTIONS)
    got = evaluate.caption_metrics(predictions)

    gts, res = as_coco(predictions)
    tokenizer = PTBTokenizer()
    gts, res = tokenizer.tokenize(gts), tokenizer.tokenize(res)
    # the PTB tokenizer lowercases and drops punctuation, and keeps every image on its own line
    assert res["images/dogs.jpg"] == ["two dogs play in the snow"]
    assert gts["images/street.jpg"] == ["cars are parked on a wet city street", "a rainy street with parked cars"]
    expected = direct_scores(gts, res, shared_meteor)

    assert set(got) == set(METRICS) | {"SPICE", "notes"}
    assert_scores_equal(got, expected, METRICS)
    assert all(isinstance(got[k], float) for k in METRICS)
    # a set with something to score: neither all right nor all wrong
    assert 0 < got["BLEU-4"] < got["BLEU-1"] < 1 and 0 < got["METEOR"] < 1 and 0 < got["CIDEr"]
    assert got["SPICE"] is None
    assert any("SPICE" in note for note in got["notes"])
    assert not any("java" in note.lower() for note in got["notes"])


def test_without_java_meteor_is_skipped_and_a_plain_tokenizer_is_used(tmp_path, monkeypatch):
    predictions = write_and_read(tmp_path / "predictions_test.jsonl", PREDICTIONS)
    gts, res = as_coco(predictions)
    with_ptb = direct_scores(PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res))

    real_which = shutil.which
    monkeypatch.setattr(evaluate.shutil, "which", lambda name, *a, **k: None if name == "java" else real_which(name))

    def no_java(*args, **kwargs):
        raise AssertionError("Java was started although it is missing")

    monkeypatch.setattr(evaluate, "Meteor", no_java)
    monkeypatch.setattr(ptbtokenizer.PTBTokenizer, "tokenize", no_java)
    got = evaluate.caption_metrics(predictions)

    plain_gts, plain_res = evaluate.plain_tokenize(gts), evaluate.plain_tokenize(res)
    # what the plain tokenizer does, by hand
    assert plain_res["images/kite.jpg"] == ["a child s red kite flies over the beach"]
    assert plain_res["images/cake.jpg"] == ["a two year old eats cake at a party"]
    expected = direct_scores(plain_gts, plain_res)
    keys = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr"]
    assert_scores_equal(got, expected, keys)
    # ... and these inputs tell the two tokenizers apart, so the comparison above can fail
    assert any(abs(with_ptb[k] - expected[k]) > 1e-6 for k in keys)

    assert got["METEOR"] is None and got["SPICE"] is None
    notes = " ".join(got["notes"]).lower()
    assert "java" in notes and "meteor" in notes and "spice" in notes


def test_line_breaks_inside_a_caption_do_not_shift_the_other_images(shared_meteor):
    """The PTB tokenizer runs one caption per line: a caption holding a carriage return or a Unicode
    line separator (a byte-level BPE model can generate one) must still score as the same words
    with a space, and must not hand every later image another image's words."""
    predictions = [dict(p) for p in PREDICTIONS]
    predictions[1]["caption"] = "Two dogs\rplay in the snow"
    predictions[2]["references"] = [
        "A kid's kite flying high\u2028above a sandy beach.",
        "A red kite in the sky over the beach",
    ]
    got = evaluate.caption_metrics(predictions)

    clean = [
        dict(p, caption=" ".join(p["caption"].split()), references=[" ".join(r.split()) for r in p["references"]])
        for p in predictions
    ]
    assert clean[1]["caption"] == PREDICTIONS[1]["caption"]
    gts, res = as_coco(clean)
    expected = direct_scores(PTBTokenizer().tokenize(gts), PTBTokenizer().tokenize(res), shared_meteor)
    assert_scores_equal(got, expected, METRICS)


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


# -----------------------------------------------------------------------------
# evaluate_run end to end on a tiny model


@pytest.fixture(scope="module")
def trained_model(make_model, splits):
    """The tiny explained model after a few seconds of training on the shapes captions, so that its
    captions are words that partly match the references (a random one writes control bytes) and,
    on the images it was trained on, name the objects far more often than chance."""
    model, processor, tokenizer, config = make_model("explained", seed=1)
    records = splits["train"]
    features = model.image_features(pixels_for(processor, records))
    config = dict(config, batch_size=32)
    params, optimizer, scheduler, scaler = training_parts(model, lr=7e-3)
    n_rows = sum(len(r.captions) for r in records)
    model.train()
    for epoch in range(15):
        order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(epoch)).tolist()
        for batch in loader_for(records, features, processor, tokenizer, config, order):
            train.train_step(model, [batch], optimizer, scheduler, scaler, params, config)
    return model.eval(), processor, tokenizer


def test_evaluate_run_writes_figures_that_its_predictions_reproduce(trained_model, splits, tmp_path, shared_meteor):
    model, processor, tokenizer = trained_model
    figures = evaluate.evaluate_run(model, processor, tokenizer, splits, tmp_path, "test", "cpu", max_new_tokens=12)

    saved = json.loads((tmp_path / "eval_test.json").read_text())
    assert saved == json.loads(json.dumps(figures))
    assert saved["split"] == "test" and saved["n_images"] == len(splits["test"])
    assert saved["SPICE"] is None and any("SPICE" in n for n in saved["notes"])
    assert "compositional" in saved

    for split, nested in (("test", saved), ("compositional", saved["compositional"])):
        path = tmp_path / f"predictions_{split}.jsonl"
        predictions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        records = splits[split]
        assert [p["image"] for p in predictions] == [str(r.image) for r in records]
        assert [p["references"] for p in predictions] == [r.captions for r in records]
        assert nested["n_images"] == len(records)
        # each caption is the model's greedy caption of that image
        with torch.no_grad():
            ids = decode(
                model,
                model.encode_images(pixel_values=pixels_for(processor, records)),
                tokenizer.eos_token_id,
                max_new_tokens=12,
            )
        assert [p["caption"] for p in predictions] == [
            tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids
        ]

        # the figures are those of the saved predictions
        assert_scores_equal(nested, evaluate.caption_metrics(predictions), METRICS)
        assert nested["SPICE"] is None
        attr = sum(
            shapes.parse_objects(p["caption"]) == shapes.scene_objects(r.meta) for p, r in zip(predictions, records)
        ) / len(records)
        assert nested["attribute_accuracy"] == pytest.approx(attr)
        assert nested["exact_match"] == pytest.approx(
            sum(p["caption"] in p["references"] for p in predictions) / len(records)
        )
        # captions that differ between images and share words with the references: the check above can fail
        assert len({p["caption"] for p in predictions}) >= 2
        assert nested["BLEU-1"] > 0 and nested["METEOR"] > 0 and nested["CIDEr"] > 0


def test_the_blind_control_captions_each_image_from_the_next_images_pixels(trained_model, splits):
    """The blind figures are those of the next image's caption scored against each image's own
    scene (shapes_figures is tested on its own above: here, which caption meets which scene), and
    on the images the model was trained on they are far below the real ones: the captions come
    from the image."""
    model, processor, tokenizer = trained_model
    records = splits["train"]
    figures, predictions = evaluate.evaluate_split(
        model, processor, tokenizer, records, "cpu", metrics=False, max_new_tokens=12
    )
    captions = [p["caption"] for p in predictions]
    rotated = captions[1:] + captions[:1]  # image k scored by the caption of image k+1's pixels
    expected = shapes_figures(records, rotated)
    assert {k: figures[f"blind_{k}"] for k in expected} == pytest.approx(expected)
    assert figures["blind_skills"] == skills.skill_figures(rotated, [r.meta for r in records])

    truth = [shapes.scene_objects(r.meta) for r in records]
    named_right = sum(shapes.parse_objects(c) == t for c, t in zip(captions, truth))
    named_right_blind = sum(shapes.parse_objects(c) == t for c, t in zip(rotated, truth))
    assert figures["attribute_accuracy"] == pytest.approx(named_right / len(records))
    assert named_right >= named_right_blind + 6, (named_right, named_right_blind)


# -----------------------------------------------------------------------------
# a bad run folder, missing data or a bad value: one line, no traceback

REFUSALS = {
    "missing run folder": (["--checkpoint", "/no/such/run"], "/no/such/run", False),
    "folder that is not a run": (["--checkpoint", "{empty}"], "{empty}", False),
    "missing data folder": (["--checkpoint", "{no_data}"], "/no/such/dir", False),
    "no beams": (["--checkpoint", "/no/such/run", "--beams", "0"], "--beams", True),
    "--out in no folder": (["--checkpoint", "/no/such/run", "--out", "/no/such/dir/eval.json"], "/no/such/dir", False),
}


@started_first
def evaluate_refusals(runs_without_data, duocap_cache, tmp_path_factory):
    empty = tmp_path_factory.mktemp("not-a-run")
    return start_refusals("evaluate.py", REFUSALS, duocap_cache, empty=empty, no_data=runs_without_data["explained"])


@pytest.mark.parametrize("case", list(REFUSALS))
def test_evaluate_refuses_a_bad_run_folder_missing_data_or_a_bad_value_in_one_line(evaluate_refusals, case):
    assert_refused(*evaluate_refusals[case])


# attention selectivity on pairs: the named object's share against the other object's


def synthetic_pair(grid=8):
    """A pair scene drawn on the canvas and its two objects' patch covers on a grid x grid image."""
    scene = {
        "objects": [
            {"colour": "red", "shape": "square", "size": "large", "x": 16.0, "y": 32.0},
            {"colour": "blue", "shape": "circle", "size": "small", "x": 48.0, "y": 32.0},
        ],
        "relation": "to the left of",
    }
    named, other = (evaluate.patch_cover(m, grid) for m in shapes.object_masks(scene))
    assert named.any() and other.any() and not (named & other).any()
    return named, other


def spread(cover):
    """Attention spread evenly over the patches of cover."""
    return cover / cover.sum()


def test_attention_selectivity_on_the_named_object_both_objects_and_the_background():
    named, other = synthetic_pair()
    on_named = evaluate.attention_shares(spread(named.astype(float)), named, other)
    assert (on_named["named"], on_named["other"], on_named["selectivity"]) == pytest.approx((1, 0, 1))
    both = evaluate.attention_shares(spread((named | other).astype(float)), named, other)
    equal = named.sum() / (named.sum() + other.sum())  # the large square covers more patches
    assert both["selectivity"] == pytest.approx(equal) == pytest.approx(both["equal"]) and equal > 0.5
    on_other = evaluate.attention_shares(spread(other.astype(float)), named, other)
    assert on_other["selectivity"] == 0.0
    background = ~(named | other)
    nowhere = evaluate.attention_shares(spread(background.astype(float)), named, other)
    assert (nowhere["named"], nowhere["other"], nowhere["selectivity"]) == (0.0, 0.0, None)
    # the summary: means over the words each share applies to, None-selectivity words left out
    single = evaluate.attention_shares(spread(named.astype(float)), named)
    summary = evaluate.summarise_shares([on_named, both, nowhere, single])
    assert (summary["object_words"], summary["pair_words"]) == (4, 3)
    assert summary["selectivity"] == pytest.approx((1 + equal) / 2)
    assert summary["selectivity_if_equal"] == pytest.approx(equal)
    assert summary["on_other_object"] == pytest.approx(np.mean([0, both["other"], 0]))
    assert summary["object_area"] == pytest.approx(named.mean())


def test_with_out_the_predictions_go_beside_it_and_the_run_is_left_as_it_was(make_model, splits, tmp_path):
    model, processor, tokenizer, _ = make_model("explained")
    small = {"test": splits["test"][:4]}
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    run.mkdir(), elsewhere.mkdir()
    evaluate.evaluate_run(
        model, processor, tokenizer, small, run, "test", out=elsewhere / "beam.json", metrics=False, max_new_tokens=4
    )
    assert sorted(p.name for p in elsewhere.iterdir()) == ["beam.json", "predictions_test.jsonl"]
    assert list(run.iterdir()) == []


def test_a_split_with_no_image_to_evaluate_is_a_data_error(make_model, splits, tmp_path):
    model, processor, tokenizer, _ = make_model("explained")
    with pytest.raises(data.DataError, match="no image to evaluate"):
        evaluate.evaluate_split(model, processor, tokenizer, [], metrics=False)
