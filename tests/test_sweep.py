"""The sweep: tiny trials on SQLite add up and an obviously bad one is pruned; best.json trains both
numbered scripts through --config; a worker SIGKILLed mid-trial leaves a trial that the next worker
fails and retries with the same parameters, from its checkpoint; two workers at once share one
study, on SQLite and on a PostgreSQL server; and bad input is refused in one line."""

import contextlib
import io
import json
import signal
import socket

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

import checkpoints
import sweep
from conftest import (
    TRAIN_SCRIPTS,
    VARIANTS,
    InProcess,
    Script,
    assert_refused,
    kept_rng,
    signal_when,
    start_refusals,
    started_early,
    started_first,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# a trial of a few steps of 8 captions, scored on 2 val images
TINY = ["--batch-size", "8", "--score-images", "2"]


def sqlite(out):
    return f"sqlite:///{out / 'study.db'}"


def trials_of(storage, variant="explained"):
    return optuna.load_study(study_name=f"duocap-{variant}", storage=storage).get_trials()


def sweep_here(argv):
    """sweep.main in this process; its stdout."""
    stdout = io.StringIO()
    with kept_rng(), contextlib.redirect_stdout(stdout):
        sweep.main([str(a) for a in argv])
    return stdout.getvalue()


def assert_added_up(trials, n_trials):
    """Every trial number once, and exactly n_trials finished (complete or pruned) trials."""
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(len(numbers))), numbers
    assert sum(t.state in FINISHED for t in trials) == n_trials, [(t.number, t.state) for t in trials]
    assert not [t for t in trials if t.state == TrialState.RUNNING]


# -----------------------------------------------------------------------------
# one worker on SQLite, in this process


@pytest.fixture(scope="module")
def swept(tiny_args, tmp_path_factory):
    """(out, stdout): 4 one-step trials of the explained variant; the first three enqueued: two with a
    sane lr and one with an lr of 10, which wrecks the weights in its one step."""
    out = tmp_path_factory.mktemp("sweep")
    study = optuna.create_study(storage=sqlite(out), study_name="duocap-explained", direction="minimize")
    for lr in (1e-3, 1e-3, 10.0):
        study.enqueue_trial({"lr": lr, "warmup": 0.0})  # no warmup: a one-step run's only step has the full lr
    argv = ["--variant", "explained", "--n-trials", 4, "--out", out, "--param", "lr=float:1e-4:10:log"]
    argv += ["--param", "train_layers=int:1:2", "--param", "heads=cat:2,4"]
    stdout = sweep_here([*argv, "--", *tiny_args, *TINY, "--max-steps", 1, "--score-every", 1, "--seed", 0])
    return out, stdout


def test_a_sweep_adds_up_its_trials_and_prunes_the_obviously_bad_one(swept):
    out, stdout = swept
    trials = trials_of(sqlite(out))
    assert_added_up(trials, 4)
    assert trials[2].params["lr"] == 10.0 and trials[2].state == TrialState.PRUNED, stdout[-3000:]
    assert trials[0].state == trials[1].state == TrialState.COMPLETE
    for t in trials:
        assert set(t.params) == {"lr", "warmup", "weight_decay", "train_layers", "heads"}
        recorded = json.loads((out / f"trial-{t.number}" / "trial.json").read_text())
        assert recorded["number"] == t.number and recorded["params"] == t.params
        assert not checkpoints.checkpoint_dirs(out / f"trial-{t.number}"), "a finished trial's checkpoints go"
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    for t in complete:  # the value is the final validation loss over the whole val split
        summary = json.loads((out / f"trial-{t.number}" / "summary.json").read_text())
        assert t.value == summary["final_val_loss"]
    lines = (out / "sweep.log").read_text().splitlines()
    for t in trials:
        line = next(line for line in lines if line.startswith(f"trial {t.number} "))
        assert ("pruned" in line) == (t.state == TrialState.PRUNED) and line.endswith("s)"), line
    assert "lr=10 " in next(line for line in lines if line.startswith("trial 2 "))


