"""
The offline demo's stand-ins, built explicitly and cached: the shapes dataset on
disk, a tiny CLIP vision tower and a tiny Qwen3 from configs, and a BPE
tokenizer trained on the demo captions, all saved with save_pretrained so that
backbones.py loads them through the same from_pretrained path a hub id takes.

Random frozen backbones are a poor stand-in for pretrained ones (the captioner
cannot learn what a random vision tower does not see), so each is briefly
pretrained when it is built: the vision tower with per-patch supervision about
the shapes under each patch, the LM on the caption text. Built deterministically
from a seed.
"""

import hashlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    PreTrainedTokenizerFast,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import data
import shapes

EOS = "<|endoftext|>"

DEMO = {
    "version": 2,
    "seed": 0,
    "shapes": {"n_train": 4000, "n_val": 250, "n_test": 500, "n_compositional": 500},
    "vision": {
        "image_size": 64,
        "patch_size": 16,
        "hidden_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "intermediate_size": 512,
    },
    "vision_pretrain": {"images": 12000, "steps": 1200, "batch_size": 128, "lr": 2e-3},
    "language": {
        "hidden_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 384,
    },
    # all_pairs_scenes: text-only scenes drawn from every colour-shape pair, held-out ones included
    "language_pretrain": {"epochs": 2, "batch_size": 128, "lr": 3e-3, "all_pairs_scenes": 2000},
    "vocab_size": 512,  # room for every caption word to be one token
}


def demo_key(spec):
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def demo_shapes(cache_dir, spec=DEMO):
    """The demo's shapes dataset on disk (generated on first use)."""
    # "distinct": the splits share no image (the training split, and so the backbones, are as before)
    root = Path(cache_dir) / f"shapes-{demo_key(spec['shapes'] | {'seed': spec['seed'], 'distinct': True})}"
    if not (root / "splits.json").is_file():
        print(f"generating the shapes dataset in {root}")
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shapes.make_shapes_dataset(tmp, seed=spec["seed"], **spec["shapes"])
        tmp.rename(root)
    return root


def demo_backbones(cache_dir, shapes_dir, spec=DEMO):
    """(vision dir, language dir) of the pretrained demo stand-ins, built once and cached."""
    root = Path(cache_dir) / f"demo-backbones-{demo_key(spec)}"
    vision_dir, language_dir = root / "vision", root / "language"
    if (root / "done").is_file():
        return vision_dir, language_dir
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(spec["seed"])
    captions = [c for r in data.load_splits("shapes", shapes_dir)["train"] for c in r.captions]
    captions += every_pair_text(spec)
    t0 = time.time()
    print(f"building the demo backbones in {root} (once; about 3 minutes on 2 CPU cores)")
    build_tokenizer(captions, spec["vocab_size"]).save_pretrained(tmp / "language")
    build_language(tmp / "language", captions, spec)
    build_vision(tmp / "vision", spec)
    (tmp / "done").write_text(json.dumps(spec))
    tmp.rename(root)
    print(f"demo backbones ready in {time.time() - t0:.0f}s")
    return vision_dir, language_dir


def every_pair_text(spec):
    """Captions of scenes drawn from every colour-shape pair, the held-out ones included. Text only:
    a real pretrained LM has read "a red triangle" although no training image shows one, so the LM
    stand-in must have too, or the compositional split measures the stand-in's ignorance of the
    words rather than whether the fusion generalises (the vision side never sees a held-out pair)."""
    rng = random.Random(spec["seed"] + 2)
    every = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    n = spec["language_pretrain"]["all_pairs_scenes"]
    return [c for _ in range(n) for c in shapes.describe(shapes.sample_scene(rng, every))]


