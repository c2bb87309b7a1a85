"""bench.py: its measurements run on the tiny models, its mid-size images are photo-sized JPEGs, and
the script refuses a bad value or a backbone it cannot load in one line."""

import pytest
from PIL import Image

import bench
import data
import shapes
from conftest import VARIANTS, assert_refused, perturb, start_refusals
from features import compute_features


@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_measures_training_and_generation(make_model, splits, variant):
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model, seed=3)
    records = splits["train"][:4]  # 20 caption rows: 2 warm-up, 1 timed and 1 counted batch of 4
    config = {"device": "cpu", "batch_size": 4, "max_caption_tokens": 32, "precision": "fp32"}
    features, bad = compute_features(model.image_features, processor, [r.image for r in records])
    assert bad == []
    warm, flops_cached = bench.bench_training(model, records, features, processor, tokenizer, config, 1, 0)
    off, flops_pixels = bench.bench_training(model, records, None, processor, tokenizer, config, 1, 0)
    assert warm > 0 and off > 0
    assert flops_cached > 0
    # without the cache the vision tower runs in the step too
    assert flops_pixels > flops_cached

    images = [data.read_image(r.image) for r in splits["test"][:4]]
    batched, single, same = bench.bench_generation(model, processor, tokenizer, images, "cpu", 4)
    assert batched > 0 and single > 0
    assert same is True


def test_bench_peak_flops_on_cpu():
    peak, source = bench.peak_flops("cpu")
    assert isinstance(peak, float) and peak > 0
    assert isinstance(source, str) and "matmul" in source


def test_bench_mid_images_are_photo_sized_jpegs_with_their_captions(tmp_path):
    records = bench.mid_records(tmp_path, 3)
    for r in records:
        with Image.open(r.image) as im:
            assert (im.format, im.size) == ("JPEG", (500, 375))
        # a flat drawing would code to under 10 KB and decode in a fraction of a photo's time
        assert r.image.stat().st_size > 80_000
        objects = shapes.parse_objects(r.captions[0])
        assert len(r.captions) == 5 and 1 <= len(objects) <= 2
    # written once: a second call reads the same files and gives the same captions
    stamps = [r.image.stat().st_mtime_ns for r in records]
    again = bench.mid_records(tmp_path, 3)
    assert [r.captions for r in again] == [r.captions for r in records]
    assert [r.image.stat().st_mtime_ns for r in again] == stamps


# -----------------------------------------------------------------------------
# a backbone it cannot load or a bad value: one line, no traceback

REFUSALS = {
    # the real size's hub ids, with the network off and an empty hub cache
    "hub backbones out of reach": (["--size", "flickr8k"], "openai/clip-vit-base-patch32", False),
    "batch of 0": (["--batch-size", "0"], "--batch-size", True),
}


@pytest.fixture(scope="module")
def bench_refusals(duocap_cache, tmp_path_factory):
    hub = {"HF_HOME": str(tmp_path_factory.mktemp("empty-hub-cache"))}
    return start_refusals("bench.py", REFUSALS, duocap_cache, env=hub)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bench_refuses_a_backbone_it_cannot_load_or_a_bad_value_in_one_line(bench_refusals, case):
    assert_refused(*bench_refusals[case])
