"""
Shared fixtures: a tiny shapes dataset, tiny random backbones saved and loaded
back through the same from_pretrained path a hub id takes, and helpers that
build either captioner variant from a run config. Nothing is downloaded and
nothing is pretrained: every backbone is random and a few kilobytes.
"""

import concurrent.futures
import contextlib
import inspect
import io
import os
import random
import runpy
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# the models here are tiny: one thread is as fast, and does not fight the training subprocesses
torch.set_num_threads(1)
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import corpora  # noqa: E402

import backbones  # noqa: E402
import checkpoints  # noqa: E402
import data  # noqa: E402
import demo  # noqa: E402
import shapes  # noqa: E402
from compare import read_jsonl  # noqa: E402
from runs import build_model, save_run  # noqa: E402

VARIANTS = ["explained", "self_attention"]
MAX_CAPTION_TOKENS = 32
HEADS = 4


@pytest.fixture(scope="session", autouse=True)
def duocap_cache(tmp_path_factory):
    """A private feature cache for this session (and for the subprocesses it starts)."""
    cache = tmp_path_factory.mktemp("duocap-cache")
    old = os.environ.get("DUOCAP_CACHE")
    os.environ["DUOCAP_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DUOCAP_CACHE", None)
    else:
        os.environ["DUOCAP_CACHE"] = old


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    return shapes.make_shapes_dataset(root, n_train=64, n_val=8, n_test=8, n_compositional=8, seed=0)


@pytest.fixture(scope="session")
def splits(shapes_dir):
    return data.load_splits("shapes", shapes_dir)


def save_vision(out_dir, hidden_size=32):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    config = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
    )
    CLIPVisionModel(config).eval().save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def vision_dir(tmp_path_factory):
    return save_vision(tmp_path_factory.mktemp("vision"))


@pytest.fixture(scope="session")
def other_vision_dir(tmp_path_factory):
    """A second vision tower with another hidden size: a checkpoint of the first must not load onto it."""
    return save_vision(tmp_path_factory.mktemp("vision-wide"), hidden_size=48)


@pytest.fixture(scope="session")
def language_dir(tmp_path_factory, splits):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("language")
    captions = [c for r in splits["train"] for c in r.captions]
    tokenizer = demo.build_tokenizer(captions, vocab_size=300)
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        max_position_embeddings=512,
        # larger than Qwen's 0.02 so that a random LM's greedy output depends on the image
        initializer_range=0.3,
    )
    Qwen3ForCausalLM(config).eval().save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(language_dir):
    return backbones.load_language(language_dir)[1]


@pytest.fixture(scope="session")
def tiny_args(vision_dir, language_dir, shapes_dir):
    """The command-line options of a run on the tiny backbones and the tiny shapes data."""
    return [
        "--vision",
        str(vision_dir),
        "--language",
        str(language_dir),
        "--data",
        "shapes",
        "--data-dir",
        str(shapes_dir),
    ]


@pytest.fixture(scope="session")
def make_config(tiny_args):
    """A run config as train.run_config produces it from the command line."""

    def make(variant, train_layers=2, max_caption_tokens=MAX_CAPTION_TOKENS, **overrides):
        import train

        args = train.parse_args(
            variant,
            [
                *tiny_args,
                "--train-layers",
                str(train_layers),
                "--heads",
                str(HEADS),
                "--max-caption-tokens",
                str(max_caption_tokens),
                "--device",
                "cpu",
            ],
        )
        config = train.run_config(variant, args)
        config.update(overrides)
        return config

    return make


@pytest.fixture(scope="session")
def make_model(make_config):
    """(model, processor, tokenizer, config) for a variant, seeded, in eval mode."""

    def make(variant, seed=0, **config_kw):
        config = make_config(variant, **config_kw)
        torch.manual_seed(seed)
        model, processor, tokenizer = build_model(config)
        return model.eval(), processor, tokenizer, config

    return make


