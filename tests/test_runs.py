"""Run directories: safetensors + JSON, a faithful round trip, clear refusals (not a run, the other
variant, another backbone)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import VARIANTS, batch_for, perturb
from runs import RunError, load_run, save_run


@pytest.fixture(scope="module")
def saved_runs(make_model, tmp_path_factory):
    """{variant: (model, config, run_dir)} with perturbed trainable weights saved."""
    runs = {}
    for seed, variant in enumerate(VARIANTS):
        model, _, _, config = make_model(variant, seed=seed)
        perturb(model, seed=seed + 10)
        run_dir = tmp_path_factory.mktemp(f"run-{variant}")
        save_run(model, config, run_dir)
        runs[variant] = (model, config, run_dir)
    return runs


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_gives_identical_logits(saved_runs, splits, variant):
    model, config, run_dir = saved_runs[variant]
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.json", "model.safetensors"]
    raw = (run_dir / "model.safetensors").read_bytes()
    assert not raw.startswith((b"\x80", b"PK")), "a checkpoint must not be a pickle or a torch zip"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["variant"] == variant and saved["vision"] == config["vision"]
    assert set(load_file(str(run_dir / "model.safetensors"))) == set(model.trainable_state_dict())

    loaded, processor, tokenizer, loaded_config = load_run(run_dir)
    assert type(loaded) is type(model) and loaded.variant == variant
    assert loaded_config == saved
    assert not loaded.training
    own = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, own[name]), f"{name} differs after loading"

    batch = batch_for(processor, tokenizer, splits["test"][:3])
    model.eval()
    with torch.no_grad():
        state_a = model.encode_images(pixel_values=batch["pixel_values"])
        state_b = loaded.encode_images(pixel_values=batch["pixel_values"])
        logits_a, _ = model.next_logits(state_a, batch["input_ids"])
        logits_b, _ = loaded.next_logits(state_b, batch["input_ids"])
        assert torch.equal(logits_a, logits_b)
        assert torch.equal(model(**batch), loaded(**batch))

    # naming the right variant loads
    assert type(load_run(run_dir, variant=variant)[0]) is type(model)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fresh_model_differs_from_checkpoint(saved_runs, make_model, splits, variant):
    model, _, _ = saved_runs[variant]
    fresh, processor, tokenizer, _ = make_model(variant, seed=123)
    batch = batch_for(processor, tokenizer, splits["test"][:3])
    with torch.no_grad():
        assert not torch.equal(model.eval()(**batch), fresh(**batch))


def test_loading_into_the_wrong_variant_is_refused(saved_runs):
    run_dir = saved_runs["explained"][2]
    with pytest.raises(ValueError) as e:
        load_run(run_dir, variant="self_attention")
    assert "explained" in str(e.value) and "self_attention" in str(e.value)

    run_dir = saved_runs["self_attention"][2]
    with pytest.raises(ValueError) as e:
        load_run(run_dir, variant="explained")
    assert "explained" in str(e.value) and "self_attention" in str(e.value)


def test_weights_of_the_other_variant_are_refused(saved_runs, tmp_path):
    """config.json says explained, but model.safetensors holds self-attention weights."""
    explained_dir, sa_dir = saved_runs["explained"][2], saved_runs["self_attention"][2]
    (tmp_path / "config.json").write_text((explained_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((sa_dir / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not fit"):
        load_run(tmp_path)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loading_onto_another_backbone_is_refused(saved_runs, other_vision_dir, tmp_path, variant):
    _, config, run_dir = saved_runs[variant]
    (tmp_path / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**config, "variant": variant, "vision": str(other_vision_dir)}))
    with pytest.raises(ValueError, match="shape") as e:
        load_run(tmp_path)
    assert "adapter.0.weight" in str(e.value) or "positions.weight" in str(e.value)


def test_checkpoint_with_a_reshaped_tensor_is_refused(saved_runs, tmp_path):
    _, _, run_dir = saved_runs["explained"]
    weights = load_file(str(run_dir / "model.safetensors"))
    weights["fusion_norm.weight"] = torch.ones(7)
    save_file(weights, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    with pytest.raises(ValueError, match="fusion_norm.weight"):
        load_run(tmp_path)


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="config.json"):
        load_run(tmp_path)


@pytest.mark.parametrize("cut", [0, 100])
def test_truncated_or_empty_weights_are_a_clear_error(saved_runs, tmp_path, cut):
    _, _, run_dir = saved_runs["explained"]
    (tmp_path / "config.json").write_text((run_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes((run_dir / "model.safetensors").read_bytes()[:cut])
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_run(tmp_path)


@pytest.mark.parametrize(
    "config, problem",
    [
        ([1, 2], "expected a run's config"),
        ({"vision": "x"}, "expected a run's config"),
        ({"variant": "explained"}, "no vision, language"),
    ],
)
def test_a_config_that_is_not_a_runs_is_a_clear_error(saved_runs, tmp_path, config, problem):
    _, _, run_dir = saved_runs["explained"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(run_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(RunError, match=problem) as e:
        load_run(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)


def test_backbones_of_the_same_shape_but_other_weights_are_refused(saved_runs, tmp_path):
    """A checkpoint holds only trainable weights: a rebuilt backbone of the same shape must not pass silently."""
    from transformers import CLIPVisionModel

    _, _, run_dir = saved_runs["explained"]
    saved = json.loads((run_dir / "config.json").read_text())
    original = CLIPVisionModel.from_pretrained(saved["vision"])
    torch.manual_seed(123)
    other = tmp_path / "vision-reseeded"
    CLIPVisionModel(original.config).save_pretrained(other)
    shutil.copy(Path(saved["vision"]) / "preprocessor_config.json", other)
    moved = tmp_path / "run"
    moved.mkdir()
    shutil.copy(run_dir / "model.safetensors", moved)
    (moved / "config.json").write_text(json.dumps({**saved, "vision": str(other)}))
    with pytest.raises(ValueError, match="other backbone weights"):
        load_run(moved)
    load_run(run_dir)  # the original pairing still loads


def reseeded(lm, config):
    torch.manual_seed(123)
    return type(lm)(config)


def one_frozen_layer_changed(lm, config):
    """The same token embeddings (and so the same first rows), another first decoder layer."""
    with torch.no_grad():
        lm.model.layers[0].mlp.down_proj.weight.mul_(-1)
    return lm


@pytest.mark.parametrize("change", [reseeded, one_frozen_layer_changed])
def test_a_language_model_of_the_same_shape_but_other_weights_is_refused(make_model, tmp_path, change):
    """The language side of the test above: a run trains only the last decoder layer here, so the
    first one, the embeddings and the final norm are the frozen weights the checkpoint relies on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, _, _, config = make_model("explained", train_layers=1)
    run_dir = tmp_path / "run"
    save_run(model, config, run_dir)
    saved = json.loads((run_dir / "config.json").read_text())
    original = AutoModelForCausalLM.from_pretrained(saved["language"])
    before = {k: v.clone() for k, v in original.state_dict().items()}
    changed = change(original, original.config)
    after = changed.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    assert not all(torch.equal(after[k], v) for k, v in before.items())
    other = tmp_path / "language-other"
    changed.save_pretrained(other)
    AutoTokenizer.from_pretrained(saved["language"]).save_pretrained(other)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(run_dir / "model.safetensors", moved)
    (moved / "config.json").write_text(json.dumps({**saved, "language": str(other)}))
    with pytest.raises(ValueError, match="other backbone weights") as e:
        load_run(moved)
    assert str(other) in str(e.value)
    load_run(run_dir)  # the original pairing still loads
    # a run saved before the frozen weights were fingerprinted still loads
    (moved / "config.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "frozen_fingerprint"}))
    load_run(moved)
