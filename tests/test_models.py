"""The two fusion variants: what trains, how text meets image, what the LM head sees, the loss."""

import pytest
import torch
import torch.nn.functional as F

from conftest import VARIANTS, batch_for, perturb, pixels_for

FUSION = {"explained": ("cross_attention.", "fusion_norm."), "self_attention": ("positions.", "input_norm.")}


# -----------------------------------------------------------------------------
# which parameters train


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("train_layers", [0, 1, 2])
def test_trainable_parameter_set(make_model, variant, train_layers):
    model = make_model(variant, train_layers=train_layers)[0]
    n_layers = len(model.lm.model.layers)
    assert n_layers == 2
    trained_layers = [f"lm.model.layers.{i}." for i in range(n_layers - train_layers, n_layers)]
    expected = ("adapter.", "modality.") + FUSION[variant] + tuple(trained_layers)
    names = dict(model.named_parameters())
    trainable = {n for n, p in names.items() if p.requires_grad}

    for prefix in expected:  # every group is there and wholly trainable
        group = [n for n in names if n.startswith(prefix)]
        assert group, f"no parameters under {prefix}"
        assert all(n in trainable for n in group), f"part of {prefix} is frozen"
    assert all(n.startswith(expected) for n in trainable), (
        f"unexpectedly trainable: {sorted(n for n in trainable if not n.startswith(expected))}"
    )

    assert not any(p.requires_grad for p in model.vision.parameters()), "the vision tower must be frozen"
    assert not model.lm.get_input_embeddings().weight.requires_grad
    assert not model.lm.lm_head.weight.requires_grad
    assert not any(p.requires_grad for p in model.lm.model.norm.parameters())
    frozen_layers = [i for i in range(n_layers) if f"lm.model.layers.{i}." not in trained_layers]
    for i in frozen_layers:
        assert not any(p.requires_grad for p in model.lm.model.layers[i].parameters()), f"LM layer {i} trains"
    if train_layers == 0:
        assert not any(p.requires_grad for p in model.lm.parameters()), "train_layers=0 leaves the whole LM frozen"

    counted, total = model.parameter_counts()
    assert counted == sum(p.numel() for n, p in names.items() if n in trainable)
    assert total == sum(p.numel() for p in model.parameters()) and counted < total
    # what is saved is exactly what trains
    assert set(model.trainable_state_dict()) == trainable


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_trainable_parameter_gets_a_gradient(make_model, splits, variant):
    model, processor, tokenizer, _ = make_model(variant)
    model.train()
    loss = model(**batch_for(processor, tokenizer, splits["train"][:4]))
    assert torch.isfinite(loss)
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n} gets no gradient"
        else:
            assert p.grad is None, f"frozen {n} got a gradient"


# -----------------------------------------------------------------------------
# cross-attention fusion: token t does not depend on the other text tokens


def test_cross_attention_fusion_of_a_token_ignores_other_text_tokens(make_model, splits, tokenizer):
    model, processor, _, _ = make_model("explained")
    perturb(model)
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:3]))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(len(tokenizer), (3, 7), generator=gen)
    fused = model.embed(state, ids, 0)
    assert fused.shape == (3, 7, model.lm.config.hidden_size)

    changed = ids.clone()
    changed[:, [0, 2, 5]] = (ids[:, [0, 2, 5]] + 1 + torch.randint(50, (3, 3), generator=gen)) % len(tokenizer)
    fused2 = model.embed(state, changed, 0)
    for t in (1, 3, 4, 6):
        torch.testing.assert_close(fused2[:, t], fused[:, t], rtol=0, atol=1e-6)
    for t in (0, 2, 5):  # and the changed tokens did change (the test can see a difference)
        assert not torch.allclose(fused2[:, t], fused[:, t], atol=1e-4)

    # one token at a time (as decoding fuses it) gives the same as the whole caption at once
    for t in range(ids.shape[1]):
        torch.testing.assert_close(model.embed(state, ids[:, t : t + 1], t)[:, 0], fused[:, t], rtol=0, atol=1e-6)

    # ... yet the fusion does depend on the image
    other = model.encode_images(pixel_values=pixels_for(processor, splits["test"][3:6]))
    assert not torch.allclose(model.embed(other, ids, 0), fused, atol=1e-4)


# -----------------------------------------------------------------------------
# self-attention: the position table


