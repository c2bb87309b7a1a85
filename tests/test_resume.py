"""Interrupted training resumes exactly: SIGKILL mid-epoch, SIGTERM (checkpoint and exit),
a non-finite step, the wrong variant; and checkpoints are data only (safetensors + JSON)."""

import json
import random
import re
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import checkpoints
from conftest import REPO, TRAIN_SCRIPTS, VARIANTS, Script, batch_for
from runs import build_model, load_run, read_config

# 64 shapes images x 5 captions = 320 rows: 40 steps an epoch of 8, 80 in all
TOTAL_STEPS = 80


def common(vision_dir, language_dir, shapes_dir):
    return [
        "--vision",
        vision_dir,
        "--language",
        language_dir,
        "--data",
        "shapes",
        "--data-dir",
        shapes_dir,
        "--batch-size",
        8,
        "--epochs",
        2,
        "--no-eval",
    ]


def step_checkpoints(run):
    return sorted((run / "checkpoints").glob("step-*[0-9]"))


def metrics_rows(run):
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


@pytest.fixture(scope="module")
def runs(vision_dir, language_dir, shapes_dir, duocap_cache, tmp_path_factory):
    """Run directories: for each variant an uninterrupted run and a SIGKILLed one, resumed;
    an explained run stopped by SIGTERM, resumed; and the outputs of every process."""
    root = tmp_path_factory.mktemp("resume")
    args = common(vision_dir, language_dir, shapes_dir)
    dirs = {
        **{f"full-{v}": root / f"full-{v}" for v in VARIANTS},
        **{f"killed-{v}": root / f"killed-{v}" for v in VARIANTS},
        "terminated": root / "terminated",
    }
    first = {}
    for v in VARIANTS:
        first[f"full-{v}"] = Script(
            [TRAIN_SCRIPTS[v], *args, "--save-every", 3, "--out", dirs[f"full-{v}"]], duocap_cache
        )
        first[f"killed-{v}"] = Script(
            [TRAIN_SCRIPTS[v], *args, "--save-every", 3, "--out", dirs[f"killed-{v}"]], duocap_cache
        )
    first["terminated"] = Script(
        [TRAIN_SCRIPTS["explained"], *args, "--log-every", 1, "--save-every", 1000, "--out", dirs["terminated"]],
        duocap_cache,
    )
    signal_when(
        [
            (first[f"killed-{v}"], lambda d=dirs[f"killed-{v}"]: bool(step_checkpoints(d)), signal.SIGKILL)
            for v in VARIANTS
        ]
        + [(first["terminated"], lambda: bool(metrics_rows(dirs["terminated"])), signal.SIGTERM)]
    )
    outputs = {k: s.wait() for k, s in first.items()}
    # the stopped run as it was left, before resuming adds to it and rotates its checkpoints
    dirs["terminated-as-left"] = root / "terminated-as-left"
    if dirs["terminated"].is_dir():
        shutil.copytree(dirs["terminated"], dirs["terminated-as-left"])

    second = {
        f"resumed-{v}": Script([TRAIN_SCRIPTS[v], "--resume", dirs[f"killed-{v}"], "--no-eval"], duocap_cache)
        for v in VARIANTS
        if outputs[f"killed-{v}"][0] == -signal.SIGKILL
    }
    if outputs["terminated"][0] in (0, 143):
        second["resumed-terminated"] = Script(
            [TRAIN_SCRIPTS["explained"], "--resume", dirs["terminated"], "--no-eval"], duocap_cache
        )
    outputs.update({k: s.wait() for k, s in second.items()})
    return dirs, outputs


def ok(outputs, name):
    rc, stdout, stderr = outputs[name]
    assert rc == 0, f"{name} exited {rc}:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    return stdout + stderr


def assert_same_weights(a, b, skip=()):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.startswith(skip):
            continue
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


def assert_data_only(run):
    """Every finished checkpoint holds safetensors and JSON and nothing else."""
    dirs = step_checkpoints(run)
    assert dirs, f"no checkpoints in {run}"
    for d in dirs:
        names = sorted(p.name for p in d.iterdir())
        assert names == ["model.safetensors", "optimizer.safetensors", "state.json"], (d, names)
        for p in d.iterdir():
            raw = p.read_bytes()
            assert not raw.startswith((b"\x80", b"PK")), f"{p} looks like a pickle or a torch zip"
            if p.suffix == ".json":
                json.loads(raw)
            else:
                load_file(str(p))


@pytest.mark.parametrize("variant", VARIANTS)
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(runs, variant):
    dirs, outputs = runs
    rc, stdout, stderr = outputs[f"killed-{variant}"]
    assert rc == -signal.SIGKILL, f"the run was not killed before it finished (exit {rc})"
    out = ok(outputs, f"resumed-{variant}")
    resumed_from = re.search(r"resumed from \S+step-(\d+) \(epoch (\d), step (\d+)\)", out)
    assert resumed_from, out[-2000:]
    step = int(resumed_from.group(3))
    assert 3 <= step < TOTAL_STEPS, "the resumed run continued from a mid-run checkpoint"
    ok(outputs, f"full-{variant}")
    for name in ("full", "killed"):
        summary = json.loads((dirs[f"{name}-{variant}"] / "summary.json").read_text())
        assert summary["steps"] == TOTAL_STEPS
    assert_same_weights(dirs[f"killed-{variant}"] / "model.safetensors", dirs[f"full-{variant}"] / "model.safetensors")
    # the last checkpoints agree too: weights and optimizer moments. (Not the torch RNG state: a
    # resumed run creates one more DataLoader iterator, which draws from it; see the report.)
    last_full = step_checkpoints(dirs[f"full-{variant}"])[-1]
    last_resumed = step_checkpoints(dirs[f"killed-{variant}"])[-1]
    assert last_full.name == last_resumed.name
    assert_same_weights(last_full / "model.safetensors", last_resumed / "model.safetensors")
    assert_same_weights(last_full / "optimizer.safetensors", last_resumed / "optimizer.safetensors", skip=("rng.",))
    # metrics.jsonl of the resumed run is appended to, and reaches the last step
    steps = [m["step"] for m in metrics_rows(dirs[f"killed-{variant}"]) if "train_loss" in m]
    assert steps[-1] == TOTAL_STEPS


