"""
The training loop both numbered scripts use.

    python 08_train_explained.py [--preset demo] [--out RUN_DIR] [--epochs N] ...

Epoch-based AdamW with linear warmup and cosine decay, gradient clipping at 1.0,
bf16 autocast on CUDA (fp16 with a GradScaler on request), fp32 on CPU. The
frozen vision tower's features are computed once per image and cached on disk.
A run directory gets config.json, model.safetensors (trainable weights only),
metrics.jsonl and, after training, the test-split evaluation.
"""
import argparse
import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

import backbones
import data
import checkpoints
from captioner import build_model, check_backbones, read_config, save_checkpoint
from evaluate import evaluate_run

CACHE = data.CACHE

PRESETS = {
    # offline, CPU, minutes: the shapes dataset and the pretrained tiny stand-ins
    "demo": dict(data="shapes", data_dir=None, vision="demo", language="demo",
                 epochs=5, batch_size=64, lr=1e-3, warmup=0.05, weight_decay=0.01, max_caption_tokens=32),
    # a GPU, bf16: the real backbones on Flickr8k's official splits
    "flickr8k": dict(data="flickr8k", data_dir="data/flickr8k", vision="openai/clip-vit-base-patch32",
                     language="Qwen/Qwen3-0.6B-Base", epochs=5, batch_size=64, lr=1e-4, warmup=0.03,
                     weight_decay=0.01, max_caption_tokens=40),
    # Karpathy's splits: dataset_flickr30k.json / dataset_coco.json beside the images
    "flickr30k": dict(data="karpathy", data_dir="data/flickr30k", vision="openai/clip-vit-base-patch32",
                      language="Qwen/Qwen3-0.6B-Base", epochs=5, batch_size=64, lr=1e-4, warmup=0.03,
                      weight_decay=0.01, max_caption_tokens=40),
    "coco": dict(data="karpathy", data_dir="data/coco", vision="openai/clip-vit-base-patch32",
                 language="Qwen/Qwen3-0.6B-Base", epochs=3, batch_size=64, lr=1e-4, warmup=0.03,
                 weight_decay=0.01, max_caption_tokens=40),
}


