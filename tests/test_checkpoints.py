"""Training-state checkpoints hold data only (safetensors and JSON), the last --keep of them, and
nothing in the repository can unpickle; loading one restores the torch, Python and NumPy generators."""

import json
import random
import re

import numpy as np
import torch
from safetensors.torch import load_file

import checkpoints
from conftest import REPO, kept_rng, training_parts


def assert_data_only(run):
    """Every finished checkpoint holds safetensors and JSON and nothing else."""
    dirs = checkpoints.checkpoint_dirs(run)
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


def test_checkpoints_are_safetensors_and_json_only(resume_runs):
    dirs, _ = resume_runs
    for name in ("full-explained", "full-self_attention", "terminated", "terminated-as-left", "killed-explained"):
        assert_data_only(dirs[name])
    for name in ("full-explained", "terminated"):
        leftovers = [p.name for p in (dirs[name] / "checkpoints").iterdir() if not re.fullmatch(r"step-\d{8}", p.name)]
        assert not leftovers, f"{name}: {leftovers}"
        assert len(checkpoints.checkpoint_dirs(dirs[name])) <= 2, "--keep 2 keeps the last two"


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


def draws():
    """The next numbers of torch's, Python's and NumPy's generators; gauss and randn too, whose
    generators keep a second normal value between calls (part of the state to save)."""
    return (
        torch.rand(4).tolist(),
        torch.randn(3).tolist(),
        [random.random(), random.gauss(0, 1)],
        np.random.rand(3).tolist() + [np.random.randn()],
    )


def test_a_checkpoint_restores_the_rng_states(make_model, tmp_path):
    """A resumed run draws what the interrupted one would have drawn next: save, disturb every
    generator, load, and the next numbers are those drawn right after saving."""
    model, *_ = make_model("explained")
    _, optimizer, scheduler, scaler = training_parts(model)
    with kept_rng():
        torch.manual_seed(1), random.seed(2), np.random.seed(3)
        random.gauss(0, 1), np.random.randn()  # a second normal value is held in each
        path = checkpoints.save(tmp_path, model, optimizer, scheduler, scaler, {"step": 7, "epoch": 0, "position": 7})
        expected = draws()
        torch.manual_seed(4), random.seed(5), np.random.seed(6)
        disturbed = draws()
        for generator, (a, b) in enumerate(zip(disturbed, expected)):
            assert a != b, f"disturbing generator {generator} changed nothing: the check below could not fail"
        progress = checkpoints.load(path, model, optimizer, scheduler, scaler)
        assert draws() == expected
    assert progress["step"] == 7
