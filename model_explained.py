"""
The cross-attention variant (named "explained" in configs and run folders).

Text embeddings are the queries, the adapted image patch embeddings the keys and
values of one multi-head attention layer; fused = LayerNorm(text + attention)
goes into Qwen as inputs_embeds, and the loss covers every text position.

Each text query attends only to image tokens, so the fusion of token t never
depends on the other text tokens: decoding fuses one new token at a time and
still uses Qwen's KV cache. With the queries switch at context the queries come
from a causal block over the caption so far: decoding then recomputes the
fusion over the caption (a small layer) and still caches Qwen. The switches
(switches.py) build the fusion norm, the query and key norms and the queries.
"""

import math

import torch.nn as nn
import torch.nn.functional as F

import switches as sw
from captioner import Captioner


class CrossAttention(nn.Module):
    """Multi-head attention from text to image tokens.

    Written out rather than nn.MultiheadAttention so that the image keys and
    values are projected once per image and reused at every decoding step (the
    module re-projects them on every call), and so the weights can be read."""

    def __init__(self, hidden_size, n_heads, sharp="off"):
        super().__init__()
        if hidden_size % n_heads:
            raise ValueError(f"--heads {n_heads}: the hidden size {hidden_size} does not split into {n_heads} heads")
        self.n_heads = n_heads
        self.q = nn.Linear(hidden_size, hidden_size)
        self.k = nn.Linear(hidden_size, hidden_size)
        self.v = nn.Linear(hidden_size, hidden_size)
        self.out = nn.Linear(hidden_size, hidden_size)
        self.query_norm, self.key_norm = sw.qk_norm(sharp, hidden_size), sw.qk_norm(sharp, hidden_size)

    def heads(self, x):  # [B, L, H] -> [B, heads, L, H / heads]
        return x.view(x.shape[0], x.shape[1], self.n_heads, -1).transpose(1, 2)

    def project_image(self, image):
        return self.heads(self.k(self.key_norm(image))), self.heads(self.v(image))

    def forward(self, text, keys, values, return_weights=False):
        q = self.heads(self.q(self.query_norm(text)))
        if return_weights:
            weights = (q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
            y = weights @ values
        else:
            weights, y = None, F.scaled_dot_product_attention(q, keys, values)
        y = self.out(y.transpose(1, 2).flatten(2))
        return (y, weights) if return_weights else y


class ExplainedCaptioner(Captioner):
    variant = "explained"

    def __init__(self, vision, lm, train_layers=2, n_heads=8, switches=sw.DEFAULT):
        super().__init__(vision, lm, train_layers, switches)
        H = lm.config.hidden_size
        self.cross_attention = CrossAttention(H, n_heads, switches.sharp_attention)
        self.fusion_norm = sw.FusionNorm(switches.fusion_norm, switches.text_init, H, self.token_rms)
        self.query_context = sw.QueryContext(switches.queries, H, n_heads)

    @classmethod
    def from_config(cls, vision, lm, config):
        return cls(vision, lm, config["train_layers"], config["cross_attention_heads"], sw.from_config(config))

    def encode_images(self, pixel_values=None, features=None):
        return self.cross_attention.project_image(self.image_tokens(pixel_values, features))

    def prefix_len(self, state):
        return 0

    def embed(self, state, ids, start):
        text = self.text_embeddings(ids)
        return self.fusion_norm(text, self.cross_attention(self.query_context(text), *state))

    def embed_new(self, state, ids, n_new):
        if not self.query_context.enabled:  # each token's fusion depends on that token alone
            return super().embed_new(state, ids, n_new)
        return self.embed(state, ids, 0)[:, ids.shape[1] - n_new :]

    def image_attention(self, state, ids):
        """[B, T, P]: how much each text position attends to each image token (mean over heads)."""
        queries = self.query_context(self.text_embeddings(ids))
        return self.cross_attention(queries, *state, return_weights=True)[1].mean(1)
