"""compare.py: every kind of row by value (columns, difference, interval, verdict) on runs with
known outcomes, the test-set refusal, a whole comparison of trained runs, and refusing a bad run
folder, missing data or a bad value in one line, before training or evaluating anything."""

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.stats

import compare
import skills
import stats
import train
from conftest import assert_refused, start_refusals, started_first
from runs import RunError

REFUSALS = {
    "missing run folders": (["--runs", "/no/a", "--vs", "/no/b"], "/no/a", False),
    "folders that are not runs": (["--runs", "{empty}", "--vs", "{empty}"], "{empty}", False),
    "missing data folder": (["--runs", "{explained}", "--vs", "{self_attention}"], "/no/such/dir", False),
    "no steps": (["--max-steps", "0"], "--max-steps", True),
}


@started_first
def compare_refusals(runs_without_data, duocap_cache, tmp_path_factory):
    cases = {case: (args + ["--out", "{out}"], named, usage) for case, (args, named, usage) in REFUSALS.items()}
    paths = dict(
        empty=tmp_path_factory.mktemp("not-a-run"), out=tmp_path_factory.mktemp("compare"), **runs_without_data
    )
    return start_refusals("compare.py", cases, duocap_cache, **paths)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_compare_refuses_a_bad_run_folder_missing_data_or_a_bad_value_in_one_line(compare_refusals, case):
    assert_refused(*compare_refusals[case])


def test_compare_of_finished_runs_reports_intervals_verdicts_and_equal_compute(trained_runs, tmp_path):
    first = {v: r for v, (r, _) in trained_runs.items()}
    out = tmp_path / "compare"
    compare.main(
        [
            "--runs",
            str(first["explained"]),
            "--vs",
            str(first["self_attention"]),
            "--out",
            str(out),
            "--attention-images",
            "4",
        ]
    )
    report = (out / "report.md").read_text()
    # (the 3-step runs name no object right, so direction and flip, which need that, apply to no image: left out)
    for name in ("objects", "objects_with_size", "objects (pair_one_colour)", "exact_match", "CIDEr", "train_tflops"):
        assert f"| {name} |" in report, name
    assert "| direction |" not in report
    assert "## At equal compute" in report and "No runs at equal FLOPs were given" in report
    assert "on the named object" in report and "selectivity" in report
    for picture in ("curves.png", "loss_curves.png", "samples.png", "attention.png"):
        assert (out / picture).stat().st_size > 10_000, picture
    # one seed a side on 8 test images: a difference, but no verdict, and the row says why
    row = next(line for line in report.splitlines() if line.startswith("| objects |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    accuracy = {v: float(c.split()[0]) for v, c in zip(compare.ORDER, cells[3:5])}
    assert cells[2] == "1 + 1" and int(cells[1]) > 0
    assert float(cells[5]) == pytest.approx(accuracy["explained"] - accuracy["self_attention"], abs=2e-3)
    assert cells[6] == f"too few images to compare ({cells[1]} < {stats.MIN_IMAGES})"


# -----------------------------------------------------------------------------
# every kind of row, by value, on runs written here with known per-image outcomes

N_PER_CATEGORY = 40
CATEGORIES = ("single", "pair_two_colours", "pair_one_colour")


def outcomes(rng, p_objects, p_direction, n=N_PER_CATEGORY * 3):
    """{skill: [per image]}, the images in CATEGORIES order: direction and its kin only on pairs
    whose objects were named right, as evaluate.py scores them."""
    category = [c for c in CATEGORIES for _ in range(N_PER_CATEGORY)]
    objects = (rng.random(n) < p_objects).astype(int)
    pair = np.array([c != "single" for c in category])
    scored = pair & (objects == 1)
    direction = np.where(scored, (rng.random(n) < p_direction).astype(int), -1)
    both_ways = np.where(scored & (rng.random(n) < 0.9), rng.integers(0, 3, n) / 2, -1)
    out = {k: [None] * n for k in skills.FIGURES}
    for k in range(n):
        out["objects"][k] = int(objects[k])
        if direction[k] >= 0:
            out["axis"][k] = 1
            out["direction"][k] = out["direction_given_axis"][k] = int(direction[k])
            out["flip_consistency"][k] = int(direction[k])
        if both_ways[k] >= 0:
            out["direction_both_ways"][k] = float(both_ways[k])
    out["category"] = category
    return out


def write_run(root, variant, seed, test, compositional, split_id="test-set-1", **summary):
    run = root / f"{variant}-{seed}"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"variant": variant}))
    for split, columns in (("test", test), ("compositional", compositional)):
        rows = [
            {
                "image": f"{split}-{k}.png",
                "caption": "a red circle" if k % 3 else "a blue square",
                "references": ["a red circle"],
                "skills": {key: columns[key][k] for key in (*skills.FIGURES, "category")},
            }
            for k in range(len(columns["objects"]))
        ]
        (run / f"predictions_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = {
        "split_id": split_id,
        "n_images": len(test["objects"]),
        "skills": {"direction_both_ways": {}},
        "blind_skills": {"objects": {"accuracy": 0.1}},
        "BLEU-4": summary.pop("bleu", 0.5),
        "METEOR": None,
        "ROUGE_L": 0.5,
        "CIDEr": 1.0,
    }
    (run / "eval_test.json").write_text(json.dumps(figures))
    (run / "summary.json").write_text(json.dumps({"final_val_loss": 1.0, "train_time_s": 10.0, **summary}))
    return run


