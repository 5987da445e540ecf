"""``python -m fastadam compare``: the Adam paper's Section 6 comparison, on this machine.

Kingma & Ba (ICLR 2015), Section 6, train logistic regression (6.1, with the decaying step
size alpha_t = alpha/sqrt(t)) and a multilayer perceptron (6.2, two hidden layers of 1000
ReLU units, minibatches of 128) with Adam and its peers, and plot the training cost against
the passes over the data (Figures 1 and 2). This command does the same, on a small real
data set that needs no download: scikit-learn's handwritten digits
(``sklearn.datasets.load_digits``: 1797 8x8 images, 10 classes, shipped inside the
package), with five optimizers of fastadam's NumPy API:

    Adam, AdaGrad, RMSProp, SGD with Nesterov momentum (0.9), AdaMax

The setting (what makes the comparison fair):

* Data: inputs scaled from 0..16 to [0, 1]; a stratified 80/20 train/test split with a fixed
  seed (1438 / 359 images). Learning rates are searched on a further stratified 80/20 split
  of the training part (1151 / 287); the test part is used only for the final accuracies.
* Models, pure NumPy with hand-written forward and backward passes in float32 (``--dtype
  float64`` for double): multinomial logistic regression (64 x 10 weights + 10 biases) and
  an MLP 64-1000-1000-10 with ReLU (He-initialised; optional inverted dropout on the hidden
  layers, ``--dropout``, off by default). The objective is the mean softmax cross-entropy
  plus an L2 term ``l2/2 * sum(W**2)`` over the weight matrices, whose gradient the model
  adds itself: every optimizer minimises the same function, with its own ``weight_decay``
  left at 0. ``--l2-logreg`` is 1e-4 by default (the paper's L2-regularised logistic
  regression); ``--l2-mlp`` 0: on 1438 images the L2 term of the He-initialised 1000-unit
  layers (0.2 at 1e-4, 0.02 at 1e-5) would stay most of the MLP's cost for the whole run,
  and the curves would show how fast each optimizer shrinks random weights rather than how
  it fits the data. The paper regularised its MLP (L2 in the run of its Figure 2b,
  dropout in 2a): ``--l2-mlp`` and ``--dropout`` do that.
* Training: minibatches of 128 (the last one of an epoch smaller), the same initial weights
  and the same minibatch order for every optimizer (fixed seeds). Logistic regression uses
  ``lr=fastadam.InverseSqrtDecay(alpha)`` for every optimizer, as the paper: alpha/sqrt(t)
  with t the 1-based step (iteration) count, as in the paper's analysis, not the epoch; the
  MLP a constant lr. Every other option is the optimizer's
  default (torch.optim's), SGD with ``momentum=0.9, nesterov=True``.
* Learning rates, chosen the same way for every optimizer: a search on the grid
  1e-5, 3e-5, 1e-4, ..., 3, 10 (``LR_GRID``). It trains on the search split for the
  experiment's number of epochs at the grid value nearest the optimizer's usual default
  (``SEARCH_START``: torch.optim's default lr; 1e-2 for SGD) and its two neighbours, then
  keeps adding the next value beyond the best one while the best is at an end of the
  values tried, so the chosen lr is a local minimum with both neighbours tried (or an end of
  the grid). Criterion: the validation loss (mean cross-entropy on the validation part)
  after the last epoch; a run that diverges (a non-finite loss) scores +inf. The full run
  then trains on the whole training part with the chosen lr. ``--quick`` and
  ``--no-search`` skip the search and use ``DEFAULT_LRS``, the values the default run's
  search chose on the machine this module was written on (the search is deterministic;
  another machine's BLAS may round differently and move a close call).

The default run's search (2-core AMD EPYC, OpenBLAS 0.3.31, float32, fastadam's own
classes; validation loss after the last epoch, * the lr chosen; NumPy stand-ins with
torch.optim's update rules chose the same lrs with scores equal to 2-3 digits)::

    logistic regression, 45 epochs, lr alpha/sqrt(t)
    lr           0.0003  0.001  0.003   0.01   0.03    0.1    0.3      1      3     10
    Adam         2.230  2.070  1.674  0.885  0.379  0.195  0.153* 0.155
    AdaGrad                    2.181  1.921  1.356  0.617  0.325  0.212* 0.284
    RMSProp                    1.245  0.521  0.266  0.177* 0.232
    SGDNesterov                2.108  1.732  1.102  0.535  0.304  0.195  0.156* 0.246
    AdaMax              2.157  1.892  1.227  0.610  0.328  0.237  0.185* 0.322

    multilayer perceptron, 20 epochs, constant lr
    lr           0.0003  0.001  0.003   0.01   0.03    0.1    0.3
    Adam         0.080  0.063  0.050* 0.081
    AdaGrad                    0.072  0.054* 0.069
    RMSProp      0.065  0.051* 0.064  0.105  0.790
    SGDNesterov                0.224  0.127  0.104  0.090* 0.097
    AdaMax              0.079  0.062* 0.062

Two choices are close calls (logistic regression with Adam, 0.3 against 1; the MLP with
AdaMax, 3e-3 against 1e-2: 0.0619 against 0.0620), which other rounding may flip.

Training cost (what the plot and the table show) is the objective above evaluated over the
whole training set after each epoch (without dropout), epoch 0 being the initial weights.

Output: a table per experiment (training cost per epoch, one column per optimizer; test
accuracy and the lr of each), the learning-rate search, and with ``--plot PATH`` a PNG
(needs matplotlib): one panel per experiment, training cost (log scale) against passes
over the training set, one line per optimizer, as the paper's Figures 1 and 2. With
``--json PATH`` everything, in this layout (schema ``fastadam-compare/1``)::

    schema, created (ISO time), elapsed_s,
    machine:  {platform, cpu_model, usable_cpus, loadavg_start, loadavg_end}
    versions: {python, numpy, sklearn, matplotlib (or null), fastadam, fastadam_simd}
    settings: {argv, quick, search (bool), seed, dtype, batch_size,
               l2: {logreg, mlp}, dropout, hidden, blas_threads ("auto" or the int asked
               for), blas_threads_used (the counts used, in order; null if unknown),
               optimizers (keys, in order), experiments (names),
               epochs: {logreg: int, mlp: int}, lr_grid, search_start, criterion}
    data:     {name, source, n_train, n_test, n_search_train, n_val, n_features,
               n_classes, scaling, split}
    experiments: {logreg|mlp: {
        title, model, n_params, lr_schedule ("InverseSqrtDecay" or "constant"),
        epochs, iterations_per_epoch,
        optimizers: {adam|adagrad|rmsprop|sgd|adamax: {
            label, class ("SGD", ...), implementation (module.qualname of the class
            used: "fastadam.optim.Adam", ...), options (fixed keyword arguments),
            lr (alpha), lr_source ("search" or "default"), lr_reason (a sentence),
            search: [{lr, val_loss (null if diverged), val_accuracy, diverged, seconds}, ...]
                    (sorted by lr; [] without a search),
            train_loss: [epochs + 1 floats or null after a divergence],
            test_accuracy_per_epoch: [epochs + 1], test_accuracy,
            test_loss (mean cross-entropy on the test set, no L2),
            final_train_loss, diverged, iterations, seconds, optimizer_seconds}}}}

Exit status: 0; 2 for bad arguments or a missing extra (scikit-learn, or matplotlib with
``--plot``: ``pip install "fastadam[compare]"``) or a missing optimizer class; 1 if the
plot could not be written.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Any

import numpy as np

SCHEMA = "fastadam-compare/1"
EXTRA = 'pip install "fastadam[compare]"'

# key -> (fastadam class name, label as in the paper's figures, fixed keyword arguments)
OPTIMIZERS = {
    "adam": ("Adam", "Adam", {}),
    "adagrad": ("Adagrad", "AdaGrad", {}),
    "rmsprop": ("RMSprop", "RMSProp", {}),
    "sgd": ("SGD", "SGDNesterov", {"momentum": 0.9, "nesterov": True}),
    "adamax": ("Adamax", "AdaMax", {}),
}

EXPERIMENTS = {
    "logreg": "logistic regression",
    "mlp": "multilayer perceptron",
}

LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)
# Where the search starts: torch.optim's default lr, at the nearest grid value (Adamax's
# 2e-3 -> 3e-3); SGD has no meaningful default (torch: 1e-3), 1e-2 is the usual start.
SEARCH_START = {"adam": 1e-3, "adagrad": 1e-2, "rmsprop": 1e-2, "sgd": 1e-2, "adamax": 3e-3}
CRITERION = "validation loss (mean cross-entropy on the validation split) after the last epoch"

# What the default run's search chose (float32, default settings, 2-core AMD EPYC,
# OpenBLAS 0.3.31); used by --quick and --no-search. The scores are in the module docstring.
DEFAULT_LRS = {
    "logreg": {"adam": 0.3, "adagrad": 1.0, "rmsprop": 0.1, "sgd": 3.0, "adamax": 1.0},
    "mlp": {"adam": 3e-3, "adagrad": 1e-2, "rmsprop": 1e-3, "sgd": 0.1, "adamax": 3e-3},
}

DEFAULTS = dict(
    epochs_logreg=45,
    epochs_mlp=20,
    hidden=1000,
    batch_size=128,
    l2_logreg=1e-4,
    l2_mlp=0.0,
    dropout=0.0,
    seed=0,
    dtype="float32",
)
QUICK = dict(epochs_logreg=10, epochs_mlp=3)


class CompareError(Exception):
    """A problem reported as one line and exit status 2."""


# ---------------------------------------------------------------------------------- data


def _require_sklearn():
    try:
        import sklearn.datasets  # noqa: F401
    except ImportError:
        raise CompareError(
            "python -m fastadam compare needs scikit-learn (its handwritten "
            "digits data set ships inside the package: nothing is "
            f"downloaded): {EXTRA}"
        ) from None
    return sys.modules["sklearn.datasets"]


def stratified_split(y, frac, seed):
    """Indices (a, b) of a stratified split: about `frac` of every class in b, the rest in a;
    both sorted. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = round(frac * len(idx))
        b.append(idx[:k])
        a.append(idx[k:])
    return np.sort(np.concatenate(a)), np.sort(np.concatenate(b))