def test_best_json_trains_both_numbered_scripts_through_config(swept, tiny_args, duocap_cache, tmp_path):
    out, stdout = swept
    best = json.loads((out / "best.json").read_text())
    study = optuna.load_study(study_name="duocap-explained", storage=sqlite(out))
    assert best == study.best_params and set(best) == {"lr", "warmup", "weight_decay", "train_layers", "heads"}
    assert f"--config {out / 'best.json'}" in stdout and "08_train_explained.py" in stdout
    retrain = stdout.split("retrain it")[-1]
    assert "--max-steps" not in retrain, "the retrain command is at the full budget"
    assert retrain.count("--seed") == 1 and "--seed $seed" in retrain, "the trials' own --seed is not in it"
    for variant in VARIANTS:
        run = tmp_path / variant
        args = [TRAIN_SCRIPTS[variant], *tiny_args, *TINY, "--config", out / "best.json", "--max-steps", 1]
        rc, run_out, run_err = InProcess([*args, "--no-eval", "--out", run], duocap_cache).wait()
        assert rc == 0, run_out[-2000:] + run_err[-3000:]
        config = json.loads((run / "config.json").read_text())
        assert config["config_file"]["values"] == best
        assert config["lr"] == best["lr"] and config["train_layers"] == best["train_layers"]


def test_a_sweep_plots_its_history_and_importances(swept):
    out, stdout = swept
    assert (out / "history.png").stat().st_size > 0
    assert (out / "importances.png").is_file() or "importances.png skipped" in stdout


# -----------------------------------------------------------------------------
# a worker killed mid-trial


@started_early
def killed_worker(tiny_args, duocap_cache, tmp_path_factory):
    """(out, trials as the worker left them, its command line): a worker of a 2-trial study
    SIGKILLed once its second trial has a checkpoint."""
    out = tmp_path_factory.mktemp("sweep-killed")
    argv = ["sweep.py", "--variant", "self_attention", "--n-trials", 2, "--out", out]
    argv += ["--heartbeat-interval", 1, "--grace-period", 3, "--", *tiny_args, *TINY]
    argv += ["--max-steps", 8, "--score-every", 2, "--save-every", 2]
    first = Script(argv, duocap_cache)
    signal_when([(first, lambda: bool(checkpoints.checkpoint_dirs(out / "trial-1")), signal.SIGKILL)])
    rc, stdout, stderr = first.wait()
    assert rc == -signal.SIGKILL, stdout[-2000:] + stderr[-3000:]
    return out, trials_of(sqlite(out), "self_attention"), argv


@pytest.fixture(scope="module")
def killed_then_finished(killed_worker):
    """(out, trials as the killed worker left them, the second worker's stdout): a second worker,
    in this process, finishes the study."""
    out, left, argv = killed_worker
    return out, left, sweep_here(argv[1:])


def test_a_killed_workers_trial_is_failed_and_retried_with_its_parameters(killed_then_finished):
    out, left, stdout = killed_then_finished
    assert [t.state for t in left] == [TrialState.COMPLETE, TrialState.RUNNING], "killed mid-trial"
    trials = trials_of(sqlite(out), "self_attention")
    assert_added_up(trials, 2)
    assert trials[1].state == TrialState.FAIL, "the killed trial is failed, not left running"
    retry = trials[2]
    assert RetryHeartbeatStaleTrialCallback.retried_trial_number(retry) == 1
    assert retry.params == trials[1].params and retry.state in FINISHED
    assert "trial 1: failed, no heartbeat" in (out / "sweep.log").read_text()


def test_a_retried_trial_resumes_from_the_killed_ones_checkpoint(killed_then_finished):
    out, _, stdout = killed_then_finished
    recorded = json.loads((out / "trial-2" / "trial.json").read_text())
    assert recorded["retry_of"] == 1 and recorded["resumed_from"] == "trial-1"
    assert f"resumed from {out / 'trial-2' / 'checkpoints'}" in stdout, stdout[-3000:]
    summary = json.loads((out / "trial-2" / "summary.json").read_text())
    assert summary["steps"] == 8


# -----------------------------------------------------------------------------
# two workers at once, on one machine (SQLite) and as on several (a PostgreSQL server)


@started_early
def two_worker_sweeps(tiny_args, duocap_cache, tmp_path_factory, postgres_url):
    """{storage: (url, out, workers, their outputs)}: two workers started at once on one 4-trial study,
    on SQLite and on the PostgreSQL server."""
    started = {}
    for storage in ("sqlite", "postgresql"):
        out = tmp_path_factory.mktemp(f"two-workers-{storage}")
        url = sqlite(out) if storage == "sqlite" else postgres_url
        argv = ["sweep.py", "--variant", "explained", "--n-trials", 4, "--out", out, "--storage", url]
        argv += ["--heartbeat-interval", 1, "--grace-period", 60, "--", *tiny_args, *TINY]
        argv += ["--max-steps", 2, "--score-every", 1]
        # a feature cache each: the cache's last step (its .meta.json.tmp) is not safe from two processes at once
        started[storage] = (url, out, [Script(argv, duocap_cache / f"{storage}-worker{k}") for k in range(2)])
    return {storage: (url, out, workers, [w.ok() for w in workers]) for storage, (url, out, workers) in started.items()}