def build_tokenizer(captions, vocab_size):
    """Byte-level BPE like Qwen's; <|endoftext|> is its only special token (EOS = pad, no BOS)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


def build_language(out_dir, captions, spec):
    """A tiny Qwen3 pretrained on the caption text, so that it knows the words and when to stop."""
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        max_position_embeddings=512,
        **spec["language"],
    )
    lm = Qwen3ForCausalLM(config)
    hp = spec["language_pretrain"]
    ids, targets, mask = data.encode_captions(tokenizer, captions, max_tokens=64)
    opt = torch.optim.AdamW(lm.parameters(), lr=hp["lr"], weight_decay=0.0)
    steps = hp["epochs"] * (len(captions) // hp["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, hp["lr"], total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(spec["seed"])
    lm.train()
    step = 0
    for _epoch in range(hp["epochs"]):
        perm = torch.randperm(len(captions), generator=gen)
        for k in range(0, len(perm) - hp["batch_size"] + 1, hp["batch_size"]):
            b = perm[k : k + hp["batch_size"]]
            logits = lm(input_ids=ids[b], attention_mask=mask[b]).logits
            loss = F.cross_entropy(logits.flatten(0, 1), targets[b].flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    print(f"  language model: {step} steps on the caption text, final loss {loss.item():.3f}")
    lm.eval().save_pretrained(out_dir)


def patch_targets(scene, grid):
    """Per patch: soft fractions of colour, shape, size (class 0 = background) and
    where the other object of a pair lies (0 none, 1 left, 2 right, 3 above, 4 below)."""
    colour = np.zeros((grid * grid, len(shapes.COLOURS) + 1), np.float32)
    shape = np.zeros((grid * grid, len(shapes.SHAPES) + 1), np.float32)
    size = np.zeros((grid * grid, len(shapes.SIZES) + 1), np.float32)
    other = np.zeros((grid * grid, 5), np.float32)
    objs = scene["objects"]
    for k, (o, m) in enumerate(zip(objs, shapes.object_masks(scene))):
        cover = m.reshape(grid, m.shape[0] // grid, grid, -1).mean((1, 3)).reshape(-1)
        colour[:, 1 + list(shapes.COLOURS).index(o["colour"])] += cover
        shape[:, 1 + shapes.SHAPES.index(o["shape"])] += cover
        size[:, 1 + list(shapes.SIZES).index(o["size"])] += cover
        where = 0
        if len(objs) == 2:
            p = objs[1 - k]
            dx, dy = p["x"] - o["x"], p["y"] - o["y"]
            where = (1 if dx < 0 else 2) if abs(dx) > abs(dy) else (3 if dy < 0 else 4)
        other[:, where] += cover
    for t in (colour, shape, size, other):
        t[:, 0] += np.clip(1 - t.sum(1), 0, None)
        t /= t.sum(1, keepdims=True)
    pairs = np.zeros(len(shapes.COLOURS) * len(shapes.SHAPES), np.float32)
    for o in objs:
        pairs[list(shapes.COLOURS).index(o["colour"]) * len(shapes.SHAPES) + shapes.SHAPES.index(o["shape"])] = 1
    return colour, shape, size, other, pairs


def build_vision(out_dir, spec):
    """A tiny CLIP vision tower taught, on freshly drawn scenes, what lies under each patch."""
    cfg = spec["vision"]
    config = CLIPVisionConfig(**cfg)
    vision = CLIPVisionModel(config)
    processor = CLIPImageProcessor(
        size={"shortest_edge": cfg["image_size"]}, crop_size={"height": cfg["image_size"], "width": cfg["image_size"]}
    )
    hp = spec["vision_pretrain"]
    grid = cfg["image_size"] // cfg["patch_size"]
    rng = random.Random(spec["seed"] + 1)
    seen = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES if (c, s) not in shapes.HELD_OUT]
    scenes = [shapes.sample_scene(rng, seen) for _ in range(hp["images"])]
    pixels = torch.cat(
        [
            processor(images=[shapes.render_scene(s) for s in scenes[k : k + 512]], return_tensors="pt")["pixel_values"]
            for k in range(0, len(scenes), 512)
        ]
    )
    targets = [torch.tensor(np.stack(t)) for t in zip(*(patch_targets(s, grid) for s in scenes))]
    H = cfg["hidden_size"]
    heads = nn.ModuleList([nn.Linear(H, t.shape[-1]) for t in targets])  # 4 per patch, 1 on the mean
    params = list(vision.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=hp["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, hp["lr"], total_steps=hp["steps"], pct_start=0.1)
    gen = torch.Generator().manual_seed(spec["seed"])
    vision.train()
    for _step in range(hp["steps"]):
        b = torch.randint(len(scenes), (hp["batch_size"],), generator=gen)
        patches = vision(pixel_values=pixels[b]).last_hidden_state[:, 1:]
        loss = sum(
            F.cross_entropy(head(patches).flatten(0, 1), t[b].flatten(0, 1)) for head, t in zip(heads[:4], targets[:4])
        )
        loss = loss + F.binary_cross_entropy_with_logits(heads[4](patches.mean(1)), targets[4][b])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    print(f"  vision tower: {hp['steps']} steps of per-patch supervision, final loss {loss.item():.3f}")
    vision.eval().save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def resolve(config, cache_dir=None):
    """The config with "demo" backbones and the demo's shapes data replaced by their folders,
    built first if they are not in the cache yet (minutes, once)."""
    cache_dir = Path(cache_dir or data.cache_root())
    wants_shapes = config["data"] == "shapes" and config.get("data_dir") is None
    wants_backbones = "demo" in (config["vision"], config["language"])
    if not (wants_shapes or wants_backbones):
        return config
    if not sys.stderr.isatty():  # a log wants lines, not progress-bar refreshes
        transformers.utils.logging.disable_progress_bar()
    config = dict(config)
    shapes_dir = demo_shapes(cache_dir)
    if wants_shapes:
        config["data_dir"] = str(shapes_dir)
    if wants_backbones:
        vision_dir, language_dir = demo_backbones(cache_dir, shapes_dir)
        config["vision"] = str(vision_dir) if config["vision"] == "demo" else config["vision"]
        config["language"] = str(language_dir) if config["language"] == "demo" else config["language"]
    return config
