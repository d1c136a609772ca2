"""Train the bundled demo CLIP model on the procedural shapes world (CPU, minutes).

    python scripts/train_demo_model.py [--minutes M] [--steps N] [--out DIR] [--seed S]

A small open_clip CLIP (ModifiedResNet image tower, 64x64 input; 3-layer text
transformer, context 20) learns image-caption pairs of 30 colour x shape classes
with open_clip's ClipLoss. The other 6 combinations (``world.HELD_OUT``) are never
drawn or named. Zero-shot accuracy on images from ``VAL_SEED`` (a seed training
never draws from) is printed periodically and recorded in ``training.json`` next
to the weights, for seen classes, all 36, and the 6 unseen combinations.

The learning-rate schedule runs over ``--steps``; ``--minutes`` is a hard cap
(the schedule then follows elapsed time so it still decays to zero). A run that
finishes its steps within the cap is reproducible for a given seed up to
floating-point nondeterminism of the CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch

from clipbatch.commands import demo_world as world

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP
STD = (0.26862954, 0.26130258, 0.27577711)

MODEL_CFG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": world.IMAGE_SIZE, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {"context_length": 20, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
PREPROCESS_CFG = {"size": world.IMAGE_SIZE, "mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "clipbatch" / "models" / "clipbatch-demo"
BATCH = 128
LR = 1e-3
WARMUP = 100
WEIGHT_DECAY = 0.05
POOL = 16384          # pre-rendered training pictures ...
REFRESH = 32          # ... of which this many are replaced by fresh ones every step
VAL_PER_CLASS = 12


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalized float [N, 3, H, W]; equals open_clip's eval transform for
    64x64 inputs (resize and crop are identities there; checked by ``check_preprocess``)."""
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def check_preprocess(images) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2

    transform = image_transform_v2(PreprocessCfg(**PREPROCESS_CFG), is_train=False)
    ours = to_tensor(np.stack([np.asarray(im) for im in images]))
    theirs = torch.stack([transform(im) for im in images])
    assert torch.allclose(ours, theirs, atol=1e-5), "training preprocessing differs from open_clip's eval transform"


def build_model(seed: int):
    import open_clip

    torch.manual_seed(seed)
    return open_clip.model.CLIP(**MODEL_CFG)


def tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=MODEL_CFG["text_cfg"]["context_length"])


class Pool:
    """A pool of rendered training pictures, partly re-rendered every step (cheap fresh data)."""

    def __init__(self, seed: int, size: int):
        self.rng = np.random.default_rng([seed, 0])
        self.classes = [world.split_class(c) for c in world.TRAIN_CLASSES]
        self.pixels = np.empty((size, world.IMAGE_SIZE, world.IMAGE_SIZE, 3), np.uint8)
        self.labels = np.empty(size, np.int64)
        self._fill(np.arange(size))

    def _fill(self, slots: np.ndarray) -> None:
        for i in slots:
            k = int(self.rng.integers(len(self.classes)))
            self.pixels[i] = np.asarray(world.render(*self.classes[k], self.rng))
            self.labels[i] = k

    def batch(self, n: int, refresh: int) -> tuple[np.ndarray, np.ndarray]:
        self._fill(self.rng.choice(len(self.labels), refresh, replace=False))
        idx = self.rng.choice(len(self.labels), n, replace=False)
        return self.pixels[idx], self.labels[idx]


def class_embeddings(model, tok, classes: list[str], templates: list[str]) -> torch.Tensor:
    """[C, D]: per class, the normalized mean of normalized template embeddings."""
    texts = [t.format(c) for c in classes for t in templates]
    emb = model.encode_text(tok(texts), normalize=True).view(len(classes), len(templates), -1)
    return torch.nn.functional.normalize(emb.mean(1), dim=-1)


