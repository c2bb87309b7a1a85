"""
Backbones: the CLIP vision tower with its image processor, and the Qwen causal
LM with its tokenizer, loaded by hub id or local directory through transformers.
Nothing else: the offline demo's stand-ins are built by demo.py and then loaded
here through the same from_pretrained path a hub id takes.
"""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessor, CLIPVisionModel


def _load(what, name, loader, **kwargs):
    try:
        return loader(name, **kwargs)
    except OSError as e:
        raise OSError(
            f"could not load the {what} {name!r}: {e}\nA hub id needs the network (or the "
            f"hub cache); a local directory needs the files save_pretrained writes."
        ) from None


def load_vision(name):
    """(frozen CLIPVisionModel, its image processor) from a hub id or directory."""
    vision = _load("vision tower", str(name), CLIPVisionModel.from_pretrained)
    processor = _load("image processor", str(name), CLIPImageProcessor.from_pretrained)
    return vision.eval().requires_grad_(False), processor


def load_language(name):
    """(Qwen causal LM, tokenizer) from a hub id or directory; never trust_remote_code."""
    lm = _load("language model", str(name), AutoModelForCausalLM.from_pretrained, dtype=torch.float32)
    tokenizer = _load("tokenizer", str(name), AutoTokenizer.from_pretrained)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name} has no EOS token; captions need one to end")
    return lm, tokenizer
