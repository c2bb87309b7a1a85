"""
The claims study: the seed analysis's claims (../shared/seed/) and two design questions, each an
experiment of study.py's claims grid, and docs/claims.md built from the committed runs.

Every run starts from its variant's swept settings (docs/sweeps/<variant>-best.json) on a shorter
schedule than the demo's (EPOCHS), the same for both arms of every comparison. An effect is a
difference against the variant's baseline on the same seeds: per run (Welch over seeds:
stats.seed_difference) for the final val loss and the costs, per image and seed
(stats.paired_difference) for objects accuracy. A verdict follows from the interval alone:
supported when it excludes zero on the side the claim says, contradicted when it excludes zero on
the other side, not shown otherwise (with the smallest effect the experiment could have shown).
"""

import math
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import data
import decoding
import evaluate
import skills
import stats
from runs import LABELS, load_run

EPOCHS = 2  # the sweeps' trial budget, at which the swept settings were chosen
HIGH_LR = 0.02  # about 4x both swept learning rates: where an unstable setting should show it
TOP_K = 50
SWEPT = {v: ["--config", f"docs/sweeps/{v}-best.json"] for v in LABELS}
BASE = {v: [*SWEPT[v], "--epochs", str(EPOCHS)] for v in LABELS}
SHORT = {"explained": "c.ca", "self_attention": "c.sa"}  # names of the configurations: c.<variant>+<change>

# what each claim switches, per variant: (change name, options added to the baseline's)
BOTH = [
    ("lora8", ["--lora", "8", "--train-layers", "0"]),
    ("whole-lm", ["--train-layers", "4"]),
    ("no-lm", ["--train-layers", "0"]),
    ("no-modality", ["--modality", "none"]),
    ("zero-text", ["--text-init", "zero"]),
    ("vision-2", ["--vision-layer", "-2"]),
    ("high-lr", ["--lr", str(HIGH_LR)]),
    ("no-clip+high-lr", ["--grad-clip", "0", "--lr", str(HIGH_LR)]),
]
CHANGES = {
    "explained": BOTH
    + [
        ("no-fusion-norm", ["--fusion-norm", "none"]),
        ("no-fusion-norm+high-lr", ["--fusion-norm", "none", "--lr", str(HIGH_LR)]),
    ],
    "self_attention": BOTH
    + [("no-positions", ["--positions", "none"]), ("start-first", ["--start-token-first", "on"])],
}


def name(variant, change=None):
    return SHORT[variant] + (f"+{change}" if change else "")


# the grid, baselines first so that every comparison has its reference early
GRID = [(name(v), v, BASE[v]) for v in LABELS] + [
    (name(v, change), v, [*BASE[v], *options]) for v in LABELS for change, options in CHANGES[v]
]
DECODED = {name(v) for v in LABELS}  # the runs claims 7 and 8 caption again


# -----------------------------------------------------------------------------
# decoding and captioning cost (claims 7 and 8), measured on a finished run


def decoding_record(run, seed):
    """Top-k captions of the test images beside the greedy ones, and greedy captioning's cost."""
    model, processor, tokenizer, config = load_run(run)
    records = data.splits_for(config, strict=False)["test"]
    images = [r.image for r in records]
    scenes = [r.meta for r in records]
    length = config["max_caption_tokens"] + 1
    with FlopCounterMode(display=False) as counter:
        decoding.caption_images(model, processor, tokenizer, images[:64], max_new_tokens=length)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    greedy = decoding.caption_images(model, processor, tokenizer, images, max_new_tokens=length)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    generator = torch.Generator().manual_seed(seed)
    top_k = decoding.caption_images(
        model, processor, tokenizer, images, strategy="top-k", top_k=TOP_K, generator=generator, max_new_tokens=length
    )
    out = {"caption_flops": counter.get_total_flops() / 64, "caption_cpu_s": cpu / len(images)}
    out["caption_s"] = wall / len(images)
    for strategy, captions in (("greedy", greedy), ("top-k", top_k)):
        columns = skills.per_image_skills(captions, scenes)
        predictions = [{"caption": c, "references": r.captions} for c, r in zip(captions, records)]
        metrics = evaluate.caption_metrics(predictions)
        out[strategy] = {
            "objects": columns["objects"],
            "direction": columns["direction"],
            "exact_match": [float(p["caption"] in p["references"]) for p in predictions],
            "CIDEr": metrics["CIDEr"],
            "BLEU-4": metrics["BLEU-4"],
        }
    return out


