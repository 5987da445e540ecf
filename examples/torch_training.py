#!/usr/bin/env python
"""Train a small convolutional classifier with PyTorch on the CPU, with fastadam's Adam.

Switching from torch.optim.Adam is ONE line (the import below); everything else is the
ordinary PyTorch loop: param groups, an lr scheduler, zero_grad/backward/step,
state_dict checkpoints (interchangeable with torch.optim.Adam's).

    python examples/torch_training.py
    python examples/torch_training.py --optimizer torch    # the same as editing the line

fastadam extras used here: max_grad_norm (fused global-norm clipping, no pass rewriting the
gradients) -- torch's equivalent is torch.nn.utils.clip_grad_norm_ before the step.
"""

import argparse
import time

import torch
import torch.nn as nn

from fastadam.torch import AdamW  # <- the one line; torch's: from torch.optim import AdamW


def make_data(n, rng):
    """32x32 RGB 'images' of 4 classes: a class-specific pattern plus noise."""
    patterns = torch.randn(4, 3, 32, 32, generator=rng)
    labels = torch.randint(0, 4, (n,), generator=rng)
    x = patterns[labels] * 0.08 + torch.randn(n, 3, 32, 32, generator=rng)
    return x, labels


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 8 * 8, 256),
        nn.ReLU(),
        nn.Linear(256, 4),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--optimizer", choices=["fastadam", "torch"], default=None, help="override the import line"
    )
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--samples", type=int, default=2048)
    args = ap.parse_args(argv)
    Optimizer = {"fastadam": AdamW, "torch": torch.optim.AdamW, None: AdamW}[args.optimizer]

    rng = torch.Generator().manual_seed(0)
    x, y = make_data(args.samples, rng)
    model = make_model()
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": decay, "weight_decay": 1e-2}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"max_grad_norm": 1.0} if Optimizer is AdamW else {}
    opt = Optimizer(groups, lr=1e-3, **extra)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=args.steps)
    loss_fn = nn.CrossEntropyLoss()

    t_opt = 0.0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = torch.randint(0, len(x), (64,), generator=rng)
        opt.zero_grad()
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        if Optimizer is not AdamW:  # torch.optim: clip in a separate pass
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        ts = time.perf_counter()
        opt.step()
        t_opt += time.perf_counter() - ts
        sched.step()
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}")
    total = time.perf_counter() - t0
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    ckpt = {"model": model.state_dict(), "optimizer": opt.state_dict()}  # torch's layout
    print(
        f"{Optimizer.__module__}.{Optimizer.__name__}: accuracy {acc:.3f}; "
        f"{total / args.steps * 1e3:.1f} ms per training step, "
        f"{t_opt / args.steps * 1e3:.2f} ms of it in the optimizer; "
        f"checkpoint state for {len(ckpt['optimizer']['state'])} tensors"
    )
    return acc


if __name__ == "__main__":
    main()
