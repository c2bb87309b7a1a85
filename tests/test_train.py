"""Training: the numbered scripts write a complete run directory from every data source; a step with
a non-finite loss changes nothing; data-parallel training under torchrun (gloo on CPU) and gradient
accumulation update the weights exactly as one process with the same global batch; interrupted
training (SIGKILL mid-epoch, SIGTERM, a torchrun job killed) resumes to the uninterrupted weights;
bad data is listed or left out; and a bad run folder, missing data or a bad value is refused in one line."""

import datetime
import json
import math
import re
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from corpora import (
    COCO_TRAIN,
    COCO_VAL,
    CSV_REFS,
    FOLDER_CASES,
    N_GOOD,
    SOURCE_NAMES,
    assert_named,
    karpathy_written,
    write_jsonl_dataset,
)
from safetensors.torch import load_file

import checkpoints
import data
import evaluate
import shapes
import skills
import train
from compare import read_jsonl
from conftest import (
    RESUME_STEPS,
    TRAIN_SCRIPTS,
    VARIANTS,
    InProcess,
    Script,
    assert_refused,
    batch_for,
    kept_rng,
    metrics_rows,
    start_refusals,
    started_early,
    started_first,
    training_parts,
    wait_all,
)
from runs import build_model, load_run, read_config

# -----------------------------------------------------------------------------
# a few steps with each numbered script, then the test evaluation


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_writes_a_complete_run_directory(trained_runs, splits, duocap_cache, variant):
    out, stdout = trained_runs[variant]
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

    # the figures of each split are those of its saved captions, read against the generator's scenes
    figures = json.loads((out / "eval_test.json").read_text())
    for split, nested in (("test", figures), ("compositional", figures["compositional"])):
        records = splits[split]
        predictions = read_jsonl(out / f"predictions_{split}.jsonl")
        assert [p["image"] for p in predictions] == [str(r.image) for r in records]
        assert [p["references"] for p in predictions] == [r.captions for r in records]
        captions = [p["caption"] for p in predictions]
        pairs = [(c, r.meta) for c, r in zip(captions, records) if r.meta["relation"] is not None]
        assert nested["n_images"] == len(records) and pairs
        assert nested["attribute_accuracy"] == pytest.approx(
            sum(shapes.parse_objects(c) == shapes.scene_objects(r.meta) for c, r in zip(captions, records))
            / len(records)
        )
        assert nested["relation_accuracy"] == pytest.approx(
            sum(skills.image_skills(c, meta)["direction"] is True for c, meta in pairs) / len(pairs)
        )
        assert nested["exact_match"] == pytest.approx(
            sum(c in r.captions for c, r in zip(captions, records)) / len(records)
        )

    # the feature cache went where DUOCAP_CACHE says
    assert list((duocap_cache / variant / "features").glob("*.npy"))


# -----------------------------------------------------------------------------
# one optimizer step


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_non_finite_loss_leaves_the_weights_untouched(make_model, splits):
    model, processor, tokenizer, config = make_model("explained")
    model.train()
    params, optimizer, scheduler, scaler = training_parts(model, lr=1e-2, weight_decay=0.01)
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


def mean_token_cross_entropy(model, batch):
    """The mean cross-entropy over every caption token of a batch, from the LM's full logits with
    F.cross_entropy: written here apart from the model's own loss (its chunked LM head and sum)."""
    state = model.encode_images(pixel_values=batch["pixel_values"])
    P = model.prefix_len(state)
    mask = batch["attention_mask"]
    mask = torch.cat([mask.new_ones(mask.shape[0], P), mask], 1)
    logits = model.lm(inputs_embeds=model.embed(state, batch["input_ids"], 0), attention_mask=mask).logits[:, P:]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch["targets"].flatten(), ignore_index=-100)


def as_rank(monkeypatch, world, global_tokens, global_loss_sum):
    """What torch.distributed shows train_step on one of `world` ranks: the world size, and
    all-reduce sums (the token count first, then the summed loss) of the whole global batch.
    The gradient stays local: DistributedDataParallel's average over ranks is the caller's."""
    totals = [global_tokens, global_loss_sum]
    monkeypatch.setattr(train, "distributed", lambda: True)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: world)
    monkeypatch.setattr(train.dist, "all_reduce", lambda tensor, op=None: tensor.copy_(totals.pop(0)))


