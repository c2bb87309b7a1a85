"""The cross-attention ("explained") variant: the fusion of a text token depends on the image and
on that token alone."""

import torch

from conftest import perturb, pixels_for


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
