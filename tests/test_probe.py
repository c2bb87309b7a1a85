"""probe.py: a probe reads a linearly encoded target and not noise, scores held-out images against
the right chance level, and reads each stage at the position that predicts the relation word."""

import numpy as np
import pytest
import torch

import probe
import shapes
from conftest import VARIANTS, perturb


def test_a_probe_reads_an_encoded_target_and_not_noise():
    rng = np.random.default_rng(0)
    y = rng.choice(["to the left of", "to the right of", "above", "below"], size=600)
    classes = {c: rng.normal(size=16) for c in set(y)}
    encoded = np.stack([classes[c] for c in y]) + rng.normal(scale=0.3, size=(600, 16))
    accuracy, chance, n_train, n_test = probe.probe(encoded, y)
    assert accuracy > 0.95 and (n_train, n_test) == (420, 180)
    assert chance == pytest.approx(max(np.unique(y[-180:], return_counts=True)[1]) / 180, abs=0.05)
    noise, _, _, _ = probe.probe(rng.normal(size=(600, 16)), y)
    assert noise < chance + 0.12


def test_a_class_with_one_image_is_probed_without_stratifying_and_one_class_not_at_all():
    """On a 7 x 7 patch grid with 50 pairs one grid row may hold a single image: the split cannot
    keep every class's share then, and a target with one class has nothing to tell apart."""
    rng = np.random.default_rng(1)
    y = np.array([0] * 25 + [1] * 24 + [2])
    x = rng.normal(size=(50, 4)) + y[:, None]
    accuracy, chance, n_train, n_test = probe.probe(x, y)
    assert (n_train, n_test) == (35, 15) and 0 <= accuracy <= 1
    assert probe.probe(x, np.zeros(50)) is None
    table = probe.run_probes(
        {"adapter (patch of A)": x},
        [{k: 0 for k in ("axis", "direction", "side")} | {"row A": int(v), "column A": int(v)} for v in y],
    )
    assert {row["target"] for row in table} == {"row", "column"}, "the one-class targets are left out"


def test_targets_of_a_pair():
    scene = {
        "objects": [
            {"colour": "red", "shape": "circle", "size": "small", "x": 10.0, "y": 50.0},
            {"colour": "blue", "shape": "square", "size": "large", "x": 40.0, "y": 52.0},
        ],
        "relation": "to the left of",
    }
    t = probe.targets(scene, grid=4)
    assert t == {
        "axis": "horizontal",
        "direction": "to the left of",
        "side": True,
        "row A": 3,
        "column A": 0,
        "row B": 3,
        "column B": 2,
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_stage_is_read_where_the_relation_word_is_predicted(make_model, splits, variant):
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model, seed=4)
    pairs = [r for r in splits["train"] if r.meta["relation"]][:5]
    found, truth = probe.stages(model, processor, tokenizer, pairs, batch_size=2)
    assert len(truth) == 5 and all(x.shape[0] == 5 for x in found.values())
    layers = model.lm.config.num_hidden_layers
    assert list(found) == ["vision (patch of A)", "adapter (patch of A)", "LM input"] + [
        f"LM layer {k}" for k in range(1, layers + 1)
    ] + [f"LM layer {k} at the direction word" for k in range(1, layers + 1)]
    r = pairs[3]
    caption, prefix = shapes.describe(r.meta)[0], shapes.phrase(r.meta["objects"][0])
    ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(caption, add_special_tokens=False)["input_ids"]])
    n = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        state = model.encode_images(
            pixel_values=processor(images=[shapes.render_scene(r.meta)], return_tensors="pt")["pixel_values"]
        )
        embeds = model.embed(state, ids, 0)[0, model.prefix_len(state) + n]
    # the next word after the prefix is the relation's first word
    assert tokenizer.decode(ids[0, n + 1 :]).strip().split()[0] in ("to", "above", "below")
    np.testing.assert_allclose(found["LM input"][3], embeds.numpy(), rtol=1e-4, atol=1e-5)


def test_the_direction_word_stage_is_read_where_left_or_right_is_predicted(make_model, splits):
    model, processor, tokenizer, _ = make_model("self_attention")
    perturb(model, seed=4)
    pairs = [r for r in splits["train"] if r.meta["relation"]]
    horizontal = next(r for r in pairs if r.meta["relation"].startswith("to the"))
    vertical = next(r for r in pairs if not r.meta["relation"].startswith("to the"))
    found, _ = probe.stages(model, processor, tokenizer, [horizontal, vertical])
    last = model.lm.config.num_hidden_layers
    caption, prefix = shapes.describe(horizontal.meta)[0], shapes.phrase(horizontal.meta["objects"][0])
    ids = torch.tensor([[tokenizer.eos_token_id] + tokenizer(caption, add_special_tokens=False)["input_ids"]])
    n = len(tokenizer(prefix + " to the", add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(ids[0, n + 1 :]).strip().split()[0] in ("left", "right")
    with torch.no_grad():
        state = model.encode_images(
            pixel_values=processor(images=[shapes.render_scene(horizontal.meta)], return_tensors="pt")["pixel_values"]
        )
        hidden = model.lm.model(inputs_embeds=model.embed(state, ids, 0), output_hidden_states=True).hidden_states
    expected = hidden[last][0, model.prefix_len(state) + n].numpy()
    np.testing.assert_allclose(found[f"LM layer {last} at the direction word"][0], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(found[f"LM layer {last}"][0], expected), "two tokens earlier for left and right"
    np.testing.assert_allclose(found[f"LM layer {last} at the direction word"][1], found[f"LM layer {last}"][1])


def test_probe_refuses_a_run_without_enough_pairs(trained_runs, capsys):
    run_dir, _ = trained_runs["explained"]
    with pytest.raises(SystemExit) as e:
        probe.main(["--run", str(run_dir)])
    assert str(e.value).startswith("error:") and "probes need 50" in str(e.value)
