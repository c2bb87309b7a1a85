"""
Memory of training at real scale, measured (a benchmark, not a test).

    python bench_memory.py loss [--batch-size 32]      # the loss: full-vocabulary logits vs chunked
    python bench_memory.py mmap [--cache-mb 600]       # training from a memory-mapped feature cache

loss: one training step of the cross-attention variant at the flickr8k preset's
shapes (Qwen3-0.6B's 151,936-token vocabulary, random weights, nothing
downloaded), its loss computed two ways, each in a fresh process: the way it used
to be (fp32 logits for every text position, padding included) and the way
Captioner.forward does it now (target positions only, chunks recomputed in the
backward pass). Reports each step's peak resident memory above the model's and
the two losses, which must agree.

mmap: a feature cache of random ViT-B/32-shaped features (49 x 768 fp16 per
image) of at least --cache-mb is written, then a tiny captioner trains one epoch
from it through the same loader as train.py. Reports how much the process's
private memory (RssAnon: what is not shared file pages) grew, against the cache
file's size; the file's pages are page cache, shared and reclaimable.
"""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, CLIPVisionModel, Qwen3Config, Qwen3ForCausalLM

import bench
import data
import demo
import train
from features import FeatureStore
from model_explained import ExplainedCaptioner


def memory_status():
    """{field: kB} from /proc/self/status (VmHWM, VmRSS, RssAnon, RssFile, ...)."""
    text = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}


def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set


def full_vocabulary_loss(model, batch):
    """The loss as it was: fp32 logits for every text position, padding included."""
    state = model.encode_images(features=batch["features"])
    logits = model.lm(
        inputs_embeds=model.embed(state, batch["input_ids"], 0),
        attention_mask=batch["attention_mask"],
        logits_to_keep=batch["input_ids"].shape[1],
    ).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100, reduction="sum")


