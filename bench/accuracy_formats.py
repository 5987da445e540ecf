#!/usr/bin/env python
"""Accuracy of fastadam's storage formats on real training (issue 10, "show it on real
training"): does AdamW with 16-bit parameters, fp32 master weights, 8-bit or bfloat16
moments and stochastic rounding train as well as float32 AdamW?

Two workloads, each trained with every format below: float32 three times (seeds 0, 1, 2:
the run-to-run noise that the other formats are judged against), every other format once
(seed 0) or, with ``--format-seeds 3``, with the same three seeds (then every value is a
mean over the seeds, and each run is also compared with the float32 run of its seed):

* ``mlp``: the MLP of ``python -m fastadam compare`` (``fastadam.compare.MLP``,
  64-1000-1000-10, ReLU, He-initialised) on scikit-learn's handwritten digits
  (``fastadam.compare.load_digits_split``: trained on the 1151 images of its search-train
  split, validation loss on its 287 validation images, accuracy on the 359 test images),
  with fastadam's NumPy API (``fastadam.AdamW``), minibatches of 128, constant lr.
  Bfloat16 parameters are ``ml_dtypes.bfloat16`` arrays and are what the optimizer updates;
  the forward and backward passes run in float32 on their exact float32 image (copied into
  the model's float32 arrays before each step), and the float32 gradients are passed as
  they are (the NumPy API accepts float32 gradients for 16-bit parameters). So the MLP
  measures the optimizer's storage alone.
* ``lm``: a small byte-level transformer language model (pre-LayerNorm GPT blocks, causal
  self-attention, learned positions, untied output layer; torch on the CPU) on
  the Python standard library's own source files (``sysconfig.get_paths()["stdlib"]``:
  every ``*.py`` in sorted path order, without ``site-packages`` and the test suites; every
  10th file is the validation set), with ``fastadam.torch.AdamW``, lr warmed up linearly and
  decayed by a cosine. Bfloat16 runs convert the model with ``model.to(torch.bfloat16)``:
  forward, backward and gradients are bfloat16 (the loss is taken in float32 from the
  logits), so the bfloat16 parameters are what is trained.

Formats (``FORMATS``; the options of docs/formats.md):

    fp32              float32 params and moments (seeds 0, 1, 2)
    bf16_master       bfloat16 params, master_weights=True (fp32 master and moments)
    fp32_8bit         float32 params, state_dtype="8bit"
    bf16_master_8bit  bfloat16 params, master_weights=True, state_dtype="8bit"
    bf16_nearest      bfloat16 params and moments, no master, rounding="nearest"
    bf16_stochastic   the same with rounding="stochastic" (the optimizer's seed=0)

A seed fixes the initial weights (a bfloat16 model starts from their rounded image) and
the minibatches, so a format's run of seed s differs from float32's run of seed s by the
format alone (and by the last bits of matrix products where the thread count differs).

The learning rates (MLP: a constant 1e-4; LM: 1e-3, decayed by the cosine to 1e-4) are
chosen so that many updates are smaller than half a bfloat16 ulp of the weight they change
(bfloat16 keeps 8 significant bits: half an ulp is 2**-9 to 2**-8 of the value, 0.002 to
0.004 around a LayerNorm weight of 1.0, about 6e-5 for a weight of 0.02): the regime where
bfloat16 parameters and moments without master weights lose those updates under nearest
rounding and stochastic rounding keeps them on average. The same holds for the second moment
(``exp_avg_sq``) in bfloat16 under nearest rounding: with beta2 = 0.999 it can never
decrease (a step lowers it by at most 0.001 of its value, under half an ulp) and it grows
only when the squared gradient exceeds about 3 to 5 times its value.

Losses are measured on the final weights, in float32 (a bfloat16 model is widened exactly
to float32 for the evaluation), so the numbers compare the trained parameters and not the
precision of the evaluation: the MLP's training loss over its whole training split, the
LM's over a fixed sample of training windows; validation losses likewise.

Output: a table per workload (final training and validation loss, test accuracy for the
MLP, each against float32's seed mean; the verdict compares the validation loss's
difference with the sample standard deviation of the three float32 seeds: within 2 of them
is "within noise", beyond is "better" or "worse") and, with ``--out PATH``, JSON (schema
``fastadam-accuracy/1``)::

    schema, created, elapsed_s, machine {platform, cpu_model, usable_cpus, loadavg_start,
    loadavg_end}, versions {python, numpy, torch, ml_dtypes, sklearn, fastadam, fastadam_simd},
    settings {argv, quick, only, steps, formats, seeds {fp32: [...], formats: [...]},
              threads ("auto" or the count asked for)},
    formats: {key: {label, param_dtype, options, state_bytes_per_param,
                    traffic_bytes_per_element}},
    workloads: {mlp|lm: {
        model, n_params, data {...}, steps, batch, lr, schedule, weight_decay,
        runs: [{format, seed, final_train_loss, val_loss, test_accuracy (mlp), diverged,
                seconds, threads, curve: [{step, train_loss, val_loss}, ...]}, ...],
        baseline: {metric: {mean, std, min, max, values}},    (float32, over the seeds)
        summary: {format: {seeds, diverged, train_loss, val_loss, test_accuracy (mlp):
                           means over the format's runs; train_loss_std, val_loss_std, ...;
                           delta_train, delta_val (against the fp32 mean),
                           paired_delta_val {mean, std, min, max, values} (run minus the
                           fp32 run of the same seed), within_noise (|delta_val| <= 2 std
                           of the fp32 seeds; null for fp32), verdict ("within noise",
                           "better", "worse", "diverged"; null for fp32)}},
        stochastic_vs_nearest: {delta_train, delta_val, fp32_val_std}}}

    python bench/accuracy_formats.py --out accuracy.json       # both workloads (minutes)
    python bench/accuracy_formats.py --format-seeds 3 --out a.json   # 3x as long, firmer
    python bench/accuracy_formats.py --only mlp --steps 500    # one workload, shorter
    python bench/accuracy_formats.py --quick --out /tmp/a.json # a smoke run (seconds)

Needs torch, scikit-learn and ml_dtypes (``--only mlp`` needs no torch).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import sysconfig
import time

import numpy as np

import fastadam
from fastadam import compare

SCHEMA = "fastadam-accuracy/1"

# key -> label, parameter dtype, optimizer options (docs/formats.md), resident optimizer
# bytes per parameter (param + master + moments; 8-bit: + 2 absmax per 256), bytes moved
# per element and AdamW step (read p/master, g, m, v; write p/master (+ 16-bit p), m, v).
FORMATS = {
    "fp32": ("float32 AdamW", "float32", {}, 12, 28),
    "bf16_master": ("bf16 + fp32 master", "bfloat16", {"master_weights": True}, 14, 28),
    "fp32_8bit": ("fp32 + 8-bit moments", "float32", {"state_dtype": "8bit"}, 4 + 2 + 8 / 256, 16),
    "bf16_master_8bit": (
        "bf16 + master + 8-bit",
        "bfloat16",
        {"master_weights": True, "state_dtype": "8bit"},
        2 + 4 + 2 + 8 / 256,
        16,
    ),
    "bf16_nearest": ("bf16, no master, nearest", "bfloat16", {"rounding": "nearest"}, 6, 14),
    "bf16_stochastic": (
        "bf16, no master, stochastic",
        "bfloat16",
        {"rounding": "stochastic", "seed": 0},
        6,
        14,
    ),
}
MAX_THREADS = 2
BASELINE = "fp32"
SEEDS = (0, 1, 2)
NOISE_SIGMAS = 2.0

# The workloads' settings; QUICK replaces some of them for --quick.
MLP = dict(hidden=1000, batch=128, steps=2000, lr=1e-4, weight_decay=1e-2, evals=10)
LM = dict(
    d_model=128,
    layers=2,
    heads=4,
    context=64,
    batch=16,
    steps=1000,
    lr=1e-3,
    warmup=0.05,
    final_lr=0.1,
    weight_decay=1e-1,
    eval_windows=256,
    evals=5,
    corpus_bytes=None,
    val_every=10,
)
QUICK = {
    "mlp": dict(hidden=128, steps=12, evals=2),
    "lm": dict(
        d_model=64,
        layers=1,
        context=32,
        batch=4,
        steps=6,
        eval_windows=16,
        evals=2,
        corpus_bytes=400_000,
    ),
}


class AccuracyError(Exception):
    """A problem reported as one line and exit status 2."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def _optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def _require(names):
    missing = [n for n in names if _optional(n) is None]
    if missing:
        pip = {"sklearn": "scikit-learn"}
        raise AccuracyError(
            "needs "
            + ", ".join(pip.get(n, n) for n in missing)
            + ": pip install "
            + " ".join(pip.get(n, n) for n in missing)
        )


