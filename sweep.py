"""
A hyper-parameter study of one variant with Optuna, on one machine or many.

    python sweep.py --variant explained|self_attention [--n-trials 20] [--timeout S] [--epochs 2]
        [--param NAME=SPEC ...] [--storage URL] [--study-name NAME] [--out DIR]
        [TRAINING OPTIONS | -- TRAINING OPTIONS]       # e.g. --vision DIR --language DIR --max-steps 100

Each trial trains the variant with train.main in <out>/trial-<number> on sampled values of
lr (log-uniform), warmup and weight_decay; --param adds or replaces any training option by
its name in a --config file: float:LOW:HIGH[:log], int:LOW:HIGH[:log] or cat:A,B,...
(--param train_layers=int:0:4, --param lr=float:1e-4:1e-2:log, --param heads=cat:4,8).

A trial's value is its final validation loss over the whole val split (summary.json's
final_val_loss; lower is better), not the validation object score: on its 64 images that
score moves in steps of 1/64 and ties the best trials, while the loss keeps separating the
good trials from the very good ones. The same loss, computed at each validation score
(--score-loss), is reported to the pruner, which stops trials that trail the others.

Trials are short (--epochs 2, where the demo's runs have 5, to fit a study into a working
session on 2 cores), and short runs favour whatever learns fast. So the best trial is a
candidate, not a result: it is retrained at the full budget, over seeds, before it
counts; sweep.py prints the command. Trials skip the test evaluation: the test split is
for judging the retrained runs, not for choosing among trials.

The study lives in a database: SQLite at <out>/study.db by default (one machine), or a
database server with --storage (postgresql+psycopg2://user@host:port/db), so that
workers on several machines run the same command and share one study. --n-trials is the
study's total: a worker stops when the study has that many finished (complete or
pruned) trials, and the same command resumes an interrupted study. A worker sends a
heartbeat for its running trial; the trial of a worker that died (killed, its machine
lost) is marked failed once its heartbeat is --grace-period old, and retried with the
same parameters by another worker (or the next one started), from the dead trial's
last checkpoint when that run folder is on its disk (else from scratch).

Writes <out>/sweep.log (a line per trial), <out>/best.json (the best trial's option values,
a file the training scripts take with --config), history.png and importances.png.
"""

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import optuna
import sqlalchemy
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from optuna.visualization.matplotlib import plot_optimization_history, plot_param_importances

import checkpoints
import train
from decoding import positive_float, positive_int

SCRIPTS = {"explained": "08_train_explained.py", "self_attention": "10_train_self_attention.py"}
# searched unless a --param of the same name says otherwise: around the presets' values (1e-3 demo, 1e-4 real)
SPACE = {"lr": "float:1e-5:1e-2:log", "warmup": "float:0:0.2", "weight_decay": "float:0:0.1"}
RESERVED = ("config", "out", "resume", "score_loss", "no_eval")  # options every trial gets from the sweep
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WORKER = f"{socket.gethostname()}:{os.getpid()}"

# -----------------------------------------------------------------------------
# the command line and the search space


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--variant", required=True, choices=list(SCRIPTS))
    p.add_argument(
        "--n-trials",
        type=positive_int,
        default=20,
        help="finished (complete or pruned) trials the study needs, all workers together",
    )
    p.add_argument("--timeout", type=positive_float, metavar="S", help="this worker starts no trial after S seconds")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="a database server, e.g. postgresql+psycopg2://user@host:5432/db (default: SQLite at OUT/study.db)",
    )
    p.add_argument("--study-name", help="default duocap-VARIANT")
    p.add_argument("--epochs", type=positive_int, default=2, help="each trial's training budget")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=SPEC",
        help="search a training option too (or otherwise): float:LOW:HIGH[:log], int:LOW:HIGH[:log] or cat:A,B,...",
    )
    p.add_argument("--sampler-seed", type=int, default=0, help="the TPE sampler's seed (--seed seeds training)")
    p.add_argument(
        "--heartbeat-interval",
        type=positive_int,
        default=60,
        metavar="S",
        help="how often a running trial is marked alive",
    )
    p.add_argument(
        "--grace-period", type=positive_int, default=180, metavar="S", help="a trial silent this long is failed"
    )
    p.add_argument("--max-retry", type=int, default=2, help="times a failed trial is retried")
    p.add_argument("--out", type=Path, help="default runs/sweep-VARIANT")
    args, rest = p.parse_known_args(argv)
    if "--" in rest:
        rest.remove("--")
    args.out = args.out or Path(f"runs/sweep-{args.variant}")
    args.study_name = args.study_name or f"duocap-{args.variant}"
    return args, rest


