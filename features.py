"""
The frozen vision tower's features, computed once per image and cached on disk.

The cache file is keyed by everything that decides the features: the tower's
name and config, the preprocessing, and each image file (path, size, mtime).
Images that fail to fully decode are recorded with the features, so that every
later run reports them the same way without decoding them again.
"""

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import data


def compute_features(encode, processor, paths, batch_size=64, desc="image features"):
    """(features [N_good, P, D] fp16, [(index, problem)] of images that failed to decode).

    This is where every image is fully decoded once, so a truncated file is found here."""
    chunks, bad = [], []
    for k in tqdm(range(0, len(paths), batch_size), desc=desc, leave=False, unit="batch", disable=None):
        images = []
        for i, p in enumerate(paths[k : k + batch_size], k):
            try:
                images.append(data.read_image(p))
            except data.DataError as e:
                bad.append((i, str(e)))
        if images:
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            with torch.no_grad():
                chunks.append(encode(pixels).to(torch.float16).cpu())
    return torch.cat(chunks), bad


def cache_key(vision_name, vision, processor, records):
    h = hashlib.sha256()
    h.update(vision_name.encode())
    h.update(vision.config.to_json_string().encode())
    h.update(processor.to_json_string().encode())
    for r in records:
        st = os.stat(r.image)
        h.update(f"{r.image}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def cached_features(model, processor, vision_name, records, device, strict=True):
    """(records, [N, P, D] fp16 vision features) from the disk cache when the same backbone,
    preprocessing and image files were seen before. Images that fail to fully decode raise a
    DataError listing them, or (strict False) are left out: the records returned are the ones kept."""
    path = data.cache_root() / "features" / f"{cache_key(vision_name, model.vision, processor, records)}-v3.safetensors"
    if not path.is_file():
        features, bad = compute_features(
            lambda pixels: model.image_features(pixels.to(device)), processor, [r.image for r in records]
        )
        dropped = {i for i, _ in bad}
        kept = torch.tensor([i for i in range(len(records)) if i not in dropped], dtype=torch.long)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"  # runs sharing the cache may build the same file at once
        save_file({"features": features, "kept": kept}, tmp, metadata={"failed": json.dumps([m for _, m in bad])})
        os.replace(tmp, path)
    with safe_open(str(path), "pt") as cached:
        data.stop_or_skip(json.loads(cached.metadata()["failed"]), strict)
        return [records[i] for i in cached.get_tensor("kept").tolist()], cached.get_tensor("features")
