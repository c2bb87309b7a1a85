"""
The two variants side by side, over seeds, with intervals and verdicts.

    python compare.py --seeds 3                          # train both on the demo, seeds 0..2, then compare
    python compare.py --runs A1 A2 ... --vs B1 B2 ...    # finished runs of one variant against the other's

Every run is scored on the same test images (runs scored on different test sets
are refused) with greedy decoding. For each metric the report gives each
variant's mean over seeds with a 95% t interval, and the difference
(cross-attention minus self-attention) with a 95% interval: a paired bootstrap
over test images and seeds for the per-image figures (the shapes skills, exact
match), Welch's t interval over seeds for corpus figures (BLEU, METEOR, CIDEr,
times). A verdict names the variant ahead only when the interval excludes zero.

Equal compute: the validation score that training logs every few steps, against
cumulative training FLOPs and training time, compared at the budget both reached.

Writes report.md, curves.png (validation score against steps, FLOPs and time),
loss_curves.png, samples.png and attention.png (seed 0's runs) in --out.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import scipy.stats
import torch
import transformers

import data
import skills
import stats
import train
from decoding import decode, positive_int
from evaluate import attention_on_objects, evaluate_run
from runs import LABELS as NAMES
from runs import RunError, load_run, read_config

COLOURS = {"explained": "tab:blue", "self_attention": "tab:orange"}
ORDER = ("explained", "self_attention")  # the difference is reported as the first minus the second
CATEGORY_SKILLS = ("objects", "direction", "flip_consistency")
CORPUS = ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr")
SUMMARY = ("train_time_s", "s_per_step", "train_flops", "final_val_loss")


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


# -----------------------------------------------------------------------------
# the runs: trained here (resumable) or given


def train_seeds(args, out):
    """{variant: [run dir per seed]}: seeds 0..N-1 of both variants, same data and budget; a run
    finished before is reused, an interrupted one resumed."""
    budget = ["--no-eval"] + (["--epochs", str(args.epochs)] if args.epochs else [])
    budget += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    groups = {}
    for variant in ORDER:
        for seed in range(args.seeds):
            run_dir = out / f"{variant}-seed{seed}"
            if (run_dir / "summary.json").is_file():
                print(f"{run_dir}: finished before, reused")
            elif list((run_dir / "checkpoints").glob("step-*")):
                train.main(variant, ["--resume", str(run_dir), "--no-eval"])
            else:
                train.main(variant, ["--out", str(run_dir), "--seed", str(seed), *budget])
            groups.setdefault(variant, []).append(run_dir)
    return groups


def given_runs(first, second):
    groups = {}
    for paths in (first, second):
        variants = {read_config(p)["variant"] for p in paths}
        if len(variants) != 1:
            raise RunError(f"{' '.join(paths)}: the runs of one side must all be of one variant, not {variants}")
        groups[variants.pop()] = [Path(p) for p in paths]
    if len(groups) != 2:
        raise RunError("--runs and --vs must be runs of the two different variants")
    return groups


def evaluated(run_dir, split):
    """eval_<split>.json of a run, evaluated now if it is missing or predates the skills."""
    path = run_dir / f"eval_{split}.json"
    if path.is_file():
        figures = json.loads(path.read_text())
        if "split_id" in figures and (figures.get("skills") or "attribute_accuracy" not in figures):
            return figures
    model, processor, tokenizer, config = load_run(run_dir)
    splits = data.splits_for(config, strict=False)
    if split not in splits:
        raise RunError(f"{config['data_dir']} has no split {split!r} (it has {', '.join(splits)})")
    return evaluate_run(
        model, processor, tokenizer, splits, run_dir, split, max_new_tokens=config["max_caption_tokens"] + 1
    )


def same_test_set(evals):
    ids = {run: e["split_id"] for runs in evals.values() for run, e in runs.items()}
    if len(set(ids.values())) != 1:
        listing = ", ".join(f"{run}: {i}" for run, i in ids.items())
        raise RunError(
            f"the runs were scored on different test sets ({listing}); compare runs of one data set and one --data-seed"
        )


# -----------------------------------------------------------------------------
# figures per seed and per image, and their intervals


def per_image(run_dir, split, key, category=None):
    """[value per test image] (None where it does not apply) from a run's predictions."""
    values = []
    for p in read_jsonl(run_dir / f"predictions_{split}.jsonl"):
        if key == "exact_match":
            values.append(float(p["caption"] in p["references"]))
        elif category is not None and p["skills"]["category"] != category:
            values.append(None)
        else:
            values.append(p["skills"][key])
    return values


def image_metric(groups, split, key, category=None):
    """(mean, low, high) per variant over seeds, and the paired bootstrap difference over images and seeds."""
    arrays = {v: [per_image(r, split, key, category) for r in runs] for v, runs in groups.items()}
    means = {
        v: stats.mean_interval(
            [np.nanmean(np.array([np.nan if x is None else x for x in row], dtype=float)) for row in a]
        )
        for v, a in arrays.items()
    }
    return means, stats.paired_difference(arrays[ORDER[0]], arrays[ORDER[1]])


