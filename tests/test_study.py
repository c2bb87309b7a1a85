"""study.py: a committed result counts as done, and the report is rebuilt from the committed
results alone, with the figures and the difference against the default they hold."""

import json
import re

import numpy as np
import pytest

import stats
import study

GRID = [
    ("explained", "explained", []),
    ("explained+sharp", "explained", ["--sharp-attention", "on"]),
    ("self_attention", "self_attention", []),
]


def fake_result(name, variant, options, seed, both_ways, rng):
    n = 200
    columns = {k: [int(x) for x in rng.random(n) < 0.9] for k in study.FIGURES}
    columns["direction_both_ways"] = [float(x) for x in both_ways]
    return {
        "name": name,
        "variant": variant,
        "options": options,
        "seed": seed,
        "split_id": "test-set-1",
        "summary": {"train_flops": 7e12},
        "figures": {k: float(np.mean(columns[k])) for k in study.FIGURES},
        "test": columns,
        "compositional": columns,
    }


@pytest.fixture
def committed(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "STUDY", tmp_path / "study")
    study.STUDY.mkdir()
    rng = np.random.default_rng(0)
    truth = {"explained": 0.5, "explained+sharp": 0.9}
    arrays = {}
    for name, variant, options in GRID[:2]:
        for seed in range(3):
            both_ways = np.where(rng.random(200) < truth[name], 1.0, 0.5)
            arrays.setdefault(name, []).append(both_ways)
            result = fake_result(name, variant, options, seed, both_ways, rng)
            study.result_path(name, seed).write_text(json.dumps(result))
    return arrays


def test_committed_results_are_done_and_nothing_is_trained(committed, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(study.compare, "train_or_reuse", lambda *a: pytest.fail("trained a run that was done"))
    study.run_grid(GRID[:2], 3, None, tmp_path / "log")
    assert "0 runs to do (6 done before)" in capsys.readouterr().out


def test_the_report_is_rebuilt_from_the_committed_results(committed):
    report = study.direction_report(GRID)
    rows = {line.split(" | ")[0].strip("| "): line for line in report.splitlines() if line.startswith("| ")}
    assert "| 0 | not run yet |" in rows["self_attention"]
    sharp = rows["explained+sharp"].split(" | ")
    assert sharp[1] == "3"
    mean = np.mean([a.mean() for a in committed["explained+sharp"]])
    assert sharp[4].startswith(f"{mean:.3f}")
    d = stats.paired_difference(np.stack(committed["explained+sharp"]), np.stack(committed["explained"]))
    assert sharp[7] == stats.verdict(d, "explained+sharp", "explained") and d.detected
    assert "(the default)" in rows["explained"]


@pytest.mark.parametrize("damage", ["truncated", "older", "other test set"])
def test_a_committed_result_that_cannot_be_trusted_is_refused_naming_it(committed, tmp_path, damage, monkeypatch):
    """A half-written file is not a done run, a result that lacks the per-image columns is not one
    to read in part, and a run scored on other test images cannot be paired with the rest."""
    path = study.result_path("explained+sharp", 1)
    result = json.loads(path.read_text())
    if damage == "truncated":
        path.write_text(path.read_text()[:100])
    elif damage == "older":
        path.write_text(json.dumps({k: v for k, v in result.items() if k != "test"}))
    else:
        path.write_text(json.dumps({**result, "split_id": "test-set-2"}))
    with pytest.raises(SystemExit) as e:
        study.direction_report(GRID)
    assert str(e.value).startswith(f"error: {path}: ")
    if damage != "other test set":
        monkeypatch.setattr(study.compare, "train_or_reuse", lambda *a: pytest.fail("trained over a damaged result"))
        with pytest.raises(SystemExit, match=re.escape(str(path))):
            study.run_grid(GRID[:2], 3, None, tmp_path / "log")