def _float(v):
    v = float(v)
    return v if math.isfinite(v) else None


class Threads:
    """The thread count of each run: NumPy's BLAS (MLP), torch's intra-op pool (LM) and
    fastadam's OpenMP team alike. A fixed count, or "auto": MAX_THREADS (2; at most the
    usable CPUs), lowered before each run to the CPUs that other processes left idle since
    the last decision (the rule of ``python -m fastadam compare --blas-threads auto``).
    On a shared machine this matters: torch's and OpenBLAS's threads wait for each other at
    every operation, so with 2 threads on 2 CPUs and another busy process an LM step took
    256 ms against 42 ms with 1 thread. The count changes the last bits of a matrix product,
    not what a format does to training."""

    def __init__(self, n):
        self.n = n
        self.cpus = compare._machine()["usable_cpus"] or 1
        self.mark = compare._cpu_snapshot()

    def decide(self):
        if self.n != "auto":
            return self.n
        now = compare._cpu_snapshot()
        if self.mark and now and now[0] - self.mark[0] >= 1.0:
            others = compare._others_busy(self.mark, now)
        else:
            others = compare._busy_cpus()
        self.mark = compare._cpu_snapshot()
        k = min(MAX_THREADS, self.cpus)
        if others is not None:
            k = min(k, max(1, round(self.cpus - others)))
        return k


