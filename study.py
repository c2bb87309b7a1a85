"""
A study: a grid of training configurations x seeds on the demo, each run's figures committed as a
small JSON under docs/study/, and a report rebuilt from what is committed.

    python study.py --grid direction [--seeds 3] [--only NAME ...]   # run what is not done yet
    python study.py --grid direction --report                        # rebuild docs/direction.md only
    python study.py --grid claims                                    # the claims study (claims.py)
    python study.py --grid claims --report                           # rebuild docs/claims.md only

A configuration is a name, a variant and the options it adds to the numbered script's defaults
(the ablation switches of switches.py); a configuration with no options is the variant's default,
whose runs are compare.py's own (runs/compare/<variant>-seed<k>), so the two share them. A run
whose JSON is in docs/study/ is done (it may have been trained on another machine or in another
session); an interrupted run resumes from its checkpoint. Runs go in the grid's order, seed by
seed, so that every configuration gets its first seed early.

Each JSON holds the run's config, summary, headline figures and per-image skills on the test and
compositional splits, so the report compares configurations image by image with the interval of
stats.paired_difference (seeds are the unit, the test images a second source of variance).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

import claims
import compare
import skills
import stats
from decoding import positive_int
from runs import LABELS

STUDY = Path("docs/study")
FIGURES = ("objects", "direction", "direction_both_ways", "flip_consistency", "axis")

# (name, variant, options): the direction experiment of the probes (probe.py): which changes let
# each variant name the direction of a relation from the image
DIRECTION = [
    ("explained", "explained", []),
    (
        "explained+context+2d+sharp",
        "explained",
        ["--queries", "context", "--image-positions", "2d", "--sharp-attention", "on"],
    ),
    ("explained+2d+sharp", "explained", ["--image-positions", "2d", "--sharp-attention", "on"]),
    ("explained+context+sharp", "explained", ["--queries", "context", "--sharp-attention", "on"]),
    ("explained+context+2d", "explained", ["--queries", "context", "--image-positions", "2d"]),
    ("self_attention", "self_attention", []),
    ("self_attention+2d+all-layers", "self_attention", ["--image-positions", "2d", "--train-layers", "4"]),
    ("self_attention+2d", "self_attention", ["--image-positions", "2d"]),
    # screening for a route in the self-attention variant, and the cross-attention route at the swept lr
    ("self_attention+2d+swept", "self_attention", ["--image-positions", "2d", *claims.SWEPT["self_attention"]]),
    (
        "self_attention+2d+fixed-scale+swept",
        "self_attention",
        ["--image-positions", "2d", "--image-scale", "fixed", *claims.SWEPT["self_attention"]],
    ),
    (
        "self_attention+2d+lora8+swept",
        "self_attention",
        ["--image-positions", "2d", "--lora", "8", *claims.SWEPT["self_attention"]],
    ),
    (
        "self_attention+2d+zero-text+start-first+swept",
        "self_attention",
        [
            "--image-positions",
            "2d",
            "--text-init",
            "zero",
            "--start-token-first",
            "on",
            *claims.SWEPT["self_attention"],
        ],
    ),
    (
        "self_attention+2d+fixed-scale+lora8+swept+8ep",
        "self_attention",
        ["--image-positions", "2d", "--image-scale", "fixed", "--lora", "8", *claims.SWEPT["self_attention"]]
        + ["--epochs", "8"],
    ),
    (
        "explained+context+2d+sharp+9ep",
        "explained",
        ["--queries", "context", "--image-positions", "2d", "--sharp-attention", "on", "--epochs", "9"],
    ),
    (
        "explained+context+2d+sharp+swept",
        "explained",
        ["--queries", "context", "--image-positions", "2d", "--sharp-attention", "on", *claims.SWEPT["explained"]],
    ),
]
GRIDS = {"direction": DIRECTION, "claims": claims.GRID}


def run_dir(name, variant, options, seed):
    if not options:
        return Path("runs/compare") / f"{variant}-seed{seed}"
    return Path("runs/study") / f"{name}-seed{seed}"


def result_path(name, seed):
    return STUDY / f"{name}-seed{seed}.json"


def per_image_columns(run, split):
    return {k: compare.per_image(run, split, k) for k in FIGURES}


def first_train_loss(run):
    first = compare.read_jsonl(run / "metrics.jsonl")[0]
    return first.get("train_loss")


def record(name, variant, options, seed, run, wall_s=None):
    """The committed figures of one finished, evaluated run."""
    evaluation = compare.evaluated(run, "test")
    result = {
        "name": name,
        "variant": variant,
        "options": options,
        "seed": seed,
        "config": json.loads((run / "config.json").read_text()),
        "summary": json.loads((run / "summary.json").read_text()),
        "split_id": evaluation["split_id"],
        "figures": {k: evaluation["skills"][k]["accuracy"] for k in FIGURES},
        "test": per_image_columns(run, "test"),
        "first_train_loss": first_train_loss(run),
        "wall_s": wall_s,
    }
    if name in claims.DECODED:
        result["decoding"] = claims.decoding_record(run, seed)
    if (run / "predictions_compositional.jsonl").is_file():
        result["compositional"] = per_image_columns(run, "compositional")
    for key in ("data_dir", "vision", "language", "config_file"):  # machine-specific paths
        result["config"].pop(key, None)
    STUDY.mkdir(parents=True, exist_ok=True)
    path = result_path(name, seed)  # written whole and renamed: an interrupted write leaves no half file
    path.with_suffix(".tmp").write_text(json.dumps(result) + "\n")
    path.with_suffix(".tmp").replace(path)
    return result


RESULT_KEYS = ("name", "variant", "seed", "split_id", "summary", "figures", "test")


def read_result(path):
    """A committed result, checked: one that is not JSON, or lacks what the reports read (a result
    of an older version), is refused in one line rather than read in part or counted as done."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {path}: not a readable result ({e}); delete it to run that run again") from None
    missing = [k for k in RESULT_KEYS if not isinstance(result, dict) or k not in result]
    if missing:
        raise SystemExit(f"error: {path}: no {', '.join(missing)} (an older result?); delete it to run that run again")
    return result


