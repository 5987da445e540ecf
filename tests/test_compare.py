"""`python -m fastadam compare` (the Adam paper's Section 6 comparison on scikit-learn's
handwritten digits): a --quick run end to end with its JSON, table and PNG; the errors for a
missing extra, a missing optimizer and bad arguments.

The comparison needs fastadam.Adagrad, RMSprop, SGD and Adamax. Where this build lacks one,
the tests here put a minimal pure-NumPy stand-in in its place (torch.optim's algorithm and
defaults, test-only: see ``standins``), so that the command can be tested on its own."""

import importlib
import importlib.util
import json
import math
import pathlib
import sys
import time

import numpy as np
import pytest

import fastadam


def _load_compare():
    try:
        return importlib.import_module("fastadam.compare")
    except ImportError:  # a new module that an older editable install does not map yet
        path = pathlib.Path(fastadam.__file__).with_name("compare.py")
        spec = importlib.util.spec_from_file_location("fastadam.compare", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["fastadam.compare"] = mod
        spec.loader.exec_module(mod)
        return mod


compare = _load_compare()


# --------------------------------------------------------------- test-only stand-ins
class _StandIn:
    """Minimal NumPy optimizer with fastadam's NumPy API: ``Cls(params, lr=..., **options)``,
    ``step(grads)`` updating the arrays in place; ``lr`` a number or a callable of the
    1-based step count. Follows torch.optim's update rules (weight_decay: L2 added to g)."""

    defaults = {}

    def __init__(self, params, lr=None, **options):
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unexpected options {sorted(unknown)}")
        self.params = list(params)
        self.lr = self.default_lr if lr is None else lr
        self.o = {**self.defaults, **options}
        self.t = 0
        self.state = [{} for _ in self.params]

    def step(self, grads):
        self.t += 1
        lr = float(self.lr(self.t) if callable(self.lr) else self.lr)
        for p, g, s in zip(self.params, grads, self.state):
            if g is None:
                continue
            if self.o.get("weight_decay"):
                g = g + self.o["weight_decay"] * p
            self.update(p, g, s, lr)


class SGDStandIn(_StandIn):
    default_lr = 1e-3
    defaults = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False)

    def update(self, p, g, s, lr):
        mu = self.o["momentum"]
        if mu:
            if "buf" not in s:
                s["buf"] = g.copy()
            else:
                s["buf"] *= mu
                s["buf"] += (1 - self.o["dampening"]) * g
            g = g + mu * s["buf"] if self.o["nesterov"] else s["buf"]
        p -= lr * g


class AdagradStandIn(_StandIn):
    default_lr = 1e-2
    defaults = dict(lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0, eps=1e-10)

    def update(self, p, g, s, lr):
        if "sum" not in s:
            s["sum"] = np.full_like(p, self.o["initial_accumulator_value"])
        clr = lr / (1 + (self.t - 1) * self.o["lr_decay"])
        s["sum"] += g * g
        p -= clr * g / (np.sqrt(s["sum"]) + self.o["eps"])


class RMSpropStandIn(_StandIn):
    default_lr = 1e-2
    defaults = dict(alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False)

    def update(self, p, g, s, lr):
        a = self.o["alpha"]
        if "sq" not in s:
            s["sq"] = np.zeros_like(p)
        s["sq"] *= a
        s["sq"] += (1 - a) * g * g
        avg = np.sqrt(s["sq"]) + self.o["eps"]  # (centered and momentum: not needed here)
        p -= lr * g / avg


class AdamaxStandIn(_StandIn):
    default_lr = 2e-3
    defaults = dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    def update(self, p, g, s, lr):
        b1, b2 = self.o["betas"]
        if "m" not in s:
            s["m"], s["u"] = np.zeros_like(p), np.zeros_like(p)
        s["m"] *= b1
        s["m"] += (1 - b1) * g
        np.maximum(b2 * s["u"], np.abs(g) + self.o["eps"], out=s["u"])
        p -= (lr / (1 - b1**self.t)) * s["m"] / s["u"]


STANDINS = {
    "SGD": SGDStandIn,
    "Adagrad": AdagradStandIn,
    "RMSprop": RMSpropStandIn,
    "Adamax": AdamaxStandIn,
}


@pytest.fixture
def standins(monkeypatch):
    """Put a stand-in in place of each optimizer class this build of fastadam lacks."""
    used = []
    for name, cls in STANDINS.items():
        if not hasattr(fastadam, name):
            monkeypatch.setattr(fastadam, name, cls, raising=False)
            used.append(name)
    return used


needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="scikit-learn not installed (pip install 'fastadam[compare]')",
)
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None,
    reason="matplotlib not installed (pip install 'fastadam[compare]')",
)


