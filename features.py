"""
The frozen vision tower's features, computed once per image and cached on disk.

A cache is one .npy file of fp16 features [N images, P patches, D] beside a JSON
file naming the images that failed to decode and why. Its name is a hash of all
that decides the features: the tower's name, config and weights, the
preprocessing, and each image file (path, size, mtime).

Built without holding it in memory: images are decoded and preprocessed in
DataLoader workers, and each batch of features is written into its rows of the
memory-mapped file. Under torchrun every rank encodes its own slice of the
images into the same file, so no rank waits on another for the whole set.
Training reads it memory-mapped too: a cache larger than memory costs page
cache, not private memory, and workers (forked or spawned) share it.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data

VERSION = "v4"


# -----------------------------------------------------------------------------
# extraction: images decoded in DataLoader workers, features a batch at a time


class DecodedImages(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, data.read_image(self.paths[i]), None
        except data.DataError as e:
            return i, None, str(e)


class Preprocess:
    """A batch of decoded images -> (indices, pixel values or None, [(index, problem)]), in the worker."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items):
        good = [(i, image) for i, image, problem in items if problem is None]
        bad = [(i, problem) for i, _, problem in items if problem is not None]
        pixels = (
            self.processor(images=[image for _, image in good], return_tensors="pt")["pixel_values"] if good else None
        )
        return [i for i, _ in good], pixels, bad


def feature_batches(encode, processor, paths, batch_size=64, workers=0, desc="image features"):
    """Yield (indices of the images that decoded, their features [n, P, D] fp16 on the CPU or
    None, [(index, problem)] of the images that did not). Every image is fully decoded here,
    so a truncated file is found here."""
    loader = torch.utils.data.DataLoader(
        DecodedImages(paths), batch_size=batch_size, num_workers=workers, collate_fn=Preprocess(processor)
    )
    for indices, pixels, bad in tqdm(loader, desc=desc, leave=False, unit="batch", disable=None):
        features = None
        if pixels is not None:
            with torch.no_grad():
                features = encode(pixels).to(torch.float16).cpu()
        yield indices, features, bad


def compute_features(encode, processor, paths, batch_size=64, desc="image features", workers=0):
    """(features [N_good, P, D] fp16 in memory, [(index, problem)]): for small sets (benchmarks, tests)."""
    chunks, bad = [], []
    for _, features, problems in feature_batches(encode, processor, paths, batch_size, workers, desc):
        chunks += [] if features is None else [features]
        bad += problems
    return torch.cat(chunks), bad


# -----------------------------------------------------------------------------
# the cache