def load_digits_split(seed=0, dtype=np.float32):
    """scikit-learn's digits, scaled to [0, 1], split 80/20 (stratified) into train and test,
    and the train part again 80/20 into search_train and val. Returns a dict of arrays."""
    datasets = _require_sklearn()
    bunch = datasets.load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(dtype)
    y = np.asarray(bunch.target, dtype=np.int64)
    tr, te = stratified_split(y, 0.2, [seed, 0])
    s_tr, s_va = stratified_split(y[tr], 0.2, [seed, 1])
    d = {"x_train": x[tr], "y_train": y[tr], "x_test": x[te], "y_test": y[te]}
    d.update(
        x_search=d["x_train"][s_tr],
        y_search=d["y_train"][s_tr],
        x_val=d["x_train"][s_va],
        y_val=d["y_train"][s_va],
    )
    return {k: np.ascontiguousarray(v) for k, v in d.items()}


# -------------------------------------------------------------------------------- models


def _softmax_xent(logits, y):
    """Mean cross-entropy (a Python float, summed in float64) and its gradient with respect
    to the logits (in their dtype). Overwrites `logits`."""
    n = len(y)
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    s = e.sum(axis=1, keepdims=True)
    rows = np.arange(n)
    loss = float(np.mean(np.log(s[:, 0], dtype=np.float64) - logits[rows, y]))
    e /= s
    e[rows, y] -= 1
    e *= 1.0 / n
    return loss, e