def training_options(variant, argv):
    """train.py's reading of argv, or its complaint as one line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return train.parse_args(variant, argv)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        raise SystemExit(f"error: {err.getvalue().strip().splitlines()[-1].split('error: ', 1)[-1]}") from None


def choice(text):
    """A categorical value: a number or true/false as JSON reads it, else the text."""
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (bool, int, float)) else text


def parse_param(variant, text, names):
    """NAME=SPEC -> (name, ("float"|"int", low, high, log) or ("cat", choices)), each extreme
    checked as train.py checks a --config value."""
    name, _, spec = text.partition("=")
    kind, _, rest = spec.partition(":")
    where = f"error: --param {text}:"
    if name not in names:
        raise SystemExit(f"{where} {name!r} is not a training option (names as in a --config file: lr, train_layers)")
    if kind == "cat":
        choices = [choice(c) for c in rest.split(",")]
        if "" in rest.split(",") or len(set(map(str, choices))) < len(choices):
            raise SystemExit(f"{where} expected cat:A,B,... with distinct values")
        parsed, values = ("cat", choices), choices
    elif kind in ("float", "int"):
        parts = rest.split(":")
        log = parts[2:] == ["log"]
        try:
            if len(parts) != 2 + log:
                raise ValueError
            low, high = map(float if kind == "float" else int, parts[:2])
        except ValueError:
            raise SystemExit(f"{where} expected {kind}:LOW:HIGH or {kind}:LOW:HIGH:log") from None
        if not low < high or (log and low <= 0):
            raise SystemExit(f"{where} expected LOW < HIGH{' and LOW above 0 on a log scale' if log else ''}")
        parsed, values = (kind, low, high, log), [low, high]
    else:
        raise SystemExit(f"{where} expected float:LOW:HIGH[:log], int:LOW:HIGH[:log] or cat:A,B,...")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "values.json"
        for value in values:
            path.write_text(json.dumps({name: value}))
            try:
                training_options(variant, ["--config", str(path)])
            except SystemExit as e:
                raise SystemExit(f"{where} {str(e.code).replace(f'error: --config {path}: ', '')}") from None
    return name, parsed


def search_space(args, passthrough):
    plain = training_options(args.variant, [])
    names = set(vars(plain)) - set(RESERVED)
    space = dict(parse_param(args.variant, f"{k}={v}", names) for k, v in SPACE.items())
    space |= dict(parse_param(args.variant, text, names) for text in args.param)
    given = training_options(args.variant, passthrough)  # a bad training option is refused now, not in a trial
    # named on the command line, an option beats every trial's --config value, at its default value too
    clash = [n for n in (*RESERVED[:3], "epochs", *space) if n in given.given]
    if clash:
        raise SystemExit(f"error: {', '.join(clash)}: set by the sweep, not a training option to pass through")
    return space


def suggest(trial, name, spec):
    kind, *rest = spec
    if kind == "cat":
        return trial.suggest_categorical(name, rest[0])
    low, high, log = rest
    return (trial.suggest_float if kind == "float" else trial.suggest_int)(name, low, high, log=log)


class Sampler(optuna.samplers.BaseSampler):
    """TPE whose randomness for trial n comes from (seed, n): workers sharing a study sample
    different values (with one seed each they would draw the same ones at the same moment),
    and a study one worker runs is repeated exactly. The constant liar counts the trials
    running elsewhere as bad ones, so that parallel workers do not crowd one spot."""

    def __init__(self, seed):
        self.seed, self.tpe = seed, None

    def before_trial(self, study, trial):
        self.tpe = optuna.samplers.TPESampler(seed=self.seed * 100_003 + trial.number, constant_liar=True)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, name, distribution):
        return self.tpe.sample_independent(study, trial, name, distribution)

    def after_trial(self, study, trial, state, values):
        self.tpe.after_trial(study, trial, state, values)


# -----------------------------------------------------------------------------
# the study, its log, and the trials


class Log:
    """<out>/sweep.log, a line at a time (workers sharing the folder append whole lines), and stdout."""

    def __init__(self, path):
        self.path = path

    def __call__(self, line):
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def rdb_storage(url, **options):
    """Workers started at once on a new database race to create its tables: the losers try again."""
    for attempt in range(3):
        try:
            return optuna.storages.RDBStorage(url, **options)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.OperationalError) as e:
            # SQLite says "table ... already exists" where a server says duplicate key
            lost_race = not isinstance(e, sqlalchemy.exc.OperationalError) or "already exists" in str(e)
            if attempt == 2 or not lost_race:
                raise
            time.sleep(1)


def open_study(args, log):
    url = args.storage or f"sqlite:///{(args.out / 'study.db').resolve()}"
    retry = RetryHeartbeatStaleTrialCallback(max_retry=args.max_retry)

    def stale(study, trial):
        retried = len(trial.system_attrs.get("retry_history", [])) < args.max_retry
        then = "retried with the same parameters" if retried else f"not retried (--max-retry {args.max_retry})"
        worker = trial.user_attrs.get("worker", "?")
        log(f"trial {trial.number}: failed, no heartbeat from {worker} for {args.grace_period}s; {then}")
        retry(study, trial)

    # SQLite: wait for a lock rather than fail (a second worker on the machine); a server: give up after 10 s
    connect = {"timeout": 60} if url.startswith("sqlite") else {"connect_timeout": 10}
    shown = url
    try:
        shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
        storage = rdb_storage(
            url,
            engine_kwargs={"connect_args": connect} if url.startswith(("sqlite", "postgresql")) else {},
            heartbeat_interval=args.heartbeat_interval,
            grace_period=args.grace_period,
            heartbeat_stale_trial_callback=stale,
        )
        # Hyperband runs successive halving at several degrees of eagerness at once (its brackets), so
        # no single early cut-off has to be guessed; Optuna's benchmarks found it the best pruner for
        # TPE. The resource is the training step: "auto" takes its maximum from the first complete
        # trial (the sweep needn't know the data's steps per epoch), and from the first score on a
        # trial can be cut; the demo's 2-epoch trials (624 steps) make 6 brackets.
        return optuna.create_study(
            storage=storage,
            study_name=args.study_name,
            direction="minimize",
            sampler=Sampler(args.sampler_seed),
            pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3),
            load_if_exists=True,
        )
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise SystemExit(f"error: --storage {shown}: cannot open the study: {reason}") from None


def distribution(spec):
    kind, *rest = spec
    if kind == "cat":
        return optuna.distributions.CategoricalDistribution(rest[0])
    low, high, log = rest
    cls = optuna.distributions.FloatDistribution if kind == "float" else optuna.distributions.IntDistribution
    return cls(low, high, log=log)


def check_study(study, args, space):
    """A study holds one variant's trials over one search space: going on with another variant, or
    with a space changed under the finished trials, is refused before any trial runs."""
    variant = study.user_attrs.get("variant")
    if variant is None:
        study.set_user_attr("variant", args.variant)
    elif variant != args.variant:
        raise SystemExit(
            f"error: study {args.study_name} is a sweep of {variant}, not {args.variant}; give another --study-name"
        )
    wanted = {name: distribution(spec) for name, spec in space.items()}
    for t in study.get_trials(deepcopy=False, states=FINISHED):
        changed = sorted(n for n in wanted.keys() | t.distributions.keys() if wanted.get(n) != t.distributions.get(n))
        if changed:
            raise SystemExit(
                f"error: study {args.study_name}: trial {t.number} searched {', '.join(changed)} over another space "
                f"than this --param gives; give another --study-name (or the same --param as before)"
            )


def counts(study):
    """(finished trials, running ones) in the study, after failing the stale ones."""
    optuna.storages.fail_stale_trials(study)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    return sum(s in FINISHED for s in states), states.count(TrialState.RUNNING)


def work_left(study, args, deadline):
    """Whether this worker starts another trial: the study lacks finished trials, not all of
    them running already. While the rest run on other workers it waits, for one may die:
    its trial is then failed and retried here."""
    said = False
    while time.time() < deadline:
        done, running = counts(study)
        if done >= args.n_trials:
            return False
        if done + running < args.n_trials:
            return True
        if not said:
            print(f"waiting: the study's last {running} trial(s) are running (elsewhere, or left by a dead worker)")
            said = True
        time.sleep(args.heartbeat_interval)
    return False


class TrialError(Exception):
    """A trial's training refused its options or data (one line); Optuna marks the trial failed."""


