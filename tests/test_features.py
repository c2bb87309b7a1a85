"""The feature cache: cached fp16 features train like pixels; one cache file per (backbone,
preprocessing, image set), reused until one of them changes; images that fail to decode stop a
strict run or are left out, and a strict run does not accept a cache built without them."""

import os
import pickle
import shutil

import numpy as np
import pytest
import torch

import data
import features as feature_cache
import train
from conftest import VARIANTS, loader_for, perturb, save_vision, training_parts
from features import cached_features
from runs import build_model


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

    cached_batches = list(loader_for(records, features, processor, tokenizer, config, order))
    pixel_batches = list(loader_for(records, None, processor, tokenizer, config, order))
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
        params, optimizer, scheduler, scaler = training_parts(model, torch.optim.SGD, lr=0.5)
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
# images that fail to decode: the header reads, so only a full decode (the feature cache) finds them


@pytest.mark.parametrize("strict", [True, False])
def test_feature_cache_stops_on_or_leaves_out_truncated_images(
    truncated_dataset, make_config, strict, capsys, duocap_cache, monkeypatch
):
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
    root, good = truncated_dataset
    records = [r for split in data.load_splits("folder", root).values() for r in split]
    config = make_config("explained")
    model, processor, _ = build_model(config)
    config["data_options"] = {**config["data_options"], "strict": False}
    kept, _ = cached_features(model, processor, config["vision"], records, "cpu", config["data_options"]["strict"])
    assert sorted(r.image.name for r in kept) == sorted(good)

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache was rebuilt")

    monkeypatch.setattr(feature_cache, "compute_features", no_decoding)
    config["data_options"] = {**config["data_options"], "strict": True}
    with pytest.raises(data.DataError) as e:
        cached_features(model, processor, config["vision"], records, "cpu", config["data_options"]["strict"])
    message = str(e.value)
    assert "2 image(s) failed to decode" in message and "truncated" in message
    assert str(root / "cut.png") in message and str(root / "cut.jpg") in message


def test_feature_cache_is_keyed_by_the_vision_weights(make_config, splits, tmp_path, monkeypatch):
    """The same folder re-saved with other weights (same config, same processor) must not reuse
    the features computed with the old ones."""
    monkeypatch.setenv("DUOCAP_CACHE", str(tmp_path / "cache"))
    folder = save_vision(tmp_path / "vision")
    config = make_config("explained", vision=str(folder))
    records = splits["train"][:4]
    model, processor, _ = build_model(config)
    _, first = feature_cache.cached_features(model, processor, config["vision"], records, "cpu")
    with torch.no_grad():
        for p in model.vision.parameters():
            p.add_(0.1)
    model.vision.save_pretrained(folder)  # same name, same config, other weights
    model, processor, _ = build_model(config)
    _, second = feature_cache.cached_features(model, processor, config["vision"], records, "cpu")
    assert second.path != first.path, "another set of weights must get another cache file"
    expected = model.image_features(
        processor(images=[data.read_image(r.image) for r in records], return_tensors="pt")["pixel_values"]
    ).half()
    assert torch.equal(second.tensor(), expected)
    assert not torch.equal(second.tensor(), first.tensor())


def test_feature_cache_is_read_memory_mapped_and_pickles_as_a_path(make_model, splits, tmp_path, monkeypatch):
    monkeypatch.setenv("DUOCAP_CACHE", str(tmp_path / "cache"))
    model, processor, _, config = make_model("self_attention")
    records = splits["train"][:6]
    kept, store = feature_cache.cached_features(model, processor, config["vision"], records, "cpu")
    assert isinstance(store.array(), np.memmap)
    assert store.path.stat().st_size >= store.array().nbytes
    # a spawned DataLoader worker gets the path and the row list, not the features
    sent = pickle.dumps(store)
    assert len(sent) < 2000 < store.array().nbytes
    copy = pickle.loads(sent)
    assert torch.equal(copy[[0, 3, 5]], store.tensor()[[0, 3, 5]])


def test_a_cache_build_that_fails_leaves_no_partial_file(make_model, splits, tmp_path, monkeypatch):
    """Ctrl-C or an error half-way through (a COCO cache is gigabytes): nothing is left behind,
    and the next run builds the cache whole."""
    monkeypatch.setenv("DUOCAP_CACHE", str(tmp_path / "cache"))
    model, processor, _, config = make_model("explained")
    records = splits["train"][:6]
    real = feature_cache.feature_batches

    def interrupted(*args, **kwargs):
        yield next(real(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(feature_cache, "feature_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        feature_cache.cached_features(model, processor, config["vision"], records, "cpu")
    assert list((tmp_path / "cache" / "features").iterdir()) == []
    monkeypatch.setattr(feature_cache, "feature_batches", real)
    kept, store = feature_cache.cached_features(model, processor, config["vision"], records, "cpu")
    assert len(kept) == 6 and store.array().shape[0] == 6
