"""compare.py refuses a bad run folder, missing data or a bad value in one line, before training or
evaluating anything."""

import json
import shutil

import pytest

import compare
from conftest import assert_refused, start_refusals
from runs import RunError

REFUSALS = {
    "missing run folders": (["--runs", "/no/a", "--vs", "/no/b"], "/no/a", False),
    "folders that are not runs": (["--runs", "{empty}", "--vs", "{empty}"], "{empty}", False),
    "missing data folder": (["--runs", "{explained}", "--vs", "{self_attention}"], "/no/such/dir", False),
    "no steps": (["--max-steps", "0"], "--max-steps", True),
}


@pytest.fixture(scope="module")
def compare_refusals(runs_without_data, duocap_cache, tmp_path_factory):
    cases = {case: (args + ["--out", "{out}"], named, usage) for case, (args, named, usage) in REFUSALS.items()}
    paths = dict(
        empty=tmp_path_factory.mktemp("not-a-run"), out=tmp_path_factory.mktemp("compare"), **runs_without_data
    )
    return start_refusals("compare.py", cases, duocap_cache, **paths)


@pytest.mark.parametrize("case", list(REFUSALS))
def test_compare_refuses_a_bad_run_folder_missing_data_or_a_bad_value_in_one_line(compare_refusals, case):
    assert_refused(*compare_refusals[case])


def test_runs_scored_on_different_test_sets_are_refused(trained_runs, tmp_path):
    runs = {v: tmp_path / v for v in trained_runs}
    for variant, (run_dir, _) in trained_runs.items():
        shutil.copytree(run_dir, runs[variant], ignore=shutil.ignore_patterns("checkpoints"))
    evals = {v: {r: json.loads((r / "eval_test.json").read_text())} for v, r in runs.items()}
    compare.same_test_set(evals)  # the same test images: accepted
    evals["self_attention"][runs["self_attention"]]["split_id"] = "another-test-set"
    with pytest.raises(RunError, match="different test sets"):
        compare.same_test_set(evals)


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
    assert "## At equal compute" in report and "training FLOPs" in report
    assert "attention on the object" in report
    for picture in ("curves.png", "loss_curves.png", "samples.png", "attention.png"):
        assert (out / picture).stat().st_size > 10_000, picture
    # one seed a side: the per-image figures still get a bootstrap interval over the test images,
    # which must cover the observed difference of the two runs' accuracies
    row = next(line for line in report.splitlines() if line.startswith("| objects |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    accuracy = {v: float(c.split()[0]) for v, c in zip(compare.ORDER, cells[1:3])}
    difference, low, high = (float(x) for x in cells[3].replace("[", "").replace("]", "").replace(",", "").split())
    assert difference == pytest.approx(accuracy["explained"] - accuracy["self_attention"], abs=2e-3)
    assert low <= difference <= high
