"""Trains the shipped demo weights: the digits classifier, then the digits DiT, then measures both.

    python -m smoothcache_fx.demo.train [--out DIR] [--steps N] [--minutes M] [--seed S]

Needs scikit-learn (`load_digits`, 1797 8x8 images bundled with it: nothing is downloaded). Runs on
one CPU thread by default so that a seed gives the same weights bit for bit; `--minutes` caps the
wall time (the steps actually run are recorded, so a capped run is reproducible with `--steps`).
Writes `dit_digits.safetensors`, `digits_classifier.safetensors` and `dit_digits.json` (configs,
steps, seed, losses, classifier test accuracy, sample accuracy, adjacent-step branch errors).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from smoothcache_fx.demo.classifier import CLASSIFIER_WEIGHTS, DigitsClassifier, classify
from smoothcache_fx.demo.model import (
    DEFAULT_GUIDANCE_SCALE,
    DEMO_CONFIG,
    DEMO_SCHEDULER_CONFIG,
    DIT_INFO,
    DIT_WEIGHTS,
    NULL_CLASS,
    NUM_CLASSES,
    WEIGHTS_DIR,
    build_demo_model,
    generate,
    make_scheduler,
)

LABEL_DROP_PROB = 0.1  # DiT's own class-dropout rate for classifier-free guidance
EVAL_GUIDANCE_SCALES = (1.0, 1.5, 2.0, 3.0)


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as images [1797, 1, 8, 8] in [-1, 1] (raw values are 0..16) and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.tensor(digits.target, dtype=torch.long)


def test_mask(n: int) -> torch.Tensor:
    """The classifier's held-out fifth: every 5th image (a split that needs no RNG to reproduce)."""
    return torch.arange(n) % 5 == 0