def run_grid(grid, seeds, only, log):
    selected = [(n, v, o, s) for s in range(seeds) for n, v, o in grid if (not only or n in only)]
    todo = [t for t in selected if not (result_path(t[0], t[3]).is_file() and read_result(result_path(t[0], t[3])))]
    print(f"{len(todo)} runs to do ({len(selected) - len(todo)} done before)")
    for name, variant, options, seed in tqdm(todo, desc="study", unit="run", disable=None):
        t0 = time.time()
        run = compare.train_or_reuse(variant, run_dir(name, variant, options, seed), ["--seed", str(seed), *options])
        result = record(name, variant, options, seed, run, time.time() - t0)
        line = f"{name} seed {seed}: " + ", ".join(
            f"{k} {v:.3f}" for k, v in result["figures"].items() if v is not None
        )
        print(line, flush=True)
        with open(log, "a") as f:
            f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line} ({time.time() - t0:.0f}s)\n")


# -----------------------------------------------------------------------------
# the report


def committed(grid):
    """{configuration: [its results by seed]}, every one scored on one test set."""
    out, split_of = {}, {}
    for name, _, _ in grid:
        found = sorted(STUDY.glob(f"{name}-seed*.json"), key=lambda p: int(p.stem.rsplit("seed", 1)[1]))
        out[name] = [read_result(p) for p in found]
        split_of |= {p: r["split_id"] for p, r in zip(found, out[name])}
    if len(set(split_of.values())) > 1:
        first = next(iter(split_of.values()))
        other = next(p for p, s in split_of.items() if s != first)
        raise SystemExit(f"error: {other}: scored on another test set ({split_of[other]}) than the rest ({first})")
    return out


def columns(results, split, key):
    return stats.floats([r[split][key] for r in results if split in r])


def direction_report(grid):
    results = committed(grid)
    lines = [
        "# Where direction is lost, and what brings it back",
        "",
        "Produced by `python study.py --grid direction --report` from the runs in `docs/study/` (each trained "
        "by `python study.py --grid direction`: the demo's 5 epochs unless the name says otherwise: `+9ep` for "
        "`--epochs 9`, `+swept` for the sweep's lr, warmup and weight decay (`docs/sweeps/<variant>-best.json`), "
        "`+lora8` for `--lora 8`; seeds as listed). Each cell is the mean over "
        "seeds with its 95% t interval; the difference is against the variant's default configuration on the same "
        "test images (stats.paired_difference: seeds as the unit plus the images' variance). `direction_both_ways` "
        f"is {skills.DIRECTION_CHANCE} for any captioner that does not read the direction and "
        f"{skills.DIRECTION_CEILING} for a perfect one; `flip_consistency` is 0 for a caption that ignores the mirror.",
        "",
        "| configuration | seeds | objects | direction | direction_both_ways | flip | direction (compositional) "
        "| both ways vs default | train TFLOP |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    default = {v: results.get(v, []) for v in LABELS}
    for name, variant, options in grid:
        rs = results[name]
        if not rs:
            lines.append(f"| {name} | 0 | not run yet | | | | | | |")
            continue
        cell = lambda key, split="test": compare.interval(stats.mean_interval(np.nanmean(columns(rs, split, key), 1)))
        base = default[variant]
        if options and base:
            d = stats.paired_difference(
                columns(rs, "test", "direction_both_ways"), columns(base, "test", "direction_both_ways")
            )
            versus = stats.verdict(d, name, variant)
        else:
            versus = "(the default)"
        tflops = np.mean([r["summary"]["train_flops"] for r in rs]) / 1e12
        comp = cell("direction", "compositional") if all("compositional" in r for r in rs) else "n/a"
        lines.append(
            f"| {name} | {len(rs)} | {cell('objects')} | {cell('direction')} | {cell('direction_both_ways')} "
            f"| {cell('flip_consistency')} | {comp} | {versus} | {tflops:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", choices=sorted(GRIDS), default="direction")
    p.add_argument("--seeds", type=positive_int, default=3)
    p.add_argument("--only", nargs="+", metavar="NAME", help="only these configurations")
    p.add_argument("--report", action="store_true", help="rebuild the report from docs/study/ only")
    args = p.parse_args(argv)
    grid = GRIDS[args.grid]
    unknown = sorted(set(args.only or []) - {n for n, _, _ in grid})
    if unknown:
        raise SystemExit(f"error: not configurations of the {args.grid} grid: {', '.join(unknown)}")
    if not args.report:
        try:
            run_grid(grid, args.seeds, args.only, Path("runs") / f"study-{args.grid}.log")
        except (ValueError, OSError) as e:
            raise SystemExit(f"error: {e}") from None
    if args.grid == "claims":
        results = committed(grid)
        wall = sum(r.get("wall_s") or 0 for rs in results.values() for r in rs)
        report, out = claims.report(results, committed(DIRECTION), wall), Path("docs/claims.md")
    else:
        report, out = direction_report(grid), Path("docs/direction.md")
    out.write_text(report)
    print(report)


if __name__ == "__main__":
    sys.exit(main())
