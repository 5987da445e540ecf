#!/usr/bin/env python
"""A real PyTorch training loop on the CPU: fastadam.torch.Adam vs torch.optim.Adam.

Trains a transformer-sized MLP (a stack of pre-LayerNorm feed-forward blocks,
d_model -> 4*d_model -> d_model with a residual, as in a transformer layer without the
attention) on random data, once per optimizer, and reports the time of the optimizer step
and of the whole training step (zero_grad + forward + backward + step), per step:

    fastadam         fastadam.torch.Adam (one fused C pass over all parameters, OpenMP)
    torch for-loop   torch.optim.Adam(foreach=False)
    torch foreach    torch.optim.Adam(foreach=True)
    torch fused      torch.optim.Adam(fused=True)

Each optimizer has its own copy of the model (same initial weights, same data). They run
interleaved: in each round every optimizer trains --steps-per-round steps, in an order that
rotates from round to round, so that all of them see the same state of the machine. Every
step is timed; the table gives medians and the interquartile range (IQR) over all rounds,
after --warmup untimed steps each (the first step also allocates the optimizer state).

    python bench/bench_torch_training.py                      # ~20 s on 2 quiet cores
    python bench/bench_torch_training.py --d-model 512 --layers 2 --rounds 5   # quicker
    python bench/bench_torch_training.py --dtype float64 --json out.json

The optimizer step of Adam is memory bound: per float32 parameter it reads param, grad,
exp_avg and exp_avg_sq and writes param, exp_avg and exp_avg_sq (28 bytes); the table gives
the resulting effective bandwidth (GB/s) of each optimizer step.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import fastadam
import fastadam.torch

VARIANTS = {
    "fastadam": lambda ps, kw: fastadam.torch.Adam(ps, **kw),
    "torch for-loop": lambda ps, kw: torch.optim.Adam(ps, foreach=False, **kw),
    "torch foreach": lambda ps, kw: torch.optim.Adam(ps, foreach=True, **kw),
    "torch fused": lambda ps, kw: torch.optim.Adam(ps, fused=True, **kw),
}


class Block(torch.nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, hidden)
        self.down = torch.nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def make_model(d, hidden, layers, dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        *[Block(d, hidden) for _ in range(layers)], torch.nn.LayerNorm(d)
    ).to(dtype)


def quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=None, help="default: 4 * d_model")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32, help="tokens per step")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--steps-per-round", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads and fastadam's num_threads (default: "
        "torch's and OpenMP's defaults)",
    )
    ap.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated subset of: " + ", ".join(VARIANTS),
    )
    ap.add_argument("--json", default=None, help="write the raw timings here")
    args = ap.parse_args(argv)

    hidden = args.hidden or 4 * args.d_model
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    for n in names:
        if n not in VARIANTS:
            ap.error(f"unknown variant {n!r}")

    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, args.d_model, generator=g).to(dtype)
    y = torch.randn(args.batch, args.d_model, generator=g).to(dtype)
    runs = {}
    for n in names:
        model = make_model(args.d_model, hidden, args.layers, dtype)
        kw = dict(lr=1e-4, weight_decay=0.0)
        if n == "fastadam":
            kw["num_threads"] = args.threads
        runs[n] = dict(
            model=model,
            opt=VARIANTS[n](list(model.parameters()), kw),
            opt_ms=[],
            train_ms=[],
            losses=[],
        )
    params = list(runs[names[0]]["model"].parameters())
    numel = sum(p.numel() for p in params)
    itemsize = torch.empty((), dtype=dtype).element_size()

    cfg = fastadam.config()
    print(
        f"model: {args.layers} blocks of LayerNorm + Linear({args.d_model}, {hidden}) + GELU + "
        f"Linear({hidden}, {args.d_model}), {len(params)} tensors, {numel / 1e6:.1f}M "
        f"{args.dtype} parameters; batch {args.batch} x {args.d_model}"
    )
    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); fastadam "
        f"{cfg['version']} (SIMD {cfg['simd']}, OpenMP "
        f"{'on' if cfg['openmp'] else 'off'}, max_threads {cfg['max_threads']}); "
        f"{platform.machine()}, Python {platform.python_version()}"
    )
    sys.stdout.flush()

    def train_step(run, record):
        model, opt = run["model"], run["opt"]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        t2 = time.perf_counter()
        if record:
            run["opt_ms"].append((t2 - t1) * 1e3)
            run["train_ms"].append((t2 - t0) * 1e3)
            run["losses"].append(loss.item())

    for n in names:
        for _ in range(args.warmup):
            train_step(runs[n], False)
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            for _ in range(args.steps_per_round):
                train_step(runs[n], True)
    elapsed = time.perf_counter() - t_start

    base = {n: statistics.median(runs[n]["opt_ms"]) for n in names}
    base_train = {n: statistics.median(runs[n]["train_ms"]) for n in names}
    nbytes = 7 * numel * itemsize
    print(
        f"\n{args.rounds} rounds x {args.steps_per_round} steps per optimizer, interleaved "
        f"({elapsed:.0f} s); medians, IQR in brackets\n"
    )
    print(
        "| optimizer | optimizer step (ms) | GB/s | training step (ms) | step share "
        "| fastadam speedup: step | training step |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in names:
        o_lo, o_med, o_hi = quartiles(runs[n]["opt_ms"])
        t_lo, t_med, t_hi = quartiles(runs[n]["train_ms"])
        sp = sp_t = "-"
        if "fastadam" in base and n != "fastadam":
            sp = f"{o_med / base['fastadam']:.2f}x"
            sp_t = f"{t_med / base_train['fastadam']:.2f}x"
        print(
            f"| {n} | {o_med:.1f} [{o_lo:.1f}-{o_hi:.1f}] | {nbytes / o_med / 1e6:.1f} "
            f"| {t_med:.1f} [{t_lo:.1f}-{t_hi:.1f}] | {o_med / t_med:.0%} | {sp} | {sp_t} |"
        )

    # The optimizers trained identical copies: their parameters should still agree closely
    # (fastadam matches torch.optim.Adam(foreach=False) to about an ulp per step).
    if "torch for-loop" in runs and "fastadam" in runs:
        a = list(runs["fastadam"]["model"].parameters())
        b = list(runs["torch for-loop"]["model"].parameters())
        steps = args.warmup + args.rounds * args.steps_per_round
        d = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a, b))
        print(
            f"\nafter {steps} steps, max |fastadam - torch for-loop| over all parameters: "
            f"{d:.3g}; losses {runs['fastadam']['losses'][-1]:.6g} vs "
            f"{runs['torch for-loop']['losses'][-1]:.6g}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "numel": numel,
                    "torch": torch.__version__,
                    "fastadam": cfg,
                    "results": {
                        n: {k: runs[n][k] for k in ("opt_ms", "train_ms", "losses")} for n in names
                    },
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