def make_objective(args, space, passthrough):
    def objective(trial):
        values = {name: suggest(trial, name, spec) for name, spec in space.items()}
        trial.set_user_attr("worker", WORKER)
        frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
        history = RetryHeartbeatStaleTrialCallback.retry_history(frozen)
        run = args.out / f"trial-{trial.number}"
        # a retried trial goes on from the last checkpoint of the dead one (or of its dead retries)
        dead = [args.out / f"trial-{n}" for n in history]
        source = next((d for d in reversed(dead) if checkpoints.checkpoint_dirs(d)), None)
        if source:
            shutil.copytree(source, run, dirs_exist_ok=True)
        run.mkdir(parents=True, exist_ok=True)
        (run / "params.json").write_text(json.dumps(values, indent=2))
        (run / "trial.json").write_text(
            json.dumps(
                {
                    "number": trial.number,
                    "params": values,
                    "worker": WORKER,
                    "retry_of": history[0] if history else None,
                    "resumed_from": source.name if source else None,
                },
                indent=2,
            )
        )
        argv = [*passthrough, "--config", str(run / "params.json"), "--out", str(run), "--score-loss", "--no-eval"]
        argv += [] if "epochs" in space else ["--epochs", str(args.epochs)]
        argv += ["--resume", str(run)] if source else []

        def on_score(row):
            trial.report(row["val_loss"], row["step"])
            return trial.should_prune()

        try:
            train.main(args.variant, argv, on_score=on_score)
            loss = json.loads((run / "summary.json").read_text())["final_val_loss"]
        except train.EarlyStop:
            loss = None
        except SystemExit as e:
            # a stop request (checkpointed: left running, the trial is retried from there) or an
            # error end the sweep; a run that diverged is a bad trial. A trial that errs is failed,
            # not left running: retried with the same values it would only err again
            if e.code and str(e.code).startswith("error:"):
                trial.set_user_attr("error", str(e.code))
                raise TrialError(f"{e.code} (trial {trial.number} failed)") from None
            if "non-finite" not in str(e.code):
                raise
            loss = math.nan
        shutil.rmtree(run / "checkpoints", ignore_errors=True)  # a finished trial's only take room
        if loss is None:
            raise optuna.TrialPruned()
        if not math.isfinite(loss):
            trial.set_user_attr("diverged", True)
            raise optuna.TrialPruned()
        return loss

    return objective


