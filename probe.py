"""
Linear probes: what each stage of a trained run encodes about a pair's spatial relation.

    python probe.py --run RUN_DIR [--images 1200] [--out RUN_DIR/probe]

On pairs of the shapes data, each image is run through the model with its first
reference caption ("a small red circle to the left of a large blue square"),
and a logistic regression (scikit-learn) is fitted on 70% of the images and
scored on the other 30% at each stage:

  vision (patch of A)    the frozen CLIP features of the patch under the first object's centre
  adapter (patch of A)   the adapted image token there (2D positions included, when switched on)
  LM input / fusion      Qwen's inputs_embeds at the position that predicts the relation word
                         (after "... red circle"): the fusion output of the cross-attention
                         variant, the token + position embedding of the self-attention one
  LM layer k             Qwen's hidden state there after decoder layer k
  ... at the direction word  the same at the token that predicts the direction word ("the" in
                         "to the left of"; the same token as above for "above" and "below")

Targets: the relation's axis (left/right or above/below), its direction (the
relation of the first object to the second, 4 classes: a probe that knows the
axis but not the direction scores about 0.5), its side (the direction within
its axis, left or above against right or below: chance 0.5), and the grid row
and column of the patch (patch stages) or of each object (text-position stages).
A stage that holds a target lets a linear read-out recover it: where the
direction's accuracy falls to chance between two stages, that is where it is
lost. Writes probe.json, probe.md and probe.png.
"""

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import transformers
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

import data
import shapes
from decoding import positive_int
from runs import LABELS, RunError, load_run
from skills import HORIZONTAL


def cell(o, grid):
    """(row, column) of the patch under an object's centre."""
    return min(int(o["y"] / shapes.CANVAS * grid), grid - 1), min(int(o["x"] / shapes.CANVAS * grid), grid - 1)


def targets(scene, grid):
    a, b = scene["objects"]
    (ra, ca), (rb, cb) = cell(a, grid), cell(b, grid)
    relation = scene["relation"]
    axis = "horizontal" if relation in HORIZONTAL else "vertical"
    side = relation in ("to the left of", "above")  # the direction within its axis: chance 0.5 once the axis is known
    return {"axis": axis, "direction": relation, "side": side, "row A": ra, "column A": ca, "row B": rb, "column B": cb}


@torch.no_grad()
def stages(model, processor, tokenizer, records, batch_size=64):
    """({stage: [n, D] features}, [targets per image]) over the pair records."""
    grid = int(model.n_patches() ** 0.5)
    found, truth = {}, []
    for k in range(0, len(records), batch_size):
        batch = records[k : k + batch_size]
        pixels = processor(images=[data.read_image(r.image) for r in batch], return_tensors="pt")["pixel_values"]
        features = model.image_features(pixels)
        image = model.image_tokens(features=features)
        state = model.encode_images(features=features)
        captions = [shapes.describe(r.meta)[0] for r in batch]
        prefixes = [shapes.phrase(r.meta["objects"][0]) for r in batch]
        # "to the left of" is decided at "the", two tokens after the object: the model may wait until then
        before_word = [
            p + (" to the" if r.meta["relation"].startswith("to the") else "") for p, r in zip(prefixes, batch)
        ]
        ids = [[tokenizer.eos_token_id] + tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions]
        lengths, word_lengths = (
            [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in texts]
            for texts in (prefixes, before_word)
        )
        if any(
            x[1 : n + 1] != tokenizer(p, add_special_tokens=False)["input_ids"]
            for texts, counts in ((prefixes, lengths), (before_word, word_lengths))
            for x, n, p in zip(ids, counts, texts)
        ):
            raise RunError("the tokenizer splits a caption's first words differently inside the caption")
        width = max(map(len, ids))
        padded = torch.tensor([x + [tokenizer.eos_token_id] * (width - len(x)) for x in ids])
        embeds = model.embed(state, padded, 0)
        hidden = model.lm.model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        P = model.prefix_len(state)
        rows = torch.arange(len(batch))
        at = torch.tensor(lengths) + P  # the last token of "a small red circle": it predicts "to"/"above"
        at_word = torch.tensor(word_lengths) + P  # the token that predicts "left"/"right"/"above"/"below"
        patch_a = torch.tensor(
            [cell(r.meta["objects"][0], grid)[0] * grid + cell(r.meta["objects"][0], grid)[1] for r in batch]
        )
        named = {
            "vision (patch of A)": features[rows, patch_a],
            "adapter (patch of A)": image[rows, patch_a],
            **{("LM input" if j == 0 else f"LM layer {j}"): h[rows, at] for j, h in enumerate(hidden)},
            **{f"LM layer {j} at the direction word": h[rows, at_word] for j, h in enumerate(hidden) if j},
        }
        for name, x in named.items():
            found.setdefault(name, []).append(x.float().numpy())
        truth += [targets(r.meta, grid) for r in batch]
    return {name: np.concatenate(xs) for name, xs in found.items()}, truth


