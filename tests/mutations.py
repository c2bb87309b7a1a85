"""
Mutation testing: break a core property on purpose and check that some test notices.

    python tests/mutations.py                 # every mutation
    python tests/mutations.py loss-scale ...  # only these (names from --list)
    python tests/mutations.py --list

Each mutation is one textual replacement in one source file that must match exactly once
(otherwise the code moved on and the mutation is reported as stale), and names the tests
that guard the property (files, with a -k expression to keep the run short). The tracked
files of the working tree are copied to a scratch folder once; each mutation is applied
there, its tests run, and the file is put back. A mutation is caught when some test
fails, survives when they all pass. The selected tests are first run once on the
unmutated copy, so that a failure can be blamed on the mutation.

Exits 0 only when every mutation was caught (none survived, none stale, none errored).
Not collected by pytest (the file name does not start with test_). The whole list takes
about 8 minutes on 2 CPU cores, most of it pytest starting up once per mutation.
"""

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Mutation:
    name: str
    what: str  # the property broken
    file: str
    old: str
    new: str
    tests: tuple  # pytest arguments: files, then optionally "-k", "expression"


MUTATIONS = [
    Mutation(
        "loss-scale",
        "the summed loss is no longer divided by the global token count",
        "train.py",
        "scaler.scale(loss_sum * world / n_tokens).backward()",
        "scaler.scale(loss_sum * world).backward()",
        ("tests/test_train.py", "-k", "gradient_is_the_mean"),
    ),
    Mutation(
        "ddp-world-factor",
        "no x world factor to undo DistributedDataParallel's averaging over ranks",
        "train.py",
        "scaler.scale(loss_sum * world / n_tokens).backward()",
        "scaler.scale(loss_sum / n_tokens).backward()",
        ("tests/test_train.py", "-k", "gradient_is_the_mean"),
    ),
    Mutation(
        "ddp-world-factor-torchrun",
        "the same, seen by real ranks: torchrun's logged gradient norms against one process's",
        "train.py",
        "scaler.scale(loss_sum * world / n_tokens).backward()",
        "scaler.scale(loss_sum / n_tokens).backward()",
        ("tests/test_train.py", "-k", "torchrun_two_ranks"),
    ),
    Mutation(
        "eos-target",
        "a caption that fits gets no EOS target",
        "data.py",
        "torch.tensor(toks if cut else toks + [eos], dtype=torch.long)",
        "torch.tensor(toks if cut else toks + [-100], dtype=torch.long)",
        ("tests/test_data.py", "-k", "encode_captions or truncated_caption"),
    ),
    Mutation(
        "truncated-caption-eos",
        "a caption cut at --max-caption-tokens is taught to stop there",
        "data.py",
        "cut = len(toks) > max_tokens",
        "cut = False",
        ("tests/test_data.py", "-k", "encode_captions or truncated_caption"),
    ),
    Mutation(
        "kv-position-next-logits",
        "a cached decoding step is placed one position too far",
        "captioner.py",
        "start = ids.shape[1] - n_new",
        "start = ids.shape[1] - n_new + (n_new < ids.shape[1])",
        ("tests/test_captioner.py", "tests/test_decoding.py", "-k", "cached or kv_cache"),
    ),
    Mutation(
        "kv-position-self-attention",
        "the self-attention variant's position offset after the image prefix is off by one",
        "model_self_attention.py",
        "first = 0 if start == 0 else P + start",
        "first = 0 if start == 0 else P + start - 1",
        ("tests/test_captioner.py", "tests/test_decoding.py", "-k", "cached or kv_cache"),
    ),
    Mutation(
        "beam-reorder-cache",
        "the KV cache rows are not reordered along with the beams",
        "decoding.py",
        "            cache.reorder_cache(origin)\n",
        "            pass\n",
        ("tests/test_decoding.py", "-k", "beam"),
    ),
    Mutation(
        "beam-pool-ranking",
        "the pool of finished hypotheses keeps its worst, not its best",
        "decoding.py",
        "pools[b] = sorted(pools[b], key=lambda h: h[0], reverse=True)[:N]",
        "pools[b] = sorted(pools[b], key=lambda h: h[0])[:N]",
        ("tests/test_decoding.py", "-k", "beam"),
    ),
    Mutation(
        "rng-restore-torch",
        "resuming does not restore torch's generator",
        "checkpoints.py",
        '    torch.set_rng_state(tensors["rng.torch"])\n',
        "",
        ("tests/test_checkpoints.py", "-k", "rng"),
    ),
    Mutation(
        "rng-restore-python",
        "resuming does not restore Python's generator",
        "checkpoints.py",
        "    random.setstate((version, tuple(internal), gauss))\n",
        "",
        ("tests/test_checkpoints.py", "-k", "rng"),
    ),
    Mutation(
        "rng-restore-numpy",
        "resuming does not restore NumPy's generator",
        "checkpoints.py",
        "    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))\n",
        "",
        ("tests/test_checkpoints.py", "-k", "rng"),
    ),
    Mutation(
        "epoch-order",
        "every epoch sees the rows in the same order",
        "train.py",
        "g = torch.Generator().manual_seed(seed * 100_003 + epoch)",
        "g = torch.Generator().manual_seed(seed * 100_003)",
        ("tests/test_train.py", "-k", "epoch_order"),
    ),
    Mutation(
        "split-same-file",
        "an image named in two splits is not refused",
        "data.py",
        "if split_of.setdefault(r.image, split) != split:",
        "if split_of.setdefault(r.image, split) != split and False:",
        ("tests/test_data.py", "-k", "two_splits"),
    ),
    Mutation(
        "split-same-bytes",
        "the same image under two names in two splits is not refused",
        "data.py",
        "            if other_split != split:\n",
        "            if False:\n",
        ("tests/test_data.py", "-k", "two_splits"),
    ),
    Mutation(
        "blind-swap",
        "the blind control captions each image's own pixels",
        "evaluate.py",
        "images[1:] + images[:1],",
        "images,",
        ("tests/test_evaluate.py", "-k", "blind"),
    ),
    Mutation(
        "truncated-image",
        "a truncated image file decodes (the missing rows filled in) instead of being an error",
        "data.py",
        "            with Image.open(path) as im:\n                problem = too_thin(",
        "            __import__('PIL.ImageFile').ImageFile.LOAD_TRUNCATED_IMAGES = True\n"
        "            with Image.open(path) as im:\n                problem = too_thin(",
        ("tests/test_data.py", "tests/test_features.py", "-k", "truncated"),
    ),
    Mutation(
        "weight-decay-groups",
        "the embedding tables (modality, positions) are weight-decayed",
        "captioner.py",
        "embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}",
        "embeddings = set()",
        ("tests/test_captioner.py", "-k", "weight_decay"),
    ),
    Mutation(
        "feature-cache-key",
        "the feature cache key ignores the vision tower's weights",
        "features.py",
        "    h.update(weights_digest(vision).encode())\n",
        "",
        ("tests/test_features.py", "-k", "keyed_by"),
    ),
    Mutation(
        "split-copies-apart",
        "a split drawn here no longer keeps the copies of one picture (same bytes, other names) together",
        "data.py",
        "    groups = picture_groups(records)\n",
        "    groups = [[r] for r in records]\n",
        ("tests/test_data.py", "-k", "every_copy_of_a_picture or bad_records_and_copies"),
    ),
    Mutation(
        "hf-row-id-as-image-id",
        "an id column that no two rows share (an id of each caption row) is taken for the image's id",
        "data.py",
        "if id_column and len(set(part[id_column])) == len(part):",
        "if id_column and len(set(part[id_column])) == -1:",
        ("tests/test_data.py", "-k", "rows_of_one_image"),
    ),
    Mutation(
        "top-p-nucleus-untempered",
        "top-p chooses its nucleus from the probabilities before the temperature (then samples tempered)",
        "decoding.py",
        "        cum = sorted_logits.softmax(-1).cumsum(-1)\n        drop = cum - sorted_logits.softmax(-1) > top_p",
        "        cum = (sorted_logits * temperature).softmax(-1).cumsum(-1)\n"
        "        drop = cum - (sorted_logits * temperature).softmax(-1) > top_p",
        ("tests/test_decoding.py", "-k", "tempered_distribution"),
    ),
    Mutation(
        "top-p-temperature-multiplies",
        "the temperature multiplies the logits instead of dividing them",
        "decoding.py",
        "    logits = logits / max(temperature, 1e-6)\n",
        "    logits = logits * max(temperature, 1e-6)\n",
        ("tests/test_decoding.py", "-k", "tempered_distribution"),
    ),
    Mutation(
        "picture-groups-by-head-only",
        "files of one size whose first 64 KiB agree are taken for one picture without reading the rest",
        "data.py",
        "    for step in (head_digest, file_digest):\n",
        "    for step in (head_digest,):\n",
        ("tests/test_data.py", "-k", "picture_groups_are_files"),
    ),
    Mutation(
        "frozen-language-weights-unchecked",
        "a run no longer records a fingerprint of its frozen weights: a language model of the same shape "
        "and the same first embedding rows but other frozen layers loads silently",
        "runs.py",
        '        "frozen_fingerprint": frozen_fingerprint(model),\n',
        "",
        ("tests/test_runs.py", "-k", "language_model_of_the_same_shape"),
    ),
    Mutation(
        "app-batch-length",
        "concurrent requests for different caption lengths share a batch, decoded at the first one's length",
        "app.py",
        "return (self.strategy, self.max_new_tokens, *(getattr(self, name) for name in used))",
        "return (self.strategy, *(getattr(self, name) for name in used))",
        ("tests/test_app.py", "-k", "different_lengths or settings_their_strategy_uses"),
    ),
    Mutation(
        "interval-pooled",
        "the seed part of a difference's interval pools the two variants' variances instead of Welch's",
        "stats.py",
        "    seed_parts = [(seed_means_a.var(ddof=1) / n_a, n_a - 1), (seed_means_b.var(ddof=1) / n_b, n_b - 1)]",
        "    pooled = ((n_a - 1) * seed_means_a.var(ddof=1) + (n_b - 1) * seed_means_b.var(ddof=1)) / (n_a + n_b - 2)\n"
        "    seed_parts = [(pooled * (1 / n_a + 1 / n_b), n_a + n_b - 2)]",
        ("tests/test_stats.py", "-k", "welchs_over_the_seed_means"),
    ),
    Mutation(
        "interval-no-image-part",
        "the interval of a difference leaves out the test images' sampling (image-by-variant variance)",
        "stats.py",
        "        parts.append((interaction / n_images, n_images - 1))",
        "        pass",
        ("tests/test_stats.py", "-k", "disagree_about_the_difference or image_by_variant"),
    ),
    Mutation(
        "compare-cost-higher-is-better",
        "a cost (FLOPs, CPU seconds, a loss) is read as higher-is-better in the verdict",
        "compare.py",
        "        run_row(name, {v: [s.get(key) and s[key] / scale for s in summaries[v]] for v in groups}, True)",
        "        run_row(name, {v: [s.get(key) and s[key] / scale for s in summaries[v]] for v in groups}, False)",
        ("tests/test_compare.py", "-k", "lower_is_better"),
    ),
    Mutation(
        "compare-equal-flops-runs-ignored",
        "the equal-compute rows compare the equal-step runs instead of the runs at the FLOPs budget",
        "compare.py",
        "    matched = {v: (runs if v == costlier else groups[v]) for v in ORDER}",
        "    matched = {v: groups[v] for v in ORDER}",
        ("tests/test_compare.py", "-k", "equal_flops_rows"),
    ),
    Mutation(
        "compare-test-set-first-run",
        "the test-set check looks at one run only",
        "compare.py",
        '    ids = {run: e["split_id"] for run, e in evals.items()}',
        '    ids = {run: e["split_id"] for run, e in list(evals.items())[:1]}',
        ("tests/test_compare.py", "-k", "test_set_check_covers_every_run"),
    ),
    Mutation(
        "compare-category-other-images",
        "a per-category row is computed on the images of the other categories",
        "compare.py",
        '        elif category is not None and p["skills"]["category"] != category:',
        '        elif category is not None and p["skills"]["category"] == category:',
        ("tests/test_compare.py", "-k", "every_per_image_row_by_value"),
    ),
    Mutation(
        "compare-compositional-from-test",
        "the compositional rows are read from the test split's predictions",
        "compare.py",
        'image_row(groups, "compositional", k,',
        "image_row(groups, split, k,",
        ("tests/test_compare.py", "-k", "every_per_image_row_by_value"),
    ),
    Mutation(
        "compare-conditional-own-images",
        "a conditional row's columns average each variant's own images, not the images both scored",
        "compare.py",
        "stats.mean_interval(x[:, keep].mean(1))",
        "stats.mean_interval(np.nanmean(x, 1))",
        ("tests/test_compare.py", "-k", "conditional_row_uses_the_images or every_per_image_row_by_value"),
    ),
    Mutation(
        "direction-mirror-scored-as-original",
        "the mirrored caption's direction is scored against the original scene",
        "skills.py",
        "    there = _relation_read(read_caption(mirrored_caption), mirrored_scene(scene, CANVAS, CANVAS))",
        "    there = _relation_read(read_caption(mirrored_caption), scene)",
        ("tests/test_skills.py", "-k", "one_half_without_the_direction"),
    ),
    Mutation(
        "selectivity-other-object",
        "the other object's attention share is read from the named object's patches",
        "evaluate.py",
        '        row["other"] = float(weights[other].sum())',
        '        row["other"] = float(weights[named].sum())',
        ("tests/test_evaluate.py", "-k", "selectivity"),
    ),
    Mutation(
        "resume-losses-lost",
        "a run resumed after its last checkpoint forgets its final losses (summary says NaN)",
        "train.py",
        '        self.val_loss = self.progress.get("val_loss", float("nan"))',
        '        self.val_loss = float("nan")',
        ("tests/test_train.py", "-k", "resumes_into_a_summary_with_its_losses"),
    ),
    Mutation(
        "max-flops-ignored",
        "a FLOPs budget no longer sets the number of steps (the schedule runs past the budget)",
        "train.py",
        '            config["max_steps"] = min(config["max_steps"] or steps, steps)',
        '            config["max_steps"] = config["max_steps"]',
        ("tests/test_train.py", "-k", "flops_budget_stops_training"),
    ),
    Mutation(
        "generate-samples-by-default",
        "generate.py samples with top-k unless told otherwise, and so captions unlike the run's evaluation",
        "decoding.py",
        'parser.add_argument("--strategy", default="greedy", choices=STRATEGIES)',
        'parser.add_argument("--strategy", default="top-k", choices=STRATEGIES)',
        ("tests/test_generate.py", "-k", "reproduces_the_evaluation_captions"),
    ),
    Mutation(
        "compare-seeds-not-the-scripts-runs",
        "compare.py's seed-k runs are trained with another seed than the scripts' (seed 0 is not the demo run)",
        "compare.py",
        'train_or_reuse(v, out / f"{v}-seed{k}", ["--seed", str(k), *budget])',
        'train_or_reuse(v, out / f"{v}-seed{k}", ["--seed", str(k + 1), *budget])',
        ("tests/test_compare.py", "-k", "seed_0_runs"),
    ),
    Mutation(
        "unequal-seeds-welch-df",
        "with unequal seed counts the seed parts keep Welch-Satterthwaite's df, which is liberal at 2 vs many",
        "stats.py",
        "    if n_a != n_b:\n",
        "    if False:\n",
        ("tests/test_stats.py", "-k", "unequal_seed_counts or welchs_over_the_seed_means"),
    ),
    Mutation(
        "compare-pairs-by-position",
        "per-image values are paired by their position in each run's predictions, not by image",
        "compare.py",
        "    orders = {r: sorted(range(len(k)), key=k.__getitem__) for r, k in keys.items()}",
        "    orders = {r: list(range(len(k))) for r, k in keys.items()}",
        ("tests/test_compare.py", "-k", "another_order or other_images"),
    ),
    Mutation(
        "thin-image-decoded",
        "an image far longer than wide is decoded (and resized to gigabytes) instead of refused",
        "data.py",
        "    if max(width, height) > MAX_ASPECT * min(width, height):",
        "    if False:",
        ("tests/test_data.py", "-k", "far_longer_than_wide"),
    ),
    Mutation(
        "app-batch-fails-together",
        "one request that fails in a batch fails every request batched with it",
        "app.py",
        "                if len(jobs) == 1:",
        "                if True:",
        ("tests/test_app.py", "-k", "fails_alone"),
    ),
    Mutation(
        "dot-slash-names-differ",
        "./a.png and a.png are two names: a splits.json written by find(1) selects no image",
        "data.py",
        "    return posixpath.normpath(name) if isinstance(name, str) else name",
        "    return name",
        ("tests/test_data.py", "-k", "dot_slash"),
    ),
    Mutation(
        "resume-ignores-options",
        "options given beside --resume are silently ignored again",
        "train.py",
        "        changed = changed_options(variant, args, config, run_dir)\n",
        "        changed = []\n",
        ("tests/test_train.py", "-k", "resuming_refuses"),
    ),
    Mutation(
        "new-run-over-an-old-one",
        "a new run goes into a folder holding another run's checkpoints, and is mixed with them",
        "train.py",
        "    if checkpoints.checkpoint_dirs(run_dir):",
        "    if False:",
        ("tests/test_train.py", "-k", "holds_one"),
    ),
]


def tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name]


def scratch_copy(dest):
    """The working tree's tracked files (with their uncommitted edits) copied into dest."""
    for name in tracked_files():
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def run_tests(root, tests, timeout):
    """(pytest exit status, names of the failed tests with the first error line, seconds, output tail)."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("DUOCAP_CACHE", None)  # conftest gives the session a private cache
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *tests],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return None, [], time.time() - t0, f"timed out after {timeout}s"
    output = proc.stdout + proc.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    first_error = re.search(r"^E +(.+)$", output, re.M)
    if first_error:
        failed.append(f"[{first_error.group(1).strip()[:160]}]")
    return proc.returncode, failed, time.time() - t0, output[-2000:]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the selected tests unmutated")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed to one mutation's tests")
    p.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    args = p.parse_args(argv)

    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:28} {m.file:26} {m.what}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        p.error(f"unknown mutation(s) {', '.join(unknown)}; see --list")
    chosen = [known[n] for n in args.names] if args.names else MUTATIONS

    scratch = Path(tempfile.mkdtemp(prefix="duocap-mutations-"))
    results = []
    try:
        scratch_copy(scratch)
        runnable = []
        for m in chosen:  # stale ones first: they need no tests run
            path = scratch / m.file
            n = path.read_text().count(m.old) if path.is_file() else 0
            if n == 1:
                runnable.append(m)
            else:
                results.append((m, "STALE", f"the text to replace occurs {n} times in {m.file}", 0.0))
                print(f"{m.name}: STALE", flush=True)
        if not args.no_baseline:
            selections = {}  # one baseline run per distinct selection of tests
            for m in runnable:
                selections.setdefault(m.tests, []).append(m.name)
            for tests, names in selections.items():
                rc, failed, seconds, tail = run_tests(scratch, tests, args.timeout)
                print(f"baseline {' '.join(tests)}: exit {rc} ({seconds:.0f}s)", flush=True)
                if rc != 0:
                    print(tail)
                    print(f"error: the tests of {', '.join(names)} fail unmutated; fix them first")
                    return 2
        for m in runnable:
            path = scratch / m.file
            original = path.read_text()
            path.write_text(original.replace(m.old, m.new))
            try:
                rc, failed, seconds, tail = run_tests(scratch, m.tests, args.timeout)
            finally:
                path.write_text(original)
            if rc == 1:
                verdict, detail = "caught", ", ".join(failed) or "(a test failed)"
            elif rc == 0:
                verdict, detail = "SURVIVED", "every selected test passed"
            else:
                last = tail.strip().splitlines()[-1] if tail.strip() else ""
                verdict, detail = "ERROR", f"pytest exit {rc}: {last}"
            results.append((m, verdict, detail, seconds))
            print(f"{m.name}: {verdict} ({seconds:.0f}s)", flush=True)
    finally:
        if args.keep:
            print(f"scratch copy kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    print()
    print(f"{'mutation':28} {'verdict':9} {'s':>5}  tests run / caught by")
    for m, verdict, detail, seconds in results:
        print(f"{m.name:28} {verdict:9} {seconds:5.0f}  {' '.join(m.tests)}")
        print(f"{'':28} {'':9} {'':5}  {detail}")
    bad = [m.name for m, verdict, _, _ in results if verdict != "caught"]
    caught = len(results) - len(bad)
    print(f"\n{caught} of {len(results)} mutations caught" + (f"; not caught: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