class LogReg:
    """Multinomial logistic regression: logits = x @ W + b. Initial weights zero."""

    kind = "logreg"

    def __init__(self, n_in, n_out, dtype=np.float32, seed=0, weight_decay=0.0):
        self.dtype = np.dtype(dtype)
        self.W = np.zeros((n_in, n_out), self.dtype)
        self.b = np.zeros(n_out, self.dtype)
        self.params = [self.W, self.b]
        self.wd = float(weight_decay)
        self.description = f"softmax regression {n_in} x {n_out} + {n_out}" + (
            f", L2 {self.wd:g}" if self.wd else ""
        )

    def _l2(self):
        return (
            0.5 * self.wd * float(np.sum(np.square(self.W, dtype=np.float64))) if self.wd else 0.0
        )

    def logits(self, x):
        return x @ self.W + self.b

    def loss_and_grads(self, x, y, rng):
        loss, d = _softmax_xent(self.logits(x), y)
        gW = x.T @ d
        if self.wd:
            gW += self.wd * self.W
        return loss + self._l2(), [gW, d.sum(axis=0)]

    def objective(self, x, y):
        return _softmax_xent(self.logits(x), y)[0] + self._l2()

    def evaluate(self, x, y):
        """(mean cross-entropy, accuracy) on (x, y), from one forward pass."""
        return _evaluate(self, x, y)


class MLP:
    """n_in - hidden - hidden - n_out, ReLU, He-normal initial weights (the output layer
    1/sqrt(fan_in)), zero biases; optional inverted dropout on both hidden layers."""

    kind = "mlp"

    def __init__(
        self, n_in, n_out, hidden=1000, dtype=np.float32, seed=0, weight_decay=0.0, dropout=0.0
    ):
        self.dtype = np.dtype(dtype)
        rng = np.random.default_rng([seed, 7])
        sizes = [n_in, hidden, hidden, n_out]
        self.Ws, self.bs = [], []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            gain = 2.0 if i < 2 else 1.0
            self.Ws.append((rng.standard_normal((a, b)) * math.sqrt(gain / a)).astype(self.dtype))
            self.bs.append(np.zeros(b, self.dtype))
        self.params = [p for wb in zip(self.Ws, self.bs) for p in wb]
        self.wd = float(weight_decay)
        self.dropout = float(dropout)
        self.description = (
            f"MLP {n_in}-{hidden}-{hidden}-{n_out}, ReLU"
            + (f", L2 {self.wd:g}" if self.wd else "")
            + (f", dropout {self.dropout:g}" if self.dropout else "")
        )

    def _l2(self):
        if not self.wd:
            return 0.0
        return 0.5 * self.wd * sum(float(np.sum(np.square(W, dtype=np.float64))) for W in self.Ws)

    def _forward(self, x, rng=None):
        acts, masks = [x], []
        h = x
        for i in range(2):
            h = h @ self.Ws[i] + self.bs[i]
            np.maximum(h, 0, out=h)
            if rng is not None and self.dropout:
                keep = 1.0 - self.dropout
                m = rng.random(h.shape, dtype=self.dtype) < keep
                m = m.astype(self.dtype)
                m *= 1.0 / keep
                h *= m
                masks.append(m)
            acts.append(h)
        return h @ self.Ws[2] + self.bs[2], acts, masks

    def logits(self, x):
        return self._forward(x)[0]

    def loss_and_grads(self, x, y, rng):
        out, acts, masks = self._forward(x, rng if self.dropout else None)
        loss, d = _softmax_xent(out, y)
        grads = [None] * 6
        for i in (2, 1, 0):
            gW = acts[i].T @ d
            if self.wd:
                gW += self.wd * self.Ws[i]
            grads[2 * i], grads[2 * i + 1] = gW, d.sum(axis=0)
            if i:
                d = d @ self.Ws[i].T
                d *= acts[i] > 0  # ReLU (and a dropped unit) passes no gradient
                if masks:
                    d *= masks[i - 1]
        return loss + self._l2(), grads

    def objective(self, x, y):
        return _softmax_xent(self.logits(x), y)[0] + self._l2()

    def evaluate(self, x, y):
        """(mean cross-entropy, accuracy) on (x, y), from one forward pass."""
        return _evaluate(self, x, y)


def _evaluate(model, x, y):
    logits = model.logits(x)
    acc = float(np.mean(np.argmax(logits, axis=1) == y))
    return _softmax_xent(logits, y)[0], acc