def perturb(model, seed=0, std=0.5):
    """Make a random-init captioner depend strongly on its image: noise on every adapter/fusion weight."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("lm."):
                spread = p.detach().float().std().item() if p.numel() > 1 else 0.0  # a gate: one value
                p.add_(torch.randn(p.shape, generator=gen) * std * (spread + 0.05))
    return model


def assert_cached_steps_match_recomputation(model, state, ids, prefill):
    """Decoding ids [B, T] one token at a time after a prefill of `prefill` tokens, with the KV
    cache, gives the logits that running the whole sequence again gives at every step."""
    with torch.no_grad():
        logits, cache = model.next_logits(state, ids[:, :prefill])
        for t in range(prefill, ids.shape[1] + 1):
            full, _ = model.next_logits(state, ids[:, :t], None, use_cache=False)
            torch.testing.assert_close(logits, full, rtol=1e-4, atol=1e-4)
            if t < ids.shape[1]:
                logits, cache = model.next_logits(state, ids[:, : t + 1], cache)


def pixels_for(processor, records):
    images = [data.read_image(r.image) for r in records]
    return processor(images=images, return_tensors="pt")["pixel_values"]


def batch_for(processor, tokenizer, records, max_tokens=MAX_CAPTION_TOKENS):
    """One training batch: each record's first caption and its pixels."""
    input_ids, targets, mask = data.encode_captions(tokenizer, [r.captions[0] for r in records], max_tokens)
    return {
        "input_ids": input_ids,
        "targets": targets,
        "attention_mask": mask,
        "pixel_values": pixels_for(processor, records),
    }


def loader_for(records, features, processor, tokenizer, config, order):
    """data.make_loader with a run config's batch size and caption length."""
    return data.make_loader(
        records,
        features,
        processor,
        tokenizer,
        batch_size=config["batch_size"],
        max_tokens=config["max_caption_tokens"],
        order=order,
    )


def training_parts(model, optimizer=torch.optim.AdamW, weight_decay=None, **options):
    """(trainable parameters, optimizer, constant-rate scheduler, disabled grad scaler): what
    train.train_step takes besides the model, the batches and the config. With weight_decay,
    the parameter groups are train.py's (decay on matrices only)."""
    params = [p for p in model.parameters() if p.requires_grad]
    made = optimizer(params if weight_decay is None else model.parameter_groups(weight_decay), **options)
    scheduler = torch.optim.lr_scheduler.LambdaLR(made, lambda step: 1.0)
    return params, made, scheduler, torch.amp.GradScaler("cuda", enabled=False)


@contextlib.contextmanager
def kept_rng():
    """This process's torch, Python and NumPy RNG states as they were before the block
    (train.main seeds them, checkpoints.load restores a run's)."""
    state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        random.setstate(state[1])
        np.random.set_state(state[2])


@pytest.fixture
def truncated_dataset(tmp_path):
    """A folder dataset whose cut.png and cut.jpg are cut in half: the header reads, the body does not."""
    good, _ = corpora.write_jsonl_dataset(tmp_path, [], truncated_images=["cut.png", "cut.jpg"])
    return tmp_path, good


@pytest.fixture(scope="session")
def runs_without_data(make_model, tmp_path_factory):
    """{variant: run folder} of saved tiny runs whose config names a data folder that does not exist."""
    runs = {}
    for variant in VARIANTS:
        model, _, _, config = make_model(variant)
        runs[variant] = tmp_path_factory.mktemp(f"no-data-{variant}")
        save_run(model, {**config, "data_dir": "/no/such/dir"}, runs[variant])
    return runs


# -----------------------------------------------------------------------------
# training / captioning scripts in fresh processes

TRAIN_SCRIPTS = {"explained": "08_train_explained.py", "self_attention": "10_train_self_attention.py"}