@pytest.mark.parametrize("plan", ["single", "accum", "ddp"])
def test_the_step_gradient_is_the_mean_token_cross_entropy_of_the_global_batch(make_model, splits, monkeypatch, plan):
    """One optimizer step's gradient (before clipping) and loss are those of the mean cross-entropy
    over every caption token of the global batch of 8, however it is split: one batch, 2 micro-batches
    of 4, or 2 ranks of 4. This is the loss scale, which AdamW (invariant to it) and clipping hide
    from a comparison of the weights after a step."""
    model, processor, tokenizer, config = make_model("explained")
    model.train()
    records = splits["train"][:8]
    halves = [batch_for(processor, tokenizer, records[:4]), batch_for(processor, tokenizer, records[4:])]
    tokens = [int((b["targets"] != -100).sum()) for b in halves]
    assert tokens[0] != tokens[1], "halves of unequal token counts tell the global mean from a mean of means"
    params = [p for p in model.parameters() if p.requires_grad]
    expected_loss = mean_token_cross_entropy(model, batch_for(processor, tokenizer, records))
    expected = torch.autograd.grad(expected_loss, params)
    expected_norm = torch.cat([g.flatten() for g in expected]).norm()

    # the gradient as it reaches clipping, the norm train_step returns, and the loss
    seen = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda ps, m: seen.append([p.grad.clone() for p in ps]) or clip(ps, m)
    )
    _, optimizer, scheduler, scaler = training_parts(model, torch.optim.SGD, lr=0.0)
    if plan == "ddp":  # two ranks of 4, simulated in this process
        results = []
        for rank in range(2):
            with monkeypatch.context() as m:
                as_rank(m, 2, sum(tokens), expected_loss.detach() * sum(tokens))
                results.append(train.train_step(model, [halves[rank]], optimizer, scheduler, scaler, params, config))
        # DistributedDataParallel averages the ranks' gradients in the backward pass
        gradient = [(a + b) / 2 for a, b in zip(*seen)]
        losses = [loss for loss, _, _ in results]
    else:
        micro_batches = halves if plan == "accum" else [batch_for(processor, tokenizer, records)]
        loss, grad_norm, ok = train.train_step(model, micro_batches, optimizer, scheduler, scaler, params, config)
        assert ok
        (gradient,) = seen
        losses = [loss]
        torch.testing.assert_close(grad_norm, expected_norm, rtol=1e-5, atol=0)
    for got, want in zip(gradient, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * expected_norm.item())
    for loss in losses:
        torch.testing.assert_close(loss, expected_loss.detach(), rtol=1e-5, atol=0)


# -----------------------------------------------------------------------------
# many processes: torchrun (gloo on CPU) and gradient accumulation


TORCHRUN = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
COMMON = ["--epochs", "1", "--max-steps", "3", "--no-eval", "--save-every", "0", "--log-every", "1"]


@started_early
def ddp_runs(tiny_args, duocap_cache, tmp_path_factory):
    """The same 3 steps of global batch 8: one process; 2 micro-batches of 4; torchrun with 2 ranks of 4."""
    root = tmp_path_factory.mktemp("ddp")
    script = TRAIN_SCRIPTS["explained"]
    plans = {
        "single": [script, "--batch-size", 8],
        "accum": [script, "--batch-size", 4, "--grad-accum", 2],
        "ddp": [*TORCHRUN, script, "--batch-size", 4],
    }
    scripts = {
        name: Script([*cmd, *tiny_args, "--out", root / name, *COMMON], duocap_cache / name)
        for name, cmd in plans.items()
    }
    return root, {name: script.ok() for name, script in scripts.items()}


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_gradient_norms(root, run):
    """The gradient norms (before clipping) logged at every step equal the single process's: the
    loss scale, which the weights after AdamW do not show."""
    norms = {
        name: {m["step"]: m["grad_norm"] for m in read_jsonl(root / name / "metrics.jsonl") if "grad_norm" in m}
        for name in ("single", run)
    }
    assert sorted(norms["single"]) == [1, 2, 3], norms
    assert norms[run] == pytest.approx(norms["single"], rel=1e-5, abs=0)


def test_torchrun_two_ranks_match_one_process_with_the_global_batch(ddp_runs):
    root, outputs = ddp_runs
    single, ddp = (
        load_file(str(root / "single" / "model.safetensors")),
        load_file(str(root / "ddp" / "model.safetensors")),
    )
    assert max_difference(single, ddp) < 1e-5
    assert_same_gradient_norms(root, "ddp")
    assert "global batch 8 = 4 per rank x 1 accumulation steps x 2 rank(s)" in outputs["ddp"]
    # the feature cache was extracted in two shards, one per rank, into one file per split
    n_train = 64
    assert f"rank 0 of 2 encoded images 0..{n_train // 2 - 1} of {n_train}" in outputs["ddp"], outputs["ddp"][-3000:]
    assert f"rank 1 of 2 encoded images {n_train // 2}..{n_train - 1} of {n_train}" in outputs["ddp"]
    assert "encoded images" not in outputs["single"], "one process encodes everything itself"