def probe(x, y, seed=0):
    """(held-out accuracy, chance, n_train, n_test) of a logistic regression from x to y; None
    when y has one class (nothing to tell apart). The split keeps the classes' shares, unless a
    class is too rare for both parts (a grid row one image falls in, on a fine patch grid)."""
    values, counts = np.unique(y, return_counts=True)
    if len(values) < 2:
        return None
    stratify = y if counts.min() >= 2 else None
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=stratify)
    if len(np.unique(y_train)) < 2:
        return None
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=1.0))
    model.fit(x_train, y_train)
    values, counts = np.unique(y_test, return_counts=True)
    return float(model.score(x_test, y_test)), float(counts.max() / counts.sum()), len(y_train), len(y_test)


def stage_targets(stage):
    if "patch" in stage:  # the patch's own place, and where the other object lies from it
        return {"axis": "axis", "direction": "direction", "side": "side", "row": "row A", "column": "column A"}
    return {k: k for k in ("axis", "direction", "side", "row A", "column A", "row B", "column B")}


def run_probes(found, truth):
    table = []
    for stage, x in found.items():
        for label, key in stage_targets(stage).items():
            y = np.array([t[key] for t in truth])
            result = probe(x, y)
            if result is None:
                continue
            accuracy, chance, n_train, n_test = result
            table.append(
                {
                    "stage": stage,
                    "target": label,
                    "accuracy": accuracy,
                    "chance": chance,
                    "train": n_train,
                    "test": n_test,
                }
            )
    return table


def write(table, title, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps({"title": title, "probes": table}, indent=2))
    lines = [
        f"# {title}",
        "",
        "| stage | target | held-out accuracy | chance | images (fit / held out) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['stage']} | {r['target']} | {r['accuracy']:.3f} | {r['chance']:.3f} | {r['train']} / {r['test']} |"
        for r in table
    ]
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    stages_in_order = list(dict.fromkeys(r["stage"] for r in table))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(stages_in_order)), 4.5))
    for target in dict.fromkeys(r["target"] for r in table):
        rows = [r for r in table if r["target"] == target]
        xs = [stages_in_order.index(r["stage"]) for r in rows]
        line = ax.plot(xs, [r["accuracy"] for r in rows], "o-", label=target)[0]
        ax.plot(xs, [r["chance"] for r in rows], ":", color=line.get_color(), alpha=0.6)
    ax.set_xticks(range(len(stages_in_order)), stages_in_order, rotation=30, ha="right")
    ax.set_ylabel("held-out accuracy (dotted: chance)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out / "probe.png", dpi=110)
    plt.close(fig)
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a trained run directory of either variant")
    p.add_argument("--images", type=positive_int, default=1200, help="pair images to probe (from the training split)")
    p.add_argument("--split", default="train")
    p.add_argument("--out", help="where to write (default RUN/probe)")
    args = p.parse_args(argv)
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
    try:
        model, processor, tokenizer, config = load_run(args.run)
        splits = data.splits_for(config, strict=False)
        if args.split not in splits:
            raise RunError(f"{config['data_dir']} has no split {args.split!r}")
        pairs = [r for r in splits[args.split] if r.meta.get("relation")][: args.images]
        if len(pairs) < 50:
            raise RunError(f"{args.run}: its data has {len(pairs)} pairs of shapes in {args.split}; probes need 50")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    model.eval()
    found, truth = stages(model, processor, tokenizer, pairs)
    title = f"Probes of {LABELS[config['variant']]} run {Path(args.run).name} on {len(pairs)} pairs"
    print(write(run_probes(found, truth), title, Path(args.out or Path(args.run) / "probe")))


if __name__ == "__main__":
    main()