# -----------------------------------------------------------------------------
# the figures of one run


def val_loss(r):
    loss = r["summary"].get("final_val_loss")
    return loss if loss is not None and math.isfinite(loss) else float("nan")


def diverged(r):
    """A run that hit a non-finite step, or ended with no finite val loss or above its first logged
    training loss (a run that learned nothing or blew up), counts as diverged."""
    s = r["summary"]
    loss = val_loss(r)
    return bool(s.get("skipped_steps")) or not math.isfinite(loss) or loss > r.get("first_train_loss", math.inf)


def per_run(results, key):
    return np.array([key(r) for r in results], dtype=float)


# -----------------------------------------------------------------------------
# effects and verdicts


def verdict(d, claim_sign, lower_is_better=False):
    """supported / contradicted / not shown, from where the interval of (arm - baseline) lies.
    claim_sign: +1 when the claim says the arm is better than the baseline, -1 when worse."""
    if d.low is None:  # diverged runs have no loss: fewer than 2 left in an arm
        return f"not shown (no interval: {d.seeds[0]} and {d.seeds[1]} runs with a value)"
    if d.n_images is not None and d.n_images < stats.MIN_IMAGES:
        return f"not shown (too few images: {d.n_images} < {stats.MIN_IMAGES})"
    if not d.excludes_zero:
        could = "" if d.detectable is None else f" (could have shown about {d.detectable:.3g})"
        return "not shown" + could
    better = (d.diff < 0) if lower_is_better else (d.diff > 0)
    return "supported" if better == (claim_sign > 0) else "contradicted"


def effect_cell(d):
    if d.diff is None:
        return "no value"
    if d.low is None:
        return f"{d.diff:+.3g} (no interval)"
    return f"{d.diff:+.3g} [{d.low:.3g}, {d.high:.3g}]"


def loss_effect(arm, base):
    return stats.seed_difference(per_run(arm, val_loss), per_run(base, val_loss))


def objects_effect(arm, base):
    return stats.paired_difference(
        stats.floats([r["test"]["objects"] for r in arm]), stats.floats([r["test"]["objects"] for r in base])
    )


def not_run(item, experiment, arm, base, published):
    return f"| {item} | {experiment} | not run yet ({len(arm)} and {len(base)} seeds) | | | {published} |"


def comparison_row(item, experiment, arm, base, claim_sign, published=""):
    """A claim's row: the val loss effect decides, objects accuracy is shown beside it."""
    if len(arm) < 2 or len(base) < 2:
        return not_run(item, experiment, arm, base, published)
    loss = loss_effect(arm, base)
    objects = objects_effect(arm, base)
    return (
        f"| {item} | {experiment} ({len(arm)} vs {len(base)} seeds) | {effect_cell(loss)} "
        f"| {effect_cell(objects)} | {verdict(loss, claim_sign, lower_is_better=True)} | {published} |"
    )


def stability_row(item, experiment, arm, base, published=""):
    """A stability claim: diverged runs in each arm at the high learning rate, and the val loss there."""
    if len(arm) < 2 or len(base) < 2:
        return not_run(item, experiment, arm, base, published)
    loss = loss_effect(arm, base)
    counts = f"diverged {sum(map(diverged, arm))}/{len(arm)} vs {sum(map(diverged, base))}/{len(base)}"
    return (
        f"| {item} | {experiment} | {effect_cell(loss)} | {counts} "
        f"| {verdict(loss, -1, lower_is_better=True)} | {published} |"
    )


