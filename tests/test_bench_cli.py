"""The benchmark command line (`python -m fastadam bench`): a quick run end to end, its JSON,
re-printing a saved run, the built-in workloads and the errors it reports."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from fastadam import bench


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fastadam", "bench", "--quick", "--json",
                           str(path)], capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    with open(path) as f:
        data = json.load(f)
    return data, proc.stdout, proc.stderr, elapsed, path


def test_quick_run_is_quick(quick_run):
    data, _, _, elapsed, _ = quick_run
    assert data["settings"]["quick"] is True
    assert elapsed < 60  # about 5 s on 2 cores, torch import included; generous for CI


def test_quick_json_structure(quick_run):
    data, _, _, _, _ = quick_run
    assert data["schema"] == bench.SCHEMA
    for key in ("cpu_model", "logical_cpus", "platform", "caches_per_cpu0"):
        assert key in data["machine"]
    v = data["versions"]
    for key in ("python", "numpy", "fastadam", "torch", "fastadam_config"):
        assert key in v
    st = data["settings"]
    assert st["sizes"] == [1000, 100000] and st["threads"] == [1]
    assert st["dtypes"] == ["float32"]
    assert st["hyperparameters"] == {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8}
    recs = data["results"]
    ok = [r for r in recs if r["status"] == "ok"]
    assert {r["workload"] for r in ok} == {"n1e3", "n1e5"}
    impls = {r["impl"] for r in ok}
    assert {"fastadam", "roofline", "reference", "numpy"} <= impls
    if v["torch"] is not None:
        assert {"torch_fused", "torch_foreach", "torch_forloop"} <= impls
    for r in ok:
        assert r["sec_per_step"] > 0 and r["sec_q1"] <= r["sec_per_step"] <= r["sec_q3"]
        assert r["batches"] == len(r["samples"]) >= 1 and all(x > 0 for x in r["samples"])
        assert r["steps_per_batch"] >= 1
        assert r["elems_per_s"] == pytest.approx(r["n_elems"] / r["sec_per_step"])
        assert r["gbps"] == pytest.approx(28 * r["n_elems"] / r["sec_per_step"] / 1e9)
        assert r["pct_roofline"] > 0
        assert r["dtype"] == "float32" and r["threads"] == 1 and r["n_tensors"] == 1


def test_quick_table_and_progress(quick_run):
    _, out, err, _, path = quick_run
    assert "== float32, 1 thread" in out
    for label in ("roofline (traffic)", "fastadam", "NumPy reference", "NumPy in-place"):
        assert label in out
    assert "done in" in err and str(path) in err


def test_load_reprints_the_table(quick_run, capsys):
    _, out, _, _, path = quick_run
    assert bench.main(["--load", str(path)]) == 0
    again = capsys.readouterr().out
    assert again == out


def test_model_workloads_have_the_real_shapes():
    gpt2 = bench.Workload.model("gpt2_small")
    assert (gpt2.n_tensors, gpt2.n_elems) == (148, 124_439_808)
    assert gpt2.shapes[0] == (50257, 768) and gpt2.shapes[1] == (1024, 768)
    resnet = bench.Workload.model("resnet50")
    assert (resnet.n_tensors, resnet.n_elems) == (161, 25_557_032)
    many = bench.Workload.model("many_small")
    assert (many.n_tensors, many.n_elems) == (1000, 1_000_000)


def test_groups_fit_the_memory_budget():
    entries = [("roofline", 3), ("fastadam", 3), ("torch_fused", 3), ("torch_foreach", 6),
               ("numpy", 20)]
    groups, too_big = bench._plan_groups(entries, budget=10, shared_bytes=1)
    assert too_big == ["numpy"]
    assert groups == [["roofline", "fastadam", "torch_fused"], ["roofline", "torch_foreach"]]
    groups, too_big = bench._plan_groups(entries[:3], budget=100, shared_bytes=1)
    assert groups == [["roofline", "fastadam", "torch_fused"]] and not too_big


def test_numpy_inplace_is_adam():
    """The in-place NumPy peer computes Adam (to rounding) like the reference."""
    from fastadam import reference

    wl = bench.Workload("t", "t", [(300,), (7, 11)], "model")
    grads = [bench._Filler(np.float64, 1.0, 1).fill(np.empty(s)) for s in wl.shapes]
    imp = bench.NumpyInplace(wl, grads, np.float64, 1, bench._Filler(np.float64, 0.02, 0))
    p0 = [v[0].copy() for v in imp.views]
    m = [np.zeros_like(x) for x in p0]
    v = [np.zeros_like(x) for x in p0]
    for t in (1, 2, 3):
        imp.step()
        for p, g, mm, vv in zip(p0, grads, m, v):
            reference.adam_step(p, g.reshape(-1), mm, vv, step=t)
    for (p, *_), q in zip(imp.views, p0):
        np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "1e3,abc"], "--sizes"),
    (["--models", "bert"], "--models"),
    (["--dtype", "float16"], "--dtype"),
    (["--threads", "0"], "--threads"),
    (["--simd", "nosuchpath"], "--simd"),
    (["--impls", "jax"], "--impls"),
    (["--sizes", "none", "--models", "none"], "nothing to measure"),
])
def test_bad_arguments(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert bench.main(["--quick", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install" in err
    assert not (tmp_path / "x.png").exists()


def test_plot(quick_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, _, _, path = quick_run
    out = tmp_path / "bench.png"
    assert bench.main(["--load", str(path), "--plot", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
