"""
The training loop both numbered scripts use.

    python 08_train_explained.py [--preset demo] [--out RUN_DIR] [--epochs N] ...

Epoch-based AdamW with linear warmup and cosine decay, gradient clipping at 1.0,
bf16 autocast on CUDA (fp16 with a GradScaler on request), fp32 on CPU. The
frozen vision tower's features are computed once per image and cached on disk.
A run directory gets config.json, model.safetensors (trainable weights only),
metrics.jsonl, checkpoints/ and, after training, the test-split evaluation.
Under torchrun the same loop runs data-parallel (DistributedDataParallel).
"""

import argparse
import contextlib
import datetime
import hashlib
import itertools
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import transformers
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

import checkpoints
import data
import demo
import features
import runs
import switches
from decoding import fraction, non_negative_float, positive_float, positive_int
from evaluate import evaluate_run, quick_score

# -----------------------------------------------------------------------------
# presets and the command line

REAL = dict(
    vision="openai/clip-vit-base-patch32",
    language="Qwen/Qwen3-0.6B-Base",
    epochs=5,
    batch_size=64,
    lr=1e-4,
    warmup=0.03,
    weight_decay=0.01,
    max_caption_tokens=40,
)
PRESETS = {
    # offline, CPU, minutes: the shapes dataset and the pretrained tiny stand-ins (see demo.py)
    "demo": REAL
    | dict(data="shapes", data_dir=None, vision="demo", language="demo", lr=1e-3, warmup=0.05, max_caption_tokens=32),
    # a GPU, bf16: the real backbones on Flickr8k's official splits
    "flickr8k": REAL | dict(data="flickr8k", data_dir="data/flickr8k"),
    # Karpathy's splits: dataset_flickr30k.json / dataset_coco.json beside the images
    "flickr30k": REAL | dict(data="karpathy", data_dir="data/flickr30k"),
    "coco": REAL | dict(data="karpathy", data_dir="data/coco", epochs=3),
}


def parse_args(variant, argv=None):
    p = argparse.ArgumentParser(description=f"Train the {variant} captioner.")
    p.add_argument(
        "--config",
        metavar="FILE",
        help='a JSON object of option values (as sweep.py writes its best settings: {"lr": 0.002, ...}); '
        "options given on the command line win",
    )
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    p.add_argument("--out", help=f"run directory (default runs/{variant}-<preset>)")
    p.add_argument("--data", help=f"data source, one of {', '.join(data.SOURCES)} (overrides the preset)")
    p.add_argument("--data-dir", help="where the data source lives (overrides the preset)")
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="leave out records with bad images or captions (default: --strict, stop and list them)",
    )
    p.add_argument("--strict", action="store_false", dest="skip_bad", help="stop on any bad record (the default)")
    p.add_argument("--image-root", help="karpathy: the image folder (default DATA_DIR/images or DATA_DIR)")
    p.add_argument(
        "--restval", default="train", choices=["train", "val", "drop"], help="karpathy: where the restval images go"
    )
    p.add_argument("--image-column", default="image", help="hf: the image column")
    p.add_argument("--caption-column", action="append", help="hf: a caption column (repeat for several)")
    p.add_argument("--download", action="store_true", help="hf: allow fetching a hub dataset")
    p.add_argument("--vision", help="CLIP vision tower: hub id or local directory (overrides the preset)")
    p.add_argument("--language", help="Qwen causal LM + tokenizer: hub id or local directory (overrides the preset)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int, help="per rank and per accumulation step")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=positive_float)
    p.add_argument("--warmup", type=fraction, help="fraction of the steps spent warming up (overrides the preset)")
    p.add_argument(
        "--weight-decay", type=non_negative_float, help="AdamW weight decay on the matrices (overrides the preset)"
    )
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    p.add_argument(
        "--max-flops",
        type=positive_float,
        help="a training-FLOPs budget: the run gets as many steps as it buys, with the warmup and cosine decay "
        "fitted to them (a completed schedule, for comparisons at equal compute)",
    )
    p.add_argument("--train-layers", type=int, default=2, help="last Qwen decoder layers to train")
    p.add_argument("--heads", type=positive_int, default=8, help="cross-attention heads (explained variant)")
    switches.add_options(p)
    p.add_argument("--max-caption-tokens", type=positive_int)
    p.add_argument("--seed", type=int, default=0, help="initialisation and data order")
    p.add_argument(
        "--data-seed",
        type=int,
        default=0,
        help="the random image-level split where a dataset has none of its own (folder data without "
        "splits.json, hf:, COCO's validation hold-out); separate from --seed, so that runs with "
        "different seeds are scored on the same test set",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 autocast on CUDA, fp32 on CPU",
    )
    p.add_argument("--workers", type=int, help="DataLoader workers (default 0 on CPU, 4 on CUDA)")
    p.add_argument("--no-feature-cache", action="store_true", help="run the vision tower on every batch")
    p.add_argument("--log-every", type=positive_int, default=10)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at each epoch end)")
    p.add_argument("--keep", type=positive_int, default=2, help="checkpoints to keep")
    p.add_argument(
        "--max-bad-steps", type=positive_int, default=5, help="stop after this many non-finite steps in a row"
    )
    p.add_argument(
        "--dist-timeout",
        type=positive_int,
        default=60,
        metavar="MINUTES",
        help="torchrun: how long a rank waits for the others at a collective",
    )
    p.add_argument("--score-every", type=positive_int, help="steps between validation scores (default: 4 an epoch)")
    p.add_argument("--score-images", type=positive_int, default=64, help="val images the validation score captions")
    p.add_argument("--score-loss", action="store_true", help="also the whole val split's loss at each score")
    p.add_argument("--no-eval", action="store_true", help="skip the test evaluation after training")
    p.add_argument(
        "--wandb",
        action="store_true",
        help="also log to Weights & Biases when it is installed (WANDB_MODE=offline needs no network)",
    )
    args = p.parse_args(argv)
    if args.config:
        values = config_file(args.config, p)
        p.set_defaults(**values)
        args = p.parse_args(argv)
        args.config_values = values
    for action in p._actions:  # which options the command line names (argparse keeps no record)
        action.default = argparse.SUPPRESS
    args.given = set(vars(p.parse_args(argv)))
    return args


