"""
The two variants side by side, over seeds, with intervals and verdicts.

    python compare.py --seeds 3                          # train both on the demo, seeds 0..2, then compare
    python compare.py --runs A1 A2 ... --vs B1 B2 ...    # finished runs of one variant against the other's
        [--equal-flops C1 C2 ...]                        # ... and runs of the costlier one at the other's FLOPs

Every run is scored on the same test images (runs scored on different test sets
are refused) with greedy decoding. Seeds are the unit: each row gives each
variant's mean over its seeds with a 95% t interval, and the difference
(cross-attention minus self-attention) with a 95% t interval that adds the
test images' sampling to the seeds' (stats.paired_difference; one value per run,
as BLEU or a cost, has no image part). Conditional rows (direction needs both
objects named right) use only the images where every run of both variants has a
value, in both columns and the difference, and every row says how many images
and seeds it rests on. A verdict names the variant ahead only when the interval
excludes zero; otherwise it says no difference was detected and how large a
difference the seeds could have detected (80% of the time).

Equal compute: the cheaper variant's runs against runs of the costlier one trained
to the same FLOPs budget with --max-flops, each with its own completed warmup
and decay (not a curve read mid-schedule). Time is the process's CPU time:
on a shared machine wall-clock time measures the neighbours too.

Writes report.md, curves.png (validation score against steps, FLOPs and CPU time),
loss_curves.png, samples.png and attention.png (seed 0's runs) in --out.
"""

import argparse
import functools
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
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
CATEGORY_SKILLS = ("objects", "direction", "direction_both_ways", "flip_consistency")
COMPOSITIONAL_SKILLS = ("objects", "direction", "direction_both_ways")
EQUAL_COMPUTE_SKILLS = ("objects", "direction", "direction_both_ways", "flip_consistency")
CORPUS = ("BLEU-4", "METEOR", "ROUGE_L", "CIDEr")
# (summary.json key, row name, scale): costs and the final loss, where lower is better
COSTS = (
    ("train_flops", "train_tflops", 1e12),
    ("train_cpu_s", "train_cpu_s", 1),
    ("cpu_s_per_step", "cpu_s_per_step", 1),
    ("train_time_s", "train_wall_s", 1),
    ("final_val_loss", "final_val_loss", 1),
)
LOWER_IS_BETTER = {name for _, name, _ in COSTS}


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


