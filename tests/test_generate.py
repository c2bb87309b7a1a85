"""generate.py: by default it captions as the run's evaluation did (greedy), beam search with
--strategy beam, from a run on any data source; it reports each bad input and
captions the rest; and it refuses a bad run folder or a bad value in one line."""

import json

import pytest
from corpora import SOURCE_NAMES

import generate
from compare import read_jsonl
from conftest import VARIANTS, InProcess, assert_refused, perturb, pixels_for, start_refusals, started_first, wait_all
from decoding import decode
from runs import load_run, save_run

# -----------------------------------------------------------------------------
# in fresh processes, with runs the training scripts wrote


@pytest.fixture(scope="module")
def generated(trained_runs, splits, duocap_cache, tmp_path_factory):
    """generate.py on every test image of each run; and, with the explained run, a missing file, an
    empty folder and a file that is not an image beside a good one. In this process: the runs were
    trained and evaluated in others, and the refusal table below runs generate.py fresh."""
    bad = tmp_path_factory.mktemp("bad-inputs")
    missing, empty, unreadable = bad / "no-such-photo.jpg", bad / "an-empty-folder", bad / "not-really.png"
    empty.mkdir()
    unreadable.write_text("this is text, not a PNG")
    good = str(splits["test"][0].image)
    scripts = {}
    for variant, (out, _) in trained_runs.items():
        paths = [p["image"] for p in read_jsonl(out / "predictions_test.jsonl")]
        scripts[variant] = InProcess(["generate.py", "--checkpoint", out, *paths], duocap_cache)  # greedy by default
    explained = trained_runs["explained"][0]
    scripts["bad inputs"] = InProcess(
        ["generate.py", "--checkpoint", explained, "--strategy", "greedy", missing, empty, unreadable, good],
        duocap_cache,
    )
    return wait_all(scripts), (missing, empty, unreadable), good


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_reproduces_the_evaluation_captions(trained_runs, generated, variant):
    out, _ = trained_runs[variant]
    predictions = read_jsonl(out / "predictions_test.jsonl")
    rc, stdout, stderr = generated[0][variant]
    assert rc == 0, stderr[-5000:]
    assert stdout == "".join(f"{p['image']}\t{p['caption']}\n" for p in predictions)


def test_generate_reports_each_bad_input_and_captions_the_good_one(trained_runs, generated):
    (rc, stdout, stderr), bad, good = generated[0]["bad inputs"], generated[1], generated[2]
    assert rc == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = stderr.splitlines()
    for path in bad:
        naming = [line for line in lines if str(path) in line]
        assert len(naming) == 1, f"{path}: {naming}"
        assert str(path) not in stdout
    out_lines = stdout.splitlines()
    assert len(out_lines) == 1 and out_lines[0].startswith(f"{good}\t"), stdout
    assert out_lines[0].split("\t", 1)[1].strip(), "the good image gets a caption"
    predictions = {
        p["image"]: p["caption"] for p in read_jsonl(trained_runs["explained"][0] / "predictions_test.jsonl")
    }
    assert stdout == f"{good}\t{predictions[good]}\n"


def test_generate_with_beam_search_prints_one_caption_per_image(make_model, splits, duocap_cache, tmp_path):
    model, processor, tokenizer, config = make_model("explained", seed=3)
    perturb(model, seed=11)
    run_dir = tmp_path / "run"
    save_run(model, config, run_dir)
    records = splits["test"][:4]
    args = ["--checkpoint", run_dir, "--strategy", "beam", "--beams", 3, "--max-new-tokens", 12]
    rc, stdout, stderr = InProcess(["generate.py", *args, *[r.image for r in records]], duocap_cache).wait()
    assert rc == 0, stderr[-5000:]
    lines = stdout.split("\n")
    assert lines[-1] == "" and len(lines) == len(records) + 1, stdout

    # the captions are beam search's, here in-process on the same checkpoint
    loaded, processor, tokenizer, _ = load_run(run_dir)
    state = loaded.encode_images(pixel_values=pixels_for(processor, records))
    expected = decode(loaded, state, tokenizer.eos_token_id, max_new_tokens=12, strategy="beam", beams=3)
    for line, r, ids in zip(lines, records, expected):
        path, caption = line.split("\t")
        assert path == str(r.image)
        assert caption == tokenizer.decode(ids, skip_special_tokens=True).strip()