def random_shift(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image by -1, 0 or +1 pixel per axis, filling with background (-1)."""
    padded = F.pad(images, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, images.shape[0]), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None].expand(-1, 8, 8)
    cols = (dx[:, None] + torch.arange(8))[:, None, :].expand(-1, 8, 8)
    batch = torch.arange(images.shape[0])[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


def train_classifier(images, labels, seed: int, epochs: int = 60) -> tuple[DigitsClassifier, float]:
    """Trains on 4/5 of the digits with shift augmentation; returns the model and held-out accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    held_out = test_mask(len(labels))
    x_train, y_train = images[~held_out], labels[~held_out]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_train), generator=gen).split(64):
            loss = F.cross_entropy(model(random_shift(x_train[idx], gen)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    accuracy = (classify(images[held_out], model) == labels[held_out]).float().mean().item()
    return model, accuracy


def _lr_at(step: int, steps: int, lr: float, warmup: int = 100) -> float:
    """Linear warmup, then cosine decay to a tenth of `lr` at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_dit(images, labels, args, log=print):
    """Eps-prediction DDPM training with 10% null labels; returns (raw model, EMA model, record)."""
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model = build_demo_model().train()
    # diffusers drops labels inside every block's LabelEmbedding independently (6 different random
    # masks per sample), which never shows the model "null in all blocks" as used at sampling time.
    # Drop once per sample here instead, and turn the per-block dropout off.
    for module in model.modules():
        if hasattr(module, "token_drop"):
            module.dropout_prob = 0.0
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    scheduler = make_scheduler(50)
    alphas_cumprod = scheduler.alphas_cumprod.float()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    start, cpu_start, loss_avg, step = time.perf_counter(), time.process_time(), None, 0
    order = torch.empty(0, dtype=torch.long)
    while step < args.steps:
        if args.minutes is not None and time.perf_counter() - start > args.minutes * 60:
            log(f"dit: stopping at the {args.minutes}-minute cap after {step} steps")
            break
        if len(order) < args.batch_size:  # epochs of a seeded permutation: a deterministic order
            order = torch.cat([order, torch.randperm(len(labels), generator=gen)])
        idx, order = order[: args.batch_size], order[args.batch_size :]
        x0, y = images[idx], labels[idx].clone()
        if args.shift:
            x0 = random_shift(x0, gen)
        y[torch.rand(len(y), generator=gen) < LABEL_DROP_PROB] = NULL_CLASS
        t = torch.randint(0, len(alphas_cumprod), (len(y),), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(model(xt, timestep=t, class_labels=y).sample, noise)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        step += 1
        loss_avg = loss.item() if loss_avg is None else 0.99 * loss_avg + 0.01 * loss.item()
        if step % 100 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            log(
                f"dit step {step}/{args.steps} loss {loss_avg:.4f} {elapsed:.0f}s ({step / elapsed:.2f} it/s)"
            )
    record = {
        "steps": step,
        "seconds": round(time.perf_counter() - start, 1),
        "cpu_seconds": round(time.process_time() - cpu_start, 1),  # wall time varies with CPU sharing
        "final_loss": round(loss_avg, 5),
    }
    return model.eval(), ema, record


def sample_accuracy(model, classifier, guidance_scale, num_steps=50, per_class=20, seed=0) -> float:
    """Fraction of `per_class` samples per digit that the classifier labels as the digit asked for."""
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    images = generate(model, labels, num_steps, guidance_scale=guidance_scale, generator=gen)
    return (classify(images, classifier) == labels).float().mean().item()


def adjacent_step_errors(model, guidance_scale, num_steps=50, per_class=2, seed=0) -> dict:
    """Relative L1 change |L_t - L_(t-1)|_1 / |L_t|_1 of every block's attn1 and ff output per step.

    These are the numbers SmoothCache calibrates on: a branch whose output barely changes between
    adjacent steps can reuse its cached output. Returns, per branch kind, the mean over layers at
    every step transition and its min/mean/max.
    """
    outputs = {"attn1": [], "ff": []}
    hooks = []
    for block in model.transformer_blocks:
        for kind in outputs:
            per_layer = []
            outputs[kind].append(per_layer)
            hooks.append(getattr(block, kind).register_forward_hook(lambda m, i, o, s=per_layer: s.append(o)))
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    try:
        generate(model, labels, num_steps, guidance_scale, generator=torch.Generator().manual_seed(seed))
    finally:
        for hook in hooks:
            hook.remove()
    summary = {}
    for kind, layers in outputs.items():
        errs = torch.tensor(  # [layers, num_steps - 1]
            [[((b - a).abs().sum() / b.abs().sum()).item() for a, b in itertools.pairwise(s)] for s in layers]
        )
        per_step = errs.mean(0)
        summary[kind] = {
            "min": round(errs.min().item(), 4),
            "mean": round(errs.mean().item(), 4),
            "max": round(errs.max().item(), 4),
            "mean_over_layers_per_step": [round(v, 4) for v in per_step.tolist()],
        }
    return summary


def _fp16_roundtrip(model):
    """A copy with weights rounded through fp16, as shipped, to check storage costs no quality."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for p in copy_.parameters():
            p.copy_(p.half().float())
    return copy_


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=None, help="wall-time cap for DiT training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--shift", action="store_true", help="±1 pixel shift augmentation for the DiT")
    parser.add_argument("--threads", type=int, default=1, help="more is faster but not bit-reproducible")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from safetensors.torch import save_file

    args.out.mkdir(parents=True, exist_ok=True)
    images, labels = load_digits_tensors()

    start = time.perf_counter()
    classifier, clf_acc = train_classifier(images, labels, args.seed)
    print(f"classifier: held-out accuracy {clf_acc:.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
    save_file(
        {k: v.contiguous() for k, v in classifier.state_dict().items()}, str(args.out / CLASSIFIER_WEIGHTS)
    )

    raw, ema, record = train_dit(images, labels, args, log=lambda s: print(s, flush=True))
    shipped = _fp16_roundtrip(ema)
    accuracy = {}
    for name, model in (("raw_fp32", raw), ("ema_fp32", ema), ("ema_fp16", shipped)):
        for scale in EVAL_GUIDANCE_SCALES:
            accuracy[f"{name}_cfg{scale}"] = round(sample_accuracy(model, classifier, scale), 4)
            print(
                f"sample accuracy {name} guidance {scale}: {accuracy[f'{name}_cfg{scale}']:.3f}", flush=True
            )
    save_file({k: v.half().contiguous() for k, v in ema.state_dict().items()}, str(args.out / DIT_WEIGHTS))

    info = {
        "dit_config": DEMO_CONFIG,
        "scheduler_config": DEMO_SCHEDULER_CONFIG,
        "train": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
        | record
        | {"label_drop_prob": LABEL_DROP_PROB, "shipped": "ema weights, fp16"},
        "classifier": {
            "held_out_accuracy": round(clf_acc, 4),
            "held_out": "every 5th of sklearn's 1797 digits",
        },
        "sample_accuracy": {"num_steps": 50, "per_class": 20, "seed": 0, **accuracy},
        "adjacent_step_rel_l1": {
            f"cfg{scale}": adjacent_step_errors(shipped, scale) for scale in (1.0, DEFAULT_GUIDANCE_SCALE)
        },
        "torch": torch.__version__,
    }
    (args.out / DIT_INFO).write_text(json.dumps(info, indent=1) + "\n")
    for key, val in info["adjacent_step_rel_l1"].items():
        print(key, {k: {s: v[s] for s in ("min", "mean", "max")} for k, v in val.items()}, flush=True)
    print(f"wrote {args.out} in {time.perf_counter() - start:.0f}s", flush=True)
    return info


if __name__ == "__main__":
    main()