# --------------------------------------------------------------------- the quick run
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One `compare --quick --json --plot` run, in process (with the stand-ins)."""
    if importlib.util.find_spec("sklearn") is None:
        pytest.skip("scikit-learn not installed (pip install 'fastadam[compare]')")
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib not installed (pip install 'fastadam[compare]')")
    mp = pytest.MonkeyPatch()
    for name, cls in STANDINS.items():
        if not hasattr(fastadam, name):
            mp.setattr(fastadam, name, cls, raising=False)
    out_dir = tmp_path_factory.mktemp("compare")
    js, png = out_dir / "compare.json", out_dir / "compare.png"
    from fastadam.__main__ import main as cli_main

    capture = _Capture()
    t0 = time.perf_counter()
    try:
        with capture:
            rc = cli_main(["compare", "--quick", "--quiet", "--json", str(js), "--plot", str(png)])
    finally:
        mp.undo()
    elapsed = time.perf_counter() - t0
    assert rc == 0, capture.err
    with open(js) as f:
        data = json.load(f)
    return data, capture.out, capture.err, elapsed, png


class _Capture:
    """Capture sys.stdout/sys.stderr (capsys is function-scoped; the run is per module)."""

    def __enter__(self):
        import io

        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self._out, self._err = io.StringIO(), io.StringIO()
        return self

    def __exit__(self, *exc):
        sys.stdout, sys.stderr = self._saved
        self.out, self.err = self._out.getvalue(), self._err.getvalue()


def test_quick_is_quick(quick_run):
    data, _, _, elapsed, _ = quick_run
    assert data["settings"]["quick"] is True and data["settings"]["search"] is False
    assert elapsed < 30  # a few seconds on 2 cores; generous for a loaded CI machine


def test_json_layout(quick_run):
    data, _, _, _, _ = quick_run
    assert data["schema"] == compare.SCHEMA
    for key in ("created", "elapsed_s", "machine", "versions", "settings", "data", "experiments"):
        assert key in data
    d = data["data"]
    assert d["n_features"] == 64 and d["n_classes"] == 10
    assert d["n_train"] + d["n_test"] == 1797
    assert abs(d["n_test"] - 0.2 * 1797) <= 10  # stratified 80/20
    assert data["versions"]["sklearn"]
    st = data["settings"]
    assert st["optimizers"] == ["adam", "adagrad", "rmsprop", "sgd", "adamax"]
    assert st["batch_size"] == 128 and st["dtype"] == "float32"
    assert set(data["experiments"]) == {"logreg", "mlp"}
    for name, exp in data["experiments"].items():
        epochs = st["epochs"][name]
        assert exp["epochs"] == epochs and exp["iterations_per_epoch"] == math.ceil(
            d["n_train"] / 128
        )
        assert exp["lr_schedule"] == ("InverseSqrtDecay" if name == "logreg" else "constant")
        assert list(exp["optimizers"]) == st["optimizers"]
        for key, r in exp["optimizers"].items():
            assert r["class"] == compare.OPTIMIZERS[key][0]
            assert r["implementation"].split(".")[-1].startswith(r["class"])
            assert r["lr"] == compare.DEFAULT_LRS[name][key]
            assert r["lr_source"] == "default" and r["search"] == []
            assert (
                len(r["train_loss"]) == epochs + 1
                and len(r["test_accuracy_per_epoch"]) == epochs + 1
            )
            assert r["iterations"] == epochs * exp["iterations_per_epoch"]
            assert 0 <= r["test_accuracy"] <= 1 and r["diverged"] is False
            assert r["seconds"] > 0 and 0 < r["optimizer_seconds"] <= r["seconds"]


def test_losses_decrease_and_accuracy_beats_chance(quick_run):
    data, _, _, _, _ = quick_run
    for name, exp in data["experiments"].items():
        for key, r in exp["optimizers"].items():
            loss = r["train_loss"]
            assert all(math.isfinite(x) for x in loss), (name, key)
            assert loss[0] == pytest.approx(math.log(10), rel=0.15)  # about chance at init
            assert loss[-1] < 0.5 * loss[0], (name, key, loss)
            assert min(loss[-3:]) < loss[1], (name, key, loss)
            floor = 0.8 if name == "logreg" else 0.6  # chance is 0.1
            assert r["test_accuracy"] > floor, (name, key, r["test_accuracy"])


def test_table_and_plot(quick_run):
    _data, out, _, _, png = quick_run
    assert "logistic regression" in out and "multilayer perceptron" in out
    for label in ("Adam", "AdaGrad", "RMSProp", "SGDNesterov", "AdaMax"):
        assert label in out
    assert "test accuracy" in out and "learning rates" in out
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < png.stat().st_size < 400_000


def test_same_start_and_data_order_for_every_optimizer(quick_run):
    data, _, _, _, _ = quick_run
    for exp in data["experiments"].values():
        starts = {r["train_loss"][0] for r in exp["optimizers"].values()}
        assert len(starts) == 1


# ------------------------------------------------------------------- smaller pieces
@needs_sklearn
def test_split_is_stratified_and_deterministic():
    d1, d2 = compare.load_digits_split(0), compare.load_digits_split(0)
    for k in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(d1[k], d2[k])
    assert d1["x_train"].dtype == np.float32 and d1["x_train"].min() >= 0
    assert d1["x_train"].max() == 1.0
    train_counts = np.bincount(d1["y_train"], minlength=10)
    test_counts = np.bincount(d1["y_test"], minlength=10)
    assert np.all(np.abs(test_counts / (train_counts + test_counts) - 0.2) < 0.02)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("model", ["logreg", "mlp"])
def test_gradients_match_finite_differences(model, dtype):
    rng = np.random.default_rng(1)
    x = rng.random((7, 5)).astype(dtype)
    y = rng.integers(0, 3, 7)
    m = (
        compare.LogReg(5, 3, dtype, 0, weight_decay=1e-2)
        if model == "logreg"
        else compare.MLP(5, 3, 4, dtype, 0, weight_decay=1e-2)
    )
    for p in m.params:  # logreg starts at zero: move off it
        p += rng.standard_normal(p.shape).astype(dtype) * 0.3
    loss, grads = m.loss_and_grads(x, y, None)
    assert loss == pytest.approx(m.objective(x, y), rel=1e-5)
    for p, g in zip(m.params, grads):
        assert g.dtype == p.dtype and g.shape == p.shape and g.flags.c_contiguous
    h = 1e-3 if dtype == np.float32 else 1e-6
    for p, g in zip(m.params, grads):
        for idx in list(np.ndindex(p.shape))[:6]:
            old = p[idx]
            p[idx] = old + h
            up = m.objective(x, y)
            p[idx] = old - h
            down = m.objective(x, y)
            p[idx] = old
            assert (up - down) / (2 * h) == pytest.approx(
                g[idx], abs=2e-3 if dtype == np.float32 else 1e-7
            )


def test_parse_optimizers():
    assert compare.parse_optimizers("all") == list(compare.OPTIMIZERS)
    assert compare.parse_optimizers("SGD, adam") == ["sgd", "adam"]
    with pytest.raises(ValueError, match="nadam"):
        compare.parse_optimizers("adam,nadam")


def test_lr_grid_search_extends_to_an_interior_best():
    calls = []

    def score(lr):  # best at 3e-2, two grid points above the start
        calls.append(lr)
        return abs(math.log10(lr) - math.log10(3e-2))

    best, tried = compare.search_grid(score, start=1e-3)
    assert best == 3e-2
    assert sorted(calls) == [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
    assert [t[0] for t in tried] == sorted(calls)


def test_lr_grid_search_treats_divergence_as_worst():
    best, _tried = compare.search_grid(lambda lr: math.inf if lr > 1e-3 else -lr, start=1e-3)
    assert best == 1e-3


# ------------------------------------------------------------------------- errors
def test_missing_sklearn_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    from fastadam.__main__ import main as cli_main

    assert cli_main(["compare", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert "scikit-learn" in err and 'pip install "fastadam[compare]"' in err
    assert "Traceback" not in err


@needs_sklearn
def test_missing_matplotlib_with_plot(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert compare.main(["--quick", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err
    assert 'pip install "fastadam[compare]"' in err
    assert not (tmp_path / "x.png").exists()


@needs_sklearn
def test_missing_optimizer_is_named(monkeypatch, capsys):
    monkeypatch.delattr(fastadam, "Adamax", raising=False)
    assert compare.main(["--quick", "--optimizers", "adam,adamax"]) == 2
    err = capsys.readouterr().err
    assert "fastadam.Adamax" in err and err.count("\n") == 1


def test_bad_arguments(capsys):
    assert compare.main(["--optimizers", "adam,nadam"]) == 2
    assert "nadam" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--epochs-mlp", "zero"])


@needs_sklearn
def test_subset_of_optimizers_and_one_experiment(standins, tmp_path, capsys):
    js = tmp_path / "c.json"
    assert (
        compare.main(
            [
                "--quick",
                "--quiet",
                "--optimizers",
                "adam,sgd",
                "--experiments",
                "logreg",
                "--epochs-logreg",
                "3",
                "--blas-threads",
                "1",
                "--json",
                str(js),
            ]
        )
        == 0
    )
    data = json.loads(js.read_text())
    assert data["settings"]["blas_threads"] == 1
    if importlib.util.find_spec("threadpoolctl") is not None:
        assert data["settings"]["blas_threads_used"] == [1]
    assert list(data["experiments"]) == ["logreg"]
    exp = data["experiments"]["logreg"]
    assert list(exp["optimizers"]) == ["adam", "sgd"]
    assert len(exp["optimizers"]["sgd"]["train_loss"]) == 4
    assert exp["optimizers"]["sgd"]["options"] == {"momentum": 0.9, "nesterov": True}