def evaluate(model, tok, val_pixels: np.ndarray, val_labels: np.ndarray) -> dict:
    model.eval()
    with torch.inference_mode():
        text = class_embeddings(model, tok, world.CLASSES, world.DEMO_TEMPLATES)
        img = torch.cat([model.encode_image(to_tensor(val_pixels[i:i + 256]), normalize=True)
                         for i in range(0, len(val_pixels), 256)])
        pred = (img @ text.T).argmax(-1).numpy()
    model.train()
    right = pred == val_labels
    unseen = np.isin(val_labels, [world.CLASSES.index(c) for c in world.HELD_OUT])
    per_unseen = {c: float(right[val_labels == world.CLASSES.index(c)].mean()) for c in world.HELD_OUT}
    return {"seen": float(right[~unseen].mean()), "all": float(right.mean()), "unseen": float(right[unseen].mean()),
            "unseen_per_class": per_unseen}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/train_demo_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps (default 3000)")
    p.add_argument("--minutes", type=float, default=25.0, help="hard cap on training time (default 25)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"model folder (default {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=world.TRAIN_SEED)
    p.add_argument("--eval-every", type=int, default=250, help="steps between accuracy reports")
    args = p.parse_args(argv)
    if args.seed in (world.DEMO_SEED, world.VAL_SEED):
        p.error("--seed must differ from the demo and validation seeds")
    return args


def optimizer(model) -> torch.optim.Optimizer:
    """AdamW with weight decay on the weight matrices only (not on biases, norms or the logit scale)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_scale" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                              {"params": no_decay, "weight_decay": 0.0}], lr=LR)


def train(model, args, pool: "Pool", caption_tokens: torch.Tensor, validate) -> tuple[int, list[dict]]:
    """The training loop: (steps taken, accuracy history). The schedule follows steps or elapsed time,
    whichever is further, so that a time cap still decays the learning rate to zero."""
    from open_clip.loss import ClipLoss

    opt, loss_fn = optimizer(model), ClipLoss()
    cap_s, gen, history, step, t0 = args.minutes * 60, torch.Generator().manual_seed(args.seed), [], 0, time.time()
    model.train()
    while step < args.steps:
        elapsed = time.time() - t0
        if elapsed >= cap_s:
            print(f"time cap of {args.minutes:g} min reached at step {step}", flush=True)
            break
        progress = max(step / args.steps, elapsed / cap_s)
        lr = LR * (step + 1) / WARMUP if step < WARMUP else LR * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        pixels, labels = pool.batch(BATCH, REFRESH)
        wording = torch.randint(caption_tokens.shape[1], (BATCH,), generator=gen)
        img_f, txt_f, scale = model(to_tensor(pixels), caption_tokens[torch.from_numpy(labels), wording])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        line = f"step {step:5d}  {time.time() - t0:6.0f}s  loss {loss.item():.3f}  lr {lr:.2e}"
        if step % args.eval_every == 0 or step == args.steps:
            acc = validate()
            history.append({"step": step, "seconds": round(time.time() - t0, 1), "loss": round(loss.item(), 4),
                            **{k: round(acc[k], 4) for k in ("seen", "all", "unseen")}})
            print(f"{line}  seen {acc['seen']:.1%}  all {acc['all']:.1%}  unseen {acc['unseen']:.1%}", flush=True)
        elif step % 50 == 0:
            print(line, flush=True)
    return step, history


def main(argv: list[str] | None = None) -> int:
    from clipbatch.model.load import save_local_dir

    args = parse_args(argv)
    torch.set_flush_denormal(True)  # tiny weights/activations otherwise slow CPU kernels down several-fold
    started = time.time()
    model = build_model(args.seed)
    tok = tokenizer()
    # All training captions, tokenized once: caption_tokens[class k, wording j].
    caption_tokens = torch.stack([tok(world.captions(*world.split_class(c))) for c in world.TRAIN_CLASSES])
    val = list(world.sample(world.VAL_SEED, VAL_PER_CLASS))
    check_preprocess([im for im, _ in val[:8]])
    val_pixels = np.stack([np.asarray(im) for im, _ in val])
    val_labels = np.array([world.CLASSES.index(name) for _, name in val])
    pool_size = min(POOL, max(BATCH, args.steps * BATCH // 4))
    pool = Pool(args.seed, pool_size)
    print(f"model {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; pool of {pool_size} pictures "
          f"rendered in {time.time() - started:.1f}s", flush=True)
    t0 = time.time()
    step, history = train(model, args, pool, caption_tokens, lambda: evaluate(model, tok, val_pixels, val_labels))
    train_s = time.time() - t0
    acc = evaluate(model, tok, val_pixels, val_labels)
    print(f"final: {step} steps in {train_s:.0f}s  seen {acc['seen']:.1%}  all {acc['all']:.1%}  "
          f"unseen {acc['unseen']:.1%}  ({', '.join(f'{c} {a:.0%}' for c, a in acc['unseen_per_class'].items())})",
          flush=True)
    model.eval()
    pre = {k: v for k, v in PREPROCESS_CFG.items() if k != "size"}
    out = save_local_dir(model, MODEL_CFG, args.out, pre, dtype="float16")
    record = {
        "steps": step, "seconds": round(train_s, 1), "total_seconds": round(time.time() - started, 1),
        "seed": args.seed, "accuracy": {k: round(v, 4) for k, v in acc.items() if k != "unseen_per_class"},
        "unseen_per_class": acc["unseen_per_class"],
        "eval": {"seed": world.VAL_SEED, "images_per_class": VAL_PER_CLASS, "templates": world.DEMO_TEMPLATES,
                 "held_out": world.HELD_OUT, "note": "weights evaluated in fp32 before the fp16 save"},
        "config": {"model_cfg": MODEL_CFG, "batch": BATCH, "lr": LR, "warmup_steps": WARMUP,
                   "schedule": "cosine", "weight_decay": WEIGHT_DECAY, "loss": "open_clip.loss.ClipLoss",
                   "pool": pool_size, "refresh_per_step": REFRESH, "captions": list(world.TRAIN_CAPTIONS),
                   "steps_requested": args.steps, "minutes_cap": args.minutes},
        "history": history,
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor()},
    }
    (out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"saved {out} ({size / 1e6:.1f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