def _make_model(name, data, settings):
    n_in, n_out = data["x_train"].shape[1], int(data["y_train"].max()) + 1
    dtype = np.dtype(settings["dtype"])
    if name == "logreg":
        return LogReg(n_in, n_out, dtype, settings["seed"], settings["l2"]["logreg"])
    return MLP(
        n_in,
        n_out,
        settings["hidden"],
        dtype,
        settings["seed"],
        settings["l2"]["mlp"],
        settings["dropout"],
    )


# ----------------------------------------------------------------------------- training


def optimizer_class(key):
    import fastadam

    name = OPTIMIZERS[key][0]
    cls = getattr(fastadam, name, None)
    if cls is None:
        here = [k for k, v in OPTIMIZERS.items() if hasattr(fastadam, v[0])]
        raise CompareError(
            f"fastadam.{name} is not available in this build of fastadam "
            f"(fastadam {getattr(fastadam, '__version__', '?')}); choose "
            f"others with --optimizers (available here: "
            f"{', '.join(here) or 'none'})"
        )
    return cls


def train(
    exp, key, lr, data, settings, x, y, epochs, eval_sets=(), track_train=True, final_sets=()
):
    """Train a fresh model of experiment `exp` with optimizer `key` at step size `lr` on
    (x, y). Returns a dict: train_loss per epoch (if track_train); for each (name, xs, ys)
    in eval_sets name_loss and name_accuracy per epoch; for those and final_sets
    name_final_loss and name_final_accuracy; diverged, iterations, seconds,
    optimizer_seconds (the time spent in opt.step)."""
    import fastadam

    model = _make_model(exp, data, settings)
    cls = optimizer_class(key)
    lr_arg = fastadam.InverseSqrtDecay(lr) if exp == "logreg" else lr
    try:
        opt = cls(model.params, lr=lr_arg, **OPTIMIZERS[key][2])
    except (TypeError, ValueError) as e:
        raise CompareError(
            f"fastadam.{cls.__name__}(params, lr={lr_arg!r}, "
            f"{', '.join(f'{k}={v!r}' for k, v in OPTIMIZERS[key][2].items())})"
            f" failed: {type(e).__name__}: {e}"
        ) from None
    seed, bs = settings["seed"], settings["batch_size"]
    order = np.random.default_rng([seed, 2])  # the same minibatches for every optimizer
    noise = np.random.default_rng([seed, 3])  # dropout masks
    res: dict[str, Any] = {"train_loss": [], "diverged": False}
    for name, _, _ in eval_sets:
        res[name + "_loss"], res[name + "_accuracy"] = [], []

    def record():
        ok = True
        if track_train:
            v = model.objective(x, y)
            res["train_loss"].append(v if math.isfinite(v) else None)
            ok = math.isfinite(v)
        for name, xs, ys in eval_sets:
            v, acc = model.evaluate(xs, ys)
            res[name + "_loss"].append(v if math.isfinite(v) else None)
            res[name + "_accuracy"].append(acc)
            ok = ok and math.isfinite(v)
        return ok

    record()
    n = len(x)
    t_opt = 0.0
    t0 = time.perf_counter()
    with np.errstate(all="ignore"):  # a diverging run is recorded, not warned
        for _epoch in range(epochs):
            perm = order.permutation(n)
            finite = True
            for i in range(0, n, bs):
                idx = perm[i : i + bs]
                loss, grads = model.loss_and_grads(x[idx], y[idx], noise)
                finite = finite and math.isfinite(loss)
                ts = time.perf_counter()
                opt.step(grads)
                t_opt += time.perf_counter() - ts
            if not record() or not finite:
                res["diverged"] = True
                for _k, v in res.items():  # pad the curves: null after a divergence
                    if isinstance(v, list):
                        v.extend([None] * (epochs + 1 - len(v)))
                break
    res["seconds"] = time.perf_counter() - t0
    res["optimizer_seconds"] = t_opt
    res["iterations"] = epochs * math.ceil(n / bs)
    with np.errstate(all="ignore"):
        for name, xs, ys in [*eval_sets, *final_sets]:  # the final model (diverged or not)
            v, acc = model.evaluate(xs, ys)
            res[name + "_final_loss"] = v if math.isfinite(v) else None
            res[name + "_final_accuracy"] = acc
    return res


def search_grid(score, start, grid=LR_GRID):
    """Minimise score(lr) over `grid` (sorted): try `start` (a grid value) and its two
    neighbours, then extend past whichever end of the values tried is the best, until the
    best is interior (or a grid end). Returns (best lr, [(lr, score), ...] sorted by lr).
    Scores are compared with ties going to the smaller lr; NaN counts as +inf."""
    grid = list(grid)
    i0 = grid.index(start)
    lo, hi = max(i0 - 1, 0), min(i0 + 1, len(grid) - 1)
    scores = {}

    def s(i):
        if i not in scores:
            v = score(grid[i])
            scores[i] = math.inf if v is None or not math.isfinite(v) else v
        return scores[i]

    for i in range(lo, hi + 1):
        s(i)
    while True:
        best = min(range(lo, hi + 1), key=lambda i: (scores[i], i))
        if best == lo and lo > 0:
            lo -= 1
            s(lo)
        elif best == hi and hi < len(grid) - 1 and scores[best] < math.inf:
            hi += 1
            s(hi)
        else:
            break
    return grid[best], [(grid[i], scores[i]) for i in sorted(scores)]


