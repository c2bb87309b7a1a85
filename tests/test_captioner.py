"""The Captioner contract both variants share: which parameters train and get gradients, what the
LM head sees, the loss (EOS counted, padding ignored, cached features as good as pixels), and
next_logits: a cached step gives the logits of a full recomputation, for one position per row."""

import pytest
import torch
import torch.nn.functional as F

from conftest import VARIANTS, assert_cached_steps_match_recomputation, batch_for, perturb, pixels_for
from decoding import decode

# -----------------------------------------------------------------------------
# which parameters train


FUSION = {"explained": ("cross_attention.", "fusion_norm."), "self_attention": ("positions.", "input_norm.")}


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


def test_more_train_layers_than_the_model_has_is_refused(make_model):
    with pytest.raises(ValueError, match="has 2 layers"):
        make_model("explained", train_layers=3)


# -----------------------------------------------------------------------------
# the loss: the LM head runs only on the text positions


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


# -----------------------------------------------------------------------------
# next_logits: the KV cache changes nothing, and the LM head runs on one position per row


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_steps_give_the_logits_of_full_recomputation(make_model, splits, tokenizer, variant):
    model, processor, _, _ = make_model(variant)
    perturb(model, seed=2)
    state = model.encode_images(pixel_values=pixels_for(processor, splits["test"][:3]))
    ids = torch.randint(len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = tokenizer.eos_token_id
    assert_cached_steps_match_recomputation(model, state, ids, prefill=2)


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


@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_decay_falls_on_trainable_matrices_only(make_model, variant):
    model, _, _, _ = make_model(variant)
    decay, no_decay = model.parameter_groups(0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    spared = {names[id(p)] for p in no_decay["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | spared == trainable and not decayed & spared
    embeddings = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    norms = {n for n, m in model.named_modules() if "norm" in type(m).__name__.lower()}
    for n in trainable:
        is_norm = n.rsplit(".", 1)[0] in norms
        if n.endswith(".bias") or n in embeddings or is_norm:
            assert n in spared, f"{n} must not be decayed"
        else:
            assert n in decayed and dict(model.named_parameters())[n].ndim == 2, n
    assert any("modality" in n for n in spared) and any("adapter.0.weight" == n for n in decayed)
