"""The fast paths change nothing but the speed: cached fp16 features train like pixels, the feature cache
is keyed on what it depends on, decoding runs the LM head on one position per row, and bench.py's
measurements run on the tiny models."""

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import bench
import data
import features as feature_cache
import shapes
import train
from conftest import VARIANTS, perturb, pixels_for
from decoding import decode


def fresh_pair(make_model, variant, seed=0):
    """Two models with identical (perturbed) weights."""
    models = []
    for _ in range(2):
        model, processor, tokenizer, config = make_model(variant, seed=seed)
        perturb(model, seed=seed + 20)
        models.append(model)
    a, b = models
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), n
    return a, b, processor, tokenizer, config


def trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


REAL_COMPUTE_FEATURES = feature_cache.compute_features  # tests below replace it with a counter


def features_of(model, processor, records):
    features, bad = REAL_COMPUTE_FEATURES(
        lambda pixels: model.image_features(pixels), processor, [r.image for r in records]
    )
    assert bad == []
    return features


# -----------------------------------------------------------------------------
# cached features vs pixels through the real pipeline


def loader(records, features, processor, tokenizer, config, order):
    return data.make_loader(
        records,
        features,
        processor,
        tokenizer,
        batch_size=config["batch_size"],
        max_tokens=config["max_caption_tokens"],
        order=order,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_features_train_like_pixels(make_model, splits, variant):
    cached_model, pixel_model, processor, tokenizer, config = fresh_pair(make_model, variant)
    records = splits["train"][:6]
    n_rows = sum(len(r.captions) for r in records)
    config = dict(config, batch_size=10)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(0)).tolist()
    features = features_of(cached_model, processor, records)
    assert features.dtype == torch.float16
    assert features.shape == (6, (32 // 8) ** 2, cached_model.vision.config.hidden_size)

    cached_batches = list(loader(records, features, processor, tokenizer, config, order))
    pixel_batches = list(loader(records, None, processor, tokenizer, config, order))
    assert len(cached_batches) == len(pixel_batches) == 3
    for cb, pb in zip(cached_batches, pixel_batches):
        assert "features" in cb and "pixel_values" not in cb
        assert "pixel_values" in pb and "features" not in pb
        for k in ("input_ids", "targets", "attention_mask"):
            assert torch.equal(cb[k], pb[k]), k
        with torch.no_grad():
            from_cache, from_pixels = cached_model(**cb), pixel_model(**pb)
            # the wrong image's features give another loss: the comparison can tell images apart
            wrong = cached_model(**dict(cb, features=cb["features"].roll(1, 0)))
        torch.testing.assert_close(from_cache, from_pixels, rtol=1e-4, atol=0)
        # fp16 rounding of the features moves the loss far less than another image does
        assert abs(from_cache - from_pixels) < abs(wrong - from_pixels) / 5

    # a few optimizer steps on each path, from the same weights, end at (nearly) the same weights
    start = trainable(cached_model)
    for model, batches in ((cached_model, cached_batches), (pixel_model, pixel_batches)):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        model.train()
        for batch in batches:
            loss, grad_norm, ok = train.train_step(model, [batch], optimizer, scheduler, scaler, params, config)
            assert ok and torch.isfinite(loss) and grad_norm > 0
    after_cached, after_pixels = trainable(cached_model), trainable(pixel_model)
    moved = sum((after_pixels[n] - start[n]).pow(2).sum() for n in start).sqrt()
    apart = sum((after_cached[n] - after_pixels[n]).pow(2).sum() for n in start).sqrt()
    assert moved > 1e-2, "the steps must move the weights for the comparison to mean anything"
    assert apart < 1e-2 * moved, f"the two paths drifted apart: {apart:.3g} against a move of {moved:.3g}"


# -----------------------------------------------------------------------------
# the feature cache: one file per (backbone, preprocessing, image set)


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("DUOCAP_CACHE", str(cache))
    return cache


def copied_records(splits, folder, n=4):
    folder.mkdir()
    records = []
    for r in splits["train"][:n]:
        path = folder / r.image.name
        shutil.copy2(r.image, path)
        records.append(data.Record(path, list(r.captions), dict(r.meta)))
    return records


class CountingFeatures:
    """features.build_cache, counting its calls; `refuse` makes any call fail."""

    def __init__(self, real):
        self.real, self.calls, self.refuse = real, 0, False

    def __call__(self, *args, **kwargs):
        if self.refuse:
            raise AssertionError("features were computed although the cache holds them")
        self.calls += 1
        return self.real(*args, **kwargs)


def test_feature_cache_is_reused_and_rebuilt_when_its_inputs_change(
    make_model, other_vision_dir, splits, tmp_path, private_cache, monkeypatch
):
    model, processor, _, config = make_model("explained")
    records = copied_records(splits, tmp_path / "images")
    counter = CountingFeatures(feature_cache.build_cache)
    monkeypatch.setattr(feature_cache, "build_cache", counter)
    folder = private_cache / "features"
    files = lambda: sorted(p.name for p in folder.glob("*.npy"))

    def cached(m=model, proc=processor, cfg=config, recs=records):
        kept, features = feature_cache.cached_features(m, proc, cfg["vision"], recs, "cpu")
        assert kept == recs
        assert isinstance(features.array(), np.memmap), "the cache is read memory-mapped"
        return features.tensor()

    first = cached()
    assert counter.calls == 1
    assert len(files()) == 1, files()
    expected = features_of(model, processor, records)
    assert first.dtype == torch.float16 and torch.equal(first, expected)

    # the same backbone, preprocessing and images: read back, nothing computed, no new file
    counter.refuse = True
    assert torch.equal(cached(), first)
    assert len(files()) == 1
    counter.refuse = False

    # one image rewritten (other pixels, a later mtime): rebuilt, into a new file
    image = data.read_image(records[1].image)
    image.putpixel((0, 0), (0, 0, 0) if image.getpixel((0, 0)) != (0, 0, 0) else (255, 255, 255))
    image.save(records[1].image)
    st = os.stat(records[1].image)
    os.utime(records[1].image, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    rebuilt = cached()
    assert counter.calls == 2 and len(files()) == 2
    assert torch.equal(rebuilt, features_of(model, processor, records))
    assert not torch.equal(rebuilt[1], first[1]), "the rewritten image has new features"
    for i in (0, 2, 3):
        assert torch.equal(rebuilt[i], first[i])

    # touched only (same bytes, a new mtime): the cache cannot know, and rebuilds
    st = os.stat(records[2].image)
    os.utime(records[2].image, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    cached()
    assert counter.calls == 3 and len(files()) == 3

    # another image set, another preprocessing, another backbone: a file each
    cached(recs=records[:3])
    assert counter.calls == 4 and len(files()) == 4
    other_processor = type(processor).from_dict({**processor.to_dict(), "image_mean": [0.5, 0.5, 0.5]})
    assert torch.equal(cached(proc=other_processor), features_of(model, other_processor, records))
    assert counter.calls == 5 and len(files()) == 5
    other_model, other_vision_processor, _, other_config = make_model("explained", vision=str(other_vision_dir))
    assert other_model.vision.config.hidden_size == 48
    wide = cached(m=other_model, proc=other_vision_processor, cfg=other_config)
    assert wide.shape[-1] == 48
    assert counter.calls == 6 and len(files()) == 6

    # and each of them is reused on the next call
    counter.refuse = True
    cached(recs=records[:3])
    cached(proc=other_processor)
    cached(m=other_model, proc=other_vision_processor, cfg=other_config)
    assert len(files()) == 6
    assert not [p for p in private_cache.rglob("*") if p.name.endswith(".tmp")], "a temporary file was left behind"


# -----------------------------------------------------------------------------
# decoding runs the LM head on one position per row


@pytest.mark.parametrize("variant", VARIANTS)
def test_decoding_runs_the_lm_head_on_one_position_per_row(make_model, splits, variant):
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model, seed=2)
    B, new = 3, 5
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:B]))
    seen = []
    handle = model.lm.lm_head.register_forward_hook(lambda m, inputs, out: seen.append(tuple(inputs[0].shape[:2])))
    try:
        eos = tokenizer.eos_token_id
        for use_cache in (True, False):
            seen.clear()
            decode(model, state, eos, max_new_tokens=new, use_cache=use_cache, stop_at_eos=False)
            assert seen == [(B, 1)] * new, (use_cache, seen)
        seen.clear()
        decode(model, state, eos, max_new_tokens=new, strategy="beam", beams=2)
        assert seen and all(s == (B * 2, 1) for s in seen), seen
    finally:
        handle.remove()
    # the image prefix of the self-attention variant is in the sequence, yet gets no logits
    if variant == "self_attention":
        assert model.prefix_len(state) == 16


# -----------------------------------------------------------------------------
# bench.py on the tiny models


@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_measures_training_and_generation(make_model, splits, variant):
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model, seed=3)
    records = splits["train"][:4]  # 20 caption rows: 2 warm-up, 1 timed and 1 counted batch of 4
    config = {"device": "cpu", "batch_size": 4, "max_caption_tokens": 32, "precision": "fp32"}
    features = features_of(model, processor, records)
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