@pytest.fixture(scope="module")
def known_runs(tmp_path_factory):
    """Three seeds a side with known outcomes, and the costlier variant at equal FLOPs."""
    root = tmp_path_factory.mktemp("known")
    rng = np.random.default_rng(0)
    # p(objects right) on test, p(direction right), p(objects right) on compositional, CPU s per step
    truth = {"explained": (0.9, 0.8, 0.8, 1.0), "self_attention": (0.7, 0.5, 0.95, 3.0)}
    runs, written = {}, {}
    for variant, (p_obj, p_dir, p_comp, cpu) in truth.items():
        for seed in range(3):
            test, comp = outcomes(rng, p_obj, p_dir), outcomes(rng, p_comp, 0.5)
            flops = 7e12 if variant == "explained" else 12.7e12
            run = write_run(
                root, variant, seed, test, comp, train_flops=flops, train_cpu_s=100 * cpu + seed, cpu_s_per_step=cpu
            )
            runs.setdefault(variant, []).append(run)
            written[run] = (test, comp)
    equal = []
    for seed in range(3):  # self-attention at the other's FLOPs: every object right, half the CPU time
        test, comp = outcomes(rng, 1.0, 0.5), outcomes(rng, 1.0, 0.5)
        run = write_run(root, "self_attention", f"flops-{seed}", test, comp, train_flops=7e12, train_cpu_s=150 + seed)
        equal.append(run)
        written[run] = (test, comp)
    evals = {r: json.loads((r / "eval_test.json").read_text()) for r in written}
    return runs, {"self_attention": equal}, evals, written


def column(written, runs, key, split=0, category=None):
    """[seeds, images] of the values written, None as NaN, only the category's images."""
    values = []
    for r in runs:
        columns = written[r][split]
        values.append([v if category in (None, c) else None for v, c in zip(columns[key], columns["category"])])
    return stats.floats(values)


def expected_row(written, groups, key, split=0, category=None):
    a, b = (column(written, groups[v], key, split, category) for v in compare.ORDER)
    keep = np.isfinite(a).all(0) & np.isfinite(b).all(0)  # every run of both has a value
    return a[:, keep].mean(1), b[:, keep].mean(1), stats.paired_difference(a, b)


def assert_row(row, expected):
    seeds_a, seeds_b, difference = expected
    assert row.means["explained"] == pytest.approx(stats.mean_interval(seeds_a))
    assert row.means["self_attention"] == pytest.approx(stats.mean_interval(seeds_b))
    # the difference is that of the columns: the same images in both
    assert row.diff.diff == pytest.approx(row.means["explained"][0] - row.means["self_attention"][0])
    assert (row.diff.diff, row.diff.low, row.diff.high) == pytest.approx(
        (difference.diff, difference.low, difference.high)
    )
    assert row.diff.n_images == difference.n_images and row.diff.seeds == (3, 3)


def test_every_per_image_row_by_value(known_runs):
    groups, _, evals, written = known_runs
    rows = {row.name: row for row in compare.table_rows(groups, evals, "test")}
    for key in ("objects", "direction", "direction_both_ways", "flip_consistency", "axis"):
        assert_row(rows[key], expected_row(written, groups, key))
    for category in CATEGORIES:
        for key in compare.CATEGORY_SKILLS:
            if category == "single" and key != "objects":
                assert rows[f"{key} ({category})"].diff.diff is None  # no single image has a direction
                continue
            assert_row(rows[f"{key} ({category})"], expected_row(written, groups, key, category=category))
    for key in compare.COMPOSITIONAL_SKILLS:
        assert_row(rows[f"{key} (compositional)"], expected_row(written, groups, key, split=1))
    assert compare.say(rows["objects (compositional)"]).startswith("self-attention ahead by")
    # cross-attention was drawn ahead on objects (0.9 against 0.7, 120 images, 3 seeds)
    assert compare.say(rows["objects"]).startswith("cross-attention ahead by")