def question_row(item, experiment, arm, base, arm_name, base_name, published=""):
    """A design question, not a claim: which of the two is better, or no difference detected."""
    if len(arm) < 2 or len(base) < 2:
        return not_run(item, experiment, arm, base, published)
    loss = loss_effect(arm, base)
    return (
        f"| {item} | {experiment} ({len(arm)} vs {len(base)} seeds) | {effect_cell(loss)} "
        f"| {effect_cell(objects_effect(arm, base))} "
        f"| {stats.verdict(loss, arm_name, base_name, lower_is_better=True)} "
        f"| {published} |"
    )


def by_seed(results):
    return {r["seed"]: r for r in results}


def interaction(arms, bases):
    """(effect in self-attention) - (effect in cross-attention) of one change on the val loss, the
    effect taken seed by seed (a run against its baseline of the same seed) and Welch over seeds."""
    effects = {}
    for v in LABELS:
        arm, base = by_seed(arms[v]), by_seed(bases[v])
        effects[v] = [val_loss(arm[s]) - val_loss(base[s]) for s in sorted(arm.keys() & base.keys())]
    return stats.seed_difference(effects["self_attention"], effects["explained"])


# -----------------------------------------------------------------------------
# the report

PUBLISHED = {
    1: "Idefics2: cross-attention ahead with frozen backbones, fully autoregressive ahead once they train "
    "(LoRA); MM1: the connector's design of negligible importance next to the encoder and image tokens",
    2: "",
    3: "",
    5: "Idefics2: LoRA on the LM is what lets the fully autoregressive design win; full fine-tuning diverged",
    7: "",
    10: "LLaVA-1.5 reads the penultimate CLIP layer; 'Rethinking Visual Layer Selection' (2025): middle "
    "layers beat the last on positions and counting",
    "direction": "What'sUp, VSR: CLIP-based models near chance on left/right; 'Beyond Semantics' (2025): "
    "image read as a bag of tokens; Li, Koh & Du (2025): the information is in the encoder, the route decides",
}


def claim_one(results):
    """Claim 1: the fusion effect (self-attention - cross-attention) at each training regime, and
    the methodology effects (each regime against the last 2 layers, within a variant)."""
    regimes = [(None, "last 2 LM layers"), ("lora8", "LoRA rank 8 on every LM layer"), ("whole-lm", "whole LM")]
    rows, fusion, methodology = [], [], []
    for change, label in regimes:
        sa, ca = results.get(name("self_attention", change), []), results.get(name("explained", change), [])
        if len(sa) < 2 or len(ca) < 2:
            rows.append(f"| 1 | fusion at {label}: self-attention vs cross-attention | not run yet | | | |")
            continue
        d = loss_effect(sa, ca)
        fusion.append(d)
        rows.append(
            f"| 1 | fusion at {label}: self-attention vs cross-attention ({len(sa)} vs {len(ca)} seeds) "
            f"| {effect_cell(d)} | {effect_cell(objects_effect(sa, ca))} "
            f"| {stats.verdict(d, 'self-attention', 'cross-attention', lower_is_better=True)} "
            f"| {PUBLISHED[1] if change is None else ''} |"
        )
        if change is not None:
            for v in LABELS:
                arm, base = results.get(name(v, change), []), results.get(name(v), [])
                if len(arm) >= 2 and len(base) >= 2:
                    methodology.append(loss_effect(arm, base))
    largest_method = max((abs(d.diff) for d in methodology if d.excludes_zero), default=None)
    if len(fusion) < len(regimes) or largest_method is None:
        summary = "not shown: " + (
            "not every regime has run" if len(fusion) < len(regimes) else "no regime effect detected"
        )
    elif any(d.low is None for d in fusion):
        summary = "not shown: a fusion difference has no interval (fewer than 2 runs with a value)"
    elif all(max(abs(d.low), abs(d.high)) < largest_method for d in fusion):
        summary = (
            f"supported: every fusion difference, to its interval's far end, is below the largest regime "
            f"effect ({largest_method:.3g} in val loss)"
        )
    elif any(d.excludes_zero and min(abs(d.low), abs(d.high)) > largest_method for d in fusion):
        summary = "contradicted: a fusion difference exceeds every regime effect, to its interval's near end"
    else:
        summary = f"not shown: the fusion intervals reach past the largest regime effect ({largest_method:.3g})"
    winners = {("self-attention" if d.diff < 0 else "cross-attention") for d in fusion if d.excludes_zero}
    changes = "the winner changes with the regime" if len(winners) > 1 else "no change of winner detected"
    rows.append(f"| 1 | fusion against training methodology | | | {summary}; {changes} | |")
    return rows