def config_file(path, parser):
    """The option values in a --config file, checked against the parser's options."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"--config {path}: {e}")
    if not isinstance(values, dict):
        parser.error(f"--config {path}: expected a JSON object of option values, not {type(values).__name__}")
    known = {a.dest: a for a in parser._actions}
    unknown = sorted(k for k in values if k not in known or k in ("config", "help", "resume", "out"))
    if unknown:
        parser.error(f"--config {path}: not training options: {', '.join(unknown)}")
    for key, value in values.items():  # each value passes the option's own check
        action = known[key]
        if action.type is not None and value is not None:
            try:
                values[key] = action.type(str(value))
            except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
                parser.error(f"--config {path}: {key}: {e}")
        if action.choices is not None and values[key] not in action.choices:
            parser.error(f"--config {path}: {key}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return values


def run_config(variant, args):
    """The preset overridden by the command line. Pure: the demo's stand-ins are
    built by demo.resolve, not here."""
    cfg = dict(PRESETS[args.preset])
    for key in (
        "vision",
        "language",
        "data",
        "data_dir",
        "epochs",
        "batch_size",
        "lr",
        "warmup",
        "weight_decay",
        "max_caption_tokens",
    ):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.data and not args.data_dir and args.data != PRESETS[args.preset]["data"]:
        cfg["data_dir"] = (
            None if args.data == "shapes" else args.data[3:] if args.data.startswith("hf:") else f"data/{args.data}"
        )
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
    cfg.update(
        variant=variant,
        preset=args.preset,
        seed=args.seed,
        data_seed=args.data_seed,
        device=device,
        precision=precision,
        train_layers=args.train_layers,
        cross_attention_heads=args.heads,
        **switches.as_config(switches.from_args(args)),
        max_steps=args.max_steps,
        max_flops=args.max_flops,
        grad_accum=args.grad_accum,
        # what a --config file said, recorded whole: the run says what it was trained with if the file changes
        config_file=None
        if args.config is None
        else {"path": str(Path(args.config).resolve()), "values": args.config_values},
        data_dir=None if cfg["data_dir"] is None else str(Path(cfg["data_dir"]).resolve()),
        data_options={
            "strict": not args.skip_bad,
            "image_root": args.image_root,
            "restval": args.restval,
            "image_column": args.image_column,
            "caption_columns": args.caption_column or ["caption"],
            "download": args.download,
        },
    )
    return cfg


def workers(args, config):
    """DataLoader workers: --workers, else 4 on CUDA (decoding JPEGs must keep up with the GPU), 0 on CPU."""
    return args.workers if args.workers is not None else (4 if config["device"].startswith("cuda") else 0)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -----------------------------------------------------------------------------
# many processes (torchrun): rank 0 builds what is shared, every rank trains


def init_distributed(timeout_minutes):
    """(rank, world size, device) under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set), else (0, 1, None).
    NCCL on CUDA, gloo on CPU. The timeout bounds how long a rank waits at a collective for
    the others (NCCL's default is 10 minutes)."""
    if "RANK" not in os.environ:
        return 0, 1, None
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", timeout=timeout)
        return dist.get_rank(), dist.get_world_size(), f"cuda:{local_rank}"
    dist.init_process_group("gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size(), "cpu"


def distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if distributed():
        dist.barrier()


@contextlib.contextmanager
def main_rank_first(is_main):
    """Rank 0 does the work first (building the demo, writing caches); the others then find it done."""
    if not is_main:
        barrier()
    yield
    if is_main:
        barrier()


# -----------------------------------------------------------------------------
# setting up a run: its config and folder, the data, the model


# what a resumed run takes from this command line: how this session runs and logs, and where this
# machine keeps the data and computes; every other option is the run's own, fixed when it started
SESSION_OPTIONS = {"resume", "keep", "log_every", "max_bad_steps", "no_eval", "no_feature_cache", "save_every"}
SESSION_OPTIONS |= {"score_every", "score_images", "score_loss", "wandb", "workers", "dist_timeout"}
MACHINE_OPTIONS = {"device", "precision", "data_dir"}


def changed_options(variant, args, config, run_dir):
    """The run options this command line names with another value than the resumed run's."""
    new = run_config(variant, args)
    data_option = {"skip_bad": "strict", "caption_column": "caption_columns"}
    data_option |= {k: k for k in ("image_root", "restval", "image_column", "download")}
    key = {"heads": "cross_attention_heads"}

    def value(cfg, dest):
        if dest == "config":  # the values the file set, wherever it lies now
            return (cfg.get("config_file") or {}).get("values")
        if dest in data_option:
            return cfg.get("data_options", {}).get(data_option[dest])
        return cfg.get(key.get(dest, dest))

    changed = []
    for dest in sorted(args.given - SESSION_OPTIONS - MACHINE_OPTIONS):
        if dest == "out":
            same = Path(args.out).resolve() == Path(run_dir).resolve()
        else:
            same = value(new, dest) == value(config, dest)
        changed += [] if same else [dest]
    return changed


def start_or_resume(variant, args, is_main):
    """(run directory, config): a new run from the preset and options, or the config of the run
    being resumed, with this machine's device, precision and data folder when given."""
    if args.resume:
        run_dir = Path(args.resume)
        config = runs.read_config(run_dir)
        if config["variant"] != variant:
            raise runs.RunError(
                f"{run_dir} holds a {config['variant']} run, not a {variant} one; resume it with its own script"
            )
        changed = changed_options(variant, args, config, run_dir)
        if changed:
            names = ", ".join("--" + n.replace("_", "-") for n in changed)
            raise ValueError(f"{names}: not what {run_dir} was started with; a resumed run keeps its own options")
        if {"device", "precision"} & args.given:
            device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
            precision = (
                args.precision if args.precision != "auto" else ("bf16" if device.startswith("cuda") else "fp32")
            )
            config.update(device=device, precision=precision)
        if "data_dir" in args.given:
            config["data_dir"] = str(Path(args.data_dir).resolve())
        return run_dir, config
    run_dir = Path(args.out or f"runs/{variant}-{args.preset}")
    # a new run here would overwrite what that one finished, or be mixed with its checkpoints
    if (run_dir / "summary.json").is_file():
        raise runs.RunError(f"{run_dir} holds a finished run: train into another --out, or remove it first")
    if checkpoints.checkpoint_dirs(run_dir):
        raise runs.RunError(f"{run_dir} holds a run already: --resume {run_dir} to go on with it, or another --out")
    with main_rank_first(is_main):  # the demo data and backbones are built once
        config = demo.resolve(run_config(variant, args))
    return run_dir, config


def load_data(config, model, processor, use_feature_cache, rank, world, workers):
    """(splits, {"train", "val"}: cached features or None). Every image a split uses is fully
    decoded once here, by the feature cache or by a check, before training starts."""
    with main_rank_first(rank == 0):  # a Hugging Face dataset is written out to files once
        splits = data.splits_for(config)
    print(f"data ({config['data']} at {config['data_dir']}): {data.describe_splits(splits)}")
    if "test" in splits:  # recorded with the run: comparisons refuse runs scored on other test sets
        config["test_set"] = data.split_id(splits["test"])
    cached = {"train": None, "val": None}
    strict = config["data_options"]["strict"]
    if use_feature_cache:
        for s in cached:  # every rank encodes its slice of the images; the cache is one file
            splits[s], cached[s] = features.cached_features(
                model, processor, config["vision"], splits[s], config["device"], strict, rank, world, workers
            )
    for s in [s for s in splits if cached.get(s) is None]:
        good, bad = data.decode_check(splits[s])
        data.stop_or_skip(bad, strict)
        splits[s] = good
    if not splits["train"]:
        raise data.DataError(f"{config['data']} data at {config['data_dir']}: no training images left to train on")
    return splits, cached


# -----------------------------------------------------------------------------
# one optimizer step


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
    GradScaler skips such a step itself, and lowers its scale."""
    micro_batches = [{k: v.to(config["device"], non_blocking=True) for k, v in b.items()} for b in micro_batches]
    n_tokens = sum((b["targets"] != -100).sum() for b in micro_batches).float()
    loss_total = torch.zeros((), device=n_tokens.device)
    if distributed():
        dist.all_reduce(n_tokens)
    world = dist.get_world_size() if distributed() else 1
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
    grad_norm = torch.nn.utils.clip_grad_norm_(params, config.get("grad_clip", 1.0) or math.inf)  # 0: off
    ok = bool(torch.isfinite(grad_norm))  # the same on every rank after all-reduce
    if ok or scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
    scheduler.step()  # the schedule follows the data, skipped batch or not
    if distributed():
        dist.all_reduce(loss_total)
    return loss_total / n_tokens, grad_norm, ok


def train_set_id(records):
    """A short hash of the training records' names and caption counts: cheap (no image is read),
    and it changes when an image or caption is added, removed or left out by --skip-bad."""
    text = "\n".join(f"{r.image.name}\t{len(r.captions)}" for r in records)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def report_long_captions(tokenizer, records, max_tokens):
    captions = [c for r in records for c in r.captions]
    lengths = [len(ids) for ids in tokenizer(captions, add_special_tokens=False)["input_ids"]]
    n_long = sum(n > max_tokens for n in lengths)
    if n_long:
        print(
            f"{n_long} of {len(captions)} training captions are longer than {max_tokens} tokens and are "
            f"truncated (longest {max(lengths)}; see --max-caption-tokens)"
        )


# -----------------------------------------------------------------------------
# the loop's parts: validation, the metrics log, stop requests, the data order


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


def logged_rows(path):
    """The lines of a metrics.jsonl; a last line cut short by a crash is left out, any other
    line that is not JSON is an error naming it."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except ValueError:
            if n == len(lines):
                print(f"{path}:{n}: cut short (a crash while writing it), left out")
                return lines[:-1]
            raise ValueError(f"{path}:{n}: not a JSON line") from None
    return lines


class MetricsLog:
    """metrics.jsonl, one JSON object a line; mirrored to Weights & Biases on request."""

    def __init__(self, path, config, use_wandb, resume_step=None, enabled=True):
        if enabled and resume_step is not None and Path(path).is_file():  # steps after the checkpoint run again
            rows = [line for line in logged_rows(path) if json.loads(line)["step"] <= resume_step]
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
        print(
            f"\n{signal.Signals(signum).name}: saving a checkpoint after this step "
            "(press Ctrl-C again to quit at once)",
            flush=True,
        )

    def requested(self):
        """Whether any rank was asked to stop (all ranks must stop after the same step)."""
        if not (distributed() and dist.get_world_size() > 1):
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
    order = torch.randperm(n_rows, generator=g)[: n_steps * grad_accum * world * batch_size]
    return order.view(n_steps, grad_accum, world, batch_size)[:, :, rank].flatten().tolist()


def groups_of(iterable, n):
    it = iter(iterable)
    while group := list(itertools.islice(it, n)):
        yield group


class EarlyStop(Exception):
    """Raised out of main when its on_score callback asked training to stop (a pruned sweep trial)."""


class Training:
    """Everything one optimizer step and one epoch need, and the progress that a checkpoint saves."""

    def __init__(self, model, config, run_dir, splits, cached, processor, tokenizer, args, rank, world, on_score=None):
        self.model, self.config, self.run_dir, self.args, self.on_score = model, config, run_dir, args, on_score
        self.splits, self.cached, self.processor, self.tokenizer = splits, cached, processor, tokenizer
        self.rank, self.world, self.is_main = rank, world, rank == 0
        device = config["device"]
        self.workers = workers(args, config)
        self.n_rows = sum(len(r.captions) for r in splits["train"])
        self.global_batch = config["batch_size"] * config["grad_accum"] * world
        self.steps_per_epoch = self.n_rows // self.global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{self.n_rows} training captions do not fill one global batch of {self.global_batch}")
        self.total_steps = config["epochs"] * self.steps_per_epoch
        if config.get("max_flops") and "flops_per_step" not in config:  # recorded: a resumed run keeps its steps
            config["flops_per_step"] = self.flops_per_step()
            steps = max(int(config["max_flops"] // config["flops_per_step"]), 1)
            config["max_steps"] = min(config["max_steps"] or steps, steps)
        if config.get("max_flops") and config["max_steps"] > self.total_steps and rank == 0:
            print(
                f"--max-flops {config['max_flops']:.3g} buys {config['max_steps']} steps, but {config['epochs']} "
                f"epochs are {self.total_steps}: the budget is not all spent (raise --epochs to spend it)"
            )
        if config["max_steps"]:
            self.total_steps = min(self.total_steps, config["max_steps"])
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(model.parameter_groups(config["weight_decay"]), lr=config["lr"])
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(config["warmup"] * self.total_steps), self.total_steps
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=config["precision"] == "fp16")
        self.progress = {
            "step": 0,
            "epoch": 0,
            "position": 0,
            "time_s": 0.0,
            "score_time_s": 0.0,
            "cpu_s": 0.0,
            "score_cpu_s": 0.0,
            "flops": 0,
            "skipped_steps": 0,
            "global_batch": self.global_batch,
            "train_set": train_set_id(splits["train"]),
        }
        self.trainer = (
            model
            if world == 1
            else torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device] if device.startswith("cuda") else None
            )
        )
        self.loss, self.val_loss, self.bad_in_a_row = torch.tensor(float("nan")), float("nan"), 0
        self.flops_by_shape = {}  # training FLOPs of one step, counted once per batch shape
        self.score_every = args.score_every or max(self.steps_per_epoch // 4, 1)
        self.score_records = splits["val"][: args.score_images]

    def loader(self, split, order=None):
        return data.make_loader(
            self.splits[split],
            self.cached[split],
            self.processor,
            self.tokenizer,
            batch_size=self.config["batch_size"],
            max_tokens=self.config["max_caption_tokens"],
            order=order,
            workers=self.workers,
            seed=self.config["seed"],
            pin_memory=self.config["device"].startswith("cuda"),
        )

    def resume(self):
        last = checkpoints.latest(self.run_dir)
        train_set = self.progress["train_set"]
        self.progress = checkpoints.load(last, self.model, self.optimizer, self.scheduler, self.scaler)
        if self.progress.get("global_batch", self.global_batch) != self.global_batch:
            raise ValueError(
                f"{last} was saved with a global batch of {self.progress['global_batch']}, this run "
                f"has {self.global_batch}; resume with the same number of ranks and --grad-accum"
            )
        if self.progress.get("train_set", train_set) != train_set:  # checkpoints before it was kept pass
            raise ValueError(
                f"{last} was saved training on other images or captions than {self.config['data_dir']} gives now "
                f"({self.n_rows} captions); its schedule and data order would not go on where they stopped"
            )
        runs.check_backbones(self.model, self.config, self.run_dir)
        self.loss = torch.tensor(self.progress.get("train_loss", float("nan")))
        self.val_loss = self.progress.get("val_loss", float("nan"))
        print(f"resumed from {last} (epoch {self.progress['epoch'] + 1}, step {self.progress['step']})")

    def save_state(self):
        # the last losses travel with the checkpoint: a run stopped after its last one resumes
        # straight into its summary, which must not say NaN
        self.progress.update(train_loss=self.loss.item(), val_loss=self.val_loss)
        if self.is_main:
            checkpoints.save(
                self.run_dir,
                self.model,
                self.optimizer,
                self.scheduler,
                self.scaler,
                self.progress,
                keep=self.args.keep,
            )
        barrier()

    def count_flops(self, micro_batches):
        """The FLOPs of a step's forward and backward passes, counted by torch's FlopCounterMode in a
        pass of their own (on the plain module: no all-reduce). Not during the step: under the mode
        the backward pass rounds differently, and a resumed run, which meets batch shapes for the
        first time at other steps, would then not repeat the uninterrupted run bit for bit."""
        with FlopCounterMode(display=False) as counter:
            for batch in micro_batches:
                batch = {k: v.to(self.config["device"], non_blocking=True) for k, v in batch.items()}
                with autocast(self.config):
                    loss_sum = self.model(**batch, reduction="sum")
                loss_sum.backward()
        self.model.zero_grad(set_to_none=True)
        return counter.get_total_flops()

    def flops_per_step(self, n_batches=4):
        """Training FLOPs of one optimizer step, the mean over the first few batches of the first
        epoch. The same rows on every rank, so that every rank derives the same number of steps."""
        B = self.config["batch_size"]
        rows = epoch_order(self.n_rows, self.config["seed"], 0, min(n_batches, self.n_rows // B), B)
        counts = [self.count_flops([batch]) for batch in self.loader("train", rows)]
        return sum(counts) / len(counts) * self.config["grad_accum"] * self.world

    def start_clocks(self):
        """The wall and process-CPU clocks, set back by the time a resumed run already spent. CPU
        time is what equal-time comparisons use: other work on a shared machine stretches a run's
        wall-clock time but not (much) the CPU time the run itself takes."""
        self.t_start = time.time() - self.progress["time_s"]
        self.cpu_start = time.process_time() - self.progress.get("cpu_s", 0.0)
        return self.t_start

    def step(self, micro_batches, log, t_start):
        """One optimizer step; a non-finite one is skipped, and too many in a row stop the run. Its
        FLOPs are counted the first time a batch shape comes up."""
        shape = tuple(tuple(b["input_ids"].shape) for b in micro_batches)
        if shape not in self.flops_by_shape:  # every rank does the same work on its own rows
            self.flops_by_shape[shape] = self.count_flops(micro_batches) * self.world
        self.loss, grad_norm, ok = train_step(
            self.trainer, micro_batches, self.optimizer, self.scheduler, self.scaler, self.params, self.config
        )
        p = self.progress
        p.update(
            step=p["step"] + 1,
            position=p["position"] + 1,
            time_s=time.time() - t_start,
            cpu_s=time.process_time() - self.cpu_start,
        )
        p["flops"] += self.flops_by_shape[shape]
        # fp16 gradients that overflow at a finite loss are the GradScaler finding its scale, not
        # a diverging run: counted as skipped, but not towards --max-bad-steps
        overflow = not ok and self.scaler.is_enabled() and bool(torch.isfinite(self.loss))
        self.bad_in_a_row = 0 if ok or overflow else self.bad_in_a_row + 1
        if not ok:
            p["skipped_steps"] += 1
            what = "fp16 gradients overflowed (the scale is lowered)" if overflow else "non-finite loss or gradient"
            print(f"step {p['step']}: {what}, step skipped ({self.bad_in_a_row} in a row, {p['skipped_steps']} in all)")
            log.write({"step": p["step"], "skipped_step": True, "loss": self.loss.item()})
            if self.bad_in_a_row >= self.args.max_bad_steps:
                self.save_state()
                raise SystemExit(
                    f"error: {self.bad_in_a_row} steps in a row had a non-finite loss or gradient; "
                    f"stopped with the last good weights checkpointed in {self.run_dir}/checkpoints "
                    "(lower --lr, or check the data)"
                )
        return grad_norm

    def epoch(self, log, stop, t_start):
        """The rest of the current epoch (or up to the last step): steps, logging, checkpoints and
        a clean stop on request; then the validation loss."""
        p, config, A = self.progress, self.config, self.config["grad_accum"]
        epoch = p["epoch"]
        order = epoch_order(
            self.n_rows, config["seed"], epoch, self.steps_per_epoch, config["batch_size"], A, self.rank, self.world
        )
        steps = groups_of(self.loader("train", order[p["position"] * A * config["batch_size"] :]), A)
        bar = tqdm(
            steps,
            desc=f"epoch {epoch + 1}/{config['epochs']}",
            unit="step",
            initial=p["position"],
            total=min(self.steps_per_epoch, p["position"] + self.total_steps - p["step"]),
            disable=None if self.is_main else True,
        )  # None: no bar when the output is not a terminal
        t_last, seen = time.time(), 0
        for micro_batches in bar:
            grad_norm = self.step(micro_batches, log, t_start)
            seen += self.global_batch
            step = p["step"]
            if step % self.args.log_every == 0 or step == self.total_steps:
                rate = seen / (time.time() - t_last)
                bar.set_postfix(loss=f"{self.loss.item():.3f}", samples_s=f"{rate:.0f}")
                log.write(
                    {
                        "step": step,
                        "epoch": epoch + 1,
                        "train_loss": self.loss.item(),
                        "grad_norm": grad_norm.item(),
                        "lr": self.scheduler.get_last_lr()[0],
                        "samples_per_s": rate,
                        "time_s": p["time_s"],
                    }
                )
                t_last, seen = time.time(), 0
            if self.is_main and (step % self.score_every == 0 or step == self.total_steps):
                self.score(log, t_start)
            stopping = stop.requested()
            if stopping or (self.args.save_every and step % self.args.save_every == 0):
                self.save_state()
            if stopping:
                if self.is_main:
                    runs.save_run(self.model, config, self.run_dir)
                    print(f"stopped at step {step}; continue with --resume {self.run_dir}")
                raise SystemExit(0)
            if step >= self.total_steps:
                break
        bar.close()
        if p["position"] >= self.steps_per_epoch:
            p.update(epoch=epoch + 1, position=0)
        if self.is_main:
            self.val_loss = validation_loss(self.model, self.loader("val"), config)
            print(
                f"epoch {epoch + 1}: train loss {self.loss.item():.3f}, val loss {self.val_loss:.3f} "
                f"({p['step']} steps, {time.time() - t_start:.0f}s)"
            )
            log.write(
                {"step": p["step"], "epoch": epoch + 1, "val_loss": self.val_loss, "time_s": time.time() - t_start}
            )
            runs.save_run(self.model, config, self.run_dir)
        self.save_state()

    def score(self, log, t_start):
        """The cheap validation score (greedy captions of a fixed val subset), logged with the
        training FLOPs and time so far, so that variants can be compared at equal compute."""
        t0, cpu0 = time.time(), time.process_time()
        self.model.eval()
        figures = quick_score(
            self.model,
            self.processor,
            self.tokenizer,
            self.score_records,
            self.config["device"],
            max_new_tokens=self.config["max_caption_tokens"] + 1,
        )
        if self.args.score_loss:
            figures["loss"] = validation_loss(self.model, self.loader("val"), self.config)
        self.model.train()
        p = self.progress
        p["score_time_s"] += time.time() - t0
        p["score_cpu_s"] += time.process_time() - cpu0
        row = {
            "step": p["step"],
            "flops": p["flops"],
            "train_time_s": p["time_s"] - p["score_time_s"],
            "train_cpu_s": p["cpu_s"] - p["score_cpu_s"],
            "time_s": time.time() - t_start,
            **{f"val_{k}": v for k, v in figures.items()},
        }
        log.write(row)
        if self.on_score is not None and self.on_score(row):
            self.save_state()
            raise EarlyStop(f"stopped at step {p['step']} by the caller (the validation score said so)")

    def done(self):
        return self.progress["step"] >= self.total_steps or self.progress["epoch"] >= self.config["epochs"]

    def summary(self, trainable, total, train_time):
        step = self.progress["step"]
        return {
            "variant": self.config["variant"],
            "trainable_params": trainable,
            "total_params": total,
            "steps": step,
            "skipped_steps": self.progress["skipped_steps"],
            "train_time_s": train_time,
            "train_cpu_s": self.progress["cpu_s"] - self.progress["score_cpu_s"],
            "cpu_s_per_step": (self.progress["cpu_s"] - self.progress["score_cpu_s"]) / max(step, 1),
            "train_flops": self.progress["flops"],
            "s_per_step": train_time / max(step, 1),
            "train_samples_per_s": step * self.global_batch / train_time,
            "final_train_loss": self.loss.item(),
            "final_val_loss": self.val_loss,
        }


# -----------------------------------------------------------------------------
# main


def main(variant, argv=None, on_score=None):
    """Train a run; returns its directory. on_score(row), when given, is called with each logged
    validation score (rank 0); a true answer stops training with a checkpoint (EarlyStop)."""
    args = parse_args(variant, argv)
    if not sys.stderr.isatty():  # a log wants lines, not progress-bar refreshes
        transformers.utils.logging.disable_progress_bar()
    rank, world, rank_device = init_distributed(args.dist_timeout)
    is_main = rank == 0
    try:  # a wrong run folder, missing data or a bad option value: one line, no traceback
        run_dir, config = start_or_resume(variant, args, is_main)
        config.update(device=rank_device or config["device"], world_size=world)
        run_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(config["seed"])
        model, processor, tokenizer = runs.build_model(config)
        model.to(config["device"])
        trainable, total = model.parameter_counts()
        splits, cached = load_data(
            config, model, processor, not args.no_feature_cache, rank, world, workers(args, config)
        )
        training = Training(model, config, run_dir, splits, cached, processor, tokenizer, args, rank, world, on_score)
        if args.resume:
            training.resume()
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"{variant}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.1f}%)")
    report_long_captions(tokenizer, splits["train"], config["max_caption_tokens"])
    if is_main:
        print(
            f"global batch {training.global_batch} = {config['batch_size']} per rank x {config['grad_accum']} "
            f"accumulation steps x {world} rank(s); {training.steps_per_epoch} steps per epoch"
        )
        if not args.resume:
            runs.save_run(model, config, run_dir)  # config.json first: a run dir always says what it is

    log = MetricsLog(
        run_dir / "metrics.jsonl",
        config,
        args.wandb,
        training.progress["step"] if args.resume else None,
        enabled=is_main,
    )
    stop = StopRequest()
    model.train()
    t_start = training.start_clocks()
    try:
        while not training.done():
            training.epoch(log, stop, t_start)
    finally:
        stop.close()
        log.close()
    train_time = time.time() - t_start
    if distributed():
        dist.destroy_process_group()
    if not is_main:
        return run_dir

    summary = training.summary(trainable, total, train_time)
    print(f"trained {summary['steps']} steps in {train_time:.0f}s ({summary['s_per_step']:.3f} s/step)")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.no_eval or not splits.get("test"):
        print(("" if args.no_eval else "no test split: not evaluated; ") + f"run directory: {run_dir}")
        return run_dir
    figures = evaluate_run(
        model,
        processor,
        tokenizer,
        splits,
        run_dir,
        "test",
        config["device"],
        max_new_tokens=config["max_caption_tokens"] + 1,
    )  # as long as training allowed
    headline = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if isinstance(v, float))
    if "compositional" in figures:
        headline += f"; compositional attribute_accuracy {figures['compositional']['attribute_accuracy']:.3f}"
    print(f"run directory: {run_dir} | test: {headline}")
    return run_dir
