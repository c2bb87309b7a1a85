import pickle

import numpy as np
import torch

import data
import features as feature_cache
from conftest import save_vision
from runs import build_model


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