# -----------------------------------------------------------------------------
# in this process, with a run from each data source


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_generate_captions_an_image_of_each_source(source_runs, name, capsys):
    """generate.py's main, in this process (a fresh process each would cost seconds of imports;
    the tests above run the script itself)."""
    run, rc, _, stderr = source_runs[name]
    assert rc == 0, stderr[-3000:]
    image = json.loads((run / "predictions_test.jsonl").read_text().splitlines()[0])["image"]
    status = generate.main(["--checkpoint", str(run), "--strategy", "greedy", "--device", "cpu", image])
    out = capsys.readouterr().out
    assert status == 0
    lines = out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{image}\t"), out
    predictions = {
        json.loads(line)["image"]: json.loads(line)["caption"]
        for line in (run / "predictions_test.jsonl").read_text().splitlines()
    }
    assert lines[0] == f"{image}\t{predictions[image]}", "greedy captions match the run's evaluation"


# -----------------------------------------------------------------------------
# a bad run folder or a bad value: one line, no traceback


REFUSALS = {
    "missing run folder": (["--checkpoint", "/no/such/run", "img.png"], "/no/such/run", False),
    "folder that is not a run": (["--checkpoint", "{empty}", "img.png"], "{empty}", False),
    "top-p above 1": (["--checkpoint", "/no/such/run", "--top-p", "2", "img.png"], "--top-p", True),
    "temperature 0": (["--checkpoint", "/no/such/run", "--temperature", "0", "img.png"], "--temperature", True),
    "temperature inf": (["--checkpoint", "/no/such/run", "--temperature", "inf", "img.png"], "--temperature", True),
}


@started_first
def generate_refusals(duocap_cache, tmp_path_factory):
    return start_refusals("generate.py", REFUSALS, duocap_cache, empty=tmp_path_factory.mktemp("not-a-run"))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_generate_refuses_a_bad_run_folder_or_a_bad_value_in_one_line(generate_refusals, case):
    assert_refused(*generate_refusals[case])


def test_a_folder_gives_its_images_in_sub_and_symlinked_folders_once_and_no_hidden_files(tmp_path):
    top = tmp_path / "top"
    (top / "nested").mkdir(parents=True)
    (top / "album.png").mkdir()  # a folder with an image's name
    (top / ".git").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in (top / "a.jpg", top / "nested" / "b.PNG", top / "c.jfif", elsewhere / "d.ppm", top / ".git" / "e.png"):
        path.write_bytes(b"pixels")
    for path in (top / ".hidden.png", top / "._a.jpg", top / "notes.txt"):
        path.write_bytes(b"not for captioning")
    (top / "linked").symlink_to(elsewhere, target_is_directory=True)
    (top / "nested" / "loop").symlink_to(top, target_is_directory=True)
    files, errors, notes = generate.expand_paths([top])
    assert sorted(f.relative_to(top).as_posix() for f in files) == ["a.jpg", "c.jfif", "linked/d.ppm", "nested/b.PNG"]
    assert errors == [] and notes == [f"{top}: 1 file(s) without an image suffix left out"]


@pytest.mark.parametrize("device", ["nonsense", "cuda:99"])
def test_a_device_that_is_not_here_is_refused_in_one_line(device):
    with pytest.raises(SystemExit) as e:
        generate.main(["--checkpoint", "/no/such/run", "--device", device, "photo.png"])
    assert str(e.value).startswith(f"error: --device {device}: ") and "\n" not in str(e.value)
