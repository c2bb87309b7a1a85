"""switches.py: the defaults build the seed's design; each switch changes the model as it says, is
recorded in config.json and rebuilt from it; the KV cache still equals full recomputation."""

import pytest
import torch

import switches as sw
import train
from conftest import VARIANTS, assert_cached_steps_match_recomputation, batch_for, perturb, pixels_for
from runs import load_run, save_run

# the trainable tensors of the tiny models before the switches existed (their names are the
# checkpoints' keys, so a run saved then still loads)
SEED_DESIGN = {
    "explained": {
        *(f"adapter.{k}.{w}" for k in (0, 1, 3, 4) for w in ("weight", "bias")),
        "modality.weight",
        *(f"cross_attention.{p}.{w}" for p in ("q", "k", "v", "out") for w in ("weight", "bias")),
        "fusion_norm.weight",
        "fusion_norm.bias",
    },
    "self_attention": {
        *(f"adapter.{k}.{w}" for k in (0, 1, 3, 4) for w in ("weight", "bias")),
        "modality.weight",
        "positions.weight",
        "input_norm.weight",
        "input_norm.bias",
    },
}

# every switch that changes the model, at a non-default value, for each variant
MODEL_SWITCHES = {
    "explained": [
        {"modality": "zero"},
        {"modality": "none"},
        {"text_init": "zero"},
        {"text_init": "zero", "fusion_norm": "none"},
        {"vision_layer": -2},
        {"image_positions": "2d"},
        {"image_scale": "fixed"},
        {"lora": 2},
        {"fusion_norm": "none"},
        {"sharp_attention": "on"},
        {"queries": "context"},
        {"queries": "context", "image_positions": "2d", "sharp_attention": "on"},
    ],
    "self_attention": [
        {"modality": "zero"},
        {"modality": "none"},
        {"text_init": "zero"},
        {"vision_layer": -2},
        {"image_positions": "2d"},
        {"image_scale": "fixed"},
        {"lora": 2},
        {"positions": "none"},
        {"start_token_first": "on"},
        {"start_token_first": "on", "text_init": "zero"},
    ],
}
CASES = [(v, s) for v in VARIANTS for s in MODEL_SWITCHES[v]]


def trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("lm.")}


def token_embeddings(model, ids):
    return model.lm.get_input_embeddings()(ids)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_defaults_build_the_seed_design(make_model, variant):
    model, _, _, config = make_model(variant)
    assert sw.from_config(config) == sw.DEFAULT
    assert trainable(model) == SEED_DESIGN[variant]
    rms = model.token_rms
    assert model.modality.weight.std().item() == pytest.approx(rms, rel=0.5) and model.modality.mode == "token"
    assert torch.all(model.adapter[-1].weight == rms)
    # a config without switch fields (a run trained before they existed) builds the same model
    old = {k: v for k, v in config.items() if k not in sw.as_config(sw.DEFAULT)}
    assert sw.from_config(old) == sw.DEFAULT


def test_every_switch_is_an_option_of_both_scripts_and_recorded_in_the_config():
    argv = ["--modality", "zero", "--queries", "context", "--vision-layer", "-2", "--lora", "4", "--grad-clip", "0"]
    config = train.run_config("explained", train.parse_args("explained", argv))
    assert (config["modality"], config["queries"], config["vision_layer"], config["lora"], config["grad_clip"]) == (
        "zero",
        "context",
        -2,
        4,
        0.0,
    )
    assert sw.from_config(config).sharp_attention == "off"
    with pytest.raises(SystemExit):
        train.parse_args("self_attention", ["--positions", "sideways"])
    with pytest.raises(ValueError, match="vision_layer"):
        sw.Switches(vision_layer=0)