def _search(exp, key, data, settings, epochs, log, before_run=None):
    """The lr search for one optimizer and experiment (see the module docstring)."""
    runs = {}

    def score(lr):
        if before_run:
            before_run()
        r = train(
            exp,
            key,
            lr,
            data,
            settings,
            data["x_search"],
            data["y_search"],
            epochs,
            track_train=False,
            final_sets=[("val", data["x_val"], data["y_val"])],
        )
        val = r["val_final_loss"]
        runs[lr] = {
            "lr": lr,
            "val_loss": val,
            "val_accuracy": r["val_final_accuracy"],
            "diverged": r["diverged"],
            "seconds": round(r["seconds"], 3),
        }
        log(
            f"  search {exp} {OPTIMIZERS[key][1]:<12} lr {lr:<6g} val loss "
            + (f"{val:.4f}" if val is not None else "diverged")
            + f"  ({r['seconds']:.1f} s)"
        )
        return math.inf if val is None else val

    best, _ = search_grid(score, SEARCH_START[key])
    return best, [runs[lr] for lr in sorted(runs)]


# ------------------------------------------------------------------------------- output


def _fmt_loss(v):
    return "diverged" if v is None else f"{v:.4f}" if v >= 1e-3 else f"{v:.2e}"


def format_tables(data):
    lines = []
    st = data["settings"]
    d = data["data"]
    lines.append(
        f"fastadam compare: {d['name']} ({d['n_train']} train / {d['n_test']} test "
        f"images, {d['n_features']} features, {d['n_classes']} classes), "
        f"{st['dtype']}, minibatch {st['batch_size']}"
    )
    for name, exp in data["experiments"].items():
        opts = exp["optimizers"]
        labels = [o["label"] for o in opts.values()]
        w = max(12, *(len(s) for s in labels))
        lines.append("")
        lines.append(
            f"== {EXPERIMENTS[name]}: {exp['model']}, lr "
            + ("alpha/sqrt(t)" if exp["lr_schedule"] == "InverseSqrtDecay" else "constant")
            + f"; {exp['epochs']} epochs x {exp['iterations_per_epoch']} iterations"
        )
        l2 = st["l2"][name]
        lines.append(
            "training cost ("
            + (f"cross-entropy + L2 {l2:g}" if l2 else "cross-entropy")
            + ", whole training set, "
            "no dropout) after each epoch"
        )
        lines.append("epoch  " + "  ".join(s.rjust(w) for s in labels))
        lines.append("-----  " + "  ".join("-" * w for _ in labels))
        for e in range(exp["epochs"] + 1):
            lines.append(
                f"{e:5d}  "
                + "  ".join(_fmt_loss(o["train_loss"][e]).rjust(w) for o in opts.values())
            )
        lines.append("-----  " + "  ".join("-" * w for _ in labels))
        lines.append("lr     " + "  ".join(f"{o['lr']:g}".rjust(w) for o in opts.values()))
        lines.append(
            "test   "
            + "  ".join(f"{100 * o['test_accuracy']:.2f}%".rjust(w) for o in opts.values())
            + "   <- test accuracy"
        )
        lines.append("time   " + "  ".join(f"{o['seconds']:.2f} s".rjust(w) for o in opts.values()))
    others = sorted(
        {
            f"{o['label']} ({o['implementation']})"
            for exp in data["experiments"].values()
            for o in exp["optimizers"].values()
            if not o["implementation"].startswith("fastadam.")
        }
    )
    if others:
        lines.append("")
        lines.append("note: not fastadam's own classes: " + ", ".join(others))
    lines.append("")
    lines.append(
        "learning rates: "
        + (
            "searched per optimizer on a validation split (grid "
            f"{LR_GRID[0]:g} ... {LR_GRID[-1]:g}, 1-3-10 steps; "
            f"criterion: {st['criterion']})"
            if st["search"]
            else "the documented defaults found by the default run's "
            "search (fastadam.compare.DEFAULT_LRS); run without "
            "--quick/--no-search to search again"
        )
    )
    for name, exp in data["experiments"].items():
        for _key, o in exp["optimizers"].items():
            line = f"  {name:<6} {o['label']:<12} lr {o['lr']:<6g} {o['lr_reason']}"
            lines.append(line)
            if o["search"]:
                lines.append(
                    "         "
                    + ", ".join(
                        f"{r['lr']:g}: "
                        + ("diverged" if r["val_loss"] is None else f"{r['val_loss']:.4f}")
                        for r in o["search"]
                    )
                )
    return "\n".join(lines)


def _check_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CompareError(f"--plot needs matplotlib, which is not installed: {EXTRA}") from None