def cost_rows(results):
    """Claim 8: self-attention against cross-attention per training step and per caption."""
    sa, ca = results.get(name("self_attention"), []), results.get(name("explained"), [])
    if len(sa) < 2 or len(ca) < 2 or not all("decoding" in r for r in sa + ca):
        return ["| 8 | cost per step and per caption | not run yet | | | |"]
    measures = [
        ("training FLOPs per step (counted)", lambda r: r["summary"]["train_flops"] / r["summary"]["steps"]),
        ("training CPU s per step", lambda r: r["summary"]["cpu_s_per_step"]),
        ("greedy caption FLOPs (counted)", lambda r: r["decoding"]["caption_flops"]),
        ("greedy caption CPU s", lambda r: r["decoding"]["caption_cpu_s"]),
    ]
    rows = []
    for label, key in measures:
        a, b = per_run(sa, key), per_run(ca, key)
        d = stats.seed_difference(a, b)
        ratio = a.mean() / b.mean()
        rows.append(
            f"| 8 | {label}: self-attention vs cross-attention | {effect_cell(d)} (x{ratio:.2f}) | "
            f"| {verdict(d, +1, lower_is_better=True)} | |"
        )
    return rows


def decoding_rows(results):
    """Claim 7: top-k (k=50) against greedy captions of the same runs."""
    rows = []
    for v in LABELS:
        runs = [r for r in results.get(name(v), []) if "decoding" in r]
        if len(runs) < 2:
            rows.append(f"| 7 | top-k vs greedy, {LABELS[v]} | not run yet | | | |")
            continue
        cider = stats.seed_difference(
            [r["decoding"]["top-k"]["CIDEr"] for r in runs], [r["decoding"]["greedy"]["CIDEr"] for r in runs]
        )
        objects = stats.paired_difference(
            stats.floats([r["decoding"]["top-k"]["objects"] for r in runs]),
            stats.floats([r["decoding"]["greedy"]["objects"] for r in runs]),
        )
        rows.append(
            f"| 7 | top-k (k={TOP_K}) vs greedy, {LABELS[v]}: CIDEr ({len(runs)} runs) | {effect_cell(cider)} "
            f"| {effect_cell(objects)} | {verdict(cider, +1)} | |"
        )
    return rows


def direction_rows(direction):
    """The direction grid's findings (study.py --grid direction, the demo's own schedule)."""
    pairs = [
        (
            "explained+context+2d+sharp+9ep",
            "explained",
            "cross-attention: context queries + 2D positions + sharp attention, 9 epochs",
        ),
        ("explained+2d+sharp", "explained", "cross-attention with the seed's context-free queries (+2D, sharp)"),
        ("self_attention+2d+lora8+swept", "self_attention", "self-attention: 2D positions, LoRA 8, swept lr"),
        ("self_attention+2d+all-layers", "self_attention", "self-attention: 2D positions, whole LM"),
    ]
    rows = []
    for arm_name, base_name, label in pairs:
        arm, base = direction.get(arm_name, []), direction.get(base_name, [])
        if len(arm) < 2 or len(base) < 2:
            rows.append(f"| direction | {label} | not run yet | | | |")
            continue
        column = lambda rs: stats.floats([r["test"]["direction_both_ways"] for r in rs])
        d = stats.paired_difference(column(arm), column(base))
        mean = np.nanmean(column(arm))
        rows.append(
            f"| direction | {label}, against the default ({len(arm)} seeds) | {effect_cell(d)} "
            f"(both ways {mean:.3f}; chance {skills.DIRECTION_CHANCE}) | | {verdict(d, +1)} "
            f"| {PUBLISHED['direction'] if not rows else ''} |"
        )
    return rows