def script_env(cache, hide_java=False, **extra):
    """One thread per process, the given feature cache, never the network; hide_java drops every
    PATH entry holding a `java`, so the caption metrics use their plain fallback (seconds instead of
    JVM start-ups); extra: more variables."""
    env = dict(
        os.environ,
        DUOCAP_CACHE=str(cache),
        PYTHONIOENCODING="utf-8",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        **extra,
    )
    if hide_java:
        env["PATH"] = path_without_java()
    return env


def path_without_java():
    return os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "java").exists()
    )


class Script:
    """A repository script running in the background. Output goes to temporary files, not
    pipes, so a process that is polled (and never read) cannot block on a full pipe."""

    def __init__(self, args, cache, hide_java=False, env=None):
        import subprocess
        import tempfile

        self.args = [str(a) for a in args]
        self.stdout, self.stderr = tempfile.TemporaryFile(), tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            cwd=REPO,
            env=script_env(cache, hide_java, **(env or {})),
            stdout=self.stdout,
            stderr=self.stderr,
        )
        self.result = None

    def kill_tree(self, sig):
        """Signal the script and every process below it at once (torchrun starts its ranks in
        sessions of their own, so a process group would not reach them)."""
        children = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:  # the fields after the command name, which is in parentheses: state, parent pid, ...
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            except OSError:  # it exited while we looked
                continue
            children.setdefault(parent, []).append(int(stat.parent.name))
        tree, k = [self.proc.pid], 0
        while k < len(tree):
            tree += children.get(tree[k], [])
            k += 1
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def wait(self, timeout=300):
        """(exit status, stdout, stderr), decoded as UTF-8."""
        import subprocess

        if self.result is None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"{self.args} ran past {timeout}s")
            outputs = []
            for f in (self.stdout, self.stderr):
                f.seek(0)
                outputs.append(f.read().decode("utf-8", "replace"))
                f.close()
            self.result = (self.proc.returncode, *outputs)
        return self.result

    def ok(self, timeout=300):
        """stdout + stderr of a run that must have exited 0."""
        rc, stdout, stderr = self.wait(timeout)
        assert rc == 0, f"{self.args} exited {rc}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        return stdout + stderr


def wait_all(scripts):
    """{name: (exit status, stdout, stderr)} of {name: Script}, once every one has exited."""
    return {name: script.wait() for name, script in scripts.items()}


class InProcess:
    """A script's command line run in this process on the first wait(), as `python script ...` runs
    it (its __main__ block, sys.argv, the working directory, Script's variables), with Script's
    (exit status, stdout, stderr): no fresh interpreter spending seconds importing torch. Variables
    that a library reads once, on import (HF_HUB_OFFLINE, HF_HOME), keep their values here: a case
    that reaches for the hub needs a Script."""

    def __init__(self, args, cache, env=None, hide_java=False):
        self.args = [str(a) for a in args]
        self.env = {"DUOCAP_CACHE": str(cache), "HF_HUB_OFFLINE": "1", **(env or {})}
        if hide_java:
            self.env["PATH"] = path_without_java()
        self.result = None

    def wait(self):
        if self.result is None:
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.ExitStack() as stack:
                stack.enter_context(kept_rng())
                stack.enter_context(mock.patch.dict(os.environ, self.env))
                stack.enter_context(mock.patch.object(sys, "argv", self.args))
                stack.enter_context(contextlib.chdir(REPO))
                stack.enter_context(contextlib.redirect_stdout(stdout))
                stack.enter_context(contextlib.redirect_stderr(stderr))
                rc = 0
                try:
                    runpy.run_path(self.args[0], run_name="__main__")
                except SystemExit as e:  # as the interpreter ends on it: a message goes to stderr, with status 1
                    if e.code is None or isinstance(e.code, int):
                        rc = e.code or 0
                    else:
                        print(e.code, file=sys.stderr)
                        rc = 1
                except Exception:
                    traceback.print_exc()
                    rc = 1
            self.result = (rc, stdout.getvalue(), stderr.getvalue())
        return self.result

    def ok(self):
        """stdout + stderr of a run that must have exited 0."""
        rc, stdout, stderr = self.wait()
        assert rc == 0, f"{self.args} exited {rc}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        return stdout + stderr


