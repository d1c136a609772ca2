"""Model names -> open_clip models, through open_clip's own factory.

A spec names a model the way open_clip does (a built-in name with a pretrained
tag or checkpoint file, ``hf-hub:org/repo``, ``local-dir:/path``) or by the
short name of the model bundled with clipbatch. Nothing here knows about Ray,
so the same code serves the actors, the text head and the tests. torch and
open_clip are imported inside the functions that use them, on purpose: decode
and shard-reader tasks import this module's neighbours (Member, the output
schema) and must not pay for torch.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipbatch.errors import UserError, one_line

DEMO_MODEL_NAME = "clipbatch-demo"
DEMO_MODEL_DIR = Path(__file__).parent.parent / "models" / DEMO_MODEL_NAME
ACTIVATION_BUDGET = 4 * 2**30  # bytes of activations one GPU batch may take: two are in flight per GPU
MIN_GPU_BATCH, MAX_GPU_BATCH = 64, 1024


def resolve_model_name(name: str) -> str:
    """Map clipbatch's short names to an open_clip identifier."""
    if name == DEMO_MODEL_NAME:
        return f"local-dir:{DEMO_MODEL_DIR}"
    return name


def check_model_name(name: str, pretrained: str | None) -> None:
    """Fail fast, before any work, on a model open_clip could never load."""
    import open_clip

    resolved = resolve_model_name(name)
    if resolved.startswith("local-dir:"):
        folder = Path(resolved.removeprefix("local-dir:")).expanduser()
        if not (folder / "open_clip_config.json").is_file():
            raise UserError(f"model '{name}': no open_clip_config.json in {folder}")
        return
    if resolved.startswith("hf-hub:"):
        if resolved.count("/") != 1 or resolved.endswith("/"):
            raise UserError(f"model '{name}': expected hf-hub:org/repo")
        return
    cleaned = resolved.replace("/", "-")
    known = open_clip.list_models()
    if cleaned not in known:
        close = difflib.get_close_matches(cleaned, known, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see open_clip.list_models()"
        raise UserError(f"unknown model '{name}'{hint}")
    if pretrained is None or os.path.isfile(os.path.expanduser(pretrained)):
        return
    tags = open_clip.list_pretrained_tags_by_model(cleaned)
    if pretrained not in tags:
        raise UserError(f"model '{name}': pretrained '{pretrained}' is neither a checkpoint file nor a known tag "
                         f"(known: {', '.join(tags) or 'none'})")


def check_hub_model(name: str) -> None:
    """For hf-hub: models, fetch the small open_clip config now (it is cached for the workers),
    so that a wrong repo or an unreachable hub fails before any work. Weights come later."""
    if not name.startswith("hf-hub:"):
        return
    from huggingface_hub import hf_hub_download

    repo = name.removeprefix("hf-hub:")
    try:
        hf_hub_download(repo, "open_clip_config.json")
    except Exception as exc:
        raise UserError(f"model '{name}': cannot fetch its open_clip_config.json from the Hugging Face "
                        f"hub ({one_line(exc, 200)})") from None


@functools.lru_cache(maxsize=8)
@functools.lru_cache(maxsize=8)
def _meta_model(name: str):
    """The model built on the meta device (no memory, no weights), in a fraction of a second; built once
    for the parameter count, the preprocess config and the GPU batch. Callers only read it."""
    import open_clip
    import torch

    resolved = resolve_model_name(name)
    if resolved.startswith("hf-hub:"):  # read the config only: create_model would fetch the weights
        from huggingface_hub import hf_hub_download

        config = hf_hub_download(resolved.removeprefix("hf-hub:"), "open_clip_config.json")
        resolved = f"local-dir:{Path(config).parent}"
    logging.disable(logging.WARNING)  # open_clip warns that this weightless model is "initialized randomly"
    try:
        with torch.device("meta"):
            return open_clip.create_model(resolved, pretrained=None, load_weights=False, device="meta",
                                          pretrained_text=False)
    finally:
        logging.disable(logging.NOTSET)


def gpu_batch_size(name: str) -> int:
    """Images a GPU batch of this model holds: as many as its largest activations fit in
    ACTIVATION_BUDGET, a power of two from 64 to 1024 (ViT-B-32: 1024, ViT-L-14: 512, ViT-L-14-336:
    128). Without building it; the encoder halves a batch that still runs out of memory."""
    import open_clip

    model = _meta_model(name)
    visual = model.visual
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is not None and hasattr(visual, "positional_embedding"):
        tokens, width = visual.positional_embedding.shape
        heads = getattr(blocks[0].attn, "num_heads", max(1, width // 64))
    else:  # convolutional and timm towers: counted as a ViT-B/16 of their input size
        size = open_clip.get_model_preprocess_cfg(model)["size"]
        side = size if isinstance(size, int) else max(size)
        tokens, width, heads = (side // 16) ** 2 + 1, 768, 12
    per_image = tokens * 4 * width * 2 * 2 + heads * tokens ** 2 * 2  # fp16: the MLP's input and output, attention
    fits = max(1, ACTIVATION_BUDGET // per_image)
    return int(min(MAX_GPU_BATCH, max(MIN_GPU_BATCH, 2 ** (fits.bit_length() - 1))))


def parameter_count(name: str) -> int:
    """Parameters of the whole model (both towers), without loading it: an actor's memory estimate."""
    return sum(p.numel() for p in _meta_model(name).parameters())


def preprocess_config(name: str, pretrained: str | None) -> dict:
    """The model's image preprocess config, in a fraction of a second and without downloading weights.

    A pretrained tag's own preprocessing (mean, std, interpolation, resize mode) is merged in as
    open_clip's factory does. The encoder checks this against the config of the model it really loads.
    """
    import open_clip
    from open_clip.transform import merge_preprocess_dict

    resolved = resolve_model_name(name)
    model = _meta_model(name)
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    if pretrained and not resolved.startswith(("local-dir:", "hf-hub:")):
        tag_cfg = open_clip.get_pretrained_cfg(resolved.replace("/", "-"), pretrained)
        if tag_cfg:
            cfg = merge_preprocess_dict(cfg, tag_cfg)
    return comparable_preprocess(cfg)


def comparable_preprocess(cfg: dict) -> dict:
    """A preprocess config as plain JSON types, so that two of them compare equal when they mean the same."""
    size = cfg.get("size", 224)
    size = [int(v) for v in size] if isinstance(size, (list, tuple)) else [int(size), int(size)]
    return {"size": size, "mode": cfg.get("mode", "RGB"), "mean": [float(v) for v in cfg["mean"]],
            "std": [float(v) for v in cfg["std"]], "interpolation": cfg.get("interpolation", "bicubic"),
            "resize_mode": cfg.get("resize_mode", "shortest"), "fill_color": int(cfg.get("fill_color", 0))}


def pick_device(requested: str) -> str:
    """'auto' means CUDA when this process can see a GPU."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device is cuda (or this actor was given a GPU) but torch finds no CUDA "
                           "device here; check the node's driver and CUDA_VISIBLE_DEVICES, or set "
                           "compute.device: cpu")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_precision(requested: str, device: str) -> str:
    """'auto' is fp16 on GPU and fp32 on CPU. bf16 is faster on CPUs with AVX512-BF16 but moves
    probabilities beyond the fp32 parity the defaults promise (docs/performance.md): opt-in only."""
    if requested == "auto":
        return "fp16" if device == "cuda" else "fp32"
    return requested


@dataclass
class LoadedModel:
    model: object  # open_clip CLIP / CustomTextCLIP, eval mode, on device
    resolved_name: str  # open_clip's identifier, for the tokenizer
    device: str
    precision: str
    preprocess_cfg: dict

    @functools.cached_property
    def tokenizer(self):
        """Built when first used: image encoders never tokenize."""
        import open_clip

        return open_clip.get_tokenizer(self.resolved_name)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp().item())

    @property
    def logit_bias(self) -> float | None:
        bias = getattr(self.model, "logit_bias", None)
        return None if bias is None else float(bias.item())

    def embed_images(self, pixels: np.ndarray):
        """uint8 [B, H, W, 3] (numpy, or a tensor decoded on the device) -> L2-normalized float32
        embeddings [B, D] (a torch tensor on the device):
        the model's mean/std normalization and precision applied on its device."""
        import torch

        mean = torch.tensor(self.preprocess_cfg["mean"], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess_cfg["std"], device=self.device).view(1, 3, 1, 1)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.precision, torch.float32)
        x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(pixels)
        x = x.to(self.device, non_blocking=True)
        # Made contiguous channels-first before the arithmetic, in place: broadcasting over the
        # channels-last view cost several times the model's own forward on CPU (bench/feed.py).
        x = x.permute(0, 3, 1, 2).contiguous().float()
        x = x.mul_(1 / (255.0 * std)).sub_(mean / std).to(dtype)
        with torch.inference_mode():
            # Normalized in float32, so that fp16/bf16 embeddings still have unit norm.
            return torch.nn.functional.normalize(self.model.encode_image(x).float(), dim=-1)


def load_model(name: str, pretrained: str | None, device: str = "auto", precision: str = "auto") -> LoadedModel:
    """Build model and tokenizer with open_clip's factory, in eval mode on the device."""
    import open_clip
    import torch

    device = pick_device(device)
    precision = pick_precision(precision, device)
    resolved = resolve_model_name(name)
    has_schema = resolved.startswith(("local-dir:", "hf-hub:"))
    pretrained_arg = None if has_schema else (os.path.expanduser(pretrained) if pretrained and
                                               os.path.isfile(os.path.expanduser(pretrained)) else pretrained)
    # Seeded, so that a model without pretrained weights (benchmarks) is the same in every process:
    # the text head is built in one process and the images are encoded in others.
    torch.manual_seed(0)
    model = open_clip.create_model(resolved, pretrained=pretrained_arg, precision=precision, device=device)
    model.eval()
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    return LoadedModel(model, resolved, device, precision, cfg)


def save_local_dir(model, model_cfg: dict, folder: str | Path, preprocess_cfg: dict | None = None,
                   dtype: str = "float32") -> Path:
    """Save a model as an open_clip ``local-dir:`` folder (open_clip_config.json + safetensors)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cast = {"float32": torch.float32, "float16": torch.float16}[dtype]
    state = {k: v.detach().to(cast if v.is_floating_point() else v.dtype).contiguous().cpu()
             for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    return folder
