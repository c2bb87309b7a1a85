"""bench.py: its measurements run on the tiny models, its mid-size images are photo-sized JPEGs, and
the script refuses a bad value or a backbone it cannot load in one line."""

import pytest
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import bench
import data
import shapes
import train
from conftest import VARIANTS, assert_refused, perturb, start_refusals, started_first
from features import compute_features


class Clock:
    """Stands in for bench's time module: each reading is one second after the last, so that every
    interval bench measures lasts exactly 1 s and each rate is the work it counts."""

    def __init__(self):
        self.now = 0.0

    def time(self):
        self.now += 1.0
        return self.now

    perf_counter = time


def flops_of(fn):
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_measures_training_and_generation(make_model, splits, monkeypatch, variant):
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model, seed=3)
    records = splits["train"][:4]  # 20 caption rows: 2 warm-up, 1 timed and 1 counted batch of 4
    config = {"device": "cpu", "batch_size": 4, "max_caption_tokens": 32, "precision": "fp32"}
    features, bad = compute_features(model.image_features, processor, [r.image for r in records])
    assert bad == []
    monkeypatch.setattr(bench, "time", Clock())
    steps, train_step = [], train.train_step
    monkeypatch.setattr(
        train, "train_step", lambda m, batches, *rest: steps.append(batches) or train_step(m, batches, *rest)
    )

    warm, flops_cached = bench.bench_training(model, records, features, processor, tokenizer, config, 1, 0)
    (cached_batch,) = steps[-1]
    off, flops_pixels = bench.bench_training(model, records, None, processor, tokenizer, config, 1, 0)
    (pixel_batch,) = steps[-1]
    assert len(steps) == 2 * 4 and "features" in cached_batch and "pixel_values" in pixel_batch
    assert warm == off == 4.0, "samples/s: 1 timed step of 4 samples in 1 s"
    # the FLOPs of the counted step: its forward and backward, and without the cache the vision tower too
    assert flops_cached == flops_of(lambda: model(**cached_batch, reduction="sum").backward())
    assert flops_pixels - flops_cached == flops_of(lambda: model.image_features(pixel_batch["pixel_values"]))

    # tokens/s: 4 images x 4 new tokens in 1 s, batched and one at a time; the same tokens
    images = [data.read_image(r.image) for r in splits["test"][:4]]
    assert bench.bench_generation(model, processor, tokenizer, images, "cpu", 4) == (16.0, 16.0, True)


def test_bench_peak_flops_on_cpu(monkeypatch):
    """10 products of two 2048 x 2048 fp32 matrices (2 n^3 FLOPs each) in what is here 1 s."""
    monkeypatch.setattr(bench, "time", Clock())
    assert bench.peak_flops("cpu") == (2 * 2048**3 * 10, "measured 2048x2048 torch.float32 matmul")


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


def test_bench_reports_its_images_size_and_decoding_time(tmp_path, monkeypatch):
    records = bench.mid_records(tmp_path, 2)
    monkeypatch.setattr(bench, "time", Clock())  # decoding both takes 1 s here
    sizes = [r.image.stat().st_size for r in records]
    assert bench.image_files(records) == {"files": 2, "mean_kb": sum(sizes) / 2 / 1000, "decode_ms": 500.0}


# -----------------------------------------------------------------------------
# a backbone it cannot load or a bad value: one line, no traceback

REFUSALS = {
    # the real size's hub ids, with the network off and an empty hub cache
    "hub backbones out of reach": (["--size", "flickr8k"], "openai/clip-vit-base-patch32", False),
    "batch of 0": (["--batch-size", "0"], "--batch-size", True),
}


@started_first
def bench_refusals(duocap_cache, tmp_path_factory):
    hub = {"HF_HOME": str(tmp_path_factory.mktemp("empty-hub-cache"))}
    return start_refusals("bench.py", REFUSALS, duocap_cache, env=hub)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bench_refuses_a_backbone_it_cannot_load_or_a_bad_value_in_one_line(bench_refusals, case):
    assert_refused(*bench_refusals[case])
