"""
The ablation switches: each one a field of the run's config, an option of both training
scripts, and the one place that builds its piece. The defaults build the seed analysis's design
(a run whose config has no switch fields, trained before they existed, loads as that design).

    modality           token | zero | none  modality embeddings at the tokens' scale, zero-initialised, absent
    text_init          token | zero         zero: every text-side addition starts at zero, so at step 0 the
                                            frozen LM reads its own token embeddings (Flamingo's zero gate)
    vision_layer       -1, -2, ...          the CLIP layer whose patch tokens are read (LLaVA reads -2)
    image_positions    none | 2d            learned row and column embeddings added to the image tokens
    image_scale        free | fixed         fixed: the adapter's last LayerNorm gain stays at the text
                                            tokens' RMS, so image tokens keep the text tokens' norm
    lora               0 | rank             LoRA adapters (peft) on every LM layer's projections
    fusion_norm        layernorm | none     cross-attention: the LayerNorm after the residual
    sharp_attention    off | on             cross-attention: unit-gain LayerNorm on the query and key inputs,
                                            so the attention logits are not squeezed by the tokens' 0.02 scale
    queries            token | context      cross-attention: queries from each token's embedding alone, or
                                            from a small causal self-attention block over the caption so far
    positions          learned | none       self-attention: the learned absolute position table
    start_token_first  off | on             self-attention: <|endoftext|> before the image, not after it
    grad_clip          1.0 | 0 (off)        the gradient norm clip (train.py)
"""

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

CHOICES = {
    "modality": ("token", "zero", "none"),
    "text_init": ("token", "zero"),
    "image_positions": ("none", "2d"),
    "image_scale": ("free", "fixed"),
    "fusion_norm": ("layernorm", "none"),
    "sharp_attention": ("off", "on"),
    "queries": ("token", "context"),
    "positions": ("learned", "none"),
    "start_token_first": ("off", "on"),
}


@dataclass(frozen=True)
class Switches:
    modality: str = "token"
    text_init: str = "token"
    vision_layer: int = -1
    image_positions: str = "none"
    image_scale: str = "free"
    lora: int = 0
    fusion_norm: str = "layernorm"
    sharp_attention: str = "off"
    queries: str = "token"
    positions: str = "learned"
    start_token_first: str = "off"
    grad_clip: float = 1.0

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} {getattr(self, name)!r}: one of {', '.join(allowed)}")
        if self.vision_layer >= 0:
            raise ValueError(f"vision_layer {self.vision_layer}: counted from the last layer, -1, -2, ...")
        if self.lora < 0 or self.grad_clip < 0:
            raise ValueError("lora and grad_clip are 0 (off) or positive")


DEFAULT = Switches()


def add_options(parser):
    group = parser.add_argument_group("ablation switches (see switches.py; the defaults are the seed's design)")
    for f in fields(Switches):
        flag = "--" + f.name.replace("_", "-")
        if f.name in CHOICES:
            group.add_argument(flag, choices=CHOICES[f.name], default=f.default)
        else:
            group.add_argument(flag, type=type(f.default), default=f.default)


def from_args(args):
    return Switches(**{f.name: getattr(args, f.name) for f in fields(Switches)})


def from_config(config):
    """The switches a run was trained with; fields it does not have take their defaults."""
    return Switches(**{f.name: config[f.name] for f in fields(Switches) if f.name in config})


def as_config(switches):
    return asdict(switches)


# -----------------------------------------------------------------------------
# the pieces


class Modality(nn.Embedding):
    """What tells image tokens from text tokens: row 0 added to image tokens, row 1 to text ones.
    none: nothing is added (the table stays, frozen at zero, so that old and new runs load alike)."""

    def __init__(self, mode, text_init, hidden_size, scale):
        super().__init__(2, hidden_size)
        self.mode = mode
        if mode == "token":
            nn.init.normal_(self.weight, std=scale)
        else:
            nn.init.zeros_(self.weight)
        if text_init == "zero":
            self.weight.data[1].zero_()
        if mode == "none":
            self.weight.requires_grad_(False)

    def add(self, x, modality_id):
        return x if self.mode == "none" else x + self.weight[modality_id]