@pytest.mark.parametrize("storage", ["sqlite", "postgresql"])
def test_two_workers_at_once_share_one_study(storage, two_worker_sweeps):
    url, out, workers, outputs = two_worker_sweeps[storage]
    trials = trials_of(url)
    assert_added_up(trials, 4)
    by_worker = {
        w.proc.pid: [t.number for t in trials if t.user_attrs["worker"].endswith(f":{w.proc.pid}")] for w in workers
    }
    assert all(by_worker.values()) and sum(map(len, by_worker.values())) == 4, by_worker
    for worker, output in zip(workers, outputs):
        mine = len(by_worker[worker.proc.pid])
        assert "has 4 of 4 trials finished" in output and f"{mine} of them run by this worker" in output, output[-2000:]
    assert json.loads((out / "best.json").read_text())


# -----------------------------------------------------------------------------
# bad input: one line, no traceback


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


REFUSALS = {
    "unreachable storage": (["--storage", "{url}"], "{url}"),
    "bad param spec": (["--param", "lr=float:1e-3"], "lr=float:1e-3"),
    "unknown option name": (["--param", "no_such_option=int:1:2"], "no_such_option"),
    "bad option value": (["--param", "heads=int:0:4"], "heads"),
    "searched and passed": (["--", "--lr", "0.1"], "lr"),
    "searched and passed at its default": (
        ["--param", "train_layers=int:0:4", "--", "--train-layers", "2"],
        "train_layers",
    ),
    "another variant's study": (
        ["--variant", "self_attention", "--out", "{earlier}", "--study-name", "mine"],
        "explained",
    ),
    "another search space": (["--out", "{earlier}", "--study-name", "mine", "--param", "heads=cat:2,4"], "heads"),
    "bad training option": (["--", "--batch-size", "0"], "--batch-size"),
}


@started_first
def sweep_refusals(duocap_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep-refused")
    cases = {
        case: (["--variant", "explained", "--out", "{out}", *args], named, False)
        for case, (args, named) in REFUSALS.items()
    }
    url = f"postgresql+psycopg2://postgres@127.0.0.1:{free_port()}/optuna"
    # a study of cross-attention over the default space, with one finished trial
    earlier = tmp_path_factory.mktemp("sweep-earlier")
    study = optuna.create_study(storage=f"sqlite:///{earlier / 'study.db'}", study_name="mine")
    study.set_user_attr("variant", "explained")
    space = {
        name: sweep.distribution(sweep.parse_param("explained", f"{name}={spec}", {name})[1])
        for name, spec in sweep.SPACE.items()
    }
    params = {name: d.low if hasattr(d, "low") else d.choices[0] for name, d in space.items()}
    study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=0.5))
    return start_refusals("sweep.py", cases, duocap_cache, out=out, url=url, earlier=earlier)


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_is_refused_in_one_line(sweep_refusals, case):
    assert_refused(*sweep_refusals[case])


def test_a_trial_whose_options_training_refuses_is_failed_and_the_sweep_says_why(tiny_args, tmp_path):
    """7 heads do not split the tiny models' width: that trial is failed (a retry with the same
    values could only fail again), not left running, and the sweep stops with the reason."""
    study = optuna.create_study(storage=sqlite(tmp_path), study_name="duocap-explained", direction="minimize")
    study.enqueue_trial({"heads": 7})
    argv = ["--variant", "explained", "--n-trials", 2, "--out", tmp_path, "--param", "heads=cat:2,7"]
    with pytest.raises(SystemExit) as e:
        sweep_here([*argv, "--", *tiny_args, *TINY, "--max-steps", 1])
    assert str(e.value).startswith("error: --heads 7: ") and str(e.value).endswith("(trial 0 failed)")
    (trial,) = trials_of(sqlite(tmp_path))
    assert trial.state == TrialState.FAIL and trial.user_attrs["error"].startswith("error: --heads 7")