@pytest.mark.parametrize("variant,switches", CASES, ids=[f"{v}-{'-'.join(map(str, s.values()))}" for v, s in CASES])
def test_a_switched_run_is_saved_and_rebuilt_from_its_config(make_model, splits, variant, switches, tmp_path):
    model, processor, _, config = make_model(variant, **switches)
    assert model.switches == sw.Switches(**switches)
    perturb(model, seed=1)
    save_run(model, config, tmp_path)
    loaded, _, _, loaded_config = load_run(tmp_path)
    assert loaded.switches == model.switches and all(loaded_config[k] == v for k, v in switches.items())
    pixels = pixels_for(processor, splits["test"][:2])
    ids = torch.tensor([[0, 5, 9, 4], [0, 7, 7, 3]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.next_logits(loaded.encode_images(pixel_values=pixels), ids, use_cache=False)[0],
            model.next_logits(model.encode_images(pixel_values=pixels), ids, use_cache=False)[0],
        )


@pytest.mark.parametrize("variant,switches", CASES, ids=[f"{v}-{'-'.join(map(str, s.values()))}" for v, s in CASES])
def test_cached_steps_give_the_logits_of_full_recomputation_with_every_switch(
    make_model, splits, tokenizer, variant, switches
):
    model, processor, _, _ = make_model(variant, **switches)
    perturb(model, seed=2)
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:3]))
    ids = torch.randint(len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tokenizer.eos_token_id
    assert_cached_steps_match_recomputation(model, state, ids, prefill=1)


# -----------------------------------------------------------------------------
# each switch does what it says


def test_modality_zero_and_none(make_model):
    zero, _, _, _ = make_model("explained", modality="zero")
    assert torch.all(zero.modality.weight == 0) and zero.modality.weight.requires_grad
    none, _, _, _ = make_model("self_attention", modality="none")
    assert "modality.weight" not in trainable(none)
    ids = torch.tensor([[0, 4, 8]])
    assert torch.equal(none.text_embeddings(ids), token_embeddings(none, ids))


def test_text_init_zero_hands_the_lm_its_own_token_embeddings_at_step_0(make_model, splits):
    ids = torch.tensor([[0, 4, 8, 2], [0, 6, 1, 1]])
    for variant in VARIANTS:
        model, processor, _, _ = make_model(variant, text_init="zero")
        state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:2]))
        with torch.no_grad():
            embeds = model.embed(state, ids, 0)[:, model.prefix_len(state) :]
        torch.testing.assert_close(embeds, token_embeddings(model, ids), rtol=0, atol=0)
        default, processor, _, _ = make_model(variant)
        with torch.no_grad():
            state = default.encode_images(pixel_values=pixels_for(processor, splits["test"][:2]))
            assert not torch.allclose(default.embed(state, ids, 0)[:, default.prefix_len(state) :], embeds)


def test_vision_layer_reads_that_layer_of_the_tower(make_model, splits):
    model, processor, _, _ = make_model("explained", vision_layer=-2)
    pixels = pixels_for(processor, splits["test"][:2])
    out = model.vision(pixel_values=pixels, output_hidden_states=True)
    assert torch.equal(model.image_features(pixels), out.hidden_states[-2][:, 1:])
    assert not torch.allclose(model.image_features(pixels), out.last_hidden_state[:, 1:])


def test_image_positions_2d_add_a_row_and_a_column_embedding(make_model):
    model, _, _, _ = make_model("self_attention", image_positions="2d")
    P, H = model.n_patches(), model.lm.config.hidden_size
    grid = int(P**0.5)
    x = torch.zeros(1, P, H)
    added = model.image_positions(x)[0].view(grid, grid, H)
    rows, columns = model.image_positions.rows.weight, model.image_positions.columns.weight
    torch.testing.assert_close(added[2, 3], rows[2] + columns[3])
    assert {"image_positions.rows.weight", "image_positions.columns.weight"} <= trainable(model)


def test_image_scale_fixed_keeps_the_adapter_gain_at_the_tokens_rms(make_model):
    model, _, _, _ = make_model("explained", image_scale="fixed")
    assert "adapter.4.weight" not in trainable(model) and torch.all(model.adapter[-1].weight == model.token_rms)