def printable(text):
    """A caption as the plots can draw it: a barely trained run writes control characters,
    which no font has glyphs for."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def plot_samples(predictions, out, n=8):
    variants = list(predictions)
    rows = list(zip(*(predictions[v][:n] for v in variants)))
    fig, axes = plt.subplots(
        len(rows), 2, figsize=(11, 1.25 * len(rows)), gridspec_kw={"width_ratios": [1, 5]}, squeeze=False
    )
    for (ax_img, ax_txt), preds in zip(axes, rows):
        ax_img.imshow(data.read_image(preds[0]["image"]))
        ax_img.axis("off")
        ax_txt.axis("off")
        lines = [f"reference: {preds[0]['references'][0]}"]
        lines += [
            f"{NAMES[v]}: {p['caption']}" + ("" if p["caption"] in p["references"] else "   (no exact match)")
            for v, p in zip(variants, preds)
        ]
        ax_txt.text(0, 0.5, "\n".join(map(printable, lines)), va="center", fontsize=11, family="monospace")
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
            words = [printable(tokenizer.decode([t]).strip()) for t in tokens]
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


def train_or_reuse(variant, run_dir, argv):
    """A run finished before is reused, an interrupted one resumed, else it is trained."""
    if (run_dir / "summary.json").is_file():
        print(f"{run_dir}: finished before, reused")
    elif list((run_dir / "checkpoints").glob("step-*")):
        train.main(variant, ["--resume", str(run_dir), "--no-eval"])
    else:
        train.main(variant, ["--out", str(run_dir), "--no-eval", *argv])
    return run_dir


def mean_flops(runs):
    return float(np.mean([json.loads((r / "summary.json").read_text())["train_flops"] for r in runs]))


def train_seeds(args, out):
    """({variant: [run dir per seed]}, {costlier variant: [run dir per seed]}): seeds 0..N-1 of both
    variants with the same data and budget (the scripts' own runs: the same options), then the
    costlier variant again with --max-flops at the cheaper one's training FLOPs."""
    budget = (["--epochs", str(args.epochs)] if args.epochs else []) + (
        ["--max-steps", str(args.max_steps)] if args.max_steps else []
    )
    groups = {
        v: [train_or_reuse(v, out / f"{v}-seed{k}", ["--seed", str(k), *budget]) for k in range(args.seeds)]
        for v in ORDER
    }
    cheaper, costlier = sorted(ORDER, key=lambda v: mean_flops(groups[v]))
    flops = f"{mean_flops(groups[cheaper]):.6g}"
    equal = [
        train_or_reuse(
            costlier, out / f"{costlier}-flops{flops}-seed{k}", ["--seed", str(k), "--max-flops", flops, *budget]
        )
        for k in range(args.seeds)
    ]
    return groups, {costlier: equal}


def variant_of(paths):
    variants = {read_config(p)["variant"] for p in paths}
    if len(variants) != 1:
        raise RunError(f"{' '.join(map(str, paths))}: the runs of one side must all be of one variant, not {variants}")
    return variants.pop()


def given_runs(first, second, equal_flops=None):
    every = [Path(p).resolve() for p in (*first, *second, *(equal_flops or []))]
    repeated = sorted({str(p) for p in every if every.count(p) > 1})
    if repeated:
        raise RunError(f"{', '.join(repeated)}: given more than once; each run is one seed")
    groups = {variant_of(paths): [Path(p) for p in paths] for paths in (first, second)}
    if len(groups) != 2:
        raise RunError("--runs and --vs must be runs of the two different variants")
    if not equal_flops:
        return groups, {}
    costlier = max(groups, key=lambda v: mean_flops(groups[v]))
    if variant_of(equal_flops) != costlier:
        raise RunError(
            f"--equal-flops: runs of the costlier variant ({costlier}) at the other's FLOPs budget, "
            f"not of {variant_of(equal_flops)}"
        )
    return groups, {costlier: [Path(p) for p in equal_flops]}


def evaluated(run_dir, split):
    """eval_<split>.json of a run, evaluated now if it is missing or predates the current skills."""
    path = run_dir / f"eval_{split}.json"
    if path.is_file():
        figures = json.loads(path.read_text())
        current = "direction_both_ways" in figures.get("skills", {}) or "attribute_accuracy" not in figures
        if "split_id" in figures and current:
            return figures
    model, processor, tokenizer, config = load_run(run_dir)
    splits = data.splits_for(config, strict=False)
    if split not in splits:
        raise RunError(f"{config['data_dir']} has no split {split!r} (it has {', '.join(splits)})")
    return evaluate_run(
        model, processor, tokenizer, splits, run_dir, split, max_new_tokens=config["max_caption_tokens"] + 1
    )


def same_test_set(evals):
    """evals: {run dir: figures} of every run in the comparison; all must be on one test set."""
    ids = {run: e["split_id"] for run, e in evals.items()}
    if len(set(ids.values())) != 1:
        listing = ", ".join(f"{run}: {i}" for run, i in ids.items())
        raise RunError(
            f"the runs were scored on different test sets ({listing}); compare runs of one data set and one --data-seed"
        )


# -----------------------------------------------------------------------------
# the rows: per-image figures, figures of whole runs, costs


@dataclass
class Row:
    name: str
    means: dict  # {variant: (mean, low, high)} over its seeds, on the images the row rests on
    diff: stats.Difference  # ORDER[0] - ORDER[1]
    lower_is_better: bool = False


def per_image(run_dir, split, key, category=None):
    """[value per test image] (None where it does not apply) from a run's predictions."""
    values = []
    for p in read_jsonl(run_dir / f"predictions_{split}.jsonl"):
        if key == "exact_match":
            values.append(float(p["caption"] in p["references"]))
        elif category is not None and p["skills"]["category"] != category:
            values.append(None)
        else:
            values.append(p["skills"].get(key))
    return values


@functools.cache
def image_digest(path):
    return data.file_digest(path)


def image_orders(runs, split):
    """{run: its predictions' indices in one order of their images}: by path when every run names
    the same images, else by the images' contents (a copy of the data elsewhere, other names).
    Runs scored on other images are refused: their values cannot be paired."""
    paths = {r: [p["image"] for p in read_jsonl(r / f"predictions_{split}.jsonl")] for r in runs}
    keys = paths
    if len({tuple(sorted(p)) for p in paths.values()}) != 1:
        try:
            keys = {r: [image_digest(p) for p in ps] for r, ps in paths.items()}
        except OSError as e:
            raise RunError(f"the runs name different {split} images, and one is not readable here ({e})") from None
    orders = {r: sorted(range(len(k)), key=k.__getitem__) for r, k in keys.items()}
    if len({tuple(keys[r][i] for i in order) for r, order in orders.items()}) != 1:
        raise RunError(f"the runs were scored on different {split} images: compare runs of one data set")
    return orders


def aligned(groups, split, key, category=None):
    """{variant: [per-image values of each run]}, every run's values in one image order."""
    orders = image_orders([r for runs in groups.values() for r in runs], split)
    return {
        v: [[values[i] for i in orders[r]] for r in runs for values in [per_image(r, split, key, category)]]
        for v, runs in groups.items()
    }


def image_row(groups, split, key, category=None, name=None):
    """Each variant's mean over seeds and the difference, on the images every run has a value for."""
    arrays = {v: stats.floats(values) for v, values in aligned(groups, split, key, category).items()}
    keep = stats.common_images(arrays[ORDER[0]], arrays[ORDER[1]])
    means = {
        v: stats.mean_interval(x[:, keep].mean(1)) if keep.any() else (None, None, None) for v, x in arrays.items()
    }
    return Row(name or key, means, stats.paired_difference(arrays[ORDER[0]], arrays[ORDER[1]]))


def run_row(name, values, lower_is_better=False):
    """The same from one value per run: Welch's t over the runs."""
    means = {v: stats.mean_interval(x) for v, x in values.items()}
    return Row(name, means, stats.seed_difference(values[ORDER[0]], values[ORDER[1]]), lower_is_better)


def cost_rows(groups):
    summaries = {v: [json.loads((r / "summary.json").read_text()) for r in runs] for v, runs in groups.items()}
    return [
        run_row(name, {v: [s.get(key) and s[key] / scale for s in summaries[v]] for v in groups}, True)
        for key, name, scale in COSTS
    ]


def table_rows(groups, evals, split):
    rows = []
    if all("skills" in evals[r] for runs in groups.values() for r in runs):
        rows += [image_row(groups, split, k) for k in skills.FIGURES]
        for category in skills.CATEGORIES:
            rows += [image_row(groups, split, k, category, f"{k} ({category})") for k in CATEGORY_SKILLS]
        if all((r / "predictions_compositional.jsonl").is_file() for runs in groups.values() for r in runs):
            rows += [image_row(groups, "compositional", k, name=f"{k} (compositional)") for k in COMPOSITIONAL_SKILLS]
    rows.append(image_row(groups, split, "exact_match"))
    rows += [run_row(k, {v: [evals[r].get(k) for r in runs] for v, runs in groups.items()}) for k in CORPUS]
    return rows + cost_rows(groups)


def equal_flops_rows(groups, equal, evals, split):
    """The cheaper variant's runs against the costlier one's runs at the same FLOPs budget."""
    ((costlier, runs),) = equal.items()
    matched = {v: (runs if v == costlier else groups[v]) for v in ORDER}
    rows = []
    if all("skills" in evals[r] for rs in matched.values() for r in rs):
        rows += [image_row(matched, split, k) for k in EQUAL_COMPUTE_SKILLS]
    return matched, rows + [image_row(matched, split, "exact_match")] + cost_rows(matched)


def blind_control(groups, evals):
    """{variant: mean objects accuracy with each image captioned from another's pixels}. Not a
    comparison: it measures how often neighbouring test images share their objects."""
    return {
        v: float(np.mean([evals[r]["blind_skills"]["objects"]["accuracy"] for r in runs]))
        for v, runs in groups.items()
        if all("blind_skills" in evals[r] for r in runs)
    }


# -----------------------------------------------------------------------------
# the validation score during training, for the curves


def score_curve(run_dir):
    """(steps, FLOPs, training CPU seconds, score, score name) from a run's metrics.jsonl."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "flops" in r]
    if not rows:
        raise RunError(f"{run_dir}: no validation scores in metrics.jsonl (trained before they were logged)")
    name = "val_objects" if "val_objects" in rows[0] else "val_bleu4"
    clock = "train_cpu_s" if "train_cpu_s" in rows[0] else "train_time_s"
    columns = [np.array([r[k] for r in rows], dtype=float) for k in ("step", "flops", clock, name)]
    return (*columns, name)


def plot_curves(groups, equal, out):
    curves = {v: [score_curve(r) for r in runs] for v, runs in groups.items()}
    budget = {v: [score_curve(r) for r in runs] for v, runs in equal.items()}
    name = next(iter(curves.values()))[0][4]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (label, column) in zip(axes, (("optimizer step", 0), ("training FLOPs", 1), ("training CPU s", 2))):
        for style, cs_by_variant in (("-", curves), ("--", budget)):
            for variant, cs in cs_by_variant.items():
                for k, c in enumerate(cs):
                    label_k = NAMES[variant] + (" (equal FLOPs)" if style == "--" else "") if k == 0 else None
                    ax.plot(c[column], c[3], style, color=COLOURS[variant], alpha=0.7, label=label_k)
        ax.set_xlabel(label)
        ax.set_ylabel(name.replace("_", " "))
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Validation score during training, one line per seed (dashed: trained to the other's FLOPs)")
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


def say(row):
    return stats.verdict(row.diff, NAMES[ORDER[0]], NAMES[ORDER[1]], lower_is_better=row.lower_is_better)


def table(rows):
    a, b = (NAMES[v] for v in ORDER)
    lines = [
        f"| metric | images | seeds | {a} | {b} | difference [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = row.diff
        images = "runs" if d.n_images is None else str(d.n_images)
        difference = "n/a" if d.diff is None else interval((d.diff, d.low, d.high))
        lines.append(
            f"| {row.name} | {images} | {d.seeds[0]} + {d.seeds[1]} | {interval(row.means[ORDER[0]])} | "
            f"{interval(row.means[ORDER[1]])} | {difference} | {say(row)} |"
        )
    return lines


def applies(rows):
    return [row for row in rows if row.diff.diff is not None]  # drop what applies to no image


def write_report(out, command, groups, rows, equal, attention, references, blind, split, n_images):
    a, b = (NAMES[v] for v in ORDER)
    seeds = {v: len(r) for v, r in groups.items()}
    rows = applies(rows)
    ahead = [(row.name, say(row)) for row in rows if row.diff.detected]
    lines = [
        f"# {a.capitalize()} vs {b}",
        "",
        f"Produced by `{command}`: {seeds[ORDER[0]]} and {seeds[ORDER[1]]} seeds, the same {n_images} `{split}` "
        "images for every run (checked by content), greedy decoding.",
        "",
        "Seeds are the unit. Each cell is the mean over a variant's seeds with its 95% t interval, on the images "
        f"the row names (for conditional rows: those where every run of both has a value). The difference is {a} "
        f"minus {b}, with a 95% t interval over seeds that adds the test images' sampling (Welch-Satterthwaite; "
        "one value per run for corpus metrics and costs). A verdict names a variant only when the interval excludes "
        f"zero, and a row on fewer than {stats.MIN_IMAGES} images says it has too few; otherwise it says how large "
        f'a difference the seeds could have detected {100 * stats.POWER:.0f}% of the time. "ahead" means better: '
        "for costs and losses the lower one.",
        "",
    ]
    if references:
        lines += [
            "Reading the direction rows: `direction` is scored where both objects are named right and is "
            "0.5 only for a captioner whose relation is a coin flip; one with a fixed habit scores anything. "
            "`direction_both_ways` scores each pair and its mirror image together: any captioner that does not read "
            f"the direction scores exactly {skills.DIRECTION_CHANCE} (on these test scenes a captioner blind to the "
            f"direction scores {fmt(references['blind to the direction'])}, a perfect one "
            f"{fmt(references['perfect'])}). `flip_consistency` is 0, not 0.5, for a caption that does not change "
            "under the mirror.",
            "",
        ]
    lines += table(rows)
    if blind:
        lines += [
            "",
            "Blind control (each image captioned from another image's pixels, objects accuracy): "
            + ", ".join(f"{NAMES[v]} {fmt(x)}" for v, x in blind.items())
            + ". Not compared: it measures how often neighbouring test images share their objects.",
        ]
    lines += ["", "## At equal compute", ""]
    if equal:
        matched, equal_rows = equal
        costlier = next(v for v in ORDER if matched[v] is not groups[v])
        lines += [
            f"{NAMES[costlier].capitalize()} trained again with `--max-flops` at the other variant's training FLOPs: "
            "each run has its own completed warmup and cosine decay. Time is the process's CPU time; "
            "wall-clock seconds on a shared machine also measure whatever else it runs.",
            "",
            *table(applies(equal_rows)),
        ]
    else:
        lines.append("No runs at equal FLOPs were given (`--equal-flops`): nothing to compare at equal compute.")
    lines += ["", "![validation score against steps, FLOPs and CPU time](curves.png)", ""]
    if attention:
        lines += [
            "## Where each variant looks",
            "",
            "An object word's attention over the image (seed 0's runs, the first test images): the share on "
            "the object it names; on pairs also the share on the other object, and the selectivity "
            "named / (named + other) against what attention spread evenly over both objects gives.",
            "",
            "| variant | object words | on the named object | object's share of the image | pair words "
            "| on the named | on the other | selectivity | if equal |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {NAMES[v]} | {r['object_words']} | {fmt(r['attention_on_object'])} | {fmt(r['object_area'])} "
            f"| {r['pair_words']} | {fmt(r['on_named_object'])} | {fmt(r['on_other_object'])} "
            f"| {fmt(r['selectivity'])} | {fmt(r['selectivity_if_equal'])} |"
            for v, r in attention.items()
        ]
        lines += ["", "![attention](attention.png)", ""]
    lines += ["## What this shows", ""]
    if ahead:
        lines += [f"- {name}: {verdict}." for name, verdict in ahead]
    else:
        lines.append("- No difference between the variants was detected on any metric.")
    lines += [
        f"- Everything else: no difference detected with {min(seeds.values())} seeds; each row's verdict says "
        "how large a difference it could have detected.",
        "- What it cannot show: other data, other budgets or other hyper-parameters (both use one preset).",
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
    p.add_argument("--equal-flops", nargs="+", metavar="RUN", help="runs of the costlier one at the other's FLOPs")
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
        groups, equal = given_runs(args.runs, args.vs, args.equal_flops) if args.runs else train_seeds(args, out)
        every_run = [r for runs in (*groups.values(), *equal.values()) for r in runs]
        evals = {r: evaluated(r, args.split) for r in every_run}
        same_test_set(evals)
        rows = table_rows(groups, evals, args.split)
        equal_rows = equal_flops_rows(groups, equal, evals, args.split) if equal else None
        first = {v: runs[0] for v, runs in groups.items()}
        splits = data.splits_for(read_config(first[ORDER[0]]), strict=False)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    plot_curves(groups, equal, out / "curves.png")
    plot_losses(first, out / "loss_curves.png")
    plot_samples({v: read_jsonl(r / f"predictions_{args.split}.jsonl") for v, r in first.items()}, out / "samples.png")
    attention, references = {}, {}
    if all(r.meta.get("objects") for r in splits[args.split]):
        references = skills.direction_reference([r.meta for r in splits[args.split]])
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
    n_images = evals[every_run[0]]["n_images"]
    report = write_report(
        out,
        command,
        groups,
        rows,
        equal_rows,
        attention,
        references,
        blind_control(groups, evals),
        args.split,
        n_images,
    )
    print(report)
    print(f"comparison written to {out}")


if __name__ == "__main__":
    main()