def write_plot(data, path):
    """The paper's Figures 1-2: one panel per experiment, training cost (log scale) against
    passes over the training set, one line per optimizer."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    exps = data["experiments"]
    fig, axes = plt.subplots(1, len(exps), figsize=(5.6 * len(exps), 4.4), squeeze=False)
    colors = {
        "adam": "#d62728",
        "adagrad": "#1f77b4",
        "rmsprop": "#2ca02c",
        "sgd": "#9467bd",
        "adamax": "#ff7f0e",
    }
    stand_ins = False
    for ax, (name, exp) in zip(axes[0], exps.items()):
        for key, o in exp["optimizers"].items():
            ys = [np.nan if v is None else v for v in o["train_loss"]]
            star = "" if o.get("implementation", "fastadam.").startswith("fastadam.") else "*"
            stand_ins = stand_ins or bool(star)
            ax.plot(
                range(len(ys)),
                ys,
                color=colors.get(key),
                lw=2.2 if key == "adam" else 1.5,
                label=f"{o['label']}{star} (lr {o['lr']:g}): test {100 * o['test_accuracy']:.1f}%",
            )
        sched = "lr α/√t" if exp["lr_schedule"] == "InverseSqrtDecay" else "constant lr"
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(
            yscale="log",
            xlabel="iterations over entire dataset (epochs)",
            ylabel="training cost",
            title=f"{EXPERIMENTS[name].capitalize()}\n{exp['model']}, {sched}",
        )
        ax.title.set_fontsize(10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    d, v, m = data["data"], data["versions"], data["machine"]
    fig.suptitle(
        f"{d['name']}, {d['n_train']} training images, minibatch "
        f"{data['settings']['batch_size']} - fastadam {v['fastadam']}, "
        f"{m['usable_cpus']} CPUs ({m['cpu_model']})"
        + (
            "\n* not fastadam's class: a NumPy stand-in with torch.optim's update rule"
            if stand_ins
            else ""
        ),
        fontsize=9,
    )
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    png = buf.getvalue()
    try:  # a palette PNG is a third of the size (pillow comes with matplotlib)
        from PIL import Image

        img = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=64)
        out = io.BytesIO()
        img.save(out, format="PNG", optimize=True)
        png = out.getvalue()
    except Exception:
        pass
    with open(path, "wb") as f:
        f.write(png)


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpus: int | None
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu_model": cpu,
        "usable_cpus": cpus,
        "loadavg_start": _loadavg(),
    }


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _versions():
    import fastadam

    v = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastadam": fastadam.__version__,
        "fastadam_simd": fastadam.config()["simd"],
    }
    try:
        import sklearn

        v["sklearn"] = sklearn.__version__
    except ImportError:
        v["sklearn"] = None
    mpl = sys.modules.get("matplotlib")
    v["matplotlib"] = getattr(mpl, "__version__", None)
    return v


# --------------------------------------------------------------------------------- main


class BlasThreads:
    """NumPy's BLAS threads during the run (threadpoolctl), restored afterwards.

    ``n``: an int, or "auto": BLAS's own count (usually one per CPU), lowered to the CPUs
    that other processes leave idle when those are fewer, and decided again before every
    training run from what the other processes used since the last decision. OpenBLAS's
    threads spin while they wait for each other, so with one thread per CPU on a machine
    where something else runs, the MLP trains 5-10x slower than with fewer threads. The
    thread count changes the last bits of a matrix product, not the results' meaning."""

    def __init__(self, n, log=lambda msg: None):
        self.n, self.log = n, log
        self.default: Any = None
        self.current: Any = None
        self.used: list[Any] = []
        self._limit: Any = None
        self._first: Any = None
        self._mark: Any = None

    def __enter__(self):
        try:
            from threadpoolctl import threadpool_info, threadpool_limits
        except ImportError:
            if self.n != "auto":
                raise CompareError(
                    f"--blas-threads needs threadpoolctl (it comes with scikit-learn): {EXTRA}"
                ) from None
            return self
        counts = [i.get("num_threads") for i in threadpool_info() if i.get("user_api") == "blas"]
        if not counts:
            return self
        self._limit = threadpool_limits
        self.default = self.current = max(counts)
        if self.n != "auto":
            self._set(self.n)
        else:
            self._mark = _cpu_snapshot()
            self._decide(_busy_cpus())
        self.used.append(self.current)
        return self

    def before_run(self):
        """Called before each training run: with "auto", decide again from what the other
        processes used since the last decision (when that was at least a second ago)."""
        if self.n != "auto" or self._mark is None:
            return
        now = _cpu_snapshot()
        if now is None or now[0] - self._mark[0] < 1.0:
            return
        others = _others_busy(self._mark, now)
        self._mark = now
        self._decide(others)
        if self.current not in self.used:
            self.used.append(self.current)

    def _decide(self, others):
        if others is None:
            return
        cpus = _machine()["usable_cpus"] or 1
        k = min(self.default, max(1, round(cpus - others)))
        if k != self.current:
            self.log(
                f"note: other processes use {others:.1f} of {cpus} CPUs: BLAS threads "
                f"{self.current} -> {k} (--blas-threads N fixes the count)"
            )
            self._set(k)

    def _set(self, k):
        lim = self._limit(limits=k, user_api="blas")
        if self._first is None:
            self._first = lim
        self.current = k

    def __exit__(self, *exc):
        if self._first is not None:
            self._first.restore_original_limits()