class ImagePositions(nn.Module):
    """Learned row and column embeddings for a square grid of image tokens (none: nothing added)."""

    def __init__(self, mode, n_tokens, hidden_size, scale):
        super().__init__()
        self.grid = math.isqrt(n_tokens)
        self.rows = self.columns = None
        if mode == "2d":
            assert self.grid**2 == n_tokens, f"{n_tokens} image tokens are not a square grid"
            self.rows, self.columns = nn.Embedding(self.grid, hidden_size), nn.Embedding(self.grid, hidden_size)
            nn.init.normal_(self.rows.weight, std=scale)
            nn.init.normal_(self.columns.weight, std=scale)

    def forward(self, x):  # [B, P, H], patches in row-major order
        if self.rows is None:
            return x
        table = self.rows.weight[:, None, :] + self.columns.weight[None, :, :]  # [grid, grid, H]
        return x + table.reshape(-1, x.shape[-1])


def fix_gain(layer_norm, value):
    """image_scale fixed: the LayerNorm's gain is a constant, not a trainable weight."""
    layer_norm.weight.requires_grad_(False)
    nn.init.constant_(layer_norm.weight, value)


def apply_lora(lm, rank):
    """LoRA adapters (rank, alpha = 2 x rank, no dropout) on every decoder layer's attention and
    MLP projections, in place; the adapters' B starts at zero, so the LM is unchanged at step 0."""
    if rank == 0 or any("lora_" in name for name, _ in lm.named_parameters()):
        return lm
    from peft import LoraConfig, inject_adapter_in_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets), lm)


def unfreeze_lora(lm):
    for name, p in lm.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


class QueryContext(nn.Module):
    """queries context: one pre-norm causal self-attention block over the caption so far, so the
    query at "... red circle" knows which object was named; token: the embedding itself. Its output
    projection starts at zero: at step 0 the queries are the tokens' embeddings."""

    def __init__(self, mode, hidden_size, n_heads):
        super().__init__()
        self.enabled = mode == "context"
        if self.enabled:
            self.n_heads = n_heads
            self.norm = nn.LayerNorm(hidden_size)
            self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
            self.out = nn.Linear(hidden_size, hidden_size)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def forward(self, text):  # [B, T, H] -> [B, T, H]; position t sees positions <= t only
        if not self.enabled:
            return text
        B, T, H = text.shape
        q, k, v = self.qkv(self.norm(text)).view(B, T, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, H)
        return text + self.out(y)


def qk_norm(sharp, hidden_size):
    """sharp_attention on: a unit-gain LayerNorm (no weights) on the query and key inputs."""
    return nn.LayerNorm(hidden_size, elementwise_affine=False) if sharp == "on" else nn.Identity()


class FusionNorm(nn.Module):
    """How the cross-attention output joins the text: LayerNorm(text + attention) (the seed's),
    text + attention (fusion_norm none), or with text_init zero text + LayerNorm(attention) with
    a gain starting at 0 (or text + g * attention, g starting at 0, without the norm), so that at
    step 0 the LM reads its own embeddings. The LayerNorm's weight and bias are this module's own,
    named as the seed's fusion_norm was."""

    def __init__(self, norm, text_init, hidden_size, scale):
        super().__init__()
        self.on_branch = text_init == "zero"
        self.weight = self.bias = self.gate = None
        if norm == "layernorm":
            self.weight = nn.Parameter(torch.full((hidden_size,), 0.0 if self.on_branch else scale))
            self.bias = nn.Parameter(torch.zeros(hidden_size))
        elif self.on_branch:
            self.gate = nn.Parameter(torch.zeros(()))

    def norm(self, x):
        return x if self.weight is None else F.layer_norm(x, x.shape[-1:], self.weight, self.bias, 1e-5)

    def forward(self, text, attended):
        if not self.on_branch:
            return self.norm(text + attended)
        return text + (self.norm(attended) if self.gate is None else self.gate * attended)


def position_table(mode, n_image, n_text, hidden_size, scale, text_init, start_token_first):
    """self-attention: learned absolute positions over the sequence (None: positions none). With
    text_init zero the text's rows start at zero (the start token is row 0 when it comes first)."""
    if mode == "none":
        return None
    table = nn.Embedding(n_image + n_text, hidden_size)
    nn.init.normal_(table.weight, std=scale)
    if text_init == "zero":
        text_rows = (
            [0, *range(n_image + 1, n_image + n_text)]
            if start_token_first == "on"
            else range(n_image, n_image + n_text)
        )
        table.weight.data[list(text_rows)] = 0.0
    return table