def test_a_conditional_row_uses_the_images_both_variants_scored(known_runs):
    groups, _, evals, written = known_runs
    row = next(r for r in compare.table_rows(groups, evals, "test") if r.name == "direction")
    a = column(written, groups["explained"], "direction")
    b = column(written, groups["self_attention"], "direction")
    # each variant alone scores other images (it names other objects right) ...
    own = np.isfinite(a).all(0).sum(), np.isfinite(b).all(0).sum()
    assert row.diff.n_images < min(own)
    # ... and the columns are on the shared images, so that their difference is the row's
    keep = np.isfinite(a).all(0) & np.isfinite(b).all(0)
    assert row.means["explained"][0] == pytest.approx(a[:, keep].mean())
    assert row.means["explained"][0] != pytest.approx(np.nanmean(a, 1).mean(), abs=1e-3)  # its own images' mean
    assert row.diff.diff == pytest.approx(row.means["explained"][0] - row.means["self_attention"][0])


def test_costs_and_whole_run_figures_by_value_lower_is_better(known_runs):
    groups, _, evals, _ = known_runs
    rows = {row.name: row for row in compare.table_rows(groups, evals, "test")}
    cpu = rows["train_cpu_s"]
    assert cpu.lower_is_better and cpu.diff.n_images is None
    assert cpu.means["explained"] == pytest.approx(stats.mean_interval([100, 101, 102]))
    welch = scipy.stats.ttest_ind([100, 101, 102], [300, 301, 302], equal_var=False).confidence_interval(0.95)
    assert (cpu.diff.low, cpu.diff.high) == pytest.approx((welch.low, welch.high))
    # explained takes less CPU time: lower is better, so it is ahead
    assert compare.say(cpu).startswith("cross-attention ahead by 200")
    assert compare.say(rows["train_tflops"]).startswith("cross-attention ahead by 5.7")
    assert rows["BLEU-4"].means["explained"][0] == pytest.approx(0.5)


def test_equal_flops_rows_compare_the_budget_runs(known_runs):
    groups, equal, evals, written = known_runs
    matched, rows = compare.equal_flops_rows(groups, equal, evals, "test")
    assert matched["self_attention"] == equal["self_attention"] and matched["explained"] == groups["explained"]
    rows = {row.name: row for row in rows}
    assert rows["objects"].means["self_attention"][0] == pytest.approx(1.0)  # the budget runs' outcomes
    assert_row(rows["objects"], expected_row(written, matched, "objects"))
    assert_row(rows["direction"], expected_row(written, matched, "direction"))
    assert rows["train_tflops"].means["self_attention"][0] == pytest.approx(7.0)
    assert compare.say(rows["train_cpu_s"]).startswith("cross-attention ahead by 50")


def test_the_test_set_check_covers_every_run(known_runs):
    groups, equal, evals, _ = known_runs
    compare.same_test_set(evals)
    for run in [groups["explained"][2], groups["self_attention"][1], equal["self_attention"][2]]:
        changed = {r: dict(e, split_id="another-test-set" if r == run else e["split_id"]) for r, e in evals.items()}
        with pytest.raises(RunError, match="different test sets"):
            compare.same_test_set(changed)


def test_every_report_row_names_its_images_and_seeds(known_runs, tmp_path):
    groups, equal, evals, _ = known_runs
    rows = compare.table_rows(groups, evals, "test")
    report = compare.write_report(
        tmp_path,
        "python compare.py --runs ...",
        groups,
        rows,
        compare.equal_flops_rows(groups, equal, evals, "test"),
        {},
        {"perfect": 1.0, "blind to the direction": 0.5},
        compare.blind_control(groups, evals),
        "test",
        120,
    )
    table = [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| metric")]
    assert len(table) > 30
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1].isdigit() or cells[1] == "runs", line
        assert cells[2] == "3 + 3", line
    objects = next(line for line in table if line.startswith("| objects |"))
    assert "| 120 | 3 + 3 |" in objects
    assert "not compared" in report.lower() and "blind control" in report.lower()
    assert "exactly 0.5" in report and "could have detected" in report


def test_a_row_on_too_few_images_says_so(tmp_path):
    rng = np.random.default_rng(3)
    groups, evals = {}, {}
    for variant in compare.ORDER:
        for seed in range(3):
            test = outcomes(rng, 0.0, 0.5)  # no objects right, so no direction scored ...
            for k in range(N_PER_CATEGORY, N_PER_CATEGORY + 10):  # ... but on 10 pairs, in every run
                test["objects"][k], test["axis"][k], test["direction"][k] = 1, 1, int(rng.integers(2))
            run = write_run(tmp_path, variant, seed, test, test, train_flops=1.0, train_cpu_s=1.0)
            groups.setdefault(variant, []).append(run)
            evals[run] = json.loads((run / "eval_test.json").read_text())
    row = next(r for r in compare.table_rows(groups, evals, "test") if r.name == "direction")
    assert 0 < row.diff.n_images < stats.MIN_IMAGES
    assert compare.say(row).startswith("too few images")


