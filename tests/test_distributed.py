"""Data-parallel training under torchrun (gloo on CPU) and gradient accumulation update the
weights exactly as one process with the same global batch and data order, and a torchrun
job killed mid-run resumes under torchrun to the uninterrupted weights."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, Script

COMMON = ["--epochs", "1", "--max-steps", "3", "--no-eval", "--save-every", "0"]


def run(cmd, out, cache, vision_dir, language_dir, shapes_dir):
    env = dict(os.environ, DUOCAP_CACHE=str(cache), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    args = [
        "--vision",
        vision_dir,
        "--language",
        language_dir,
        "--data",
        "shapes",
        "--data-dir",
        shapes_dir,
        "--out",
        out,
        *COMMON,
    ]
    return subprocess.Popen(
        [*cmd, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module")
def runs(vision_dir, language_dir, shapes_dir, duocap_cache, tmp_path_factory):
    """The same 3 steps of global batch 8: one process; 2 micro-batches of 4; torchrun with 2 ranks of 4."""
    root = tmp_path_factory.mktemp("ddp")
    script = "08_train_explained.py"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    plans = {
        "single": ([sys.executable, script, "--batch-size", "8"]),
        "accum": ([sys.executable, script, "--batch-size", "4", "--grad-accum", "2"]),
        "ddp": (torchrun + ["--batch-size", "4"]),
    }
    procs = {
        name: run(cmd, root / name, duocap_cache / name, vision_dir, language_dir, shapes_dir)
        for name, cmd in plans.items()
    }
    outputs = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} failed:\n{out[-4000:]}"
        outputs[name] = out
    return root, outputs


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_torchrun_two_ranks_match_one_process_with_the_global_batch(runs):
    root, outputs = runs
    single, ddp = (
        load_file(str(root / "single" / "model.safetensors")),
        load_file(str(root / "ddp" / "model.safetensors")),
    )
    initial_gap = max_difference(single, {k: torch.zeros_like(v) for k, v in single.items()})
    assert initial_gap > 0
    assert max_difference(single, ddp) < 1e-5
    assert "global batch 8 = 4 per rank x 1 accumulation steps x 2 rank(s)" in outputs["ddp"]
    # the feature cache was extracted in two shards, one per rank, into one file per split
    n_train = 64
    assert f"rank 0 of 2 encoded images 0..{n_train // 2 - 1} of {n_train}" in outputs["ddp"], outputs["ddp"][-3000:]
    assert f"rank 1 of 2 encoded images {n_train // 2}..{n_train - 1} of {n_train}" in outputs["ddp"]
    assert "encoded images" not in outputs["single"], "one process encodes everything itself"


def test_gradient_accumulation_matches_one_big_batch(runs):
    root, outputs = runs
    single, accum = (
        load_file(str(root / "single" / "model.safetensors")),
        load_file(str(root / "accum" / "model.safetensors")),
    )
    assert max_difference(single, accum) < 1e-5
    assert "global batch 8 = 4 per rank x 2 accumulation steps x 1 rank(s)" in outputs["accum"]


def test_the_runs_did_train(runs, make_model):
    """Guard against a vacuous match: the trained weights differ from a fresh model's."""
    root, _ = runs
    model, *_ = make_model("explained")
    fresh = model.trainable_state_dict()
    trained = load_file(str(root / "single" / "model.safetensors"))
    assert max_difference(fresh, trained) > 1e-4


def test_epoch_order_shards_the_global_batch():
    import train

    one = train.epoch_order(100, seed=3, epoch=1, n_steps=5, batch_size=8)
    shards = [train.epoch_order(100, 3, 1, 5, 2, grad_accum=2, rank=r, world=2) for r in range(2)]
    for step in range(5):
        global_rows = set(one[step * 8 : (step + 1) * 8])
        from_ranks = set(shards[0][step * 4 : (step + 1) * 4]) | set(shards[1][step * 4 : (step + 1) * 4])
        assert global_rows == from_ranks
    assert train.epoch_order(100, 3, 1, 5, 8) == one
    assert train.epoch_order(100, 3, 2, 5, 8) != one


# -----------------------------------------------------------------------------
# a torchrun job killed mid-run (every rank and the launcher at once, as when a node
# is lost) and resumed under torchrun

RESUME_STEPS = 24


@pytest.fixture(scope="module")
def ddp_resume(vision_dir, language_dir, shapes_dir, duocap_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-resume")
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "08_train_explained.py"]
    args = [
        "--vision",
        vision_dir,
        "--language",
        language_dir,
        "--data",
        "shapes",
        "--data-dir",
        shapes_dir,
        "--batch-size",
        4,
        "--epochs",
        1,
        "--max-steps",
        RESUME_STEPS,
        "--save-every",
        3,
        "--no-eval",
    ]
    cache = duocap_cache / "ddp-resume"
    full = Script([*torchrun, *args, "--out", root / "full"], cache)
    killed = Script([*torchrun, *args, "--out", root / "killed"], cache)
    deadline = time.time() + 240
    while killed.proc.poll() is None and not list((root / "killed").glob("checkpoints/step-*[0-9]")):
        assert time.time() < deadline, "the run to kill never wrote a checkpoint"
        time.sleep(0.005)
    if killed.proc.poll() is None:
        killed.kill_tree(signal.SIGKILL)
    outputs = {"full": full.wait(), "killed": killed.wait()}
    if outputs["killed"][0] == -signal.SIGKILL:
        outputs["resumed"] = Script([*torchrun, "--resume", root / "killed", "--no-eval"], cache).wait()
    return root, outputs


def test_torchrun_killed_mid_run_resumes_under_torchrun_to_the_uninterrupted_weights(ddp_resume):
    root, outputs = ddp_resume
    assert outputs["full"][0] == 0, outputs["full"][1][-3000:] + outputs["full"][2][-3000:]
    assert outputs["killed"][0] == -signal.SIGKILL, "the run finished before it could be killed"
    rc, stdout, stderr = outputs["resumed"]
    assert rc == 0, stdout[-3000:] + stderr[-3000:]
    resumed_from = re.search(r"resumed from \S+ \(epoch 1, step (\d+)\)", stdout)
    assert resumed_from and 3 <= int(resumed_from.group(1)) < RESUME_STEPS, stdout[-2000:]
    for run in ("full", "killed"):
        summary = (root / run / "summary.json").read_text()
        assert f'"steps": {RESUME_STEPS}' in summary, summary
    full, resumed = (load_file(str(root / run / "model.safetensors")) for run in ("full", "killed"))
    assert max_difference(full, resumed) < 1e-6
