"""
The two variants side by side.

    python compare.py                       # train both on the demo (same data, seed, budget), then compare
    python compare.py --runs RUN_A RUN_B    # compare two finished runs

Both are evaluated on the same split with the same decoding. The output folder
gets report.md (every metric, parameters, training time and speed, final
losses; the command that produced it), loss_curves.png, samples.png (test
images with references and both captions) and attention.png (one heat map over
the image per generated word: the cross-attention weights for one variant,
Qwen's last-layer text-to-image attention for the other).
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import transformers

import data
import train
from decoding import decode, positive_int
from evaluate import evaluate_run
from runs import LABELS as NAMES
from runs import RunError, load_run, read_config

COLOURS = {"explained": "tab:blue", "self_attention": "tab:orange"}


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(runs, out):
    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, run_dir in runs.items():
        rows = read_jsonl(run_dir / "metrics.jsonl")
        train_rows = [r for r in rows if "train_loss" in r]
        val_rows = [r for r in rows if "val_loss" in r]
        ax.plot(
            [r["step"] for r in train_rows],
            [r["train_loss"] for r in train_rows],
            color=COLOURS[variant],
            alpha=0.6,
            label=f"{NAMES[variant]} train",
        )
        ax.plot(
            [r["step"] for r in val_rows],
            [r["val_loss"] for r in val_rows],
            "o--",
            color=COLOURS[variant],
            label=f"{NAMES[variant]} validation",
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per caption token")
    ax.set_yscale("log")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_samples(predictions, out, n=8):
    variants = list(predictions)
    rows = list(zip(*(predictions[v][:n] for v in variants)))
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 1.25 * len(rows)), gridspec_kw={"width_ratios": [1, 5]})
    for (ax_img, ax_txt), preds in zip(axes, rows):
        ax_img.imshow(data.read_image(preds[0]["image"]))
        ax_img.axis("off")
        ax_txt.axis("off")
        lines = [f"reference: {preds[0]['references'][0]}"]
        lines += [
            f"{NAMES[v]}: {p['caption']}" + ("" if p["caption"] in p["references"] else "   (no exact match)")
            for v, p in zip(variants, preds)
        ]
        ax_txt.text(0, 0.5, "\n".join(lines), va="center", fontsize=11, family="monospace")
    fig.suptitle("Test images: a reference caption and each variant's greedy caption", fontsize=13)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


@torch.no_grad()
def plot_attention(runs, records, out, max_words=10):
    """Rows: (image, variant); columns: generated words, each with its attention over the image."""
    panels = []
    for variant, run_dir in runs.items():
        model, processor, tokenizer, _ = load_run(run_dir)
        for r in records:
            image = data.read_image(r.image)
            state = model.encode_images(pixel_values=processor(images=[image], return_tensors="pt")["pixel_values"])
            tokens = decode(model, state, tokenizer.eos_token_id)[0][:max_words]
            ids = torch.tensor([[tokenizer.eos_token_id] + tokens[:-1]])
            weights = model.image_attention(state, ids)[0]  # [T, P]: position t produced tokens[t]
            grid = int(weights.shape[-1] ** 0.5)
            words = [tokenizer.decode([t]).strip() for t in tokens]
            panels.append((f"{NAMES[variant]}", image, words, weights.view(-1, grid, grid)))
    cols = max(len(p[2]) for p in panels)
    fig, axes = plt.subplots(len(panels), cols + 1, figsize=(1.6 * (cols + 1), 1.9 * len(panels)), squeeze=False)
    for row, (name, image, words, maps) in zip(axes, panels):
        for ax in row:
            ax.axis("off")
        row[0].imshow(image)
        row[0].set_title(name, fontsize=10, fontweight="bold")
        for ax, word, m in zip(row[1:], words, maps):
            ax.imshow(image)
            ax.imshow(
                m.numpy(), cmap="inferno", alpha=0.6, extent=(0, image.width, image.height, 0), interpolation="nearest"
            )
            ax.set_title(word, fontsize=11)
    fig.suptitle("Where each generated word looks: attention over the image patches (bright = more)", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def fmt(v):
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_report(runs, evals, out, command, trained_here):
    variants = list(runs)
    summaries = {v: json.loads((runs[v] / "summary.json").read_text()) for v in variants}
    rows = []
    metric_names = [k for k, v in evals[variants[0]].items() if isinstance(v, (int, float)) or v is None]
    for k in metric_names:
        rows.append((k, [evals[v].get(k) for v in variants]))
    comp = [evals[v].get("compositional", {}) for v in variants]
    for k in ("attribute_accuracy", "relation_accuracy", "exact_match", "blind_attribute_accuracy", "CIDEr"):
        if all(k in c for c in comp):
            rows.append((f"compositional {k}", [c[k] for c in comp]))
    for k in (
        "trainable_params",
        "total_params",
        "steps",
        "train_time_s",
        "s_per_step",
        "train_samples_per_s",
        "final_train_loss",
        "final_val_loss",
    ):
        rows.append((k, [summaries[v][k] for v in variants]))
    lines = [
        "# Cross-attention vs self-attention",
        "",
        f"Produced by `{command}`; split `{evals[variants[0]]['split']}`, greedy decoding"
        + (
            ", the same data, seed and training budget for both."
            if trained_here
            else "; the runs were trained elsewhere: check their config.json for data, seed and budget."
        ),
        "",
        "| metric | " + " | ".join(NAMES[v] for v in variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    lines += [f"| {k} | " + " | ".join(fmt(x) for x in vals) + " |" for k, vals in rows]
    notes = evals[variants[0]].get("notes", [])
    lines += [""] + [f"- {n}" for n in notes]
    lines += [
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![samples](samples.png)",
        "",
        "![attention](attention.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return "\n".join(lines)


def finished_runs(paths):
    runs = {read_config(run_dir)["variant"]: Path(run_dir) for run_dir in paths}
    if len(runs) != 2:
        raise RunError(f"--runs needs one run of each variant; {' and '.join(paths)} are both {next(iter(runs))}")
    return runs


def train_both(args, out):
    budget = ["--seed", str(args.seed), "--no-eval"]
    budget += ["--epochs", str(args.epochs)] if args.epochs else []
    budget += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    return {v: train.main(v, ["--out", str(out / v)] + budget) for v in ("explained", "self_attention")}


def evaluate_both(runs, split, out):
    evals, predictions = {}, {}
    for variant, run_dir in runs.items():
        model, processor, tokenizer, config = load_run(run_dir)
        splits = data.splits_for(config, strict=False)
        if split not in splits:
            raise RunError(f"{config['data_dir']} has no split {split!r} (it has {', '.join(splits)})")
        evals[variant] = evaluate_run(
            model,
            processor,
            tokenizer,
            splits,
            run_dir,
            split,
            out=out / f"eval_{variant}.json",
            max_new_tokens=config["max_caption_tokens"] + 1,
        )
        predictions[variant] = read_jsonl(run_dir / f"predictions_{split}.jsonl")
    return evals, predictions, splits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs=2, metavar=("RUN_A", "RUN_B"), help="two finished run directories")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--split", default="test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=positive_int, help="training budget for both (default: the preset's)")
    p.add_argument("--max-steps", type=positive_int)
    args = p.parse_args(argv)
    if not sys.stderr.isatty():  # a log wants lines, not progress-bar refreshes: an error stays one line
        transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python compare.py", *(argv if argv is not None else sys.argv[1:])])

    try:  # a wrong run folder or missing data: one line, no traceback
        runs = finished_runs(args.runs) if args.runs else train_both(args, out)
        evals, predictions, splits = evaluate_both(runs, args.split, out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    plot_losses(runs, out / "loss_curves.png")
    plot_samples(predictions, out / "samples.png")
    plot_attention(runs, splits[args.split][:3], out / "attention.png")
    print(write_report(runs, evals, out, command, trained_here=not args.runs))
    print(f"comparison written to {out}")


if __name__ == "__main__":
    main()