# ------------------------------------------------------------------------------ the MLP


def _mlp_run(fmt, seed, cfg, data, threads):
    """Train the digits MLP with one format; returns the run's record."""
    import ml_dtypes

    _, pdtype, options, _, _ = FORMATS[fmt]
    model = compare.MLP(
        data["x_train"].shape[1],
        int(data["y_train"].max()) + 1,
        hidden=cfg["hidden"],
        dtype=np.float32,
        seed=seed,
    )
    if pdtype == "bfloat16":
        params = [p.astype(ml_dtypes.bfloat16) for p in model.params]
    else:
        params = model.params

    def sync():  # the model's float32 arrays <- the trained params
        if params is not model.params:
            for dst, src in zip(model.params, params):
                dst[...] = src

    sync()
    opt = fastadam.AdamW(
        params, lr=cfg["lr"], weight_decay=cfg["weight_decay"], num_threads=threads, **options
    )
    x, y = data["x_search"], data["y_search"]
    order = np.random.default_rng([seed, 2])
    noise = np.random.default_rng([seed, 3])
    bs, n = cfg["batch"], len(x)
    marks = _marks(cfg["steps"], cfg["evals"])
    curve, diverged = [], False

    def evaluate(step):
        sync()
        tr = model.objective(x, y)
        va, _ = model.evaluate(data["x_val"], data["y_val"])
        curve.append({"step": step, "train_loss": _float(tr), "val_loss": _float(va)})
        return math.isfinite(tr) and math.isfinite(va)

    t0 = time.perf_counter()
    evaluate(0)
    perm, pos = order.permutation(n), 0
    with np.errstate(all="ignore"):
        for step in range(1, cfg["steps"] + 1):
            if pos >= n:
                perm, pos = order.permutation(n), 0
            idx = perm[pos : pos + bs]
            pos += bs
            sync()
            _, grads = model.loss_and_grads(x[idx], y[idx], noise)
            opt.step(grads)
            if step in marks and not evaluate(step):
                diverged = True
                break
    sync()
    with np.errstate(all="ignore"):
        test_loss, test_acc = model.evaluate(data["x_test"], data["y_test"])
    last = curve[-1]
    return {
        "format": fmt,
        "seed": seed,
        "final_train_loss": last["train_loss"],
        "val_loss": last["val_loss"],
        "test_loss": _float(test_loss),
        "test_accuracy": float(test_acc),
        "diverged": diverged,
        "seconds": round(time.perf_counter() - t0, 2),
        "curve": curve,
    }


