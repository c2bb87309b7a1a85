"""
Training-state checkpoints, so that a run can be interrupted and resumed exactly.

RUN_DIR/checkpoints/step-00000123/ holds
    model.safetensors      the trainable weights
    optimizer.safetensors  the optimizer's per-parameter tensors and the torch RNG states
    state.json             step, epoch, position in the epoch, scheduler, grad scaler,
                           optimizer hyper-parameters, Python and NumPy RNG states
Tensors go to safetensors and everything else to JSON: loading a checkpoint
never runs code: JSON and safetensors only. A checkpoint is written into a temporary folder and
renamed into place, so a kill mid-write leaves the previous one intact.
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


def checkpoint_dirs(run_dir):
    return sorted((Path(run_dir) / "checkpoints").glob("step-*[0-9]"))


def save(run_dir, model, optimizer, scheduler, scaler, progress, keep=2):
    """Write a checkpoint for `progress` ({"step", "epoch", "position", ...}) and keep the last `keep` (>= 1)."""
    keep = max(keep, 1)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{progress['step']:08d}"
    for stale in root.glob("*.tmp"):  # left by a kill in the middle of a write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{final.name}.tmp"
    tmp.mkdir(parents=True)
    save_file(model.trainable_state_dict(), str(tmp / "model.safetensors"))
    names = {id(p): n for n, p in model.named_parameters()}
    tensors, scalars = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value):
                    tensors[f"state.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{names[id(p)]}.{key}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():  # this process's own GPU only; never start CUDA for a CPU run
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    py_state = random.getstate()
    np_state = np.random.get_state()
    state = {
        "progress": progress,
        "param_groups": [
            {k: v for k, v in g.items() if k != "params"} | {"params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups
        ],
        "optimizer_scalars": scalars,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_python": [py_state[0], list(py_state[1]), py_state[2]],
        "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    (tmp / "state.json").write_text(json.dumps(state))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load(path, model, optimizer, scheduler, scaler):
    """Restore a checkpoint written by save; returns its progress dict."""
    path = Path(path)
    hint = f"delete {path} to resume from the checkpoint before it"
    try:
        model.load_trainable(path / "model.safetensors")
        state = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:  # a file cut short by a crash, or missing
        raise ValueError(f"{path}: a damaged checkpoint ({' '.join(str(e).split())}); {hint}") from None
    params = dict(model.named_parameters())
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(f"{path}: {len(groups)} optimizer parameter groups saved, {len(optimizer.param_groups)} now")
    for group, saved in zip(optimizer.param_groups, groups):
        group.update({k: (tuple(v) if isinstance(v, list) else v) for k, v in saved.items() if k != "params"})
    optimizer.state.clear()
    for key, value in tensors.items():
        if key.startswith("state."):
            name, _, field = key[len("state.") :].rpartition(".")
            # AdamW keeps its step count on the CPU (unless fused); the moments live with the parameter
            optimizer.state[params[name]][field] = value if field == "step" else value.to(params[name].device)
    for key, value in state["optimizer_scalars"].items():
        name, _, field = key.rpartition(".")
        optimizer.state[params[name]][field] = value
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    version, internal, gauss = state["rng_python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["rng_numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return state["progress"]


def latest(run_dir):
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/step-* to resume from")
    return dirs[-1]