def test_gradient_accumulation_matches_one_big_batch(ddp_runs):
    root, outputs = ddp_runs
    single, accum = (
        load_file(str(root / "single" / "model.safetensors")),
        load_file(str(root / "accum" / "model.safetensors")),
    )
    assert max_difference(single, accum) < 1e-5
    assert_same_gradient_norms(root, "accum")
    assert "global batch 8 = 4 per rank x 2 accumulation steps x 1 rank(s)" in outputs["accum"]


def test_the_runs_did_train(ddp_runs, make_model):
    """Guard against a vacuous match: the trained weights differ from a fresh model's."""
    root, _ = ddp_runs
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
# interrupted and resumed


def assert_same_weights(a, b, skip=()):
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        if k.startswith(skip):
            continue
        assert torch.equal(wa[k], wb[k]), f"{k} differs between {a} and {b}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(resume_runs, variant):
    dirs, scripts = resume_runs
    rc, stdout, stderr = scripts[f"killed-{variant}"].wait()
    assert rc == -signal.SIGKILL, f"the run was not killed before it finished (exit {rc})"
    out = scripts[f"resumed-{variant}"].ok()
    resumed_from = re.search(r"resumed from \S+step-(\d+) \(epoch (\d), step (\d+)\)", out)
    assert resumed_from, out[-2000:]
    step = int(resumed_from.group(3))
    assert 3 <= step < RESUME_STEPS, "the resumed run continued from a mid-run checkpoint"
    scripts[f"full-{variant}"].ok()
    for name in ("full", "killed"):
        summary = json.loads((dirs[f"{name}-{variant}"] / "summary.json").read_text())
        assert summary["steps"] == RESUME_STEPS
    assert_same_weights(dirs[f"killed-{variant}"] / "model.safetensors", dirs[f"full-{variant}"] / "model.safetensors")
    # the last checkpoints agree too: weights and optimizer moments. (Not the torch RNG state: a
    # resumed run creates one more DataLoader iterator, which draws from it; see the report.)
    last_full = checkpoints.checkpoint_dirs(dirs[f"full-{variant}"])[-1]
    last_resumed = checkpoints.checkpoint_dirs(dirs[f"killed-{variant}"])[-1]
    assert last_full.name == last_resumed.name
    assert_same_weights(last_full / "model.safetensors", last_resumed / "model.safetensors")
    assert_same_weights(last_full / "optimizer.safetensors", last_resumed / "optimizer.safetensors", skip=("rng.",))
    # metrics.jsonl of the resumed run is appended to, and reaches the last step
    steps = [m["step"] for m in metrics_rows(dirs[f"killed-{variant}"]) if "train_loss" in m]
    assert steps[-1] == RESUME_STEPS


def test_sigterm_checkpoints_and_exits_then_resume_finishes(resume_runs):
    dirs, scripts = resume_runs
    run, left = dirs["terminated"], dirs["terminated-as-left"]
    rc, stdout, stderr = scripts["terminated"].wait()
    assert rc in (0, 143), f"exit {rc}:\n{stderr[-3000:]}"
    assert "Traceback" not in stdout + stderr
    logged = [m["step"] for m in metrics_rows(left)]
    assert logged, "nothing was logged before the stop"
    assert checkpoints.checkpoint_dirs(left), "SIGTERM left no checkpoint"
    last = checkpoints.checkpoint_dirs(left)[-1]
    state = json.loads((last / "state.json").read_text())
    stopped_at = state["progress"]["step"]
    assert stopped_at >= max(logged) - 1, f"checkpoint at step {stopped_at}, but step {max(logged)} was logged"
    assert stopped_at < RESUME_STEPS, "the run was stopped before the end"
    assert f"stopped at step {stopped_at}" in stdout
    assert not (left / "summary.json").exists()

    # the checkpoint loads into a fresh model and optimizer (restoring this process's RNGs after)
    config = read_config(run)
    with kept_rng():
        model, _, _ = build_model(config)
        params, optimizer, scheduler, scaler = training_parts(
            model, lr=config["lr"], weight_decay=config["weight_decay"]
        )
        progress = checkpoints.load(last, model, optimizer, scheduler, scaler)
    assert progress["step"] == stopped_at
    assert len(optimizer.state) == len(params), "the optimizer state was restored for every parameter"

    # the run directory's model is the checkpoint's, and load_run takes it
    loaded, _, _, loaded_config = load_run(left)
    assert loaded_config["variant"] == "explained"
    checkpoint_weights = load_file(str(last / "model.safetensors"))
    own = loaded.state_dict()
    for k, v in checkpoint_weights.items():
        assert torch.equal(own[k], v), k

    out = scripts["resumed-terminated"].ok()
    assert f"step {stopped_at})" in out
    summary = json.loads((run / "summary.json").read_text())
    full = json.loads((dirs["full-explained"] / "summary.json").read_text())
    assert summary["steps"] == full["steps"] == RESUME_STEPS
    assert_same_weights(run / "model.safetensors", dirs["full-explained"] / "model.safetensors")