def run_mlp(cfg, formats, seeds, threads):
    data = compare.load_digits_split(0, np.float32)
    model = compare.MLP(data["x_train"].shape[1], 10, hidden=cfg["hidden"])
    rec = {
        "model": model.description + " (fastadam.compare.MLP)",
        "n_params": int(sum(p.size for p in model.params)),
        "data": {
            "name": "scikit-learn digits (fastadam.compare.load_digits_split, seed 0)",
            "n_train": len(data["y_search"]),
            "n_val": len(data["y_val"]),
            "n_test": len(data["y_test"]),
        },
        "api": "fastadam.AdamW (NumPy); bfloat16 params are ml_dtypes.bfloat16 arrays, "
        "forward/backward in float32 from their exact image, float32 gradients",
        "steps": cfg["steps"],
        "batch": cfg["batch"],
        "lr": cfg["lr"],
        "schedule": "constant",
        "weight_decay": cfg["weight_decay"],
        "runs": [],
    }
    from threadpoolctl import threadpool_limits  # comes with scikit-learn

    for fmt, seed in _plan(formats, seeds):
        k = threads.decide()
        with threadpool_limits(limits=k, user_api="blas"):
            r = _mlp_run(fmt, seed, cfg, data, k)
        r["threads"] = k
        _log_run("mlp", r)
        rec["runs"].append(r)
    _summarise(rec, ["final_train_loss", "val_loss", "test_accuracy"])
    return rec


# ---------------------------------------------------------------- the language model