def test_sigterm_checkpoints_and_exits_then_resume_finishes(runs):
    dirs, outputs = runs
    run, left = dirs["terminated"], dirs["terminated-as-left"]
    rc, stdout, stderr = outputs["terminated"]
    assert rc in (0, 143), f"exit {rc}:\n{stderr[-3000:]}"
    assert "Traceback" not in stdout + stderr
    logged = [m["step"] for m in metrics_rows(left)]
    assert logged, "nothing was logged before the stop"
    assert step_checkpoints(left), "SIGTERM left no checkpoint"
    last = step_checkpoints(left)[-1]
    state = json.loads((last / "state.json").read_text())
    stopped_at = state["progress"]["step"]
    assert stopped_at >= max(logged) - 1, f"checkpoint at step {stopped_at}, but step {max(logged)} was logged"
    assert stopped_at < TOTAL_STEPS, "the run was stopped before the end"
    assert f"stopped at step {stopped_at}" in stdout
    assert not (left / "summary.json").exists()

    # the checkpoint loads into a fresh model and optimizer (restoring this process's RNGs after)
    config = read_config(run)
    rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        model, _, _ = build_model(config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(model.parameter_groups(config["weight_decay"]), lr=config["lr"])
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        progress = checkpoints.load(last, model, optimizer, scheduler, scaler)
    finally:
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
    assert progress["step"] == stopped_at
    assert len(optimizer.state) == len(params), "the optimizer state was restored for every parameter"

    # the run directory's model is the checkpoint's, and load_run takes it
    loaded, _, _, loaded_config = load_run(left)
    assert loaded_config["variant"] == "explained"
    checkpoint_weights = load_file(str(last / "model.safetensors"))
    own = loaded.state_dict()
    for k, v in checkpoint_weights.items():
        assert torch.equal(own[k], v), k

    out = ok(outputs, "resumed-terminated")
    assert f"step {stopped_at})" in out
    summary = json.loads((run / "summary.json").read_text())
    full = json.loads((dirs["full-explained"] / "summary.json").read_text())
    assert summary["steps"] == full["steps"] == TOTAL_STEPS
    assert_same_weights(run / "model.safetensors", dirs["full-explained"] / "model.safetensors")


def test_checkpoints_are_safetensors_and_json_only(runs):
    dirs, outputs = runs
    for name in ("full-explained", "full-self_attention", "terminated", "terminated-as-left", "killed-explained"):
        assert_data_only(dirs[name])
    for name in ("full-explained", "terminated"):
        leftovers = [p.name for p in (dirs[name] / "checkpoints").iterdir() if not re.fullmatch(r"step-\d{8}", p.name)]
        assert not leftovers, f"{name}: {leftovers}"
        assert len(step_checkpoints(dirs[name])) <= 2, "--keep 2 keeps the last two"


def test_resuming_with_the_other_variant_is_refused(runs):
    """What 10_train_self_attention.py --resume EXPLAINED_RUN runs (train.main("self_attention")),
    in this process: the refusal comes before anything is built, loaded or written."""
    import train

    dirs, outputs = runs
    run = dirs["full-explained"]
    ok(outputs, "full-explained")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        train.main("self_attention", ["--resume", str(run), "--no-eval"])
    message = str(e.value.code)
    assert e.value.code not in (0, None)
    assert "explained" in message and "self_attention" in message, message
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    with pytest.raises(ValueError) as e:
        load_run(run, variant="self_attention")
    assert "explained" in str(e.value) and "self_attention" in str(e.value)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_non_finite_loss_leaves_the_weights_untouched(make_model, splits):
    import train

    model, processor, tokenizer, config = make_model("explained")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with torch.no_grad():
        model.adapter[0].weight[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    batch = batch_for(processor, tokenizer, splits["train"][:4])
    loss, grad_norm, ok = train.train_step(model, [batch], optimizer, scheduler, scaler, params, config)
    assert not ok
    assert not torch.isfinite(loss)
    assert not optimizer.state, "no optimizer step was taken"
    for n, p in model.named_parameters():
        if p.requires_grad:
            # bitwise: NaN == NaN here, and weight decay alone would have moved every other weight
            assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), f"{n} changed"

    # the same step with the NaN removed does move the weights: the check above could fail
    with torch.no_grad():
        model.adapter[0].weight[0, 0] = 0.0
    loss, grad_norm, ok = train.train_step(model, [batch], optimizer, scheduler, scaler, params, config)
    assert ok and torch.isfinite(loss)
    assert not torch.equal(model.adapter[1].weight, before["adapter.1.weight"])


LOADS_DATA = re.compile(
    r"\bc?pickle\b|\bdill\b|joblib|torch\.load\b|allow_pickle|weights_only\s*=\s*False"
    r"|trust_remote_code\s*=\s*True"
)


def test_no_top_level_script_can_unpickle():
    """Nothing in the repository's scripts loads with pickle (or torch.load, which unpickles)."""
    sources = sorted(REPO.glob("*.py"))
    assert len(sources) >= 10
    hits = [
        f"{p.name}:{n}: {line.strip()}"
        for p in sources
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if LOADS_DATA.search(line)
    ]
    assert hits == []