def start_refusals(script, cases, cache, env=None, **paths):
    """An entry point's refusal table: {case: (Script or InProcess, what the message must name, usage)}.
    cases: {case: (arguments, named, usage)}, with {name} in an argument or in `named` standing
    for paths[name]; usage: an argparse usage error rather than the script's own one-line error.
    The first case of the script's own error runs in a fresh process, started now: only there does
    anything else that reaches stderr show (a traceback on the way out, a warning, a library's log
    line). The others run in this process on wait(), where a fresh one would add seconds of imports."""
    fresh = next(case for case, (_, _, usage) in cases.items() if not usage)
    return {
        case: (
            (Script if case == fresh else InProcess)([script, *(a.format(**paths) for a in args)], cache, env=env),
            named.format(**paths),
            usage,
        )
        for case, (args, named, usage) in cases.items()
    }


def assert_refused(script, named, usage):
    """A clean refusal: a non-zero exit and no traceback; an argparse usage error names the option on
    its error line, and the script's own error is one line, "error: ...", naming the path or option."""
    rc, stdout, stderr = script.wait()
    assert rc != 0, f"{script.args} exited 0:\n{stdout[-2000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    if usage:
        assert rc == 2 and stderr.startswith("usage:"), stderr
        assert f"error: argument {named}" in stderr.splitlines()[-1], stderr
    else:
        assert stderr.startswith("error:") and len(stderr.splitlines()) == 1, stderr
        assert named in stderr, f"{named} not named in: {stderr}"


# -----------------------------------------------------------------------------
# fixtures whose work is subprocesses, started before the first test

# The tests in this process train on one thread; these fixtures mostly wait on training
# subprocesses. Started in a background thread when the session begins (for the fixtures the
# selected tests need), they use the second core while the in-process tests run, instead of
# leaving it idle and running on their own later. A body must not touch this process's global
# state (working directory, sys.argv, stdout, the RNGs): it starts Scripts and reads files.
HEAD_START = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="head-start")
STARTED_EARLY = {}  # fixture name: (its body, a function of session fixtures; whether it runs in HEAD_START)
STARTED = {}  # fixture name: the future of its body's result


def started_early(body, in_thread=True):
    """A session fixture, named as the body, whose body runs in HEAD_START: started by head_start
    before the first test if a selected test needs it, or when first asked for."""
    STARTED_EARLY[body.__name__] = (body, in_thread)

    @pytest.fixture(scope="session", name=body.__name__)
    def fixture(request):
        return start(body.__name__, request).result()

    fixture.__doc__ = body.__doc__
    return fixture


def started_first(body):
    """The same for a body that only starts processes and returns at once (a refusal table): it
    runs in this thread, at the session's start, so that its processes overlap the tests before."""
    return started_early(body, in_thread=False)


def start(name, request):
    if name not in STARTED:
        body, in_thread = STARTED_EARLY[name]
        kwargs = {p: request.getfixturevalue(p) for p in inspect.signature(body).parameters}
        if in_thread:
            STARTED[name] = HEAD_START.submit(body, **kwargs)
        else:
            STARTED[name] = concurrent.futures.Future()
            STARTED[name].set_result(body(**kwargs))
    return STARTED[name]


def pytest_collection_modifyitems(items):
    """Test files that wait on a run started early go after the others, in the order the runs are
    queued, so that the tests in this process run while those runs train. A file's tests stay
    together (moving one apart would set its module fixtures up twice)."""
    queue = [name for name, (_, in_thread) in STARTED_EARLY.items() if in_thread]
    last_needed = {}
    for item in items:  # a file that waits only on processes started at once goes before them, after the rest
        needs = [queue.index(n) + 1 if n in queue else 0.5 for n in item.fixturenames if n in STARTED_EARLY]
        last_needed[item.module] = max([last_needed.get(item.module, 0), *needs])
    first_seen = {m: k for k, m in reversed(list(enumerate(item.module for item in items)))}
    items.sort(key=lambda item: (last_needed[item.module], first_seen[item.module]))


