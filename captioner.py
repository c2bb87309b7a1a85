"""
What both fusion variants share: the frozen vision tower, the image adapter,
the modality embedding, which parameters train, the loss, the decoding protocol
and the trainable weights.

A variant subclasses Captioner and says how text ids become Qwen's
inputs_embeds given the encoded image (`embed`), and how many positions the
image occupies in Qwen's sequence (`prefix_len`). Everything else is written
once, here.

The decoding protocol, used by decoding.py (and through it generate.py,
evaluation, the app and the benchmarks):
    state = model.encode_images(pixel_values=... | features=...)   # once per image
    logits, cache = model.next_logits(state, ids)                   # prefill
    logits, cache = model.next_logits(state, ids, cache)            # one new token
"""

import hashlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint

import switches as sw


def chunk_cross_entropy(head, hidden, targets):
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class Captioner(nn.Module):
    variant = None
    loss_chunk_rows = 1024  # rows of fp32 logits alive at once: 1024 x 151,936 x 4 bytes = 0.6 GB for Qwen

    def __init__(self, vision, lm, train_layers=2, switches=sw.DEFAULT):
        super().__init__()
        self.vision, self.lm, self.switches = vision, lm, switches
        layers = vision.config.num_hidden_layers  # its hidden states: the embeddings, then each layer's
        if not -(layers + 1) <= switches.vision_layer <= -1:
            raise ValueError(
                f"--vision-layer {switches.vision_layer}: the vision tower has {layers} layers "
                f"(-1 to -{layers + 1}, the embeddings last)"
            )
        H = lm.config.hidden_size
        Dv = vision.config.hidden_size
        # Qwen's token embeddings are small (std ~0.02): whatever is added to them or fed
        # beside them starts at their scale, or it drowns the token identity and hands the
        # frozen layers a residual stream far larger than the one they were trained on.
        self.token_rms = lm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt().item()
        self.adapter = nn.Sequential(nn.Linear(Dv, H), nn.LayerNorm(H), nn.GELU(), nn.Linear(H, H), nn.LayerNorm(H))
        self.modality = sw.Modality(switches.modality, switches.text_init, H, self.token_rms)
        self.init_layer_norm(self.adapter[-1])
        if switches.image_scale == "fixed":
            sw.fix_gain(self.adapter[-1], self.token_rms)
        self.image_positions = sw.ImagePositions(switches.image_positions, self.n_patches(), H, self.token_rms)
        self.train_layers = train_layers

    def init_layer_norm(self, ln):
        nn.init.constant_(ln.weight, self.token_rms)

    def freeze(self):
        """Train the adapter, the modality embedding, the variant's fusion parts and the
        last `train_layers` Qwen decoder layers (and LoRA adapters on every layer, with the lora
        switch, added here: after the variant's own parts drew their initial weights); everything
        else is frozen."""
        sw.apply_lora(self.lm, self.switches.lora)
        self.vision.requires_grad_(False)
        self.lm.requires_grad_(False)
        layers = self.lm.model.layers
        if not 0 <= self.train_layers <= len(layers):
            raise ValueError(f"--train-layers {self.train_layers}: the language model has {len(layers)} layers")
        for layer in layers[len(layers) - self.train_layers :]:
            layer.requires_grad_(True)
        sw.unfreeze_lora(self.lm)
        return self

    def backbone_fingerprint(self):
        """A short hash of frozen backbone weights: a checkpoint holds only the trainable
        weights, so loading it onto other backbones of the same shape must be caught too."""
        h = hashlib.sha256()
        for t in (self.lm.get_input_embeddings().weight[:1024], self.vision.embeddings.patch_embedding.weight):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def parameter_groups(self, weight_decay):
        """AdamW groups: weight decay on the trainable matrices only. LayerNorm gains, biases and
        embeddings (the modality and position tables) are not decayed (as in nanoGPT): pulling a
        gain or an embedding towards zero is not regularisation, it changes what the layer means."""
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        trainable = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in trainable if p.ndim >= 2 and id(p) not in embeddings]
        no_decay = [p for p in trainable if p.ndim < 2 or id(p) in embeddings]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def n_patches(self):
        """Image tokens per image: the CLIP tower's patch grid (its CLS token is dropped)."""
        vc = self.vision.config
        return (vc.image_size // vc.patch_size) ** 2

    def parameter_counts(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    # --- images -------------------------------------------------------------

    @torch.no_grad()
    def image_features(self, pixel_values):
        """Frozen CLIP patch tokens [B, P, Dv] of the switches' vision layer (the CLS token is dropped)."""
        layer = self.switches.vision_layer
        if layer == -1:
            return self.vision(pixel_values=pixel_values).last_hidden_state[:, 1:]
        return self.vision(pixel_values=pixel_values, output_hidden_states=True).hidden_states[layer][:, 1:]

    def image_tokens(self, pixel_values=None, features=None):
        if features is None:
            features = self.image_features(pixel_values)
        features = features.to(self.adapter[0].weight.dtype)
        return self.modality.add(self.image_positions(self.adapter(features)), 0)

    def encode_images(self, pixel_values=None, features=None):
        """What decoding needs from the images, computed once per image."""
        return self.image_tokens(pixel_values, features)

    def text_embeddings(self, ids):
        return self.modality.add(self.lm.get_input_embeddings()(ids), 1)

    # --- the two things a variant defines -------------------------------------

    def prefix_len(self, state):
        raise NotImplementedError

    def embed(self, state, ids, start):
        """Qwen inputs_embeds for text ids at text positions start.. (with the image prefix if start == 0)."""
        raise NotImplementedError

    def embed_new(self, state, ids, n_new):
        """inputs_embeds of the last n_new of ids [B, T] (with the image prefix when n_new == T)."""
        start = ids.shape[1] - n_new
        return self.embed(state, ids[:, start:], start)

    # --- training ---------------------------------------------------------------

    def forward(self, input_ids, targets, attention_mask, pixel_values=None, features=None, reduction="mean"):
        """Cross-entropy over the caption tokens (targets of -100 are ignored), their mean
        or (reduction="sum") their sum.

        The LM head only runs where there is a target: not on image positions, not on
        padding. With Qwen's 151,936-token vocabulary, logits for every position of a
        batch of 256 x 40 would take about 13 GB with their gradient, so the head and the
        cross-entropy run in chunks of rows, each recomputed in the backward pass
        (activation checkpointing): peak memory is one chunk's logits, whatever the batch."""
        state = self.encode_images(pixel_values, features)
        embeds = self.embed(state, input_ids, 0)
        P = self.prefix_len(state)
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], P), attention_mask], 1)
        hidden = self.lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, P:]
        picked = targets != -100
        hidden, targets = hidden[picked], targets[picked]
        head = self.lm.get_output_embeddings()
        loss = hidden.new_zeros((), dtype=torch.float32)
        for k in range(0, len(targets), self.loss_chunk_rows):
            rows = slice(k, k + self.loss_chunk_rows)
            loss = loss + checkpoint(chunk_cross_entropy, head, hidden[rows], targets[rows], use_reentrant=False)
        return loss if reduction == "sum" else loss / max(len(targets), 1)

    # --- decoding ---------------------------------------------------------------

    def next_logits(self, state, ids, cache=None, use_cache=True):
        """Logits for the token after ids [B, T]. Without a cache the whole sequence is
        run (and, with use_cache, the cache for it returned); with one, only ids[:, -1]."""
        embeds = self.embed_new(state, ids, ids.shape[1] if cache is None else 1)
        out = self.lm(inputs_embeds=embeds, cache=cache, use_cache=use_cache, logits_to_keep=1)
        return out.logits[:, -1].float(), out.cache

    # --- checkpoints ------------------------------------------------------------

    def trainable_state_dict(self):
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().contiguous() for n, t in self.state_dict().items() if n in names}

    def load_trainable(self, path):
        try:
            weights = load_file(str(path))
        except (SafetensorError, OSError) as e:  # truncated, empty, or not safetensors at all
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
        if missing or unexpected:
            raise ValueError(
                f"{path}: does not fit this {self.variant} model; missing keys "
                f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        own = self.state_dict()
        for n, t in weights.items():
            if t.shape != own[n].shape:
                raise ValueError(
                    f"{path}: {n} has shape {tuple(t.shape)} but this model's is "
                    f"{tuple(own[n].shape)}: the checkpoint was trained on another backbone"
                )
        self.load_state_dict(weights, strict=False)
