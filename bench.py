"""
Throughput of training and captioning, every figure from one run.

    python bench.py [--size demo|mid|flickr8k] [--random-init] [--json OUT] [--device cuda]

  demo      the demo backbones on the 64x64 shapes PNGs
  mid       the demo backbones on JPEGs at Flickr-like resolution (500x375), so
            image decoding and resizing cost what they cost in real use
  flickr8k  CLIP ViT-B/32 and Qwen3-0.6B shaped models (with --random-init: random
            weights, nothing downloaded) on the 500x375 JPEGs; for a GPU

Measured: training samples/s of each variant with the frozen features cached
(warm) and with the cache off (the vision tower and the image pipeline run on
every batch); captioning tokens/s for 64 images x 30 new tokens batched with the
KV cache and one image at a time without it (and whether their greedy tokens
agree); peak memory; model FLOPs utilisation of the training step (FLOPs counted
by torch's FlopCounterMode, over the measured peak of a large fp32 matmul on CPU
or the bf16 dense peak of the GPU).
"""

import argparse
import json
import platform
import random
import resource
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Qwen3Config, Qwen3ForCausalLM

import backbones
import data
import demo
import features
import shapes
import train
from decoding import decode, positive_int
from runs import VARIANTS

# bf16 dense peaks (FLOP/s) of common training GPUs, from their vendors' data sheets
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}

MID_GRAIN = 30  # standard deviation of the grain added to mid images, in 0-255 steps

FLICKR8K_VISION = dict(
    image_size=224, patch_size=32, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
FLICKR8K_LANGUAGE = dict(
    vocab_size=151936,
    hidden_size=1024,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    intermediate_size=3072,
    rope_theta=1000000,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
)


def mid_records(root, n):
    """n shapes scenes as 500x375 JPEGs, with their own captions; images written once.

    Decoding time follows the amount of coded data. A flat drawing upscaled to
    500x375 codes to under 10 KB where a photo takes about 130 KB (the Flickr8k
    archive holds 8,091 of them in about 1 GB), so the drawing is toned down from
    pure white and grain is added, which brings the files from 6 KB to about 110 KB and
    the decoding time from 0.7 ms to 1.7 ms (docs/performance.md); otherwise the
    benchmark would under-state what the feature cache saves."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    pairs = [(c, s) for c in shapes.COLOURS for s in shapes.SHAPES]
    records = []
    for i in range(n):
        scene, path = shapes.sample_scene(rng, pairs), root / f"{i:04d}.jpg"
        if not path.is_file():
            grain = np.random.default_rng(i).normal(0, MID_GRAIN, (375, 500, 3))
            pixels = np.asarray(shapes.render_scene(scene).resize((500, 375), Image.BICUBIC), dtype=np.float64)
            Image.fromarray((pixels * 0.75 + 32 + grain).clip(0, 255).astype(np.uint8)).save(path, quality=90)
        records.append(data.Record(path, shapes.describe(scene)))
    return records


def image_files(records):
    """Mean file size (KB) and decoding time (ms) of the benchmark's images: what the
    feature cache saves per image depends on them."""
    paths = [r.image for r in records]
    start = time.perf_counter()
    for path in paths:
        data.read_image(path)
    decode_ms = (time.perf_counter() - start) / len(paths) * 1000
    return {
        "files": len(paths),
        "mean_kb": sum(p.stat().st_size for p in paths) / len(paths) / 1000,
        "decode_ms": decode_ms,
    }


def load_backbones(size, random_init):
    """(vision, processor, lm, tokenizer) for a benchmark size."""
    if size == "flickr8k" and not random_init:  # the hub backbones, before minutes of building the demo's
        vision, processor = backbones.load_vision("openai/clip-vit-base-patch32")
        lm, tokenizer = backbones.load_language("Qwen/Qwen3-0.6B-Base")
        return vision, processor, lm, tokenizer
    vision_dir, language_dir = demo.demo_backbones(data.cache_root(), demo.demo_shapes(data.cache_root()))
    lm, tokenizer = backbones.load_language(language_dir)
    vision, processor = backbones.load_vision(vision_dir)
    if size == "flickr8k":
        vision = CLIPVisionModel(CLIPVisionConfig(**FLICKR8K_VISION)).eval().requires_grad_(False)
        processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        lm = Qwen3ForCausalLM(Qwen3Config(**FLICKR8K_LANGUAGE, eos_token_id=tokenizer.eos_token_id))
    elif random_init:
        vision = CLIPVisionModel(vision.config).eval().requires_grad_(False)
        lm = Qwen3ForCausalLM(lm.config)
    return vision, processor, lm, tokenizer


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_flops(device):
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAK.items():
            if key in name:
                return peak, f"bf16 dense peak of {name} (data sheet)"
    n, dtype = (4096, torch.bfloat16) if device.startswith("cuda") else (2048, torch.float32)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    t0, reps = time.time(), 10
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.time() - t0), f"measured {n}x{n} {dtype} matmul"


def bench_training(model, records, features, processor, tokenizer, config, steps, workers):
    """(samples/s, FLOPs per step) over `steps` steps after two warm-up steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=config["precision"] == "fp16")
    rows = sum(len(r.captions) for r in records)
    passes = -(-(steps + 3) * config["batch_size"] // rows)  # enough passes over the rows for every step
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(0)).repeat(passes)
    loader = data.make_loader(
        records,
        features,
        processor,
        tokenizer,
        batch_size=config["batch_size"],
        max_tokens=config["max_caption_tokens"],
        order=order.tolist(),
        workers=workers,
        pin_memory=config["device"].startswith("cuda"),
    )
    batches = iter(loader)
    model.train()
    for _ in range(2):
        train.train_step(model, [next(batches)], optimizer, scheduler, scaler, params, config)
    sync(config["device"])
    t0 = time.time()
    for _ in range(steps):
        train.train_step(model, [next(batches)], optimizer, scheduler, scaler, params, config)
    sync(config["device"])
    rate = steps * config["batch_size"] / (time.time() - t0)
    with FlopCounterMode(display=False) as counter:
        train.train_step(model, [next(batches)], optimizer, scheduler, scaler, params, config)
    return rate, counter.get_total_flops()