def run_training_main(argv, variant="explained"):
    """train.main in this process up to its error: the SystemExit code (its RNG seeding undone afterwards)."""
    with kept_rng(), pytest.raises(SystemExit) as e:
        train.main(variant, argv)
    return e.value.code


def test_resuming_with_the_other_variant_is_refused(resume_runs):
    """What 10_train_self_attention.py --resume EXPLAINED_RUN runs (train.main("self_attention")),
    in this process: the refusal comes before anything is built, loaded or written."""
    dirs, scripts = resume_runs
    run = dirs["full-explained"]
    scripts["full-explained"].ok()
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code = run_training_main(["--resume", str(run), "--no-eval"], "self_attention")
    message = str(code)
    assert code not in (0, None)
    assert "explained" in message and "self_attention" in message, message
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    with pytest.raises(ValueError) as e:
        load_run(run, variant="self_attention")
    assert "explained" in str(e.value) and "self_attention" in str(e.value)


# a torchrun job killed mid-run (every rank and the launcher at once, as when a node
# is lost) and resumed under torchrun

DDP_RESUME_STEPS = 24


@started_early
def ddp_resume(tiny_args, duocap_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp-resume")
    torchrun = [*TORCHRUN, TRAIN_SCRIPTS["explained"]]
    args = [
        *tiny_args,
        "--batch-size",
        4,
        "--epochs",
        1,
        "--max-steps",
        DDP_RESUME_STEPS,
        "--save-every",
        3,
        "--no-eval",
    ]
    cache = duocap_cache / "ddp-resume"
    full = Script([*torchrun, *args, "--out", root / "full"], cache)
    killed = Script([*torchrun, *args, "--out", root / "killed"], cache)
    deadline = time.time() + 240
    while killed.proc.poll() is None and not checkpoints.checkpoint_dirs(root / "killed"):
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
    assert resumed_from and 3 <= int(resumed_from.group(1)) < DDP_RESUME_STEPS, stdout[-2000:]
    for run in ("full", "killed"):
        summary = (root / run / "summary.json").read_text()
        assert f'"steps": {DDP_RESUME_STEPS}' in summary, summary
    full, resumed = (load_file(str(root / run / "model.safetensors")) for run in ("full", "killed"))
    assert max_difference(full, resumed) < 1e-6


# -----------------------------------------------------------------------------
# training from each data source


def expected_data_line(name, sources):
    where, written = sources[name]
    if name == "karpathy":
        return karpathy_written(written, "train").describe()
    if name == "coco":
        coco_train, coco_val = written
        splits = data.load_splits("coco", where)  # which train image is held out is the loader's (seeded) choice
        return (
            f"train {COCO_TRAIN - 1} images ({sum(map(len, coco_train.values())) - len(splits['val'][0].captions)}"
            f" captions), val 1 images ({len(splits['val'][0].captions)} captions), "
            f"test {COCO_VAL} images ({sum(map(len, coco_val.values()))} captions)"
        )
    if name == "folder":
        return (
            f"train 8 images ({8 * CSV_REFS} captions), val 1 images ({CSV_REFS} captions), "
            f"test 1 images ({CSV_REFS} captions)"
        )
    return written.describe()


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_training_from_each_source(source_runs, sources, name, monkeypatch):
    run, rc, stdout, stderr = source_runs[name]
    assert rc == 0, f"{name}:\n{stdout[-3000:]}\n{stderr[-5000:]}"
    where = Path(sources[name][0]).resolve()
    source = f"hf:{sources[name][0]}" if name == "hf" else name
    line = next((line for line in stdout.splitlines() if line.startswith("data (")), None)
    assert line == f"data ({source} at {where}): {expected_data_line(name, sources)}", stdout[:2000]
    for f in ("model.safetensors", "config.json", "eval_test.json", "predictions_test.jsonl", "summary.json"):
        assert (run / f).is_file(), f
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    figures = json.loads((run / "eval_test.json").read_text())
    predictions = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    test_split = data.splits_for(json.loads((run / "config.json").read_text()), cache_dir=run.parent)["test"]
    assert figures["n_images"] == len(predictions) == len(test_split)
    assert [p["references"] for p in predictions] == [r.captions for r in test_split]
    # the caption metrics are those of the saved predictions (the run hid Java: so does this process)
    which = evaluate.shutil.which
    monkeypatch.setattr(evaluate.shutil, "which", lambda name, *a, **k: None if name == "java" else which(name))
    metrics = evaluate.caption_metrics(predictions)
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE_L", "CIDEr"):
        assert figures[key] == pytest.approx(metrics[key], rel=1e-9, abs=1e-12), key
    assert figures["METEOR"] is None


@pytest.mark.parametrize(
    "name, missing",
    [
        (
            "flickr8k",
            [
                "Flickr8k.token.txt",
                "Flicker8k_Dataset",
                "Flickr_8k.trainImages.txt",
                "Flickr_8k.devImages.txt",
                "Flickr_8k.testImages.txt",
            ],
        ),
        ("coco", ["annotations/captions_train2017.json", "annotations/captions_val2017.json", "train2017", "val2017"]),
    ],
)
def test_missing_dataset_lists_the_missing_files(name, missing, vision_dir, language_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    message = run_training_main(
        [
            "--vision",
            str(vision_dir),
            "--language",
            str(language_dir),
            "--data",
            name,
            "--data-dir",
            str(empty),
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert isinstance(message, str) and message.startswith("error:"), message
    assert str(empty.resolve()) in message
    for f in missing:
        assert str(empty.resolve() / f) in message, f"{f} not listed:\n{message}"
    assert "Traceback" not in message


# -----------------------------------------------------------------------------
# the training script on a corpus of bad records


CORPUS_TRUNCATED = ["cut.png", "cut.jpg"]


@pytest.fixture(scope="module")
def corpus_runs(vision_dir, language_dir, duocap_cache, tmp_path_factory):
    """Every folder problem in one dataset (truncated images in train); the script run strict and
    with --skip-bad; and a dataset whose test split holds a truncated image, evaluated. In this
    process, as the script runs (the refusal table below has the script's fresh-process case)."""
    root = tmp_path_factory.mktemp("bad-corpus")
    cases = [make() for make in FOLDER_CASES.values()]
    names = [f"g{i:02d}.png" for i in range(N_GOOD)]
    good, planted = write_jsonl_dataset(
        root,
        cases,
        truncated_images=CORPUS_TRUNCATED,
        splits={
            "train": names[:8] + CORPUS_TRUNCATED + [b.file for b in cases if b.image is not None],
            "val": names[8:9],
            "test": names[9:],
        },
    )

    evaluated = tmp_path_factory.mktemp("bad-test-split")
    write_jsonl_dataset(
        evaluated,
        [],
        truncated_images=["cut.jpg"],
        splits={"train": names[:7], "val": names[7:8], "test": names[8:] + ["cut.jpg"]},
    )

    base = [
        TRAIN_SCRIPTS["explained"],
        "--vision",
        vision_dir,
        "--language",
        language_dir,
        "--data",
        "folder",
        "--batch-size",
        4,
    ]
    runs_root = tmp_path_factory.mktemp("bad-runs")
    scripts = {
        "strict": InProcess(
            base + ["--data-dir", root, "--max-steps", 3, "--no-eval", "--out", runs_root / "strict"], duocap_cache
        ),
        "skip": InProcess(
            base + ["--data-dir", root, "--max-steps", 3, "--no-eval", "--skip-bad", "--out", runs_root / "skip"],
            duocap_cache,
        ),
        "evaluated": InProcess(
            base + ["--data-dir", evaluated, "--max-steps", 1, "--skip-bad", "--out", runs_root / "evaluated"],
            duocap_cache,
            hide_java=True,
        ),
    }
    results = wait_all(scripts)
    return root, good, planted, runs_root, results


def test_strict_training_lists_every_problem_without_a_traceback(corpus_runs):
    root, good, planted, _, results = corpus_runs
    rc, stdout, stderr = results["strict"]
    output = stdout + stderr
    assert rc != 0
    assert "Traceback" not in output, output[-3000:]
    assert f"{len(planted)} problem(s) in the folder data" in output, output[-3000:]
    for bad, line_no in planted:
        assert_named(output, root, bad, line_no)
    assert "--skip-bad" in output


def test_skip_bad_training_leaves_the_problems_out_and_trains(corpus_runs):
    root, good, planted, runs_root, results = corpus_runs
    rc, stdout, stderr = results["skip"]
    output = stdout + stderr
    assert rc == 0, output[-5000:]
    assert "Traceback" not in output
    assert (runs_root / "skip" / "model.safetensors").is_file()
    assert f"{len(planted)} problem(s) in the folder data; --skip-bad leaves them out" in output
    left_out = [line for line in output.splitlines() if line.startswith("--skip-bad: left out")]
    assert len(left_out) == len(CORPUS_TRUNCATED)
    for name in CORPUS_TRUNCATED:
        assert any(str(root / name) in line for line in left_out), left_out
    summary = json.loads((runs_root / "skip" / "summary.json").read_text())
    assert summary["steps"] == 3


def test_skip_bad_run_with_a_truncated_test_image_evaluates_without_a_traceback(corpus_runs):
    """The feature cache decodes only train and val: a truncated test image must still be
    reported (or left out) cleanly, not crash the evaluation after training."""
    _, _, _, runs_root, results = corpus_runs
    rc, stdout, stderr = results["evaluated"]
    output = stdout + stderr
    assert "Traceback" not in output, output[-3000:]
    assert rc == 0, output[-3000:]
    assert "cut.jpg" in output, "the truncated test image is reported"
    assert (runs_root / "evaluated" / "eval_test.json").is_file()


# -----------------------------------------------------------------------------
# a bad run folder, missing data or a bad value: one line, no traceback


REFUSALS = {
    "missing run folder": (["--resume", "/no/such/run"], "/no/such/run", False),
    "folder that is not a run": (["--resume", "{empty}"], "{empty}", False),
    "missing data folder": (
        ["--vision", "{vision}", "--language", "{language}", "--data", "folder", "--data-dir", "/no/such/dir"]
        + ["--out", "{out}"],
        "/no/such/dir",
        False,
    ),
    "no image left with --skip-bad": (
        ["--vision", "{vision}", "--language", "{language}", "--data", "folder", "--data-dir", "{unreadable}"]
        + ["--skip-bad", "--out", "{out}"],
        "{unreadable}",
        False,
    ),
}
BAD_VALUES = {"explained": (["--batch-size", "0"], "--batch-size"), "self_attention": (["--lr", "-1"], "--lr")}


@started_first
def training_refusals(vision_dir, language_dir, duocap_cache, tmp_path_factory):
    """Both training scripts' refusal tables (start_refusals: one case of each in a fresh process)."""
    started = {}
    for variant, script in TRAIN_SCRIPTS.items():
        args, option = BAD_VALUES[variant]
        cases = {**REFUSALS, "bad option value": (args + ["--out", "{out}"], option, True)}
        unreadable = tmp_path_factory.mktemp("unreadable-images")
        for k in range(4):
            (unreadable / f"{k}.png").write_text("this is text, not a PNG")
        (unreadable / "captions.jsonl").write_text(
            "".join(f'{{"image": "{k}.png", "caption": "a red circle"}}\n' for k in range(4))
        )
        paths = dict(
            empty=tmp_path_factory.mktemp("not-a-run"),
            unreadable=unreadable,
            vision=vision_dir,
            language=language_dir,
            out=tmp_path_factory.mktemp("refused") / "run",
        )
        started[variant] = start_refusals(script, cases, duocap_cache, **paths)
    return started


@pytest.mark.parametrize("case", [*REFUSALS, "bad option value"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_training_scripts_refuse_a_bad_run_folder_missing_data_or_a_bad_value_in_one_line(
    training_refusals, variant, case
):
    assert_refused(*training_refusals[variant][case])


def test_the_process_group_timeout_is_the_flag(monkeypatch):
    """Under torchrun the process group gets --dist-timeout, not NCCL's 10 minutes, which rank 0
    alone encoding a large image set would overrun."""
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train.dist, "init_process_group", lambda backend, timeout: seen.update(b=backend, t=timeout))
    monkeypatch.setattr(train.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(train.dist, "get_world_size", lambda: 2)
    args = train.parse_args("explained", ["--dist-timeout", "90"])
    assert train.init_distributed(args.dist_timeout) == (0, 2, "cpu")
    assert seen == {"b": "gloo", "t": datetime.timedelta(minutes=90)}


# a FLOPs budget buys a number of steps with the warmup and decay fitted to them, so that a run at
# equal compute has finished its schedule (not a curve read while the learning rate is still high)


@pytest.fixture(scope="module")
def budget_runs(tiny_args, duocap_cache, tmp_path_factory):
    """{"full": 6-step run, "budget": the same at half its FLOPs}, in this process."""
    root = tmp_path_factory.mktemp("budget")
    base = [*tiny_args, "--batch-size", "8", "--max-steps", "6", "--no-eval", "--score-every", "100"]
    base += ["--log-every", "1"]
    with kept_rng():
        train.main("self_attention", [*base, "--out", str(root / "full")])
        full = json.loads((root / "full" / "summary.json").read_text())
        budget = full["train_flops"] / 2
        train.main("self_attention", [*base, "--out", str(root / "budget"), "--max-flops", str(budget)])
    return {"full": root / "full", "budget": root / "budget", "flops": budget}


def test_a_flops_budget_stops_training_with_the_schedule_completed(budget_runs):
    run = budget_runs["budget"]
    summary = json.loads((run / "summary.json").read_text())
    config = read_config(run)
    assert config["max_flops"] == budget_runs["flops"]
    per_step = config["flops_per_step"]
    assert summary["steps"] == int(budget_runs["flops"] // per_step) == config["max_steps"] < 6
    assert summary["train_flops"] <= budget_runs["flops"] * 1.05
    assert summary["train_flops"] > budget_runs["flops"] - 2 * per_step
    lrs = [m["lr"] for m in metrics_rows(run) if "lr" in m]
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12), "the cosine decay reached its end at the budget"
    assert len(lrs) == summary["steps"] and max(lrs) > 0.5 * config["lr"], "it warmed up first"


def test_a_run_records_the_cpu_time_it_took(budget_runs):
    summary = json.loads((budget_runs["full"] / "summary.json").read_text())
    assert 0 < summary["train_cpu_s"] and summary["cpu_s_per_step"] == pytest.approx(summary["train_cpu_s"] / 6)
    scored = [m for m in metrics_rows(budget_runs["full"]) if "flops" in m]
    assert scored and all(m["train_cpu_s"] > 0 for m in scored)


def test_a_run_stopped_after_its_last_checkpoint_resumes_into_a_summary_with_its_losses(budget_runs, tmp_path):
    """The process ended after the last checkpoint but before summary.json: the resumed run has
    nothing left to train, and its summary must still give the final losses, not NaN."""
    run = tmp_path / "run"
    shutil.copytree(budget_runs["full"], run)
    (run / "summary.json").unlink()
    with kept_rng():
        train.main("self_attention", ["--resume", str(run), "--no-eval"])
    resumed = json.loads((run / "summary.json").read_text())
    full = json.loads((budget_runs["full"] / "summary.json").read_text())
    assert math.isfinite(resumed["final_val_loss"]) and math.isfinite(resumed["final_train_loss"])
    assert resumed["final_val_loss"] == full["final_val_loss"]
    assert resumed["final_train_loss"] == full["final_train_loss"]


def test_a_config_file_sets_options_the_command_line_overrides_and_bad_ones_are_refused(tmp_path, capsys):
    good = tmp_path / "best.json"
    good.write_text(json.dumps({"lr": 0.002, "warmup": 0.1, "queries": "context", "train_layers": 3}))
    args = train.parse_args("explained", ["--config", str(good), "--lr", "0.003"])
    assert (args.lr, args.warmup, args.queries, args.train_layers) == (0.003, 0.1, "context", 3)
    config = train.run_config("explained", args)
    assert config["config_file"] == {"path": str(good.resolve()), "values": json.loads(good.read_text())}
    assert (config["lr"], config["warmup"], config["queries"]) == (0.003, 0.1, "context")
    for content, named in (
        ({"learning_rate": 0.1}, "not training options: learning_rate"),
        ({"out": "elsewhere"}, "not training options: out"),
        ({"lr": -1}, "lr"),
        ({"queries": "sideways"}, "queries"),
        ([0.1], "expected a JSON object"),
    ):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        with pytest.raises(SystemExit) as e:
            train.parse_args("explained", ["--config", str(bad)])
        assert e.value.code == 2
        message = capsys.readouterr().err
        assert str(bad) in message and named in message, message


def test_cross_attention_heads_that_do_not_split_the_width_are_refused_in_one_line(tiny_args, tmp_path):
    with pytest.raises(SystemExit) as e:
        train.main("explained", [*tiny_args, "--heads", "7", "--out", str(tmp_path / "run")])
    assert str(e.value).startswith("error: --heads 7: the hidden size") and "\n" not in str(e.value)


def test_a_flops_budget_beyond_the_epochs_says_it_is_not_all_spent(tiny_args, tmp_path, capsys):
    train.main("explained", [*tiny_args, "--epochs", "1", "--max-flops", "1e15", "--no-eval", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "--max-flops 1e+15 buys" in out and "the budget is not all spent (raise --epochs to spend it)" in out


@pytest.mark.parametrize(
    "option, value, problem",
    [
        ("--vision-layer", "-50", "the vision tower has"),
        ("--warmup", "3", "must be in [0, 1]"),
        ("--weight-decay", "-2", "0 or more"),
    ],
)
def test_an_option_out_of_its_range_is_refused_in_one_line(tiny_args, tmp_path, capsys, option, value, problem):
    with pytest.raises(SystemExit) as e:
        train.main("explained", [*tiny_args, option, value, "--out", str(tmp_path / "run")])
    message = str(e.value) if e.value.code != 2 else capsys.readouterr().err.splitlines()[-1]
    assert option in message and problem in message, message


def test_resuming_refuses_other_run_options_and_takes_this_machines_device(tiny_args, tmp_path, capsys):
    """A resumed run keeps its own options: one given with another value is refused, not ignored.
    The device is this machine's: a run started on a GPU resumes on a CPU."""
    run = tmp_path / "run"
    with pytest.raises(train.EarlyStop):
        train.main("explained", [*tiny_args, "--max-steps", "4", "--out", str(run)], on_score=lambda row: True)
    with pytest.raises(SystemExit) as e:
        train.main("explained", ["--resume", str(run), "--lr", "5", "--epochs", "3"])
    assert (
        str(e.value) == f"error: --epochs, --lr: not what {run} was started with; a resumed run keeps its own options"
    )
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "device": "cuda", "precision": "bf16"}))
    train.main("explained", ["--resume", str(run), *tiny_args, "--max-steps", "4", "--device", "cpu", "--no-eval"])
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    assert json.loads((run / "config.json").read_text())["device"] == "cpu"


def test_a_new_run_into_a_folder_that_holds_one_is_refused(tiny_args, tmp_path):
    """Its checkpoints would be mixed with the new run's (pruned by step), or what it finished
    overwritten: --resume it, or train elsewhere."""
    run = tmp_path / "run"
    with pytest.raises(train.EarlyStop):
        train.main("explained", [*tiny_args, "--max-steps", "4", "--out", str(run)], on_score=lambda row: True)
    assert checkpoints.checkpoint_dirs(run)
    with pytest.raises(SystemExit) as e:
        train.main("explained", [*tiny_args, "--max-steps", "2", "--out", str(run)])
    assert str(e.value) == f"error: {run} holds a run already: --resume {run} to go on with it, or another --out"
    train.main("explained", ["--resume", str(run), "--no-eval"])  # finished now
    with pytest.raises(SystemExit) as e:
        train.main("explained", [*tiny_args, "--max-steps", "2", "--out", str(run)])
    assert str(e.value) == f"error: {run} holds a finished run: train into another --out, or remove it first"


def test_resuming_on_a_training_set_that_changed_is_refused(tiny_args, shapes_dir, tmp_path):
    """A caption added since the checkpoint: the steps per epoch and the data order would differ,
    and the resumed run would not be the one that stopped."""
    data_dir = shutil.copytree(shapes_dir, tmp_path / "shapes")
    args = [*tiny_args, "--data", "folder", "--data-dir", str(data_dir)]
    run = tmp_path / "run"
    with pytest.raises(train.EarlyStop):
        train.main("explained", [*args, "--max-steps", "4", "--out", str(run)], on_score=lambda row: True)
    first = json.loads((data_dir / "captions.jsonl").read_text().splitlines()[0])
    with open(data_dir / "captions.jsonl", "a") as f:
        f.write(json.dumps({**first, "caption": "one more caption of the first image"}) + "\n")
    with pytest.raises(SystemExit) as e:
        train.main("explained", ["--resume", str(run)])
    assert "saved training on other images or captions" in str(e.value) and "\n" not in str(e.value)


def test_a_damaged_checkpoint_is_named_and_a_cut_short_metrics_line_is_left_out(tiny_args, tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(train.EarlyStop):
        train.main("explained", [*tiny_args, "--max-steps", "4", "--out", str(run)], on_score=lambda row: True)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train_lo')  # a crash while writing
    (last,) = checkpoints.checkpoint_dirs(run)[-1:]
    optimizer = last / "optimizer.safetensors"
    kept = optimizer.read_bytes()
    optimizer.write_bytes(kept[:100])
    with pytest.raises(SystemExit) as e:
        train.main("explained", ["--resume", str(run)])
    message = str(e.value)
    assert message.startswith(f"error: {last}: a damaged checkpoint") and "\n" not in message
    assert message.endswith(f"delete {last} to resume from the checkpoint before it")
    optimizer.write_bytes(kept)
    train.main("explained", ["--resume", str(run), "--no-eval"])
    assert "metrics.jsonl:" in capsys.readouterr().out and (run / "summary.json").is_file()
