"""
The run directory: what a training run leaves behind and how to bring it back.

    RUN_DIR/config.json        everything needed to rebuild the model (variant, backbones, options)
    RUN_DIR/model.safetensors  the trainable weights only

This is the one module that knows both variants (VARIANTS, the registry). A run
is refused, with a message saying why, when it is not a run, holds the other
variant, or was trained on other backbone weights than the ones found now.
"""

import hashlib
import json
from pathlib import Path

from safetensors.torch import save_file

import backbones
from model_explained import ExplainedCaptioner
from model_self_attention import SelfAttentionCaptioner

VARIANTS = {cls.variant: cls for cls in (ExplainedCaptioner, SelfAttentionCaptioner)}
# what people call each variant; the keys are the names in code, configs and run folders
LABELS = {"explained": "cross-attention", "self_attention": "self-attention"}


class RunError(ValueError):
    """A folder that is not a usable run; the message names it and says what is wrong."""


def build_model(config):
    """(fresh model with its frozen parts frozen, processor, tokenizer) for the variant and
    backbones a run's config names."""
    if config["variant"] not in VARIANTS:
        raise RunError(f"unknown variant {config['variant']!r} (one of {', '.join(VARIANTS)})")
    vision, processor = backbones.load_vision(config["vision"])
    lm, tokenizer = backbones.load_language(config["language"])
    model = VARIANTS[config["variant"]].from_config(vision, lm, config)
    return model.freeze(), processor, tokenizer


def save_run(model, config, run_dir):
    """Trainable weights as safetensors and the config as JSON, each written whole and renamed into place."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_file(model.trainable_state_dict(), str(run_dir / "model.safetensors.tmp"))
    (run_dir / "model.safetensors.tmp").replace(run_dir / "model.safetensors")
    config = {
        **config,
        "variant": model.variant,
        "backbone_fingerprint": model.backbone_fingerprint(),
        "frozen_fingerprint": frozen_fingerprint(model),
    }
    (run_dir / "config.json.tmp").write_text(json.dumps(config, indent=2))
    (run_dir / "config.json.tmp").replace(run_dir / "config.json")


def read_config(run_dir):
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        what = "no such folder" if not Path(run_dir).is_dir() else "no config.json in it"
        raise RunError(f"{run_dir}: not a run directory ({what}); training writes one")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "variant" not in config:
        raise RunError(
            f'{path}: expected a run\'s config, a JSON object with "variant" and the options it was trained with'
        )
    return config


def load_run(run_dir, variant=None):
    """(model, processor, tokenizer, config) from a run directory; the weights are trusted
    to be data only (safetensors), and a checkpoint of the other variant is refused."""
    config = read_config(run_dir)
    missing = [k for k in ("vision", "language", "max_caption_tokens") if k not in config]
    if missing:
        raise RunError(f"{Path(run_dir) / 'config.json'}: no {', '.join(missing)}; training writes every option there")
    if variant is not None and config["variant"] != variant:
        raise RunError(f"{run_dir} holds a {config['variant']} checkpoint, not a {variant} one")
    weights = Path(run_dir) / "model.safetensors"
    if not weights.is_file():
        raise RunError(f"{run_dir}: no model.safetensors; the run saved no weights yet")
    model, processor, tokenizer = build_model(config)
    model.load_trainable(weights)
    check_backbones(model, config, run_dir)
    return model.eval(), processor, tokenizer, config


def frozen_fingerprint(model):
    """A short hash of every frozen parameter, about 1024 evenly spaced values of each. The
    model's backbone_fingerprint reads only the token embeddings' first rows and the patch
    embedding, which a language model fine-tuned from the same one may keep unchanged. Only the
    values count, as a set: not the names, the order, or a tensor listed twice."""
    digests = []
    for p in model.parameters():
        if not p.requires_grad:
            flat = p.detach().flatten()
            digests.append(hashlib.sha256(flat[:: max(1, flat.numel() // 1024)].float().cpu().numpy().tobytes()))
    return hashlib.sha256(b"".join(sorted({d.digest() for d in digests}))).hexdigest()[:16]


def check_backbones(model, config, run_dir):
    """Runs saved before frozen_fingerprint existed are checked by the backbone fingerprint alone."""
    now = {"backbone_fingerprint": model.backbone_fingerprint(), "frozen_fingerprint": frozen_fingerprint(model)}
    for key, value in now.items():
        expected = config.get(key)
        if expected and expected != value:
            raise RunError(
                f"{run_dir} was trained on other backbone weights than {config['vision']} and "
                f"{config['language']} hold now ({key} {value}, expected {expected}): were the "
                "backbones rebuilt or replaced since training?"
            )