def test_the_sample_plot_draws_a_caption_with_control_characters(splits, tmp_path):
    """A barely trained run writes control characters; the plot shows them as U+FFFD rather than
    warning about a glyph no font has."""
    image = str(splits["test"][0].image)
    predictions = {
        variant: [{"image": image, "caption": "a red\x1b circle\x10", "references": ["a red circle"]}]
        for variant in ("explained", "self_attention")
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare.plot_samples(predictions, tmp_path / "samples.png")
    assert (tmp_path / "samples.png").stat().st_size > 0
    assert compare.printable("a red\x1b circle") == "a red\ufffd circle"


def test_the_seed_0_runs_compare_trains_are_the_training_scripts_runs(monkeypatch, tmp_path):
    """`python compare.py --seeds 3` trains seed 0 of each variant with the options that
    `python 08_train_explained.py` and `python 10_train_self_attention.py` use (so the README's
    demo figures and compare's seed-0 runs are the same runs), and seed k with --seed k."""

    class Parsed(Exception):
        pass

    def capture(args, out):
        raise Parsed(args)

    train_seeds = compare.train_seeds
    monkeypatch.setattr(compare, "train_seeds", capture)
    with pytest.raises(Parsed) as parsed:
        compare.main(["--out", str(tmp_path / "compare")])
    args = parsed.value.args[0]

    trained = {}

    def fake_train(variant, argv):
        out = Path(argv[argv.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "summary.json").write_text(
            json.dumps({"train_flops": {"explained": 1.0, "self_attention": 2.0}[variant]})
        )
        trained[out.name] = (variant, [a for a in argv[argv.index("--out") + 2 :] if a != "--no-eval"])

    monkeypatch.setattr(compare.train, "main", fake_train)
    train_seeds(args, tmp_path / "runs")
    for variant in ("explained", "self_attention"):
        script = train.run_config(variant, train.parse_args(variant, []))
        for seed in range(3):
            got_variant, argv = trained[f"{variant}-seed{seed}"]
            assert got_variant == variant
            assert train.run_config(variant, train.parse_args(variant, argv)) == {**script, "seed": seed}


def reorder_predictions(run, split, order):
    path = run / f"predictions_{split}.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[i] for i in order))


def test_runs_whose_predictions_list_the_images_in_another_order_are_paired_image_by_image(known_runs, tmp_path):
    """A copy of the data whose splits.json lists the test images in another order: each image's
    values still meet those of the same image in the other runs."""
    groups, _, evals, _ = known_runs
    copies = {v: [tmp_path / r.name for r in runs] for v, runs in groups.items()}
    for runs, copied in zip(groups.values(), copies.values()):
        for r, c in zip(runs, copied):
            shutil.copytree(r, c)
    n = len(compare.read_jsonl(copies["self_attention"][0] / "predictions_test.jsonl"))
    reorder_predictions(copies["self_attention"][0], "test", list(reversed(range(n))))
    copied_evals = {tmp_path / r.name: e for r, e in evals.items()}
    before = {row.name: row for row in compare.table_rows(groups, evals, "test")}
    after = {row.name: row for row in compare.table_rows(copies, copied_evals, "test")}
    for key in ("objects", "direction", "direction_both_ways"):
        b, a = before[key].diff, after[key].diff
        assert (a.diff, a.low, a.high, a.n_images) == pytest.approx((b.diff, b.low, b.high, b.n_images)), key


def test_runs_scored_on_other_images_are_refused(known_runs, tmp_path):
    groups, _, evals, _ = known_runs
    other = tmp_path / groups["self_attention"][0].name
    shutil.copytree(groups["self_attention"][0], other)
    path = other / "predictions_test.jsonl"
    path.write_text(path.read_text().replace('"test-0.png"', '"elsewhere-0.png"'))
    moved = {**groups, "self_attention": [other, *groups["self_attention"][1:]]}
    with pytest.raises(RunError, match="different test images"):
        compare.image_row(moved, "test", "objects")


def test_a_run_given_twice_or_equal_flops_runs_of_the_cheaper_variant_are_refused(known_runs, tmp_path):
    groups, equal, _, _ = known_runs
    ca, sa = groups["explained"], groups["self_attention"]
    with pytest.raises(RunError, match="given more than once"):
        compare.given_runs([ca[0], ca[0], ca[1]], sa)
    with pytest.raises(RunError, match="given more than once"):
        compare.given_runs(ca, sa, equal_flops=sa)
    cheaper = [shutil.copytree(r, tmp_path / r.name) for r in ca]
    with pytest.raises(RunError, match="costlier variant \\(self_attention\\)"):
        compare.given_runs(ca, sa, equal_flops=cheaper)
    assert compare.given_runs(ca, sa, equal_flops=equal["self_attention"])[1] == {
        "self_attention": equal["self_attention"]
    }
