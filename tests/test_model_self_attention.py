"""The self-attention variant: image tokens and text share Qwen's sequence, placed by a learned
position table that refuses what does not fit."""

import pytest
import torch

from conftest import pixels_for


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