def parse_args(variant, argv=None):
    p = argparse.ArgumentParser(description=f"Train the {variant} captioner.")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--out", help=f"run directory (default runs/{variant}-<preset>)")
    p.add_argument("--data", help=f"data source, one of {', '.join(data.SOURCES)} (overrides the preset)")
    p.add_argument("--data-dir", help="where the data source lives (overrides the preset)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out records with bad images or captions (default: --strict, stop and list them)")
    p.add_argument("--strict", action="store_false", dest="skip_bad", help="stop on any bad record (the default)")
    p.add_argument("--image-root", help="karpathy: the image folder (default DATA_DIR/images or DATA_DIR)")
    p.add_argument("--restval", default="train", choices=["train", "val", "drop"],
                   help="karpathy: where the restval images go")
    p.add_argument("--image-column", default="image", help="hf: the image column")
    p.add_argument("--caption-column", action="append", help="hf: a caption column (repeat for several)")
    p.add_argument("--download", action="store_true", help="hf: allow fetching a hub dataset")
    p.add_argument("--vision", help="CLIP vision tower: hub id or local directory (overrides the preset)")
    p.add_argument("--language", help="Qwen causal LM + tokenizer: hub id or local directory (overrides the preset)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="per rank and per accumulation step")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float)
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--train-layers", type=int, default=2, help="last Qwen decoder layers to train")
    p.add_argument("--heads", type=int, default=8, help="cross-attention heads (explained variant)")
    p.add_argument("--max-caption-tokens", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    p.add_argument("--no-feature-cache", action="store_true", help="run the vision tower on every batch")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at each epoch end)")
    p.add_argument("--keep", type=int, default=2, help="checkpoints to keep")
    p.add_argument("--max-bad-steps", type=int, default=5,
                   help="stop after this many non-finite steps in a row")
    p.add_argument("--no-eval", action="store_true", help="skip the test evaluation after training")
    p.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases when it is installed (WANDB_MODE=offline needs no network)")
    return p.parse_args(argv)


def run_config(variant, args):
    """The preset, overridden by the command line, with the demo's stand-ins built if needed."""
    cfg = dict(PRESETS[args.preset])
    for key in ("vision", "language", "data", "data_dir", "epochs", "batch_size", "lr", "max_caption_tokens"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.data and not args.data_dir and args.data != PRESETS[args.preset]["data"]:
        cfg["data_dir"] = None if args.data == "shapes" else args.data[3:] if args.data.startswith("hf:") else f"data/{args.data}"
    if cfg["data"] == "shapes" and cfg["data_dir"] is None:
        cfg["data_dir"] = str(backbones.demo_shapes(CACHE))
    if "demo" in (cfg["vision"], cfg["language"]):
        vision_dir, language_dir = backbones.demo_backbones(CACHE, backbones.demo_shapes(CACHE))
        cfg["vision"] = str(vision_dir) if cfg["vision"] == "demo" else cfg["vision"]
        cfg["language"] = str(language_dir) if cfg["language"] == "demo" else cfg["language"]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    cfg.update(variant=variant, preset=args.preset, seed=args.seed, device=device, precision=precision,
               train_layers=args.train_layers, cross_attention_heads=args.heads, max_steps=args.max_steps,
               data_dir=str(Path(cfg["data_dir"]).resolve()),
               data_options={"strict": not args.skip_bad, "image_root": args.image_root, "restval": args.restval,
                             "image_column": args.image_column, "caption_columns": args.caption_column or ["caption"],
                             "download": args.download})
    return cfg


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# frozen features, once per image

def cached_features(model, processor, config, records, device):
    """(records, [N, P, D] fp16 vision features) from the disk cache when the same backbone,
    preprocessing and image files were seen before. Images that fail to fully decode stop
    the run, or with --skip-bad are left out (the records returned are the ones kept)."""
    h = hashlib.sha256()
    h.update(config["vision"].encode())
    h.update(model.vision.config.to_json_string().encode())
    h.update(processor.to_json_string().encode())
    for r in records:
        st = os.stat(r.image)
        h.update(f"{r.image}|{st.st_size}|{st.st_mtime_ns}".encode())
    path = CACHE / "features" / f"{h.hexdigest()[:20]}-v3.safetensors"
    if not path.is_file():
        encode = lambda pixels: model.image_features(pixels.to(device))
        features, bad = data.compute_features(encode, processor, [r.image for r in records])
        dropped = {i for i, _ in bad}
        kept = torch.tensor([i for i in range(len(records)) if i not in dropped], dtype=torch.long)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # runs sharing the cache may build the same file at once
        # the decoding failures are kept with the features, so that every later run (a strict
        # one after a --skip-bad one included) reports them without decoding again
        save_file({"features": features, "kept": kept}, tmp, metadata={"failed": json.dumps([m for _, m in bad])})
        os.replace(tmp, path)
    with safe_open(str(path), "pt") as cached:
        stop_or_skip(json.loads(cached.metadata()["failed"]), config)
        return [records[i] for i in cached.get_tensor("kept").tolist()], cached.get_tensor("features")


def stop_or_skip(problems, config):
    """Images that failed to decode: stop the run listing them all, or with --skip-bad say which are left out."""
    if problems and config["data_options"]["strict"]:
        listing = "\n".join(f"  {message}" for message in problems)
        raise SystemExit(f"error: {len(problems)} image(s) failed to decode:\n{listing}\n"
                         "Fix them, or pass --skip-bad to leave them out.")
    for message in problems:
        print(f"--skip-bad: left out {message}")


def decode_or_stop(records, config):
    """Fully decode a split's images before training (the loaders only read headers)."""
    good, bad = data.decode_check(records)
    stop_or_skip(bad, config)
    return good


class Collate:
    """Caption rows -> a batch: token ids and targets, and cached features or pixels.
    A class rather than a closure, so that DataLoader workers can be spawned too."""

    def __init__(self, tokenizer, processor, features, max_tokens):
        self.tokenizer, self.processor, self.features, self.max_tokens = tokenizer, processor, features, max_tokens

    def __call__(self, items):
        idx, images, captions = zip(*items)
        input_ids, targets, mask = data.encode_captions(self.tokenizer, captions, self.max_tokens)
        batch = {"input_ids": input_ids, "targets": targets, "attention_mask": mask}
        if self.features is not None:
            batch["features"] = self.features[list(idx)]
        else:
            batch["pixel_values"] = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        return batch


def make_loader(records, features, processor, tokenizer, config, order, workers):
    """Batches of caption rows, in `order` (a list of row indices; None = as stored)."""
    rows = data.CaptionRows(records, load_pixels=features is None)
    collate = Collate(tokenizer, processor, features, config["max_caption_tokens"])
    # its own generator: worker seeds must not consume the global RNG, or a resumed run would drift
    return torch.utils.data.DataLoader(rows, batch_size=config["batch_size"], sampler=order, collate_fn=collate,
                                       num_workers=workers, pin_memory=config["device"].startswith("cuda"),
                                       generator=torch.Generator().manual_seed(config.get("seed", 0)))


def autocast(config):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config["precision"])
    device_type = "cuda" if config["device"].startswith("cuda") else "cpu"
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def train_step(model, micro_batches, optimizer, scheduler, scaler, params, config):
    """One optimizer step over a list of micro-batches (gradient accumulation; under
    DistributedDataParallel each rank passes its own). The loss is the mean over every
    caption token of the global batch, so k micro-batches of b on n ranks update the
    weights as one batch of k*n*b would. Returns (loss, gradient norm before clipping, ok):
    a non-finite gradient leaves the weights untouched (ok False); with fp16 the
    GradScaler already skips overflowed steps by itself."""
    micro_batches = [{k: v.to(config["device"], non_blocking=True) for k, v in b.items()} for b in micro_batches]
    n_tokens = sum((b["targets"] != -100).sum() for b in micro_batches).float()
    loss_total = torch.zeros((), device=n_tokens.device)
    distributed = dist.is_available() and dist.is_initialized()
    if distributed:
        dist.all_reduce(n_tokens)
    world = dist.get_world_size() if distributed else 1
    optimizer.zero_grad(set_to_none=True)
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        no_sync = model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext()
        with no_sync:
            with autocast(config):
                loss_sum = model(**batch, reduction="sum")
            # DDP averages gradients over ranks, hence the factor world
            scaler.scale(loss_sum * world / n_tokens).backward()
        loss_total += loss_sum.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    ok = scaler.is_enabled() or bool(torch.isfinite(grad_norm))  # the same on every rank after all-reduce
    if ok:
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()  # the schedule follows the data, skipped batch or not
    if distributed:
        dist.all_reduce(loss_total)
    return loss_total / n_tokens, grad_norm, ok


def report_long_captions(tokenizer, records, max_tokens):
    captions = [c for r in records for c in r.captions]
    lengths = [len(ids) for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]]
    n_long = sum(n > max_tokens for n in lengths)
    if n_long:
        print(f"{n_long} of {len(captions)} training captions are longer than {max_tokens} tokens and are "
              f"truncated (longest {max(lengths)}; see --max-caption-tokens)")