def test_lora_trains_adapters_on_every_layer_and_starts_at_the_lm(make_model, splits):
    model, processor, _, _ = make_model("self_attention", lora=2, train_layers=0)
    names = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    layers = {n.split(".")[2] for n in names}
    assert names and all("lora_" in n for n in names) and len(layers) == model.lm.config.num_hidden_layers
    default, _, _, _ = make_model("self_attention", train_layers=0)
    pixels = pixels_for(processor, splits["test"][:2])
    ids = torch.tensor([[0, 4, 8], [0, 6, 1]])
    with torch.no_grad():  # B starts at zero: the same logits as without LoRA
        torch.testing.assert_close(
            model.next_logits(model.encode_images(pixel_values=pixels), ids, use_cache=False)[0],
            default.next_logits(default.encode_images(pixel_values=pixels), ids, use_cache=False)[0],
        )


def test_fusion_norm_none_and_sharp_attention(make_model, splits):
    plain, processor, _, _ = make_model("explained", fusion_norm="none")
    state = plain.encode_images(pixel_values=pixels_for(processor, splits["test"][:2]))
    ids = torch.tensor([[0, 4, 8], [0, 6, 1]])
    text = plain.text_embeddings(ids)
    torch.testing.assert_close(plain.embed(state, ids, 0), text + plain.cross_attention(text, *state))
    sharp, _, _, _ = make_model("explained", sharp_attention="on")
    assert isinstance(sharp.cross_attention.query_norm, torch.nn.LayerNorm)
    assert not sharp.cross_attention.query_norm.elementwise_affine
    x = torch.randn(2, 3, sharp.lm.config.hidden_size) * 0.02
    assert sharp.cross_attention.key_norm(x).std(-1).mean().item() == pytest.approx(1, rel=0.05)


def test_context_queries_see_the_caption_so_far_and_token_queries_do_not(make_model, splits):
    a, b = torch.tensor([[0, 4, 8, 9]]), torch.tensor([[0, 5, 8, 9]])  # only token 1 differs
    for queries, depends in (("token", False), ("context", True)):
        model, processor, _, _ = make_model("explained", queries=queries)
        perturb(model, seed=3)
        state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:1]))
        with torch.no_grad():
            later = model.embed(state, a, 0)[:, 2:], model.embed(state, b, 0)[:, 2:]
        assert (not torch.allclose(*later)) == depends, queries


def test_positions_none_and_start_token_first(make_model, splits):
    none, processor, _, _ = make_model("self_attention", positions="none")
    assert none.positions is None and "positions.weight" not in trainable(none)
    first, _, _, _ = make_model("self_attention", start_token_first="on")
    state = first.encode_images(pixel_values=pixels_for(processor, splits["test"][:1]))
    ids = torch.tensor([[0, 4, 8]])
    sequence = []
    first.lm.model.register_forward_pre_hook(lambda m, a, kw: sequence.append(kw["inputs_embeds"]), with_kwargs=True)
    with torch.no_grad():
        first.next_logits(state, ids, use_cache=False)
    expected = torch.cat([first.text_embeddings(ids[:, :1]), state, first.text_embeddings(ids[:, 1:])], 1)
    expected = first.input_norm(expected + first.positions.weight[: expected.shape[1]])
    torch.testing.assert_close(sequence[0], expected)


def test_grad_clip_zero_leaves_the_gradient_unclipped(make_model, splits):
    records = splits["train"][:4]
    updates = {}
    for clip in (0.0, 1e-3):
        model, processor, tokenizer, config = make_model("explained", grad_clip=clip)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]
        optimizer = torch.optim.SGD(params, lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        batch = batch_for(processor, tokenizer, records)
        _, grad_norm, _ = train.train_step(model, [batch], optimizer, scheduler, scaler, params, config)
        step = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before)))
        updates[clip] = (step.item(), grad_norm.item())
    (off, norm), (clipped, _) = updates[0.0], updates[1e-3]
    assert off == pytest.approx(norm, rel=1e-3) and norm > 1e-2  # SGD with lr 1: the step is the gradient
    assert clipped == pytest.approx(1e-3, rel=1e-2)