@pytest.fixture(scope="session", autouse=True)
def head_start(request):
    needed = set().union(*(item.fixturenames for item in request.session.items))
    for name in sorted(STARTED_EARLY, key=lambda n: not STARTED_EARLY[n][1]):  # the background's queue first
        if name in needed:
            start(name, request)
    yield
    HEAD_START.shutdown(cancel_futures=True)


# -----------------------------------------------------------------------------
# runs shared by several test files, each started in the background and waited for together


@pytest.fixture(scope="session")
def trained_runs(tiny_args, duocap_cache, tmp_path_factory):
    """{variant: (run dir, stdout)}: both numbered scripts train 3 steps on the shapes data and
    evaluate, in this process as `python script` runs them (java hidden: no test here reads METEOR,
    and each JVM costs seconds). The scripts run in fresh processes in resume_runs and the refusal
    tables."""
    runs = {}
    for variant, script in TRAIN_SCRIPTS.items():
        out = tmp_path_factory.mktemp(f"e2e-{variant}") / "run"
        args = [script, *tiny_args, "--max-steps", 3, "--batch-size", 8, "--out", out]
        runs[variant] = (out, InProcess(args, duocap_cache / variant, hide_java=True).ok())
    return runs


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """{source: (where, what was written)}: a tiny dataset of each source in its own layout."""
    root = tmp_path_factory.mktemp("sources")
    coco_train, coco_val = corpora.write_coco(root / "coco")
    return {
        "flickr8k": (root / "flickr8k", corpora.write_flickr8k(root / "flickr8k")),
        "karpathy": (root / "karpathy", corpora.write_karpathy(root / "karpathy")),
        "coco": (root / "coco", (coco_train, coco_val)),
        "folder": (root / "folder", corpora.write_csv_folder(root / "folder")),
        "hf": (root / "hf", corpora.write_hf(root / "hf")),
    }


@pytest.fixture(scope="session")
def source_runs(sources, vision_dir, language_dir, duocap_cache, tmp_path_factory):
    """{source: (run dir, exit status, stdout, stderr)}: 2 steps with each source, then the test
    evaluation (java hidden: the plain-tokenizer metrics are enough here and much quicker). In this
    process: a fresh one would add only its seconds of imports (the scripts' own subprocess tests
    are trained_runs and the refusal tables)."""
    runs = tmp_path_factory.mktemp("source-runs")
    scripts = {
        name: InProcess(
            [TRAIN_SCRIPTS["explained"], "--vision", vision_dir, "--language", language_dir]
            + [*corpora.cli_source(name, where), "--max-steps", 2, "--batch-size", 4, "--out", runs / name],
            duocap_cache,
            hide_java=True,
        )
        for name, (where, _) in sources.items()
    }
    return {name: (runs / name, *result) for name, result in wait_all(scripts).items()}


# 64 shapes images x 5 captions = 320 rows: 40 steps an epoch of 8, 80 in all
RESUME_STEPS = 80


def metrics_rows(run):
    path = run / "metrics.jsonl"
    return read_jsonl(path) if path.is_file() else []


def signal_when(pending, timeout=240):
    """pending: [(Script, condition(), signal)]. Poll every 5 ms and send each its signal
    as soon as its condition holds (or stop polling when it has already exited)."""
    deadline = time.time() + timeout
    pending = list(pending)
    while pending and time.time() < deadline:
        for item in list(pending):
            script, condition, sig = item
            if script.proc.poll() is not None:
                pending.remove(item)
            elif condition():
                script.proc.send_signal(sig)
                pending.remove(item)
        time.sleep(0.005)
    assert not pending, "the runs to interrupt never reached the point of interruption"


