#!/usr/bin/env python
"""Train a small MLP classifier in plain NumPy with fastadam.Adam.

The optimizer is chosen by ONE line (OPTIMIZER below); switch it to PlainAdam, a textbook
NumPy Adam, to compare speed and results (they agree to rounding: fastadam follows
torch.optim.Adam's arithmetic, see fastadam.reference):

    python examples/numpy_training.py
    python examples/numpy_training.py --optimizer plain     # the same as editing the line
"""

import argparse
import time

import numpy as np

import fastadam


class PlainAdam:
    """Adam in plain NumPy, one array operation at a time (for comparison)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        self.params, self.lr, self.betas, self.eps, self.wd = params, lr, betas, eps, weight_decay
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if g is None:
                continue
            g = g + self.wd * p if self.wd else g
            m += (1 - b1) * (g - m)
            v *= b2
            v += (1 - b2) * g * g
            p -= (self.lr / (1 - b1**self.t)) * m / (np.sqrt(v / (1 - b2**self.t)) + self.eps)


OPTIMIZER = fastadam.Adam  # <- the one line: fastadam.Adam, or PlainAdam to compare


def make_data(n, dim, classes, rng):
    """Points labelled by a random teacher network (learnable, not linearly separable)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    w1 = rng.standard_normal((dim, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, classes)).astype(np.float32)
    return x, np.argmax(np.tanh(x @ w1) @ w2, axis=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--optimizer",
        choices=["fastadam", "plain"],
        default=None,
        help="override the OPTIMIZER line",
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=512)
    args = ap.parse_args(argv)
    Optimizer = {"fastadam": fastadam.Adam, "plain": PlainAdam, None: OPTIMIZER}[args.optimizer]

    rng = np.random.default_rng(0)
    dim, classes = 32, 4
    x, labels = make_data(4096, dim, classes, rng)
    onehot = np.eye(classes, dtype=np.float32)[labels]

    # parameters: float32, C-contiguous, updated in place by the optimizer
    w1 = (rng.standard_normal((dim, args.hidden)) / np.sqrt(dim)).astype(np.float32)
    b1 = np.zeros(args.hidden, np.float32)
    w2 = (rng.standard_normal((args.hidden, classes)) / np.sqrt(args.hidden)).astype(np.float32)
    b2 = np.zeros(classes, np.float32)
    params = [w1, b1, w2, b2]
    opt = Optimizer(params, lr=3e-3, weight_decay=1e-4)

    t_opt = 0.0
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = rng.integers(0, len(x), 256)
        xb, yb = x[batch], onehot[batch]
        # forward: tanh MLP, softmax cross-entropy
        h = np.tanh(xb @ w1 + b1)
        logits = h @ w2 + b2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.mean(np.sum(yb * np.log(p + 1e-12), axis=1))
        # backward
        dlogits = (p - yb) / len(xb)
        dh = (dlogits @ w2.T) * (1 - h * h)
        grads = [xb.T @ dh, dh.sum(axis=0), h.T @ dlogits, dlogits.sum(axis=0)]
        ts = time.perf_counter()
        opt.step(grads)  # fastadam: one fused C call for all four
        t_opt += time.perf_counter() - ts
        if step % 100 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss:.4f}")
    total = time.perf_counter() - t0
    acc = np.mean(np.argmax(np.tanh(x @ w1 + b1) @ w2 + b2, axis=1) == labels)
    print(
        f"{Optimizer.__module__}.{Optimizer.__name__}: accuracy {acc:.3f}; "
        f"{total / args.steps * 1e3:.2f} ms per training step, "
        f"{t_opt / args.steps * 1e3:.3f} ms of it in the optimizer"
    )
    return float(acc)


if __name__ == "__main__":
    main()