@torch.no_grad()
def validation_loss(model, loader, config):
    """Mean cross-entropy per caption token over the whole split, as the training loss is."""
    model.eval()
    total = tokens = 0
    for batch in loader:
        batch = {k: v.to(config["device"], non_blocking=True) for k, v in batch.items()}
        with autocast(config):
            total += model(**batch, reduction="sum").item()
        tokens += (batch["targets"] != -100).sum().item()
    model.train()
    return total / max(tokens, 1)


class MetricsLog:
    """metrics.jsonl, one JSON object a line; mirrored to Weights & Biases on request."""

    def __init__(self, path, config, use_wandb, resume_step=None, enabled=True):
        if enabled and resume_step is not None and Path(path).is_file():  # steps after the checkpoint run again
            rows = [line for line in Path(path).read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            Path(path).write_text("".join(row + "\n" for row in rows))
        self.file = open(path, "a" if resume_step is not None else "w") if enabled else None
        self.wandb = None
        if use_wandb and enabled:
            try:
                import wandb
            except ImportError:
                print("--wandb: wandb is not installed (pip install wandb); logging to metrics.jsonl only")
            else:
                self.wandb = wandb.init(project="duocap", name=Path(path).parent.name, config=config)

    def write(self, row):
        if self.file is None:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb:
            self.wandb.log(row, step=row["step"])

    def close(self):
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


class StopRequest:
    """SIGINT / SIGTERM ask the run to checkpoint at the end of the current step and exit;
    a second SIGINT exits at once."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def close(self):
        """Give Ctrl-C back its usual meaning (evaluation after training is not checkpointed)."""
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
              "(press Ctrl-C again to quit at once)", flush=True)

    def requested(self):
        """Whether any rank was asked to stop (all ranks must stop after the same step)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signal is not None
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor(float(self.signal is not None), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)


def epoch_order(n_rows, seed, epoch, n_steps, batch_size, grad_accum=1, rank=0, world=1):
    """This rank's rows of one epoch, in order. The permutation depends only on (seed,
    epoch), so a resumed run sees exactly the batches the interrupted one would have;
    optimizer step k uses the same rows (k*G .. (k+1)*G, G = the global batch) whether
    they come from one process or from `world` ranks with `grad_accum` micro-batches each."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n_rows, generator=g)[:n_steps * grad_accum * world * batch_size]
    return order.view(n_steps, grad_accum, world, batch_size)[:, :, rank].flatten().tolist()


def groups_of(iterable, n):
    it = iter(iterable)
    while group := list(itertools.islice(it, n)):
        yield group


def init_distributed():
    """(rank, world size, device) under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), else (0, 1, None).
    NCCL on CUDA, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), f"cuda:{local_rank}"
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), "cpu"


def barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(is_main):
    """Rank 0 does the work first (building the demo, writing caches); the others then find it done."""
    if not is_main:
        barrier()
    yield
    if is_main:
        barrier()


def main(variant, argv=None):
    args = parse_args(variant, argv)
    rank, world, rank_device = init_distributed()
    is_main = rank == 0
    if args.resume:
        run_dir = Path(args.resume)
        config = read_config(run_dir)
        if config["variant"] != variant:
            raise SystemExit(f"error: {run_dir} holds a {config['variant']} run, not a {variant} one; "
                             f"resume it with its own script")
    else:
        with main_rank_first(is_main):  # the demo data and backbones are built once
            config = run_config(variant, args)
        config["grad_accum"] = args.grad_accum
        run_dir = Path(args.out or f"runs/{variant}-{args.preset}")
    config["device"] = rank_device or config["device"]
    config["world_size"] = world
    run_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(config["seed"])
    device = config["device"]

    with main_rank_first(is_main):  # a Hugging Face dataset is written out to files once
        try:
            splits = data.splits_for(config)
        except data.DataError as e:
            raise SystemExit(f"error: {e}") from None
    print(f"data ({config['data']} at {config['data_dir']}): {data.describe_splits(splits)}")
    model, processor, tokenizer = build_model(config)
    model.to(device)
    trainable, total = model.parameter_counts()
    print(f"{variant}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.1f}%)")
    report_long_captions(tokenizer, splits["train"], config["max_caption_tokens"])

    features = {"train": None, "val": None}
    if not args.no_feature_cache:
        for s in features:
            with main_rank_first(is_main):  # the feature cache is built once; the others read it
                splits[s], features[s] = cached_features(model, processor, config, splits[s], device)
    for s in [s for s in splits if features.get(s) is None]:  # decoded nowhere else before it is needed
        splits[s] = decode_or_stop(splits[s], config)
    workers = args.workers if args.workers is not None else (4 if device.startswith("cuda") else 0)
    val_loader = make_loader(splits["val"], features["val"], processor, tokenizer, config, None, workers)
    n_rows = sum(len(r.captions) for r in splits["train"])
    global_batch = config["batch_size"] * config["grad_accum"] * world
    steps_per_epoch = n_rows // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {n_rows} training captions do not fill one global batch of {global_batch}")
    if is_main:
        print(f"global batch {global_batch} = {config['batch_size']} per rank x {config['grad_accum']} "
              f"accumulation steps x {world} rank(s); {steps_per_epoch} steps per epoch")
    total_steps = config["epochs"] * steps_per_epoch
    if config["max_steps"]:
        total_steps = min(total_steps, config["max_steps"])

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config["lr"], weight_decay=config["weight_decay"])
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config["warmup"] * total_steps), total_steps)
    scaler = torch.amp.GradScaler("cuda", enabled=config["precision"] == "fp16")
    progress = {"step": 0, "epoch": 0, "position": 0, "time_s": 0.0, "skipped_steps": 0, "global_batch": global_batch}
    if args.resume:
        last = checkpoints.latest(run_dir)
        progress = checkpoints.load(last, model, optimizer, scheduler, scaler)
        if progress.get("global_batch", global_batch) != global_batch:
            raise SystemExit(f"error: {last} was saved with a global batch of {progress['global_batch']}, this run "
                             f"has {global_batch}; resume with the same number of ranks and --grad-accum")
        check_backbones(model, config, run_dir)
        print(f"resumed from {last} (epoch {progress['epoch'] + 1}, step {progress['step']})")
    elif is_main:
        save_checkpoint(model, config, run_dir)  # config.json first: a run dir always says what it is
    log = MetricsLog(run_dir / "metrics.jsonl", config, args.wandb, progress["step"] if args.resume else None,
                     enabled=is_main)
    stop = StopRequest()
    trainer = model
    if world > 1:
        trainer = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)

    def save_state():
        if is_main:
            checkpoints.save(run_dir, model, optimizer, scheduler, scaler, progress, keep=args.keep)
        barrier()

    model.train()
    t_start = time.time() - progress["time_s"]
    bad_in_a_row, loss, val = 0, torch.tensor(float("nan")), float("nan")
    while progress["step"] < total_steps and progress["epoch"] < config["epochs"]:
        epoch = progress["epoch"]
        A = config["grad_accum"]
        order = epoch_order(n_rows, config["seed"], epoch, steps_per_epoch, config["batch_size"], A, rank, world)
        loader = make_loader(splits["train"], features["train"], processor, tokenizer, config,
                             order[progress["position"] * A * config["batch_size"]:], workers)
        steps = groups_of(loader, A)  # A micro-batches per optimizer step
        bar = tqdm(steps, desc=f"epoch {epoch + 1}/{config['epochs']}", unit="step", initial=progress["position"],
                   total=min(steps_per_epoch, progress["position"] + total_steps - progress["step"]),
                   disable=not is_main)
        t_last, seen = time.time(), 0
        for micro_batches in bar:
            loss, grad_norm, ok = train_step(trainer, micro_batches, optimizer, scheduler, scaler, params, config)
            progress.update(step=progress["step"] + 1, position=progress["position"] + 1,
                            time_s=time.time() - t_start)
            seen += global_batch
            bad_in_a_row = 0 if ok else bad_in_a_row + 1
            if not ok:
                progress["skipped_steps"] += 1
                print(f"\nstep {progress['step']}: non-finite loss or gradient, step skipped "
                      f"({bad_in_a_row} in a row, {progress['skipped_steps']} in all)")
                log.write({"step": progress["step"], "skipped_step": True, "loss": loss.item()})
                if bad_in_a_row >= args.max_bad_steps:
                    save_state()
                    raise SystemExit(f"error: {bad_in_a_row} steps in a row had a non-finite loss or gradient; "
                                     f"stopped with the last good weights checkpointed in {run_dir}/checkpoints "
                                     "(lower --lr, or check the data)")
            step = progress["step"]
            if step % args.log_every == 0 or step == total_steps:
                rate = seen / (time.time() - t_last)
                bar.set_postfix(loss=f"{loss.item():.3f}", samples_s=f"{rate:.0f}")
                log.write({"step": step, "epoch": epoch + 1, "train_loss": loss.item(), "grad_norm": grad_norm.item(),
                           "lr": scheduler.get_last_lr()[0], "samples_per_s": rate, "time_s": progress["time_s"]})
                t_last, seen = time.time(), 0
            stopping = stop.requested()
            if stopping or (args.save_every and step % args.save_every == 0):
                save_state()
            if stopping:
                if is_main:
                    save_checkpoint(model, config, run_dir)
                    print(f"stopped at step {step}; continue with --resume {run_dir}")
                raise SystemExit(0)
            if step >= total_steps:
                break
        bar.close()
        if progress["position"] >= steps_per_epoch:
            progress.update(epoch=epoch + 1, position=0)
        if is_main:
            val = validation_loss(model, val_loader, config)
            print(f"epoch {epoch + 1}: train loss {loss.item():.3f}, val loss {val:.3f}")
            log.write({"step": progress["step"], "epoch": epoch + 1, "val_loss": val, "time_s": time.time() - t_start})
            save_checkpoint(model, config, run_dir)
        save_state()
    train_time = time.time() - t_start
    stop.close()
    log.close()
    if not is_main:
        dist.destroy_process_group()
        return run_dir
    step = progress["step"]
    print(f"trained {step} steps in {train_time:.0f}s ({train_time / max(step, 1):.3f} s/step)")
    summary = {"variant": variant, "trainable_params": trainable, "total_params": total, "steps": step,
               "skipped_steps": progress["skipped_steps"], "train_time_s": train_time,
               "s_per_step": train_time / max(step, 1), "train_samples_per_s": step * global_batch / train_time,
               "final_train_loss": loss.item(), "final_val_loss": val}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if args.no_eval or "test" not in splits:
        print(f"run directory: {run_dir}")
        return run_dir
    figures = evaluate_run(model, processor, tokenizer, splits, run_dir, "test", device)
    headline = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float))
    if "compositional" in figures:
        headline += f"; compositional attribute_accuracy {figures['compositional']['attribute_accuracy']:.3f}"
    print(f"run directory: {run_dir} | test: {headline}")
    return run_dir
