"""Train a few steps with each numbered script and caption with generate.py, each in a fresh process."""

import json
import math
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from conftest import REPO

SCRIPTS = {"explained": "08_train_explained.py", "self_attention": "10_train_self_attention.py"}


def start(args, cache):
    # one thread each: the processes run side by side on a small machine
    env = dict(
        os.environ,
        DUOCAP_CACHE=str(cache),
        PYTHONIOENCODING="utf-8",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    return subprocess.Popen(
        [sys.executable, *map(str, args)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def finish(proc, timeout=300):
    """(exit code, stdout, stderr); bytes are decoded here so that a caption is compared exactly."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"{proc.args} ran past {timeout}s:\n{stderr.decode('utf-8', 'replace')[-3000:]}")
    return proc.returncode, stdout.decode("utf-8"), stderr.decode("utf-8", "replace")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def trained(vision_dir, language_dir, shapes_dir, duocap_cache, tmp_path_factory):
    """{variant: (run dir, stdout)}: both numbered scripts train 3 steps, side by side, in fresh processes."""
    procs = {}
    for variant, script in SCRIPTS.items():
        out = tmp_path_factory.mktemp(f"e2e-{variant}") / "run"
        # a feature cache each: two runs computing the same cache file at the same moment would race
        # on its one temporary name (train.cached_features writes <hash>.safetensors.tmp)
        procs[variant] = (
            out,
            start(
                [
                    script,
                    "--vision",
                    vision_dir,
                    "--language",
                    language_dir,
                    "--data",
                    "shapes",
                    "--data-dir",
                    shapes_dir,
                    "--max-steps",
                    3,
                    "--batch-size",
                    8,
                    "--out",
                    out,
                ],
                duocap_cache / variant,
            ),
        )
    runs = {}
    for variant, (out, proc) in procs.items():
        rc, stdout, stderr = finish(proc)
        assert rc == 0, f"{SCRIPTS[variant]} failed:\n{stdout}\n{stderr[-5000:]}"
        runs[variant] = out, stdout
    return runs


@pytest.fixture(scope="module")
def generated(trained, splits, duocap_cache, tmp_path_factory):
    """generate.py in fresh processes: every test image for each run, and a missing file beside a good one."""
    missing = tmp_path_factory.mktemp("nothing-here") / "no-such-image.png"
    good = str(splits["test"][0].image)
    procs = {}
    for variant, (out, _) in trained.items():
        paths = [p["image"] for p in read_jsonl(out / "predictions_test.jsonl")]
        procs[variant] = start(["generate.py", "--checkpoint", out, "--strategy", "greedy", *paths], duocap_cache)
    procs["missing"] = start(
        ["generate.py", "--checkpoint", trained["explained"][0], "--strategy", "greedy", missing, good], duocap_cache
    )
    return {k: finish(p) for k, p in procs.items()}, missing, good


@pytest.mark.parametrize("variant", list(SCRIPTS))
def test_training_writes_a_complete_run_directory(trained, splits, duocap_cache, variant):
    out, stdout = trained[variant]
    for name in ("config.json", "model.safetensors", "metrics.jsonl", "eval_test.json", "predictions_test.jsonl"):
        assert (out / name).is_file(), f"{name} missing from the run directory"
    assert not [p for p in out.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".pkl", ".tmp")]
    assert "trainable of" in stdout, "the trainable and total parameter counts are printed at start"

    config = json.loads((out / "config.json").read_text())
    assert config["variant"] == variant and config["max_steps"] == 3 and config["batch_size"] == 8
    weights = load_file(str(out / "model.safetensors"))
    assert any(k.startswith("adapter.") for k in weights)
    assert not any(k.startswith("vision.") or "embed_tokens" in k for k in weights), "frozen weights are not saved"

    metrics = read_jsonl(out / "metrics.jsonl")
    train_rows = [m for m in metrics if "train_loss" in m]
    val_rows = [m for m in metrics if "val_loss" in m]
    assert train_rows and train_rows[-1]["step"] == 3, "training stops after --max-steps"
    assert max(m["step"] for m in metrics) == 3
    assert all(math.isfinite(m["train_loss"]) for m in train_rows)
    assert val_rows and math.isfinite(val_rows[-1]["val_loss"])

    figures = json.loads((out / "eval_test.json").read_text())
    for key in ("attribute_accuracy", "exact_match", "blind_attribute_accuracy", "relation_accuracy"):
        assert 0 <= figures[key] <= 1, key
    assert figures["n_images"] == len(splits["test"])
    assert figures["compositional"]["n_images"] == len(splits["compositional"])
    assert 0 <= figures["compositional"]["attribute_accuracy"] <= 1

    predictions = read_jsonl(out / "predictions_test.jsonl")
    assert [p["image"] for p in predictions] == [str(r.image) for r in splits["test"]]
    assert [p["references"] for p in predictions] == [r.captions for r in splits["test"]]
    assert all(isinstance(p["caption"], str) for p in predictions)

    # the feature cache went where DUOCAP_CACHE says
    assert list((duocap_cache / variant / "features").glob("*.npy"))


@pytest.mark.parametrize("variant", list(SCRIPTS))
def test_generate_reproduces_the_evaluation_captions(trained, generated, variant):
    out, _ = trained[variant]
    predictions = read_jsonl(out / "predictions_test.jsonl")
    rc, stdout, stderr = generated[0][variant]
    assert rc == 0, stderr[-5000:]
    assert stdout == "".join(f"{p['image']}\t{p['caption']}\n" for p in predictions)


def test_generate_reports_a_missing_file_and_captions_the_rest(trained, generated):
    (rc, stdout, stderr), missing, good = generated[0]["missing"], generated[1], generated[2]
    assert rc == 1
    assert str(missing) in stderr
    assert str(missing) not in stdout
    assert stdout.startswith(good + "\t"), stdout
    predictions = {p["image"]: p["caption"] for p in read_jsonl(trained["explained"][0] / "predictions_test.jsonl")}
    assert stdout == f"{good}\t{predictions[good]}\n"