def seed_metric(values):
    """The same from one value per seed: Welch's t interval for the difference of the means."""
    means = {v: stats.mean_interval(x) for v, x in values.items()}
    a, b = (np.asarray([x for x in values[v] if x is not None], dtype=float) for v in ORDER)
    if len(a) < 2 or len(b) < 2:
        return means, (float(a.mean() - b.mean()) if len(a) and len(b) else None, None, None)
    interval = scipy.stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return means, (float(a.mean() - b.mean()), float(interval.low), float(interval.high))


def table_rows(groups, evals, split):
    rows = []
    shapes_data = all("skills" in e for runs in evals.values() for e in runs.values())
    if shapes_data:
        rows += [(k, *image_metric(groups, split, k)) for k in skills.FIGURES]
        for category in ("single", "pair_two_colours", "pair_one_colour"):
            rows += [(f"{k} ({category})", *image_metric(groups, split, k, category)) for k in CATEGORY_SKILLS]
        if all((r / "predictions_compositional.jsonl").is_file() for runs in groups.values() for r in runs):
            rows += [
                (f"{k} (compositional)", *image_metric(groups, "compositional", k)) for k in ("objects", "direction")
            ]
        blind = {v: [evals[v][r]["blind_skills"]["objects"]["accuracy"] for r in runs] for v, runs in groups.items()}
        rows.append(("objects (blind control)", *seed_metric(blind)))
    rows.append(("exact_match", *image_metric(groups, split, "exact_match")))
    for k in CORPUS:
        rows.append((k, *seed_metric({v: [evals[v][r].get(k) for r in runs] for v, runs in groups.items()})))
    summaries = {v: [json.loads((r / "summary.json").read_text()) for r in runs] for v, runs in groups.items()}
    for k in SUMMARY:
        scale = 1e12 if k == "train_flops" else 1  # in TFLOP: the verdicts print three decimals
        values = {v: [None if s.get(k) is None else s[k] / scale for s in summaries[v]] for v in groups}
        rows.append(("train_tflops" if k == "train_flops" else k, *seed_metric(values)))
    return rows


# -----------------------------------------------------------------------------
# equal compute: the validation score logged during training