def stdlib_corpus(limit=None):
    """The standard library's ``*.py`` files (sorted by path, no site-packages, no test
    suites) as bytes: (train, validation, description); every 10th file is validation.
    ``limit``: stop adding files once that many bytes are read."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(
        (p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts[:-1])),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    train, val, total, used = [], [], 0, 0
    for i, p in enumerate(files):
        try:
            b = p.read_bytes()
        except OSError:
            continue
        (val if i % LM["val_every"] == LM["val_every"] - 1 else train).append(b)
        total += len(b)
        used += 1
        if limit and total >= limit:
            break
    tr, va = b"".join(train), b"".join(val)
    desc = {
        "name": "Python standard library sources",
        "root": str(root),
        "python": platform.python_version(),
        "files": used,
        "split": f"every {LM['val_every']}th file (sorted by path) is validation",
        "train_bytes": len(tr),
        "val_bytes": len(va),
        "sha256": hashlib.sha256(tr + va).hexdigest(),
    }
    return tr, va, desc


def _lm_module():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, d, heads):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = (
                self.qkv(self.ln1(x))
                .view(b, t, 3, self.heads, d // self.heads)
                .permute(2, 0, 3, 1, 4)
            )
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
            return x + self.down(F.gelu(self.up(self.ln2(x))))

    class ByteLM(nn.Module):
        """Byte-level GPT: embeddings (256 bytes, learned positions), pre-LN blocks, final
        LayerNorm, untied output layer. Linear and embedding weights N(0, 0.02)."""

        def __init__(self, d, layers, heads, context):
            super().__init__()
            self.emb = nn.Embedding(256, d)
            self.pos = nn.Parameter(torch.zeros(context, d))
            self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, 256)
            for name, p in self.named_parameters():
                if p.dim() > 1:
                    nn.init.normal_(p, 0.0, 0.02)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, x):
            return self.head(self.ln(self.blocks(self.emb(x) + self.pos[: x.shape[1]])))

    return ByteLM


def _windows(data, starts, context):
    import torch

    idx = starts[:, None] + torch.arange(context + 1)[None, :]
    return data[idx]


def _lm_run(fmt, seed, cfg, corpus, threads):
    import torch
    from torch.nn import functional as F

    import fastadam.torch as fat

    _, pdtype, options, _, _ = FORMATS[fmt]
    train, _val, eval_sets = corpus
    torch.manual_seed(seed)
    model = _lm_module()(cfg["d_model"], cfg["layers"], cfg["heads"], cfg["context"])
    if pdtype == "bfloat16":
        model = model.to(torch.bfloat16)
    opt = fat.AdamW(
        model.parameters(),
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        num_threads=threads,
        **options,
    )
    gen = torch.Generator().manual_seed(1000 + seed)
    steps, ctx = cfg["steps"], cfg["context"]
    marks = _marks(steps, cfg["evals"])
    curve, diverged = [], False

    def lr_at(step):  # 1-based: linear warmup, cosine to final_lr * lr
        w = max(1, int(cfg["warmup"] * steps))
        if step <= w:
            return cfg["lr"] * step / w
        c = 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, steps - w)))
        return cfg["lr"] * (cfg["final_lr"] + (1 - cfg["final_lr"]) * c)

    @torch.no_grad()
    def evaluate(step):
        m = model if pdtype == "float32" else copy.deepcopy(model).float()
        m.eval()
        out = {"step": step}
        for name, w in eval_sets.items():
            tot = 0.0
            for i in range(0, len(w), cfg["batch"] * 4):
                b = w[i : i + cfg["batch"] * 4]
                logits = m(b[:, :-1]).float()
                tot += F.cross_entropy(
                    logits.reshape(-1, 256), b[:, 1:].reshape(-1), reduction="sum"
                ).item()
            out[name] = _float(tot / (len(w) * ctx))
        model.train()
        curve.append(out)
        return all(v is not None for v in out.values())

    t0 = time.perf_counter()
    evaluate(0)
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train) - ctx - 1, (cfg["batch"],), generator=gen)
        b = _windows(train, starts, ctx)
        logits = model(b[:, :-1]).float()
        loss = F.cross_entropy(logits.reshape(-1, 256), b[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.step()
        if step in marks and not evaluate(step):
            diverged = True
            break
    last = curve[-1]
    return {
        "format": fmt,
        "seed": seed,
        "final_train_loss": last["train_loss"],
        "val_loss": last["val_loss"],
        "diverged": diverged,
        "seconds": round(time.perf_counter() - t0, 2),
        "curve": curve,
    }


def run_lm(cfg, formats, seeds, threads):
    import torch

    tr, va, desc = stdlib_corpus(cfg["corpus_bytes"])
    train = torch.frombuffer(bytearray(tr), dtype=torch.uint8).long()
    val = torch.frombuffer(bytearray(va), dtype=torch.uint8).long()
    ctx = cfg["context"]
    g = torch.Generator().manual_seed(12345)  # the same evaluation windows for every run
    eval_sets = {
        "train_loss": _windows(
            train, torch.randint(0, len(train) - ctx - 1, (cfg["eval_windows"],), generator=g), ctx
        ),
        "val_loss": _windows(
            val, torch.randint(0, len(val) - ctx - 1, (cfg["eval_windows"],), generator=g), ctx
        ),
    }
    model = _lm_module()(cfg["d_model"], cfg["layers"], cfg["heads"], ctx)
    rec = {
        "model": f"byte-level transformer LM: d_model {cfg['d_model']}, {cfg['layers']} "
        f"layers, {cfg['heads']} heads, context {ctx}, MLP 4x, pre-LN, untied head",
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "data": dict(desc, eval_windows=cfg["eval_windows"], tokens_per_step=cfg["batch"] * ctx),
        "api": "fastadam.torch.AdamW; bfloat16 runs: model.to(torch.bfloat16), bfloat16 "
        "forward/backward/gradients, loss in float32",
        "steps": cfg["steps"],
        "batch": cfg["batch"],
        "lr": cfg["lr"],
        "schedule": f"linear warmup {cfg['warmup']:g} of the steps, cosine to "
        f"{cfg['final_lr']:g} x lr",
        "weight_decay": cfg["weight_decay"],
        "runs": [],
    }
    for fmt, seed in _plan(formats, seeds):
        k = threads.decide()
        torch.set_num_threads(k)
        r = _lm_run(fmt, seed, cfg, (train, val, eval_sets), k)
        r["threads"] = k
        _log_run("lm", r)
        rec["runs"].append(r)
    _summarise(rec, ["final_train_loss", "val_loss"])
    return rec


# ------------------------------------------------------------------------------ shared


def _marks(steps, evals):
    return {max(1, round(steps * k / evals)) for k in range(1, evals + 1)} | {steps}


def _plan(formats, seeds):
    """(format, seed) of every run: float32 with seeds["fp32"], the others with
    seeds["formats"]."""
    out = []
    for f in formats:
        out += [(f, s) for s in seeds["fp32" if f == BASELINE else "formats"]]
    return out


def _log_run(name, r):
    acc = f", test accuracy {100 * r['test_accuracy']:.2f}%" if "test_accuracy" in r else ""
    log(
        f"{name} {r['format']:<17} seed {r['seed']}: train {_fmt(r['final_train_loss'])}, "
        f"val {_fmt(r['val_loss'])}{acc}  ({r['seconds']:.1f} s, threads {r['threads']})"
    )


def _fmt(v, digits=4):
    return "diverged" if v is None else f"{v:.{digits}f}"


def _stats(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        "min": min(vals),
        "max": max(vals),
        "values": list(values),
    }


def _summarise(rec, metrics):
    """Per format: the mean of each metric over its runs, its difference from the float32
    mean (delta_*), the spread of its own runs (*_std), the paired differences from the
    float32 run of the same seed (paired_delta_val), and the verdict within_noise:
    |delta_val| <= NOISE_SIGMAS x the standard deviation of the float32 seeds."""
    base = [r for r in rec["runs"] if r["format"] == BASELINE]
    rec["baseline"] = {m: _stats([r[m] for r in base]) for m in metrics} if base else None
    by_seed = {r["seed"]: r for r in base}
    summ = {}
    for r in rec["runs"]:
        if r["format"] in summ:
            continue
        runs = [q for q in rec["runs"] if q["format"] == r["format"]]
        s = {"seeds": [q["seed"] for q in runs], "diverged": any(q["diverged"] for q in runs)}
        for m in metrics:
            key = "train_loss" if m == "final_train_loss" else m
            st = _stats([q[m] for q in runs])
            s[key] = st["mean"] if st else None
            s[key + "_std"] = st["std"] if st else None
            if rec["baseline"] and rec["baseline"][m] and s[key] is not None:
                s["delta_" + key.replace("_loss", "")] = s[key] - rec["baseline"][m]["mean"]
        pairs = [
            q["val_loss"] - by_seed[q["seed"]]["val_loss"]
            for q in runs
            if q["seed"] in by_seed
            and q["val_loss"] is not None
            and by_seed[q["seed"]]["val_loss"] is not None
        ]
        if r["format"] != BASELINE and pairs:
            s["paired_delta_val"] = _stats(pairs)
        b = rec["baseline"]["val_loss"] if rec["baseline"] else None
        if r["format"] == BASELINE or b is None:
            s["within_noise"] = s["verdict"] = None
        elif s["val_loss"] is None or s["diverged"]:
            s["within_noise"], s["verdict"] = False, "diverged"
        else:
            s["within_noise"] = abs(s["delta_val"]) <= NOISE_SIGMAS * b["std"]
            s["verdict"] = (
                "within noise" if s["within_noise"] else "better" if s["delta_val"] < 0 else "worse"
            )
        summ[r["format"]] = s
    rec["summary"] = summ
    near, stoch = summ.get("bf16_nearest"), summ.get("bf16_stochastic")
    if near and stoch and near["val_loss"] is not None and stoch["val_loss"] is not None:
        rec["stochastic_vs_nearest"] = {
            "delta_train": stoch["train_loss"] - near["train_loss"],
            "delta_val": stoch["val_loss"] - near["val_loss"],
            "fp32_val_std": b["std"] if b else None,
        }


def format_table(name, rec):
    title = {
        "mlp": "MLP on digits (NumPy API)",
        "lm": "byte-level transformer LM on the Python stdlib (torch)",
    }[name]
    has_acc = name == "mlp"
    lines = [
        (
            f"== {title}: {rec['model']}, {rec['n_params']:,} params, {rec['steps']} steps "
            f"of {rec['batch']}, lr {rec['lr']:g} ({rec['schedule']}), weight_decay "
            f"{rec['weight_decay']:g}"
        )
    ]
    base = rec["baseline"]
    head = (
        f"{'format':<28} {'seeds':>5} {'B/param':>7}  {'train loss':>10} {'vs fp32':>8}  "
        f"{'val loss':>8} {'± std':>7} {'vs fp32':>8}"
        + ("  test acc" if has_acc else "")
        + "  vs noise (in fp32 std)"
    )
    lines += [head, "-" * len(head)]
    sd = base["val_loss"]["std"] if base and base["val_loss"] else 0.0
    for key, s in rec["summary"].items():
        label, _, _, nbytes, _ = FORMATS[key]
        tr = f"{s['delta_train']:+.4f}" if "delta_train" in s and key != BASELINE else ""
        vr = f"{s['delta_val']:+.4f}" if "delta_val" in s and key != BASELINE else ""
        vs = f"{s['val_loss_std']:.4f}" if len(s["seeds"]) > 1 else ""
        noise = s["verdict"] or ""
        if sd > 0 and vr:
            noise += f" ({s['delta_val'] / sd:+.1f})"
        acc = f"  {100 * s['test_accuracy']:7.2f}%" if has_acc else ""
        lines.append(
            f"{label:<28} {len(s['seeds']):>5} {nbytes:>7.2f}  "
            f"{_fmt(s['train_loss']):>10} {tr:>8}  {_fmt(s['val_loss']):>8} {vs:>7} "
            f"{vr:>8}{acc}  {noise}"
        )
    if base:
        vals = ", ".join(_fmt(v) for v in base["val_loss"]["values"])
        lines.append(
            f"float32 seeds' val losses: {vals}. Every value is the mean over the "
            "format's seeds; within noise: |val loss - float32 mean| <= "
            f"{NOISE_SIGMAS:g} std of the float32 seeds (better/worse beyond)."
        )
    sn = rec.get("stochastic_vs_nearest")
    if sn:
        rel = f" ({sn['delta_val'] / sd:+.1f} fp32 std)" if sd > 0 else ""
        lines.append(
            f"bf16 without master, stochastic minus nearest rounding: train loss "
            f"{sn['delta_train']:+.4f}, val loss {sn['delta_val']:+.4f}{rel}."
        )
    return "\n".join(lines)


def _versions():
    import ml_dtypes

    v = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "fastadam": fastadam.__version__,
        "fastadam_simd": fastadam.config()["simd"],
    }
    for mod in ("torch", "sklearn"):
        m = _optional(mod)
        v[mod] = getattr(m, "__version__", None) if m else None
    return v


def build_parser():
    p = argparse.ArgumentParser(
        prog="python bench/accuracy_formats.py",
        description="Train an MLP on digits (NumPy API) and a byte-level transformer LM on "
        "the Python stdlib (torch) with every storage format of fastadam's "
        "AdamW, and compare the final losses with float32 AdamW's run-to-run "
        "noise (3 seeds).",
        epilog="The module docstring documents the setting and the JSON layout.",
    )
    p.add_argument(
        "--quick", action="store_true", help="a smoke run of seconds (tiny models, a few steps)"
    )
    p.add_argument("--only", choices=["mlp", "lm"], help="one workload (default: both)")
    p.add_argument(
        "--steps", type=int, help=f"training steps (default: mlp {MLP['steps']}, lm {LM['steps']})"
    )
    p.add_argument(
        "--lr", type=float, help=f"peak lr (default: mlp {MLP['lr']:g}, lm {LM['lr']:g})"
    )
    p.add_argument(
        "--formats", default="all", help="comma separated keys of FORMATS, or all (default)"
    )
    p.add_argument(
        "--seeds",
        type=int,
        default=len(SEEDS),
        help=f"float32 runs, seeds 0, 1, ... (default {len(SEEDS)})",
    )
    p.add_argument(
        "--format-seeds",
        type=int,
        default=1,
        help="runs of every other format, seeds 0, 1, ... (default 1)",
    )
    p.add_argument(
        "--threads",
        default="auto",
        help=f"threads of each run (BLAS or torch, and fastadam): N, or auto "
        f"(default): {MAX_THREADS}, lowered before each run to the CPUs other "
        "processes leave idle",
    )
    p.add_argument("--out", metavar="PATH", help="write the results as JSON")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    fmts = (
        list(FORMATS)
        if args.formats == "all"
        else [f.strip() for f in args.formats.split(",") if f.strip()]
    )
    bad = [f for f in fmts if f not in FORMATS]
    err = (
        f"unknown format(s) {bad} (choose from {', '.join(FORMATS)})"
        if bad
        else "no format"
        if not fmts
        else "--steps must be >= 1"
        if args.steps is not None and args.steps < 1
        else "--seeds and --format-seeds must be >= 1"
        if min(args.seeds, args.format_seeds) < 1
        else None
    )
    if err is None and args.threads != "auto":
        try:
            args.threads = int(args.threads)
            if args.threads < 1:
                raise ValueError
        except ValueError:
            err = f"--threads must be auto or an integer >= 1, got {args.threads!r}"
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seeds = {"fp32": list(range(args.seeds)), "formats": list(range(args.format_seeds))}
    workloads = [args.only] if args.only else ["mlp", "lm"]
    try:
        _require(["ml_dtypes", "sklearn"] + (["torch"] if "lm" in workloads else []))
    except AccuracyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    out = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": None,
        "machine": compare._machine(),
        "versions": _versions(),
        "settings": {
            "argv": argv,
            "quick": args.quick,
            "only": args.only,
            "steps": args.steps,
            "formats": fmts,
            "seeds": seeds,
            "threads": args.threads,
        },
        "formats": {
            k: {
                "label": v[0],
                "param_dtype": v[1],
                "options": v[2],
                "state_bytes_per_param": v[3],
                "traffic_bytes_per_element": v[4],
            }
            for k, v in FORMATS.items()
            if k in fmts
        },
        "workloads": {},
    }
    runners = {"mlp": (MLP, run_mlp), "lm": (LM, run_lm)}
    for name in workloads:
        base, fn = runners[name]
        cfg = dict(base, **(QUICK[name] if args.quick else {}))
        if args.steps:
            cfg["steps"] = args.steps
        if args.lr:
            cfg["lr"] = args.lr
        out["workloads"][name] = fn(cfg, fmts, seeds, Threads(args.threads))
        print(format_table(name, out["workloads"][name]) + "\n", flush=True)
    out["elapsed_s"] = round(time.time() - t0, 1)
    out["machine"]["loadavg_end"] = compare._loadavg()
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.out)
        log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