def describe(trial):
    """A sweep.log line: number, worker, parameters, outcome, wall time."""
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    if trial.state == TrialState.COMPLETE:
        outcome = f"val loss {trial.value:.4f}"
    elif trial.state == TrialState.PRUNED and trial.user_attrs.get("diverged"):
        outcome = "pruned, diverged"
    elif trial.state == TrialState.PRUNED and trial.last_step is not None:
        outcome = f"pruned at step {trial.last_step} (val loss {trial.intermediate_values[trial.last_step]:.4f})"
    else:
        outcome = trial.state.name.lower()
    wall = (trial.datetime_complete - trial.datetime_start).total_seconds()
    return f"trial {trial.number} [{trial.user_attrs.get('worker', '?')}] {params}: {outcome} ({wall:.0f}s)"


# -----------------------------------------------------------------------------
# what a worker leaves when it is done


def write_whole(path, write):
    """Write through a temporary file renamed into place: workers sharing the folder finish at once."""
    tmp = path.with_name(f".{os.getpid()}.{path.name}")
    write(tmp)
    os.replace(tmp, path)


def plot(study, out):
    """history.png and importances.png; a note for each that could not be drawn."""
    notes = []
    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    for name, draw, needs in (("history", plot_optimization_history, 1), ("importances", plot_param_importances, 2)):
        if n_complete < needs:
            notes.append(f"{name}.png skipped: {n_complete} complete trial(s), it needs {needs}")
            continue
        try:
            figure = draw(study).figure
            write_whole(out / f"{name}.png", lambda p: figure.savefig(p, dpi=120, bbox_inches="tight"))
        except Exception as e:  # importances need parameters that vary among the complete trials
            notes.append(f"{name}.png skipped: {e}")
        plt.close("all")
    return notes