def weights_digest(module):
    """A hash of every tensor of a module: a folder re-saved with other weights, or another hub
    revision, must not reuse features computed with the old ones."""
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_key(vision_name, vision, processor, records, layer=-1):
    h = hashlib.sha256()
    h.update(vision_name.encode())
    if layer != -1:  # the last layer's key is the one it always had
        h.update(f"layer {layer}".encode())
    h.update(vision.config.to_json_string().encode())
    h.update(weights_digest(vision).encode())
    h.update(processor.to_json_string().encode())
    for r in records:
        st = os.stat(r.image)
        h.update(f"{r.image}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


class FeatureStore:
    """Cached features of the kept images, memory-mapped. store[i] / store[[i, j]] read those rows
    (as tensors) from the page cache; pickling, for a spawned DataLoader worker, sends the path
    and not the data."""

    dtype = torch.float16

    def __init__(self, path, rows):
        self.path, self.rows = Path(path), np.asarray(rows, dtype=np.int64)
        self._array = None

    def array(self):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getstate__(self):
        return {"path": self.path, "rows": self.rows}

    def __setstate__(self, state):
        self.__init__(state["path"], state["rows"])

    def __len__(self):
        return len(self.rows)

    @property
    def shape(self):
        return (len(self.rows), *self.array().shape[1:])

    def __getitem__(self, index):
        return torch.from_numpy(np.ascontiguousarray(self.array()[self.rows[index]]))

    def tensor(self):
        """All of it in memory: for small caches and tests."""
        return self[np.arange(len(self))]


def distributed():
    return dist.is_available() and dist.is_initialized()


def barrier():
    if distributed():
        dist.barrier()


def rank_zero_says(flag):
    """Rank 0's value of flag, on every rank."""
    flag = [flag]
    if distributed():
        dist.broadcast_object_list(flag, src=0)
    return flag[0]


def shared_temporary_name(path):
    """One temporary name for all ranks (rank 0's pid), unique among runs sharing the cache."""
    return Path(rank_zero_says(f"{path}.{os.getpid()}.tmp"))


def build_cache(model, processor, records, device, path, rank, world, workers):
    """Write the features of every record into `path` (.npy) and the decoding failures beside it;
    each of the `world` ranks encodes its contiguous slice of the records."""
    n = len(records)
    shape = (n, model.n_patches(), model.vision.config.hidden_size)
    tmp = shared_temporary_name(path)
    try:
        if rank == 0:
            np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape).flush()
        barrier()
        first, last = rank * n // world, (rank + 1) * n // world
        out = np.load(tmp, mmap_mode="r+")
        bad = []
        encode = lambda pixels: model.image_features(pixels.to(device))
        paths = [r.image for r in records[first:last]]
        for indices, features, problems in feature_batches(encode, processor, paths, workers=workers):
            if features is not None:
                assert features.shape[1:] == shape[1:], f"features of shape {tuple(features.shape)}, expected {shape}"
                out[[first + i for i in indices]] = features.numpy()
            bad += [(first + i, problem) for i, problem in problems]
        out.flush()
        del out
        if world > 1:
            print(f"feature cache: rank {rank} of {world} encoded images {first}..{last - 1} of {n}")
        Path(f"{tmp}.rank{rank}.json").write_text(json.dumps(bad))
        barrier()
        if rank == 0:
            failed = sorted(f for r in range(world) for f in json.loads(Path(f"{tmp}.rank{r}.json").read_text()))
            for r in range(world):
                Path(f"{tmp}.rank{r}.json").unlink()
            os.replace(tmp, path)
            meta = path.with_suffix(".json")
            Path(f"{meta}.tmp").write_text(json.dumps({"images": n, "failed": failed}))
            os.replace(f"{meta}.tmp", meta)  # last: its presence says the cache is complete
        barrier()
    except BaseException:  # an error or Ctrl-C: no half-written cache (gigabytes for COCO) is left behind
        if rank == 0:
            for leftover in [Path(tmp), *Path(tmp).parent.glob(f"{Path(tmp).name}.rank*.json")]:
                leftover.unlink(missing_ok=True)
        raise


def cached_features(model, processor, vision_name, records, device, strict=True, rank=0, world=1, workers=0):
    """(records, FeatureStore of their vision features) from the disk cache when the same
    backbone, preprocessing and image files were seen before, else built first (by every rank
    together under torchrun). Images that fail to fully decode raise a DataError listing them,
    or (strict False) are left out: the records returned are the ones kept."""
    key = cache_key(vision_name, model.vision, processor, records, model.switches.vision_layer)
    path = data.cache_root() / "features" / f"{key}-{VERSION}.npy"
    meta = path.with_suffix(".json")
    if rank_zero_says(not meta.is_file()):  # one decision for all ranks: another run may finish the file meanwhile
        path.parent.mkdir(parents=True, exist_ok=True)
        build_cache(model, processor, records, device, path, rank, world, workers)
    failed = json.loads(meta.read_text())["failed"]
    data.stop_or_skip([problem for _, problem in failed], strict)
    dropped = {i for i, _ in failed}
    kept = [i for i in range(len(records)) if i not in dropped]
    return [records[i] for i in kept], FeatureStore(path, kept)