@torch.no_grad()
def bench_generation(model, processor, tokenizer, images, device, new_tokens):
    """(tokens/s batched + KV cache, tokens/s one image at a time without it, same tokens?)"""
    model.eval()
    eos = tokenizer.eos_token_id
    pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)

    def run(batch_size, use_cache):
        out = []
        sync(device)
        t0 = time.time()
        for k in range(0, len(images), batch_size):
            state = model.encode_images(pixel_values=pixels[k : k + batch_size])
            out += decode(model, state, eos, new_tokens, use_cache=use_cache, stop_at_eos=False)
        sync(device)
        return len(images) * new_tokens / (time.time() - t0), out

    batched_rate, batched = run(len(images), True)
    single_rate, single = run(1, False)
    return batched_rate, single_rate, batched == single


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="demo", choices=["demo", "mid", "flickr8k"])
    p.add_argument("--random-init", action="store_true", help="random weights of the same shapes (no download)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--batch-size", type=positive_int, help="training batch (default 64; for flickr8k 256 on a GPU, 4 on a CPU)"
    )
    p.add_argument("--steps", type=positive_int, default=20, help="timed training steps per measurement")
    p.add_argument("--images", type=positive_int, default=64, help="images to caption")
    p.add_argument("--new-tokens", type=positive_int, default=30)
    p.add_argument("--workers", type=int, help="DataLoader workers with the cache off (default: train.py's)")
    p.add_argument("--json", help="write the figures here too")
    args = p.parse_args(argv)
    device = args.device
    on_cpu_big = args.size == "flickr8k" and device == "cpu"
    # real size on a GPU: cross-attention feeds Qwen the caption tokens only, about 12 a row,
    # so a batch of 64 is under 1,000 tokens a step, too little work to fill a large GPU
    batch_size = args.batch_size or (4 if on_cpu_big else 256 if args.size == "flickr8k" else 64)
    steps = 2 if on_cpu_big else args.steps
    n_images = min(args.images, 8) if on_cpu_big else args.images
    new_tokens = 4 if on_cpu_big else args.new_tokens
    workers = args.workers if args.workers is not None else (4 if device.startswith("cuda") else 0)

    torch.manual_seed(0)
    try:
        vision, processor, lm, tokenizer = load_backbones(args.size, args.random_init)
    except OSError as e:  # a hub id without the network: one line, though transformers' message has several
        message = " ".join(str(e).split())
        raise SystemExit(f"error: {message} (--random-init measures the same shapes without downloading)") from None
    if args.size == "demo":
        records = data.load_splits("shapes", demo.demo_shapes(data.cache_root()))["train"][:256]
    else:
        records = mid_records(data.cache_root() / f"bench-mid-grain{MID_GRAIN}", 256)
    config = {
        "device": device,
        "batch_size": batch_size,
        "max_caption_tokens": 32,
        "precision": "bf16" if device.startswith("cuda") else "fp32",
    }
    peak, peak_source = peak_flops(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)

    results = {"images": image_files(records), "train_samples_per_s": {}, "train_flops_per_step": {}}
    mfu = {}
    for cls in VARIANTS.values():
        model = cls(vision, lm).freeze().to(device)
        cached, _ = features.compute_features(
            lambda px, m=model: m.image_features(px.to(device)), processor, [r.image for r in records]
        )
        warm, flops = bench_training(model, records, cached, processor, tokenizer, config, steps, workers)
        off, _ = bench_training(model, records, None, processor, tokenizer, config, steps, workers)
        results["train_samples_per_s"][cls.variant] = {"cache_warm": warm, "cache_off": off, "ratio": warm / off}
        results["train_flops_per_step"][cls.variant] = flops
        mfu[cls.variant] = flops * warm / batch_size / peak
        if cls.variant == "explained":
            images = [data.read_image(r.image) for r in records[:n_images]]
            batched, single, same = bench_generation(model, processor, tokenizer, images, device, new_tokens)
            results["generate_tokens_per_s"] = {
                "batched_kv": batched,
                "single_no_kv": single,
                "ratio": batched / single,
                "identical_greedy_tokens": same,
                "images": n_images,
                "new_tokens": new_tokens,
                "variant": cls.variant,
            }
        del model
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results.update(
        peak_memory_mb=peak_mb,
        mfu=mfu,
        peak_flops=peak,
        peak_flops_source=peak_source,
        size=args.size,
        random_init=args.random_init,
        device=device,
        device_name=torch.cuda.get_device_name(device) if device.startswith("cuda") else cpu_name(),
        batch_size=batch_size,
        timed_steps=steps,
        precision=config["precision"],
        versions={
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    )
    print_table(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_table(r):
    t, g = r["train_samples_per_s"], r["generate_tokens_per_s"]
    print(
        f"\nbench --size {r['size']}{' --random-init' if r['random_init'] else ''} on {r['device']} "
        f"({r['device_name']}), batch {r['batch_size']}, {r['precision']}"
    )
    i = r["images"]
    print(f"{i['files']} images, {i['mean_kb']:.0f} KB and {i['decode_ms']:.1f} ms to decode each")
    print(f"{'':34}{'cross-attention':>18}{'self-attention':>18}")
    for key, label in (
        ("cache_warm", "train samples/s, features cached"),
        ("cache_off", "train samples/s, cache off"),
        ("ratio", "  warm / off"),
    ):
        print(f"{label:34}{t['explained'][key]:>18.1f}{t['self_attention'][key]:>18.1f}")
    print(f"{'MFU of the training step':34}{r['mfu']['explained']:>18.2%}{r['mfu']['self_attention']:>18.2%}")
    print(
        f"captioning {g['images']} images x {g['new_tokens']} tokens: batched + KV cache {g['batched_kv']:.0f} tok/s, "
        f"one at a time without cache {g['single_no_kv']:.1f} tok/s, ratio {g['ratio']:.1f}x, "
        f"identical greedy tokens: {g['identical_greedy_tokens']}"
    )
    print(f"peak memory {r['peak_memory_mb']:.0f} MB; peak FLOP/s {r['peak_flops']:.3g} ({r['peak_flops_source']})")


if __name__ == "__main__":
    main()