@started_early
def resume_runs(tiny_args, duocap_cache, tmp_path_factory):
    """(run directories, {name: Script}): for each variant an uninterrupted run and a SIGKILLed one,
    resumed; an explained run stopped by SIGTERM, resumed."""
    root = tmp_path_factory.mktemp("resume")
    args = [*tiny_args, "--batch-size", 8, "--epochs", 2, "--no-eval"]
    dirs = {
        **{f"full-{v}": root / f"full-{v}" for v in VARIANTS},
        **{f"killed-{v}": root / f"killed-{v}" for v in VARIANTS},
        "terminated": root / "terminated",
    }
    first = {
        f"{name}-{v}": Script([TRAIN_SCRIPTS[v], *args, "--save-every", 3, "--out", dirs[f"{name}-{v}"]], duocap_cache)
        for v in VARIANTS
        for name in ("full", "killed")
    }
    first["terminated"] = Script(
        [TRAIN_SCRIPTS["explained"], *args, "--log-every", 1, "--save-every", 1000, "--out", dirs["terminated"]],
        duocap_cache,
    )
    signal_when(
        [
            (first[f"killed-{v}"], lambda d=dirs[f"killed-{v}"]: bool(checkpoints.checkpoint_dirs(d)), signal.SIGKILL)
            for v in VARIANTS
        ]
        + [(first["terminated"], lambda: bool(metrics_rows(dirs["terminated"])), signal.SIGTERM)]
    )
    wait_all(first)
    # the stopped run as it was left, before resuming adds to it and rotates its checkpoints
    dirs["terminated-as-left"] = root / "terminated-as-left"
    if dirs["terminated"].is_dir():
        shutil.copytree(dirs["terminated"], dirs["terminated-as-left"])

    second = {
        f"resumed-{v}": Script([TRAIN_SCRIPTS[v], "--resume", dirs[f"killed-{v}"], "--no-eval"], duocap_cache)
        for v in VARIANTS
        if first[f"killed-{v}"].wait()[0] == -signal.SIGKILL
    }
    if first["terminated"].wait()[0] in (0, 143):
        second["resumed-terminated"] = Script(
            [TRAIN_SCRIPTS["explained"], "--resume", dirs["terminated"], "--no-eval"], duocap_cache
        )
    wait_all(second)
    return dirs, {**first, **second}


# -----------------------------------------------------------------------------
# a PostgreSQL server, for sweep workers sharing a study as they would from several machines


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a database "optuna" on a throwaway PostgreSQL server on a free port, stopped when
    the session ends, however the tests went."""
    import glob
    import socket
    import subprocess
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); `bash setup.sh` installs it")
    bin_dir = Path(found[-1]).parent
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    root = Path(tempfile.mkdtemp(prefix="duocap-pg-"))  # not under pytest's folder, which only root may enter
    if as_postgres:
        shutil.chown(root, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(program, *args):
        done = subprocess.run([*as_postgres, str(bin_dir / program), *map(str, args)], capture_output=True, text=True)
        if done.returncode:
            log = (root / "log").read_text() if (root / "log").is_file() else ""
            pytest.fail(f"{program} {' '.join(map(str, args))} exited {done.returncode}:\n{done.stderr}\n{log}")

    data_dir = root / "data"
    try:
        run("initdb", "-D", data_dir, "-A", "trust", "-U", "postgres")
        server = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        run("pg_ctl", "-D", data_dir, "-o", server, "-l", root / "log", "-w", "start")
        run("psql", "-h", "127.0.0.1", "-p", port, "-U", "postgres", "-c", "create database optuna")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/optuna"
    finally:
        if (data_dir / "postmaster.pid").is_file():
            run("pg_ctl", "-D", data_dir, "-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)