def test_self_attention_position_table_refuses_an_overlong_sequence(make_model, splits, tokenizer):
    model, processor, _, config = make_model("self_attention", max_caption_tokens=10)
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:2]))
    P = state.shape[1]
    assert P == model.n_image_tokens == (32 // 8) ** 2
    text = config["max_caption_tokens"] + 1  # [BOS] + the longest caption
    assert model.positions.num_embeddings == P + text

    ids = torch.randint(len(tokenizer), (2, text + 1))
    out = model.embed(state, ids[:, :text], 0)  # fits exactly
    assert out.shape == (2, P + text, model.lm.config.hidden_size)
    assert model.embed(state, ids[:, :1], text - 1).shape == (2, 1, model.lm.config.hidden_size)
    with pytest.raises(ValueError, match="position table"):
        model.embed(state, ids, 0)
    with pytest.raises(ValueError, match="position table"):
        model.embed(state, ids[:, :1], text)  # one decoding step past the end

    # a training batch with too long a caption is refused, not silently cut
    input_ids = torch.randint(len(tokenizer), (2, text + 1))
    with pytest.raises(ValueError, match="position table"):
        model(
            input_ids,
            input_ids.clone(),
            torch.ones_like(input_ids),
            features=model.image_features(pixels_for(processor, splits["test"][:2])),
        )


# -----------------------------------------------------------------------------
# the LM head runs only on the text positions


@pytest.mark.parametrize("variant", VARIANTS)
def test_lm_head_only_sees_target_positions(make_model, splits, variant):
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model)
    batch = batch_for(processor, tokenizer, splits["train"][:3])
    n_targets = int((batch["targets"] != -100).sum())
    assert n_targets < batch["targets"].numel(), "the batch must have padding for this test to mean anything"
    seen = []
    handle = model.lm.lm_head.register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].shape))
    try:
        loss = model(**batch)
    finally:
        handle.remove()
    assert len(seen) == 1
    assert seen[0][0] == n_targets, f"LM head ran on {seen[0][0]} rows, the captions have {n_targets} targets"

    # and those are the right positions: the loss is the text part of a full forward pass
    with torch.no_grad():
        state = model.encode_images(pixel_values=batch["pixel_values"])
        P = model.prefix_len(state)
        assert P == (16 if variant == "self_attention" else 0)
        mask = torch.cat([torch.ones(3, P, dtype=torch.long), batch["attention_mask"]], 1)
        full = model.lm(inputs_embeds=model.embed(state, batch["input_ids"], 0), attention_mask=mask).logits
        assert full.shape[1] == P + batch["input_ids"].shape[1]
        expected = F.cross_entropy(full[:, P:].flatten(0, 1), batch["targets"].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-5)
    # in chunks of a few rows (several head calls, each recomputed in backward) it is the same loss and gradient
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.loss_chunk_rows = 7
    chunked = model(**batch)
    chunked.backward()
    torch.testing.assert_close(chunked.detach(), expected, rtol=1e-5, atol=1e-5)
    for n, p in model.named_parameters():
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_counts_eos_and_ignores_padding(make_model, splits, variant):
    """Changing the logits' targets at padding must not move the loss; the EOS target must."""
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model)
    batch = batch_for(processor, tokenizer, splits["train"][:3])
    with torch.no_grad():
        base = model(**batch)
        no_eos = dict(batch, targets=batch["targets"].masked_fill(batch["targets"] == tokenizer.eos_token_id, -100))
        assert not torch.isclose(model(**no_eos), base), "the EOS target must count in the loss"
        # padding inputs of another token change nothing (they are masked and their targets ignored)
        pad = batch["attention_mask"] == 0
        assert pad.any()
        other = dict(batch, input_ids=batch["input_ids"].masked_fill(pad, 5))
        torch.testing.assert_close(model(**other), base, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# cached features give the same loss as pixels


@pytest.mark.parametrize("variant", VARIANTS)
def test_features_and_pixels_give_the_same_loss(make_model, splits, variant):
    model, processor, tokenizer, _ = make_model(variant)
    perturb(model)
    batch = batch_for(processor, tokenizer, splits["train"][:4])
    px = batch.pop("pixel_values")
    with torch.no_grad():
        from_pixels = model(**batch, pixel_values=px)
        features = model.image_features(px)
        assert features.shape == (4, 16, model.vision.config.hidden_size), "patch tokens only, CLS dropped"
        from_features = model(**batch, features=features)
        from_fp16 = model(**batch, features=features.to(torch.float16))
        other_image = model(**batch, features=features.roll(1, 0))
    torch.testing.assert_close(from_features, from_pixels, rtol=0, atol=1e-5)
    torch.testing.assert_close(from_fp16, from_pixels, rtol=0, atol=1e-2)
    assert not torch.isclose(other_image, from_pixels, atol=1e-4), "the loss must depend on the image"


def test_more_train_layers_than_the_model_has_is_refused(make_model):
    with pytest.raises(ValueError, match="has 2 layers"):
        make_model("explained", train_layers=3)


def test_decoding_stops_at_the_end_of_the_position_table(make_model, splits, tokenizer):
    """A short position table bounds the caption instead of crashing the evaluation after training."""
    from decoding import decode

    model, processor, _, _ = make_model("self_attention", max_caption_tokens=4)
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:3]))
    eos = tokenizer.eos_token_id
    out = decode(model, state, eos, max_new_tokens=30, stop_at_eos=False)  # would need 30 text positions
    assert len(out) == 3
    assert max(len(t) for t in out) <= model.max_text_tokens == 5
