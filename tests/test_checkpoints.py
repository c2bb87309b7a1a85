"""Training-state checkpoints hold data only (safetensors and JSON), the last --keep of them, and
nothing in the repository can unpickle."""

import json
import re

from safetensors.torch import load_file

import checkpoints
from conftest import REPO


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
