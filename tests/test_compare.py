"""compare.py refuses a bad run folder, missing data or a bad value in one line, before training or
evaluating anything."""

import pytest

from conftest import assert_refused, start_refusals

REFUSALS = {
    "missing run folders": (["--runs", "/no/a", "/no/b"], "/no/a", False),
    "folders that are not runs": (["--runs", "{empty}", "{empty}"], "{empty}", False),
    "missing data folder": (["--runs", "{explained}", "{self_attention}"], "/no/such/dir", False),
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