def without(argv, options):
    """argv less the given options and their values."""
    kept, skip = [], False
    for a in argv:
        if not skip and a.split("=", 1)[0] not in options:
            kept.append(a)
        skip = a in options
    return kept


def finish(study, args, passthrough, log):
    trials = study.get_trials(deepcopy=False)
    n = {s: sum(t.state == s for t in trials) for s in (*FINISHED, TrialState.FAIL)}
    mine = sum(t.state in FINISHED and t.user_attrs.get("worker") == WORKER for t in trials)
    log(
        f"worker {WORKER}: study {args.study_name} has {n[TrialState.COMPLETE] + n[TrialState.PRUNED]} of "
        f"{args.n_trials} trials finished ({n[TrialState.COMPLETE]} complete, {n[TrialState.PRUNED]} pruned; "
        f"{n[TrialState.FAIL]} failed), {mine} of them run by this worker"
    )
    for note in plot(study, args.out):
        print(note)
    if not n[TrialState.COMPLETE]:
        print("no complete trial: no best.json")
        return
    best = study.best_trial
    write_whole(args.out / "best.json", lambda p: p.write_text(json.dumps(best.params, indent=2) + "\n"))
    budget = without(passthrough, ("--epochs", "--max-steps", "--max-flops", "--seed", "--out"))
    command = (
        f"for seed in 0 1 2; do python {SCRIPTS[args.variant]} --config {args.out / 'best.json'} --seed $seed "
        f"--out {args.out / 'best-seed'}$seed {shlex.join(budget)}; done"
    )
    print(
        f"best: trial {best.number}, val loss {best.value:.4f}, in {args.out / 'best.json'}\n"
        f"retrain it at the full budget over seeds before it counts:\n  {command.replace(' ;', ';')}"
    )


def main(argv=None):
    args, passthrough = parse_args(argv)
    space = search_space(args, passthrough)
    args.out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats, plots
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # sweep.log has a line per trial
    log = Log(args.out / "sweep.log")
    study = open_study(args, log)
    check_study(study, args, space)
    deadline = time.time() + (args.timeout or math.inf)
    log(f"worker {WORKER}: study {args.study_name}, {args.n_trials} trials wanted")
    done, _ = counts(study)
    if work_left(study, args, deadline):
        try:
            study.optimize(
                make_objective(args, space, passthrough),
                n_trials=args.n_trials - done,  # at most: other workers share the rest
                timeout=args.timeout,
                callbacks=[
                    lambda study, trial: log(describe(trial)),
                    lambda study, trial: None if work_left(study, args, deadline) else study.stop(),
                ],
                gc_after_trial=True,
                show_progress_bar=sys.stderr.isatty(),  # a bar on a terminal, none in a log
            )
        except TrialError as e:
            raise SystemExit(str(e)) from None
        except SystemExit as e:
            if not e.code:  # Ctrl-C or SIGTERM: the trial checkpointed and is left running
                log(f"worker {WORKER}: stopped; its trial is retried, from its checkpoint, {args.grace_period}s on")
            raise
    finish(study, args, passthrough, log)


if __name__ == "__main__":
    main()
