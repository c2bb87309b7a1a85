"""claims.py: the grid's configurations parse as the scripts' options, a verdict follows from its
interval, divergence is counted as it says, and docs/claims.md's rows hold the committed figures."""

import math

import numpy as np
import pytest

import claims
import stats
import train


def test_every_configuration_of_the_grid_parses_as_its_script_options():
    names = [n for n, _, _ in claims.GRID]
    assert len(names) == len(set(names))
    assert claims.DECODED <= set(names)
    for name, variant, options in claims.GRID:
        args = train.parse_args(variant, options)
        assert args.epochs == claims.EPOCHS, name
    lora = train.parse_args("explained", claims.GRID[names.index("c.ca+lora8")][2])
    assert (lora.lora, lora.train_layers) == (8, 0)


def difference(diff, low, high):
    return stats.Difference(diff, low, high, se=(high - low) / 4, df=4, n_images=None)


@pytest.mark.parametrize(
    "d, sign, lower, expected",
    [
        (difference(0.1, 0.05, 0.15), -1, True, "supported"),  # the arm's loss is higher: worse, as claimed
        (difference(0.1, 0.05, 0.15), +1, True, "contradicted"),
        (difference(0.1, 0.05, 0.15), +1, False, "supported"),
        (difference(-0.1, -0.15, -0.05), -1, False, "supported"),
    ],
)
def test_a_verdict_follows_from_the_side_of_zero_the_interval_lies_on(d, sign, lower, expected):
    assert claims.verdict(d, sign, lower_is_better=lower) == expected


def test_an_interval_that_covers_zero_is_not_shown_with_the_detectable_size():
    d = difference(0.01, -0.05, 0.07)
    assert claims.verdict(d, -1, lower_is_better=True) == f"not shown (could have shown about {d.detectable:.3g})"


def run(seed, loss, skipped=0, first=1.0):
    return {"seed": seed, "summary": {"final_val_loss": loss, "skipped_steps": skipped}, "first_train_loss": first}


def test_divergence_is_a_non_finite_step_a_non_finite_loss_or_ending_above_the_start():
    assert not claims.diverged(run(0, 0.4))
    assert claims.diverged(run(0, 0.4, skipped=3))
    assert claims.diverged(run(0, float("nan")))
    assert claims.diverged(run(0, 1.2, first=1.0))
    assert math.isnan(claims.val_loss(run(0, None)))


def fake(seed, loss, objects, rng, n=100):
    r = run(seed, loss)
    r["test"] = {"objects": [int(x) for x in rng.random(n) < objects]}
    r["summary"] |= {"train_flops": 1e12, "steps": 100, "cpu_s_per_step": 0.1 + 0.01 * seed}
    return r


@pytest.fixture
def results():
    rng = np.random.default_rng(0)
    out = {}
    for v, base in (("explained", 0.40), ("self_attention", 0.38)):
        out[claims.name(v)] = [fake(s, base + 0.001 * s, 0.9, rng) for s in range(3)]
        # without modality embeddings: self-attention loses much more than cross-attention
        hurt = 0.02 if v == "explained" else 0.10
        out[claims.name(v, "no-modality")] = [fake(s, base + hurt + 0.001 * s, 0.9, rng) for s in range(3)]
    out[claims.name("explained", "no-fusion-norm")] = [fake(s, 0.40 + 0.002 * s, 0.9, rng) for s in range(3)]
    return out


def rows_of(report):
    lines = [line for line in report.splitlines() if line.startswith("| ")][1:]  # the header's off
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_the_report_gives_each_claim_its_interval_and_verdict(results):
    rows = rows_of(claims.report(results, {}))
    by_experiment = {r[1].split(" (")[0]: r for r in rows}
    no_modality = by_experiment["self-attention without modality embeddings"]
    d = stats.seed_difference([0.48, 0.481, 0.482], [0.38, 0.381, 0.382])
    assert no_modality[2] == claims.effect_cell(d) and no_modality[4] == "supported"
    interaction = by_experiment["the loss modality embeddings save: self-attention's minus cross-attention's"]
    assert interaction[2].startswith("+0.08") and interaction[4] == "supported"
    norm = by_experiment["cross-attention without the fusion LayerNorm"]
    assert norm[4].startswith("not shown (could have shown about")
    assert "not run yet" in by_experiment["self-attention without learned positions"][2]


def test_an_arm_with_one_run_left_after_divergence_has_no_interval_and_no_verdict(results):
    """At the high learning rate runs diverge and have no val loss: with one left the row says
    so, instead of formatting an interval that cannot be made."""
    rng = np.random.default_rng(1)
    arm = [fake(0, 0.9, 0.5, rng), fake(1, float("nan"), 0.5, rng), fake(2, float("nan"), 0.5, rng)]
    row = claims.stability_row(6, "without clipping", arm, results[claims.name("explained")])
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].endswith("(no interval)") and cells[3] == "diverged 2/3 vs 0/3"
    assert cells[4] == "not shown (no interval: 1 and 3 runs with a value)"


def test_a_per_image_effect_on_too_few_images_is_not_shown():
    """direction_both_ways is scored on the pair images only: a tight interval on 8 of them is
    not a finding."""
    d = stats.Difference(0.5, 0.05, 0.95, se=0.2, df=10, n_images=8, seeds=(3, 3))
    assert claims.verdict(d, +1) == f"not shown (too few images: 8 < {stats.MIN_IMAGES})"
