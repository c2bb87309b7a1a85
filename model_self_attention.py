"""
The self-attention-only variant.

[image tokens + modality 0 ; text tokens + modality 1] are concatenated, a
learned absolute position embedding is added and an input LayerNorm applied,
and Qwen's own self-attention does the fusion. The loss covers only the text
positions, and the LM head only runs there.
"""

import torch
import torch.nn as nn

from captioner import Captioner


class SelfAttentionCaptioner(Captioner):
    variant = "self_attention"

    def __init__(self, vision, lm, train_layers=2, max_text_tokens=33):
        super().__init__(vision, lm, train_layers)
        H = lm.config.hidden_size
        self.n_image_tokens = self.n_patches()
        # sized to what can occur: every patch plus [BOS] + the longest caption
        self.max_text_tokens = max_text_tokens
        self.positions = nn.Embedding(self.n_image_tokens + max_text_tokens, H)
        nn.init.normal_(self.positions.weight, std=self.token_rms)
        self.input_norm = nn.LayerNorm(H)
        self.init_layer_norm(self.input_norm)

    @classmethod
    def from_config(cls, vision, lm, config):
        return cls(vision, lm, config["train_layers"], config["max_caption_tokens"] + 1)

    def prefix_len(self, state):
        return state.shape[1]

    def embed(self, state, ids, start):
        text = self.text_embeddings(ids)
        x = torch.cat([state, text], 1) if start == 0 else text
        first = 0 if start == 0 else state.shape[1] + start
        if first + x.shape[1] > self.positions.num_embeddings:
            raise ValueError(
                f"a sequence of {state.shape[1]} image + {start + ids.shape[1]} text positions does not fit "
                f"the position table of {self.positions.num_embeddings} ({self.n_image_tokens} image + "
                f"{self.positions.num_embeddings - self.n_image_tokens} text); train with a larger "
                f"--max-caption-tokens or generate fewer tokens"
            )
        return self.input_norm(x + self.positions.weight[first : first + x.shape[1]])

    def image_attention(self, state, ids):
        """[B, T, P]: Qwen's last-layer attention from each text position to the image
        positions, mean over heads, renormalised over the image (eager attention, as
        the fused kernels do not return weights)."""
        P = state.shape[1]
        previous = self.lm.config._attn_implementation
        self.lm.set_attn_implementation("eager")
        try:
            out = self.lm(inputs_embeds=self.embed(state, ids, 0), output_attentions=True, logits_to_keep=1)
        finally:
            self.lm.set_attn_implementation(previous)
        weights = out.attentions[-1].mean(1)[:, P:, :P]
        return weights / weights.sum(-1, keepdim=True)