def score_curve(run_dir):
    """(steps, FLOPs, training seconds, score, score name) from a run's metrics.jsonl."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "flops" in r]
    if not rows:
        raise RunError(f"{run_dir}: no validation scores in metrics.jsonl (trained before they were logged)")
    name = "val_objects" if "val_objects" in rows[0] else "val_bleu4"
    columns = [np.array([r[k] for r in rows], dtype=float) for k in ("step", "flops", "train_time_s", name)]
    return (*columns, name)


def at_equal_compute(groups):
    """{"flops" | "train_time_s": (budget, means, difference)}: each run's score at the largest
    budget every run reached (interpolated between logged points)."""
    curves = {v: [score_curve(r) for r in runs] for v, runs in groups.items()}
    result = {}
    for axis, column in (("flops", 1), ("train_time_s", 2)):
        budget = min(c[column][-1] for cs in curves.values() for c in cs)
        values = {v: [float(np.interp(budget, c[column], c[3])) for c in cs] for v, cs in curves.items()}
        result[axis] = (budget, *seed_metric(values))
    return result, curves


def plot_curves(curves, budgets, out):
    name = next(iter(curves.values()))[0][4]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (label, column) in zip(axes, (("optimizer step", 0), ("training FLOPs", 1), ("training time (s)", 2))):
        for variant, cs in curves.items():
            for k, c in enumerate(cs):
                ax.plot(c[column], c[3], color=COLOURS[variant], alpha=0.7, label=NAMES[variant] if k == 0 else None)
        key = {1: "flops", 2: "train_time_s"}.get(column)
        if key:
            ax.axvline(budgets[key][0], color="grey", linestyle="--", linewidth=1, label="the budget both reached")
        ax.set_xlabel(label)
        ax.set_ylabel(name.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Validation score during training, one line per seed", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# -----------------------------------------------------------------------------
# the report


def fmt(v, digits=3):
    if v is None:
        return "n/a"
    if abs(v) >= 1000:
        return f"{v:.3g}"
    return f"{v:.{digits}f}"


def interval(m):
    mean, low, high = m
    return fmt(mean) + ("" if low is None else f" [{fmt(low)}, {fmt(high)}]")


LOWER_IS_BETTER = ("train_time_s", "s_per_step", "train_tflops", "final_val_loss")


def say(diff, name=""):
    """The verdict in words; "ahead" means better, so for a cost the lower one is ahead."""
    if name in LOWER_IS_BETTER and diff[1] is not None:
        diff = (-diff[0], -diff[2], -diff[1])
    return stats.verdict(*diff, NAMES[ORDER[0]], NAMES[ORDER[1]])


def write_report(out, command, groups, rows, compute, attention, split, n_images):
    a, b = (NAMES[v] for v in ORDER)
    seeds = {v: len(r) for v, r in groups.items()}
    rows = [row for row in rows if any(m[0] is not None for m in row[1].values())]  # drop what applies to no image
    ahead = [(name, say(d, name)) for name, _, d in rows if d[1] is not None and (d[1] > 0 or d[2] < 0)]
    lines = [
        f"# {a.capitalize()} vs {b}",
        "",
        f"Produced by `{command}`: {seeds[ORDER[0]]} and {seeds[ORDER[1]]} seeds, the same {n_images} `{split}` "
        "images for every run (checked by content), greedy decoding.",
        "",
        "Each cell is the mean over seeds with its 95% t interval. The difference is "
        f"{a} minus {b}, with a 95% interval: a paired bootstrap over test images and seeds for per-image "
        "figures, Welch's t over seeds for the others. A verdict names a variant only when the interval "
        'excludes zero; "ahead" means better, so for times, FLOPs and losses the lower one is ahead.',
        "",
        f"| metric | {a} | {b} | difference [95% CI] | verdict |",
        "|---|---|---|---|---|",
    ]
    for name, means, diff in rows:
        d = "n/a" if diff[0] is None else interval(diff)
        lines.append(
            f"| {name} | {interval(means[ORDER[0]])} | {interval(means[ORDER[1]])} | {d} | {say(diff, name)} |"
        )
    lines += ["", "## At equal compute", ""]
    for axis, label in (("flops", "training FLOPs"), ("train_time_s", "seconds of training")):
        budget, means, diff = compute[axis]
        lines.append(
            f"- at {fmt(budget)} {label} (the most every run reached): {a} {interval(means[ORDER[0]])}, "
            f"{b} {interval(means[ORDER[1]])}; {say(diff)}"
        )
    lines += ["", "![validation score against steps, FLOPs and time](curves.png)", ""]
    if attention:
        lines += [
            "## Where each variant looks",
            "",
            "Share of an object word's attention on that object's patches (seed 0, test pairs and singles), "
            "against the share of the image those patches make up (attention spread evenly):",
            "",
            "| variant | object words | attention on the object | object's share of the image |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {NAMES[v]} | {r['object_words']} | {fmt(r['attention_on_object'])} | {fmt(r['object_area'])} |"
            for v, r in attention.items()
        ]
        lines += ["", "![attention](attention.png)", ""]
    lines += ["## What this shows", ""]
    if ahead:
        lines += [f"- {name}: {verdict}." for name, verdict in ahead]
    else:
        lines.append("- No difference between the variants was detected on any metric.")
    lines += [
        f"- Everything else: no difference detected with {min(seeds.values())} seeds; a difference smaller than "
        "the intervals shown can still exist.",
        "- What it cannot show: other data, other budgets or other hyper-parameters (both use one preset), and "
        "with few seeds the seed-level intervals are wide.",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "![samples](samples.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(lines))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=positive_int, default=3, help="seeds 0..N-1 of each variant to train")
    p.add_argument("--runs", nargs="+", metavar="RUN", help="finished runs of one variant ...")
    p.add_argument("--vs", nargs="+", metavar="RUN", help="... against finished runs of the other")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--split", default="test")
    p.add_argument("--epochs", type=positive_int, help="training budget for both (default: the preset's)")
    p.add_argument("--max-steps", type=positive_int)
    p.add_argument("--attention-images", type=int, default=100, help="test images for the attention figure")
    args = p.parse_args(argv)
    if bool(args.runs) != bool(args.vs):
        p.error("--runs and --vs go together")
    if not sys.stderr.isatty():  # a log wants lines, not progress-bar refreshes
        transformers.utils.logging.disable_progress_bar()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python compare.py", *(argv if argv is not None else sys.argv[1:])])
    try:  # a wrong run folder, missing data or runs on other test sets: one line, no traceback
        groups = given_runs(args.runs, args.vs) if args.runs else train_seeds(args, out)
        evals = {v: {r: evaluated(r, args.split) for r in runs} for v, runs in groups.items()}
        same_test_set(evals)
        rows = table_rows(groups, evals, args.split)
        compute, curves = at_equal_compute(groups)
        first = {v: runs[0] for v, runs in groups.items()}
        splits = data.splits_for(read_config(first[ORDER[0]]), strict=False)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    plot_curves(curves, compute, out / "curves.png")
    plot_losses(first, out / "loss_curves.png")
    plot_samples({v: read_jsonl(r / f"predictions_{args.split}.jsonl") for v, r in first.items()}, out / "samples.png")
    attention = {}
    if all(r.meta.get("objects") for r in splits[args.split]):
        plot_attention(first, splits[args.split][:3], out / "attention.png")
        for v, run_dir in first.items():
            model, processor, tokenizer, config = load_run(run_dir)
            attention[v] = attention_on_objects(
                model,
                processor,
                tokenizer,
                splits[args.split][: args.attention_images],
                max_new_tokens=config["max_caption_tokens"] + 1,
            )
    n_images = next(iter(next(iter(evals.values())).values()))["n_images"]
    print(write_report(out, command, groups, rows, compute, attention, args.split, n_images))
    print(f"comparison written to {out}")


if __name__ == "__main__":
    main()