def _cpu_snapshot():
    """(monotonic seconds, total and idle jiffies of all CPUs, this process's CPU seconds)
    from /proc/stat, or None where there is none."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return time.monotonic(), sum(v[:8]), v[3] + v[4], time.process_time()
    except (OSError, ValueError, IndexError):
        return None


def _others_busy(a, b):
    """CPUs kept busy by other processes between two snapshots (None if unknown)."""
    if a is None or b is None or b[1] <= a[1]:
        return None
    try:
        hz = os.sysconf("SC_CLK_TCK")
    except (AttributeError, ValueError, OSError):
        hz = 100
    total, idle = b[1] - a[1], b[2] - a[2]
    own = (b[3] - a[3]) * hz
    return max(0.0, (os.cpu_count() or 1) * (total - idle - own) / total)


def _busy_cpus(window=0.25):
    """CPUs the other processes keep busy: measured over `window` seconds from /proc/stat
    (Linux), else the 1-minute load average, else None."""
    a = _cpu_snapshot()
    if a is not None:
        time.sleep(window)
        v = _others_busy(a, _cpu_snapshot())
        if v is not None:
            return v
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _blas_arg(s):
    if s.strip().lower() == "auto":
        return "auto"
    return _positive_int(s)


def parse_optimizers(s):
    """'adam,sgd' -> ['adam', 'sgd']; 'all' -> every key. Raises ValueError naming an
    unknown one."""
    toks = [t.strip().lower() for t in str(s).split(",") if t.strip()]
    if toks == ["all"]:
        return list(OPTIMIZERS)
    by_class = {v[0].lower(): k for k, v in OPTIMIZERS.items()}
    by_label = {v[1].lower(): k for k, v in OPTIMIZERS.items()}
    out = []
    for t in toks:
        k = t if t in OPTIMIZERS else by_class.get(t) or by_label.get(t)
        if k is None:
            raise ValueError(
                f"--optimizers: unknown optimizer {t!r} (choose from "
                f"{', '.join(OPTIMIZERS)} or all)"
            )
        if k not in out:
            out.append(k)
    if not out:
        raise ValueError("--optimizers: no optimizer given")
    return out


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog or "python -m fastadam compare",
        description="The Adam paper's Section 6 comparison on this machine: logistic\n"
        "regression (lr alpha/sqrt(t)) and an MLP on scikit-learn's handwritten\n"
        "digits, trained with Adam, AdaGrad, RMSProp, SGD with Nesterov momentum\n"
        "and AdaMax (learning rates searched on a validation split). Needs\n"
        f"scikit-learn (and matplotlib for --plot): {EXTRA}",
        epilog="examples:\n"
        "  %(prog)s                        # about a minute on 2 cores\n"
        "  %(prog)s --quick                # a few seconds, documented lrs\n"
        "  %(prog)s --json out.json --plot out.png\n"
        "  %(prog)s --optimizers adam,sgd --experiments mlp\n"
        "\nThe module docstring (python -c 'import fastadam.compare as c; "
        "help(c)') documents the setting and the JSON layout.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a few seconds: {QUICK['epochs_logreg']} + {QUICK['epochs_mlp']} "
        "epochs, no lr search (the documented lrs)",
    )
    p.add_argument(
        "--no-search",
        action="store_true",
        help="use the documented lrs (DEFAULT_LRS) instead of searching",
    )
    p.add_argument(
        "--optimizers",
        default="all",
        help="comma separated: adam, adagrad, rmsprop, sgd (Nesterov), adamax or all (default)",
    )
    p.add_argument(
        "--experiments", default="logreg,mlp", help="logreg, mlp or both (default logreg,mlp)"
    )
    p.add_argument(
        "--epochs-logreg",
        type=_positive_int,
        default=None,
        help=f"epochs of logistic regression (default {DEFAULTS['epochs_logreg']}; "
        f"--quick {QUICK['epochs_logreg']})",
    )
    p.add_argument(
        "--epochs-mlp",
        type=_positive_int,
        default=None,
        help=f"epochs of the MLP (default {DEFAULTS['epochs_mlp']}; --quick {QUICK['epochs_mlp']})",
    )
    p.add_argument(
        "--hidden",
        type=_positive_int,
        default=DEFAULTS["hidden"],
        help="units per hidden layer of the MLP (default 1000, as the paper)",
    )
    p.add_argument(
        "--dropout",
        type=float,
        default=DEFAULTS["dropout"],
        help="dropout probability on the MLP's hidden layers (default 0)",
    )
    p.add_argument(
        "--l2-logreg",
        type=float,
        default=DEFAULTS["l2_logreg"],
        help="L2 coefficient of logistic regression's objective (default 1e-4)",
    )
    p.add_argument(
        "--l2-mlp",
        type=float,
        default=DEFAULTS["l2_mlp"],
        help="L2 coefficient of the MLP's objective, on its weight matrices (default 0)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "float64"],
        default=DEFAULTS["dtype"],
        help="model and optimizer precision (default float32)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=DEFAULTS["seed"],
        help="seed of the split, the initial weights and the minibatch order",
    )
    p.add_argument(
        "--blas-threads",
        type=_blas_arg,
        default="auto",
        help="threads of NumPy's BLAS, or 'auto' (default): BLAS's own count "
        "(usually one per CPU), lowered before each training run to the CPUs "
        "that other processes leave idle, since OpenBLAS's spinning threads "
        "make the MLP 5-10x slower on a busy machine (uses threadpoolctl, "
        "which comes with scikit-learn)",
    )
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def run(settings, log, before_run=None):
    """The comparison; returns the JSON-ready dict (see the module docstring)."""
    data = load_digits_split(settings["seed"], np.dtype(settings["dtype"]))
    for key in settings["optimizers"]:
        optimizer_class(key)  # every class named before anything runs
    t0 = time.time()
    out = {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": None,
        "machine": _machine(),
        "versions": _versions(),
        "settings": dict(settings),
        "data": {
            "name": "scikit-learn digits",
            "source": "sklearn.datasets.load_digits "
            "(ships inside scikit-learn; UCI optical recognition of handwritten digits)",
            "n_train": len(data["y_train"]),
            "n_test": len(data["y_test"]),
            "n_search_train": len(data["y_search"]),
            "n_val": len(data["y_val"]),
            "n_features": data["x_train"].shape[1],
            "n_classes": int(data["y_train"].max()) + 1,
            "scaling": "pixel / 16, in [0, 1]",
            "split": "stratified 80/20 train/test; train stratified 80/20 again into "
            "search-train/validation for the lr search",
        },
        "experiments": {},
    }
    for exp in settings["experiments"]:
        epochs = settings["epochs"][exp]
        model = _make_model(exp, data, settings)
        rec = {
            "title": EXPERIMENTS[exp],
            "model": model.description,
            "n_params": int(sum(p.size for p in model.params)),
            "lr_schedule": "InverseSqrtDecay" if exp == "logreg" else "constant",
            "epochs": epochs,
            "iterations_per_epoch": math.ceil(len(data["y_train"]) / settings["batch_size"]),
            "optimizers": {},
        }
        for key in settings["optimizers"]:
            cls_name, label, fixed = OPTIMIZERS[key]
            if settings["search"]:
                lr, tried = _search(exp, key, data, settings, epochs, log, before_run)
                src = "search"
                vals = [r["lr"] for r in tried]
                reason = (
                    f"lowest validation loss of the lrs tried ({min(vals):g} ... "
                    f"{max(vals):g}), searched from {SEARCH_START[key]:g}"
                )
            else:
                lr, tried, src = DEFAULT_LRS[exp][key], [], "default"
                reason = "documented default (what the default run's search chose)"
            if before_run:
                before_run()
            r = train(
                exp,
                key,
                lr,
                data,
                settings,
                data["x_train"],
                data["y_train"],
                epochs,
                eval_sets=[("test", data["x_test"], data["y_test"])],
            )
            log(
                f"{exp} {label:<12} lr {lr:<6g} final training cost "
                f"{_fmt_loss(r['train_loss'][-1])}, test accuracy "
                f"{100 * r['test_final_accuracy']:.2f}%  ({r['seconds']:.1f} s)"
            )
            cls = optimizer_class(key)
            rec["optimizers"][key] = {
                "label": label,
                "class": cls_name,
                "implementation": f"{cls.__module__}.{cls.__qualname__}",
                "options": dict(fixed),
                "lr": lr,
                "lr_source": src,
                "lr_reason": reason,
                "search": tried,
                "train_loss": r["train_loss"],
                "test_accuracy_per_epoch": r["test_accuracy"],
                "test_accuracy": r["test_final_accuracy"],
                "test_loss": r["test_final_loss"],
                "final_train_loss": r["train_loss"][-1],
                "diverged": r["diverged"],
                "iterations": r["iterations"],
                "seconds": r["seconds"],
                "optimizer_seconds": r["optimizer_seconds"],
            }
        out["experiments"][exp] = rec
    out["elapsed_s"] = time.time() - t0
    out["machine"]["loadavg_end"] = _loadavg()
    return out


def main(argv=None, prog=None):
    """Entry point of ``python -m fastadam compare``; returns an exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(prog).parse_args(argv)
    quiet = args.quiet

    def log(msg):
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        opts = parse_optimizers(args.optimizers)
        exps = [t.strip().lower() for t in args.experiments.split(",") if t.strip()]
        bad = [t for t in exps if t not in EXPERIMENTS]
        if bad or not exps:
            raise ValueError(
                f"--experiments: unknown {', '.join(map(repr, bad)) or 'none'} "
                "(choose from logreg, mlp)"
            )
        if not 0 <= args.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
        for opt in ("l2_logreg", "l2_mlp"):
            if not getattr(args, opt) >= 0:
                raise ValueError(
                    f"--{opt.replace('_', '-')} must be >= 0, got {getattr(args, opt)}"
                )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    q = QUICK if args.quick else DEFAULTS
    settings = {
        "argv": argv,
        "quick": args.quick,
        "search": not (args.quick or args.no_search),
        "seed": args.seed,
        "dtype": args.dtype,
        "batch_size": DEFAULTS["batch_size"],
        "l2": {"logreg": args.l2_logreg, "mlp": args.l2_mlp},
        "dropout": args.dropout,
        "hidden": args.hidden,
        "blas_threads": args.blas_threads,
        "optimizers": opts,
        "experiments": list(dict.fromkeys(exps)),
        "epochs": {
            "logreg": args.epochs_logreg or q["epochs_logreg"],
            "mlp": args.epochs_mlp or q["epochs_mlp"],
        },
        "lr_grid": list(LR_GRID),
        "search_start": dict(SEARCH_START),
        "criterion": CRITERION,
    }
    try:
        _require_sklearn()
        if args.plot:
            _check_matplotlib()
        for key in opts:
            optimizer_class(key)  # every class named before anything runs
        with BlasThreads(args.blas_threads, log) as blas:
            data = run(settings, log, blas.before_run)
            data["settings"]["blas_threads_used"] = blas.used or None
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_tables(data), flush=True)
    code = 0
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, args.json)
        log(f"wrote {args.json}")
    if args.plot:
        try:
            write_plot(data, args.plot)
            log(f"wrote {args.plot}")
        except Exception as e:
            print(f"error: --plot {args.plot}: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
