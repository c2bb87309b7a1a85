"""
What both fusion variants share: the frozen vision tower, the image adapter,
the modality embedding, which parameters train, checkpoints, and decoding.

A variant subclasses Captioner and says how text ids become Qwen's
inputs_embeds given the encoded image (`embed`), and how many positions the
image occupies in Qwen's sequence (`prefix_len`). Everything else (the loss,
the KV-cached decoding protocol, checkpoints) is written once, here.

The decoding protocol, used by generate.py, evaluation and the benchmarks:
    state = model.encode_images(pixel_values=... | features=...)   # once per image
    logits, cache = model.next_logits(state, ids)                   # prefill
    logits, cache = model.next_logits(state, ids, cache)            # one new token
"""
import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class Captioner(nn.Module):
    variant = None

    def __init__(self, vision, lm, train_layers=2):
        super().__init__()
        self.vision, self.lm = vision, lm
        H = lm.config.hidden_size
        Dv = vision.config.hidden_size
        # Qwen's token embeddings are small (std ~0.02): whatever is added to them or fed
        # beside them starts at their scale, or it drowns the token identity and hands the
        # frozen layers a residual stream far larger than the one they were trained on.
        self.token_rms = lm.get_input_embeddings().weight.detach().float().pow(2).mean().sqrt().item()
        self.adapter = nn.Sequential(nn.Linear(Dv, H), nn.LayerNorm(H), nn.GELU(), nn.Linear(H, H), nn.LayerNorm(H))
        self.modality = nn.Embedding(2, H)  # 0 = image token, 1 = text token
        nn.init.normal_(self.modality.weight, std=self.token_rms)
        self.init_layer_norm(self.adapter[-1])
        self.train_layers = train_layers

    def init_layer_norm(self, ln):
        nn.init.constant_(ln.weight, self.token_rms)

    def freeze(self):
        """Train the adapter, the modality embedding, the variant's fusion parts and the
        last `train_layers` Qwen decoder layers; everything else is frozen."""
        self.vision.requires_grad_(False)
        self.lm.requires_grad_(False)
        layers = self.lm.model.layers
        if not 0 <= self.train_layers <= len(layers):
            raise ValueError(f"--train-layers {self.train_layers}: the language model has {len(layers)} layers")
        for layer in layers[len(layers) - self.train_layers:]:
            layer.requires_grad_(True)
        return self

    def backbone_fingerprint(self):
        """A short hash of frozen backbone weights: a checkpoint holds only the trainable
        weights, so loading it onto other backbones of the same shape must be caught too."""
        h = hashlib.sha256()
        for t in (self.lm.get_input_embeddings().weight[:1024], self.vision.embeddings.patch_embedding.weight):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def parameter_counts(self):
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return trainable, sum(p.numel() for p in self.parameters())

    # --- images -------------------------------------------------------------

    @torch.no_grad()
    def image_features(self, pixel_values):
        """Frozen CLIP patch tokens [B, P, Dv] (the CLS token is dropped)."""
        return self.vision(pixel_values=pixel_values).last_hidden_state[:, 1:]

    def image_tokens(self, pixel_values=None, features=None):
        if features is None:
            features = self.image_features(pixel_values)
        features = features.to(self.adapter[0].weight.dtype)
        return self.adapter(features) + self.modality.weight[0]

    def encode_images(self, pixel_values=None, features=None):
        """What decoding needs from the images, computed once per image."""
        return self.image_tokens(pixel_values, features)

    def text_embeddings(self, ids):
        return self.lm.get_input_embeddings()(ids) + self.modality.weight[1]

    # --- the two things a variant defines -------------------------------------

    def prefix_len(self, state):
        raise NotImplementedError

    def embed(self, state, ids, start):
        """Qwen inputs_embeds for text ids at text positions start.. (with the image prefix if start == 0)."""
        raise NotImplementedError

    # --- training ---------------------------------------------------------------

    def forward(self, input_ids, targets, attention_mask, pixel_values=None, features=None, reduction="mean"):
        """Cross-entropy over the caption tokens (targets of -100 are ignored), their mean
        or (reduction="sum") their sum. The LM head only runs on the text positions: the
        image positions need no logits."""
        state = self.encode_images(pixel_values, features)
        embeds = self.embed(state, input_ids, 0)
        P = self.prefix_len(state)
        mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], P), attention_mask], 1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=input_ids.shape[1]).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction=reduction)

    # --- decoding ---------------------------------------------------------------

    def next_logits(self, state, ids, cache=None, use_cache=True):
        """Logits for the token after ids [B, T]. Without a cache the whole sequence is
        run (and, with use_cache, the cache for it returned); with one, only ids[:, -1]."""
        T = ids.shape[1]
        new = ids if cache is None else ids[:, -1:]
        embeds = self.embed(state, new, T - new.shape[1])
        out = self.lm(inputs_embeds=embeds, cache=cache, use_cache=use_cache, logits_to_keep=1)
        return out.logits[:, -1].float(), out.cache

    # --- checkpoints ------------------------------------------------------------

    def trainable_state_dict(self):
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {n: t.detach().contiguous() for n, t in self.state_dict().items() if n in names}

    def load_trainable(self, path):
        weights = load_file(str(path))
        expected = {n for n, p in self.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(expected - weights.keys()), sorted(weights.keys() - expected)
        if missing or unexpected:
            raise ValueError(f"{path}: does not fit this {self.variant} model; missing keys "
                             f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                             f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        own = self.state_dict()
        for n, t in weights.items():
            if t.shape != own[n].shape:
                raise ValueError(f"{path}: {n} has shape {tuple(t.shape)} but this model's is "
                                 f"{tuple(own[n].shape)}: the checkpoint was trained on another backbone")
        self.load_state_dict(weights, strict=False)


def save_checkpoint(model, config, run_dir):
    """Trainable weights as safetensors, everything needed to rebuild the model as JSON."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(model.trainable_state_dict(), str(run_dir / "model.safetensors.tmp"))
    (run_dir / "model.safetensors.tmp").replace(run_dir / "model.safetensors")
    config = {**config, "variant": model.variant, "backbone_fingerprint": model.backbone_fingerprint()}
    (run_dir / "config.json.tmp").write_text(json.dumps(config, indent=2))
    (run_dir / "config.json.tmp").replace(run_dir / "config.json")


def read_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.json; is this a run directory written by training?")
    return json.loads(path.read_text())


def index_state(state, index):
    """Select (or reorder) the rows of an encoded image batch."""
    if isinstance(state, tuple):
        return tuple(s[index] for s in state)
    return state[index]


def batch_size_of(state):
    return (state[0] if isinstance(state, tuple) else state).shape[0]


def device_of(state):
    return (state[0] if isinstance(state, tuple) else state).device


def strip_eos(rows, eos_id):
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows]


@torch.no_grad()
def decode(model, state, eos_id, max_new_tokens=30, strategy="greedy", top_k=50, top_p=0.9,
           temperature=1.0, use_cache=True, generator=None, beams=4, length_penalty=1.0, stop_at_eos=True):
    """Generate up to max_new_tokens for each image of an encoded batch.

    Every caption starts from the same one-token prompt ([BOS] = EOS), so the
    batch needs no left padding; a finished row keeps being fed EOS and its
    later tokens are dropped. Returns a list of token id lists (EOS excluded).
    stop_at_eos=False always runs max_new_tokens steps (for benchmarks)."""
    # a learned position table (self-attention) bounds how long a caption can get
    max_new_tokens = min(max_new_tokens, getattr(model, "max_text_tokens", max_new_tokens))
    if strategy == "beam":
        return beam_search(model, state, eos_id, beams, max_new_tokens, length_penalty, use_cache)
    B = batch_size_of(state)
    ids = torch.full((B, 1), eos_id, dtype=torch.long, device=device_of(state))
    done = torch.zeros(B, dtype=torch.bool, device=ids.device)
    cache = None
    for _ in range(max_new_tokens):
        logits, cache = model.next_logits(state, ids, cache, use_cache)
        token = pick_token(logits, strategy, top_k, top_p, temperature, generator)
        if stop_at_eos:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        ids = torch.cat([ids, token[:, None]], 1)
        if done.all():
            break
    return strip_eos(ids[:, 1:].tolist(), eos_id)


@torch.no_grad()
def beam_search(model, state, eos_id, beams=4, max_new_tokens=30, length_penalty=1.0, use_cache=True):
    """Keep the `beams` most probable captions of each image; return the best by
    log-probability / length**length_penalty. A finished beam only extends with
    EOS at no cost, so it keeps competing with the unfinished ones. With a cache,
    the cache rows are reordered along with the beams, never recomputed."""
    B, N = batch_size_of(state), beams
    state = index_state(state, torch.arange(B, device=device_of(state)).repeat_interleave(N))
    ids = torch.full((B * N, 1), eos_id, dtype=torch.long, device=device_of(state))
    scores = torch.full((B, N), float("-inf"), device=ids.device)
    scores[:, 0] = 0  # all beams start identical: only the first one may expand
    lengths = torch.zeros(B * N, device=ids.device)
    done = torch.zeros(B * N, dtype=torch.bool, device=ids.device)
    cache = None
    for _ in range(max_new_tokens):
        logits, cache = model.next_logits(state, ids, cache, use_cache)
        logprobs = logits.log_softmax(-1)
        finished_row = torch.full_like(logprobs[0], float("-inf"))
        finished_row[eos_id] = 0
        logprobs[done] = finished_row
        V = logprobs.shape[-1]
        candidates = (scores.view(B * N, 1) + logprobs).view(B, N * V)
        scores, flat = candidates.topk(N, -1)
        origin = (flat // V + torch.arange(B, device=ids.device)[:, None] * N).view(-1)
        token = (flat % V).view(-1)
        lengths = lengths[origin] + ~done[origin]
        done = done[origin] | (token == eos_id)
        ids = torch.cat([ids[origin], token[:, None]], 1)
        if cache is not None:
            cache.reorder_cache(origin)
        if done.all():
            break
    final = scores.view(-1) / lengths.clamp(min=1) ** length_penalty
    best = final.view(B, N).argmax(-1) + torch.arange(B, device=ids.device) * N
    return strip_eos(ids[best, 1:].tolist(), eos_id)


def pick_token(logits, strategy, top_k, top_p, temperature, generator):
    if strategy == "greedy":
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-6)
    if strategy == "top-k":
        kth = logits.topk(min(top_k, logits.shape[-1]), -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif strategy == "top-p":
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    else:
        raise ValueError(f"unknown strategy {strategy!r} (greedy, top-k, top-p, beam)")
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


def build_model(config):
    """A fresh model of the variant and backbones that a run's config names."""
    import backbones
    from model_explained import ExplainedCaptioner
    from model_self_attention import SelfAttentionCaptioner
    vision, processor = backbones.load_vision(config["vision"])
    lm, tokenizer = backbones.load_language(config["language"])
    if config["variant"] == "explained":
        model = ExplainedCaptioner(vision, lm, config["train_layers"], config["cross_attention_heads"])
    elif config["variant"] == "self_attention":
        model = SelfAttentionCaptioner(vision, lm, config["train_layers"], config["max_caption_tokens"] + 1)
    else:
        raise ValueError(f"unknown variant {config['variant']!r} (explained or self_attention)")
    return model.freeze(), processor, tokenizer


def load_run(run_dir, variant=None):
    """(model, processor, tokenizer, config) from a run directory; the weights are trusted
    to be data only (safetensors), and a checkpoint of the other variant is refused."""
    config = read_config(run_dir)
    if variant is not None and config["variant"] != variant:
        raise ValueError(f"{run_dir} holds a {config['variant']} checkpoint, not a {variant} one")
    model, processor, tokenizer = build_model(config)
    model.load_trainable(Path(run_dir) / "model.safetensors")
    check_backbones(model, config, run_dir)
    return model.eval(), processor, tokenizer, config


def check_backbones(model, config, run_dir):
    expected = config.get("backbone_fingerprint")
    if expected and expected != model.backbone_fingerprint():
        raise ValueError(f"{run_dir} was trained on other backbone weights than {config['vision']} and "
                         f"{config['language']} hold now (fingerprint {model.backbone_fingerprint()}, "
                         f"expected {expected}): were the backbones rebuilt or replaced since training?")
