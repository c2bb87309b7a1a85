"""
The self-attention-only variant.

[image tokens + modality 0 ; text tokens + modality 1] are concatenated, a
learned absolute position embedding is added and an input LayerNorm applied,
and Qwen's own self-attention does the fusion. The loss covers only the text
positions, and the LM head only runs there.

With start_token_first on, <|endoftext|> (the document separator of a Qwen base
model) comes before the image: [start ; image ; caption]. The sequence has the
same length and the last image position then predicts the first caption token,
so the positions the loss and decoding read are the same ones. The switches
(switches.py) build the position table and say what the input norm covers.
"""

import torch
import torch.nn as nn

import switches as sw
from captioner import Captioner


class SelfAttentionCaptioner(Captioner):
    variant = "self_attention"

    def __init__(self, vision, lm, train_layers=2, max_text_tokens=33, switches=sw.DEFAULT):
        super().__init__(vision, lm, train_layers, switches)
        H = lm.config.hidden_size
        self.n_image_tokens = self.n_patches()
        # sized to what can occur: every patch plus [BOS] + the longest caption
        self.max_text_tokens = max_text_tokens
        self.start_first = switches.start_token_first == "on"
        self.positions = sw.position_table(
            switches.positions,
            self.n_image_tokens,
            max_text_tokens,
            H,
            self.token_rms,
            switches.text_init,
            switches.start_token_first,
        )
        self.input_norm = nn.LayerNorm(H)
        self.init_layer_norm(self.input_norm)
        self.text_unnormed = switches.text_init == "zero"  # the LM reads its own token embeddings at step 0

    @classmethod
    def from_config(cls, vision, lm, config):
        return cls(vision, lm, config["train_layers"], config["max_caption_tokens"] + 1, sw.from_config(config))

    def prefix_len(self, state):
        return state.shape[1]

    def embed(self, state, ids, start):
        text = self.text_embeddings(ids)
        P = state.shape[1]
        if start > 0:  # decoding: new text tokens only
            x, is_image = text, torch.zeros(text.shape[1], dtype=torch.bool)
        else:
            x = torch.cat([text[:, :1], state, text[:, 1:]] if self.start_first else [state, text], 1)
            where = torch.arange(x.shape[1]) - int(self.start_first)
            is_image = (where >= 0) & (where < P)
        first = 0 if start == 0 else P + start
        if self.positions is not None:
            if first + x.shape[1] > self.positions.num_embeddings:
                raise ValueError(
                    f"a sequence of {P} image + {start + ids.shape[1]} text positions does not fit "
                    f"the position table of {self.positions.num_embeddings} ({self.n_image_tokens} image + "
                    f"{self.positions.num_embeddings - self.n_image_tokens} text); train with a larger "
                    f"--max-caption-tokens or generate fewer tokens"
                )
            x = x + self.positions.weight[first : first + x.shape[1]]
        if not self.text_unnormed:
            return self.input_norm(x)
        return torch.where(is_image[:, None].to(x.device), self.input_norm(x), x)

    def image_attention(self, state, ids):
        """[B, T, P]: Qwen's last-layer attention from each text position to the image
        positions, mean over heads, renormalised over the image (eager attention, as
        the fused kernels do not return weights)."""
        P = state.shape[1]
        image = slice(1, P + 1) if self.start_first else slice(0, P)
        previous = self.lm.config._attn_implementation
        self.lm.set_attn_implementation("eager")
        try:
            out = self.lm(inputs_embeds=self.embed(state, ids, 0), output_attentions=True, logits_to_keep=1)
        finally:
            self.lm.set_attn_implementation(previous)
        weights = out.attentions[-1].mean(1)[:, P:, image]
        return weights / weights.sum(-1, keepdim=True)