def random_caption_batch(batch_size, vocab_size, eos, max_tokens=40, seed=0):
    """Caption-like lengths (8 to 40 tokens, right-padded) of random token ids, and random features."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, max_tokens + 1, (batch_size,), generator=g)
    T = int(lengths.max()) + 1
    input_ids = torch.full((batch_size, T), eos)
    targets = torch.full((batch_size, T), -100)
    mask = torch.zeros((batch_size, T), dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        tokens = torch.randint(0, vocab_size - 1, (n,), generator=g)
        input_ids[i, 1 : n + 1] = tokens
        targets[i, :n], targets[i, n] = tokens, eos
        mask[i, : n + 1] = 1
    features = torch.randn(batch_size, 49, 768, generator=g).half()
    return {"input_ids": input_ids, "targets": targets, "attention_mask": mask, "features": features}


def loss_step(mode, batch_size):
    """One forward + backward at real size in this process: {"peak_mb" above the model, "loss"}."""
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**bench.FLICKR8K_VISION)).eval().requires_grad_(False)
    lm = Qwen3ForCausalLM(Qwen3Config(**bench.FLICKR8K_LANGUAGE, eos_token_id=151643))
    model = ExplainedCaptioner(vision, lm).freeze()
    batch = random_caption_batch(batch_size, lm.config.vocab_size, 151643)
    before = memory_status()["VmRSS"]
    reset_peak()
    loss = model(**batch, reduction="sum") if mode == "chunked" else full_vocabulary_loss(model, batch)
    loss.backward()
    peak = memory_status()["VmHWM"]
    n_targets = int((batch["targets"] != -100).sum())
    return {
        "mode": mode,
        "batch_size": batch_size,
        "text_positions": batch["targets"].numel(),
        "targets": n_targets,
        "peak_above_model_mb": (peak - before) / 1024,
        "loss_sum": loss.item(),
        "loss_per_token": loss.item() / n_targets,
    }


def bench_loss(batch_size):
    results = {}
    for mode in ("full", "chunked"):  # a fresh process each: the peak of one must not hide the other's
        out = subprocess.run(
            [sys.executable, __file__, "loss-step", mode, "--batch-size", str(batch_size)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    full, chunked = results["full"], results["chunked"]
    print(
        f"one training step, cross-attention at flickr8k shapes (vocabulary 151,936), batch {batch_size}, "
        f"{full['text_positions']} text positions of which {full['targets']} are targets:"
    )
    for r in (full, chunked):
        print(
            f"  {r['mode']:8} peak {r['peak_above_model_mb']:8.0f} MB above the model, "
            f"loss {r['loss_per_token']:.6f} per token"
        )
    difference = abs(full["loss_per_token"] - chunked["loss_per_token"])
    ratio = chunked["peak_above_model_mb"] / full["peak_above_model_mb"]
    print(f"  losses agree to {difference:.2e}; chunked peak is {ratio:.0%} of full")
    return {"full": full, "chunked": chunked, "loss_difference": difference}


def bench_mmap(cache_mb, batch_size=128):
    n = int(cache_mb * 2**20 // (49 * 768 * 2)) + 1
    folder = data.cache_root() / "bench-memory"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"random-{n}.npy"
    if not path.is_file():
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, 49, 768))
        rng = np.random.default_rng(0)
        for k in range(0, n, 1024):  # written a block at a time, never whole in memory
            out[k : k + 1024] = rng.standard_normal((min(1024, n - k), 49, 768), dtype=np.float32)
        out.flush()
        del out
    captions = [f"a picture number {i % 97} of a small red circle" for i in range(n)]
    tokenizer = demo.build_tokenizer(captions[:200], vocab_size=300)
    torch.manual_seed(0)
    vision = CLIPVisionModel(CLIPVisionConfig(**(bench.FLICKR8K_VISION | {"num_hidden_layers": 1})))
    lm = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            eos_token_id=tokenizer.eos_token_id,
        )
    )
    model = ExplainedCaptioner(vision, lm, n_heads=4).freeze()
    records = [data.Record(Path(f"image-{i}"), [c]) for i, c in enumerate(captions)]
    store = FeatureStore(path, np.arange(n))
    loader = data.make_loader(
        records, store, None, tokenizer, batch_size=batch_size, max_tokens=32, order=torch.randperm(n).tolist()
    )
    config = {"device": "cpu", "precision": "fp32"}
    optimizer = torch.optim.AdamW(model.parameter_groups(0.01), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(loader)
    for _ in range(5):  # warm-up: the allocator reaches its steady state for a batch's buffers
        train.train_step(model, [next(batches)], optimizer, scheduler, scaler, params, config)
    before = memory_status()
    for batch in batches:
        train.train_step(model, [batch], optimizer, scheduler, scaler, params, config)
    after = memory_status()
    size_mb = path.stat().st_size / 2**20
    grown_mb = (after["RssAnon"] - before["RssAnon"]) / 1024
    print(f"trained one epoch ({n} images, batch {batch_size}) from a {size_mb:.0f} MB memory-mapped feature cache:")
    print(
        f"  private memory (RssAnon) grew {grown_mb:.1f} MB = {grown_mb / size_mb:.1%} of the cache file; "
        f"file pages resident (RssFile) {before['RssFile'] / 1024:.0f} -> {after['RssFile'] / 1024:.0f} MB"
    )
    return {
        "cache_mb": size_mb,
        "images": n,
        "private_growth_mb": grown_mb,
        "share_of_cache": grown_mb / size_mb,
        "rss_file_mb_before": before["RssFile"] / 1024,
        "rss_file_mb_after": after["RssFile"] / 1024,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["loss", "mmap", "loss-step"])
    p.add_argument("mode", nargs="?", choices=["full", "chunked"], help="loss-step only (run by `loss`)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache-mb", type=float, default=600)
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    if args.what == "loss-step":
        print(json.dumps(loss_step(args.mode, args.batch_size)))
        return
    results = bench_loss(args.batch_size) if args.what == "loss" else bench_mmap(args.cache_mb)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