def report(results, direction, wall_s=None):
    """docs/claims.md from the committed results: {configuration name: [result per seed]}."""
    get = lambda v, change=None: results.get(name(v, change), [])
    rows = claim_one(results)
    rows.append(
        comparison_row(
            "2",
            "cross-attention without the fusion LayerNorm",
            get("explained", "no-fusion-norm"),
            get("explained"),
            -1,
        )
    )
    rows.append(
        stability_row(
            "2",
            f"the same at lr {HIGH_LR}: val loss, and diverged runs",
            get("explained", "no-fusion-norm+high-lr"),
            get("explained", "high-lr"),
        )
    )
    for v in LABELS:
        rows.append(comparison_row("3", f"{LABELS[v]} without modality embeddings", get(v, "no-modality"), get(v), -1))
    arms = {v: get(v, "no-modality") for v in LABELS}
    bases = {v: get(v) for v in LABELS}
    if all(len(arms[v]) >= 2 and len(bases[v]) >= 2 for v in LABELS):
        d = interaction(arms, bases)
        rows.append(
            f"| 3 | the loss modality embeddings save: self-attention's minus cross-attention's | {effect_cell(d)} "
            f"| | {verdict(d, +1)} | |"
        )
    rows.append(
        comparison_row(
            "4",
            "self-attention without learned positions",
            get("self_attention", "no-positions"),
            get("self_attention"),
            -1,
        )
    )
    for v in LABELS:
        for change, label in (("no-lm", "no LM layer"), ("whole-lm", "the whole LM"), ("lora8", "LoRA on every layer")):
            rows.append(
                comparison_row(
                    "5",
                    f"{LABELS[v]}: {label} instead of the last 2",
                    get(v, change),
                    get(v),
                    -1,
                    PUBLISHED[5] if change == "lora8" else "",
                )
            )
    for v in LABELS:  # tested at the high lr only, where instability could show (the grid's budget)
        rows.append(
            stability_row(
                "6",
                f"{LABELS[v]} without gradient clipping, at lr {HIGH_LR}: val loss, and diverged runs",
                get(v, "no-clip+high-lr"),
                get(v, "high-lr"),
            )
        )
    rows += decoding_rows(results)
    rows += cost_rows(results)
    for v in LABELS:
        rows.append(
            question_row(
                "9",
                f"{LABELS[v]}: text-side additions zero-initialised",
                get(v, "zero-text"),
                get(v),
                "zero-init",
                "token-scale init",
            )
        )
    rows.append(
        question_row(
            "10",
            "self-attention: start token before the image",
            get("self_attention", "start-first"),
            get("self_attention"),
            "start first",
            "image first",
        )
    )
    for v in LABELS:
        rows.append(
            question_row(
                "10",
                f"{LABELS[v]}: penultimate vision layer",
                get(v, "vision-2"),
                get(v),
                "layer -2",
                "last layer",
                PUBLISHED[10] if v == "explained" else "",
            )
        )
    rows += direction_rows(direction)
    runs = sum(len(rs) for rs in results.values())
    timing = (
        f"; the grid's {runs} runs took {wall_s / 3600:.1f} h of training and evaluation on 2 cores" if wall_s else ""
    )
    head = [
        "# The claims study",
        "",
        "Produced by `python study.py --grid claims` (rebuilt from `docs/study/` by `python study.py --grid claims "
        f"--report`). Every run: the variant's swept settings (`docs/sweeps/<variant>-best.json`), {EPOCHS} epochs of "
        f"the demo's data (the sweeps' trial budget; the demo trains 5), seeds 0-2{timing}. "
        "Effects are arm minus baseline on the same seeds: val loss (lower is better) per run with Welch's t over "
        "the seeds, objects accuracy per image and seed (`stats.paired_difference`). A verdict follows from the "
        "interval alone: supported when it excludes zero on the side the claim says, contradicted when it excludes "
        "zero on the other side, not shown otherwise, with the smallest effect the experiment could have shown "
        "(80% power). A run counts as diverged when it had a non-finite step or ended with its val loss above its "
        "first logged training loss.",
        "",
        "| item | experiment | effect [95% CI]: val loss unless the row says | objects accuracy [95% CI] "
        "| verdict | published |",
        "|---|---|---|---|---|---|",
    ]
    return "\n".join(head + rows) + "\n"
