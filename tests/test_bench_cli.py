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
    proc = subprocess.run(
        [sys.executable, "-m", "fastadam", "bench", "--quick", "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
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


# The JSON schema of `python -m fastadam bench`, pinned key by key: a change here is a change
# of the fastadam-bench/1 schema (bench.SCHEMA), which readers of saved runs depend on.
QUICK_TOP_KEYS = {
    "schema",
    "created",
    "elapsed_s",
    "machine",
    "versions",
    "settings",
    "notes",
    "results",
}
QUICK_SETTINGS_KEYS = {
    "sizes",
    "models",
    "dtypes",
    "threads",
    "simd",
    "simd_in_use",
    "impls",
    "roofline",
    "repeats",
    "batch_time",
    "max_time",
    "warm_time",
    "slow_limit",
    "numpy_all_threads",
    "max_memory",
    "aligned",
    "quick",
    "seed",
    "argv",
    "hyperparameters",
    "optimizers",
}
MACHINE_KEYS = {
    "platform",
    "machine",
    "logical_cpus",
    "cpu_model",
    "physical_cores",
    "usable_cpus",
    "caches_per_cpu0",
    "loadavg_start",
    "hypervisor",
    "loadavg_end",
}
MACHINE_OPTIONAL = {"mem_total_bytes", "mem_available_bytes"}  # where /proc/meminfo is
VERSIONS_KEYS = {"python", "numpy", "fastadam", "fastadam_config", "torch"}
VERSIONS_OPTIONAL = {"torch_num_threads_default", "environment"}  # torch; OMP_* variables set
RECORD_KEYS = {  # an "ok" record of fastadam (Adam)
    "workload",
    "workload_label",
    "kind",
    "n_tensors",
    "n_elems",
    "dtype",
    "threads",
    "optimizer",
    "impl",
    "label",
    "simd",
    "group",
    "groups",
    "buffer_offsets_mod64",
    "status",
    "sec_per_step",
    "sec_q1",
    "sec_q3",
    "sec_min",
    "sec_max",
    "iqr_rel",
    "batches",
    "steps_per_batch",
    "warmup_steps",
    "rewarm",
    "capped",
    "samples",
    "rounds",
    "elems_per_s",
    "gbps",
    "roofline_sec_per_step",
    "pct_roofline",
    "cell_seconds",
    "others_cpu",
}
PEER_RECORD_KEYS = RECORD_KEYS - {"buffer_offsets_mod64"} | {"vs_fastadam"}
ROOFLINE_RECORD_KEYS = RECORD_KEYS - {"buffer_offsets_mod64"} | {"group_sec_per_step"}


def test_quick_json_keys_pinned(quick_run):
    data, _, _, _, _ = quick_run
    assert set(data) == QUICK_TOP_KEYS
    assert set(data["settings"]) == QUICK_SETTINGS_KEYS
    assert MACHINE_KEYS <= set(data["machine"]) <= MACHINE_KEYS | MACHINE_OPTIONAL
    assert VERSIONS_KEYS <= set(data["versions"]) <= VERSIONS_KEYS | VERSIONS_OPTIONAL
    ok = {}
    for r in data["results"]:
        if r["status"] == "ok":
            ok.setdefault(r["impl"], r)
    assert set(ok["fastadam"]) == RECORD_KEYS
    assert set(ok["roofline"]) == ROOFLINE_RECORD_KEYS
    for key in ("reference", "numpy", "torch_fused", "torch_foreach", "torch_forloop"):
        if key in ok:
            assert set(ok[key]) == PEER_RECORD_KEYS, key


def test_model_workloads_have_the_real_shapes():
    gpt2 = bench.Workload.model("gpt2_small")
    assert (gpt2.n_tensors, gpt2.n_elems) == (148, 124_439_808)
    assert gpt2.shapes[0] == (50257, 768) and gpt2.shapes[1] == (1024, 768)
    resnet = bench.Workload.model("resnet50")
    assert (resnet.n_tensors, resnet.n_elems) == (161, 25_557_032)
    many = bench.Workload.model("many_small")
    assert (many.n_tensors, many.n_elems) == (1000, 1_000_000)


def test_groups_fit_the_memory_budget():
    entries = [
        ("roofline", 3),
        ("fastadam", 3),
        ("torch_fused", 3),
        ("torch_foreach", 6),
        ("numpy", 20),
    ]
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


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sizes", "1e3,abc"], "--sizes"),
        (["--models", "bert"], "--models"),
        (["--dtype", "float16"], "--dtype"),
        (["--threads", "0"], "--threads"),
        (["--simd", "nosuchpath"], "--simd"),
        (["--impls", "jax"], "--impls"),
        (["--sizes", "none", "--models", "none"], "nothing to measure"),
    ],
)
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


# ----------------------------------------------------------------------------- other rules


@pytest.fixture(scope="module")
def quick_all(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "quick_all.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastadam",
            "bench",
            "--quick",
            "--optimizer",
            "all",
            "--json",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    with open(path) as f:
        data = json.load(f)
    return data, proc.stdout, elapsed, path


def test_quick_all_rules(quick_all):
    data, out, elapsed, _ = quick_all
    assert elapsed < 120  # about 13 s on 2 cores
    assert data["schema"] == bench.SCHEMA
    st = data["settings"]
    assert (
        st["optimizers"]
        == bench.RULE_ORDER
        == ["adam", "sgd", "adagrad", "rmsprop", "adamax", "nadam", "radam", "lion"]
    )
    assert st["rule_sizes"] == st["sizes"] == [1000, 100000]
    assert st["rules"]["sgd"]["options"]["momentum"] == 0.9
    have_torch = data["versions"]["torch"] is not None
    ok = [r for r in data["results"] if r["status"] == "ok"]
    for rule in bench.RULE_ORDER:
        spec = bench.RULE_SPECS[rule]
        rs = [r for r in ok if r["optimizer"] == rule]
        assert {r["workload"] for r in rs} == {"n1e3", "n1e5"}
        impls = {r["impl"] for r in rs}
        assert {"fastadam", "roofline", "reference"} <= impls
        if have_torch:
            assert {"torch_foreach", "torch_forloop"} <= impls
            assert ("torch_fused" in impls) == spec.fused
        assert ("numpy" in impls) == (rule == "adam")
        bpe = 4 * (2 * spec.streams - 1)
        assert spec.bytes_per_elem("float32") == bpe
        for r in rs:
            assert r["gbps"] == pytest.approx(bpe * r["n_elems"] / r["sec_per_step"] / 1e9)
            if rule != "adam":
                assert r["bytes_per_elem"] == bpe and r["streams"] == spec.streams
            if r["impl"] != "roofline":
                assert r["pct_roofline"] > 0
    summ = data["rules_summary"]
    assert {(s["optimizer"], s["workload"]) for s in summ} == {
        (rule, w) for rule in bench.RULE_ORDER for w in ("n1e3", "n1e5")
    }
    for s in summ:
        assert s["fastadam"] > 0 and s["target"] is None  # no target workload in --quick
        if have_torch:
            assert s["vs_torch_fastest"] > 0
            assert (s["vs_torch_fused"] is not None) == bench.RULE_SPECS[s["optimizer"]].fused
    assert "== float32, 1 thread" in out  # Adam's section, as before
    for title in ("SGD", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Lion"):
        assert f"== {title}: float32, 1 thread" in out
    assert "== SGD: float32, 1 thread, 3 streams = 20 B/element" in out
    assert "== summary" in out


def test_load_reprints_all_rules(quick_all, capsys):
    _, out, _, path = quick_all
    assert bench.main(["--load", str(path)]) == 0
    assert capsys.readouterr().out == out


def test_default_run_is_adam_only(quick_run):
    data, out, _, _, _ = quick_run
    assert data["settings"]["optimizers"] == ["adam"]
    assert "rules_summary" not in data and "rules" not in data["settings"]
    assert {r["optimizer"] for r in data["results"]} == {"adam"}
    assert "== summary" not in out


def test_rule_workloads_default_to_the_targets():
    s = bench.resolve(bench.build_parser().parse_args(["--optimizer", "sgd,lion"]))
    assert s.optimizers == ["sgd", "lion"]
    assert s.rule_sizes == [10**6, 10**8] and s.rule_models == ["many_small"]
    s = bench.resolve(bench.build_parser().parse_args(["--optimizer", "sgd", "--sizes", "1e4"]))
    assert s.rule_sizes == s.sizes == [10**4] and s.rule_models == ["many_small"]
    assert s.models == list(bench.MODELS)  # Adam's: as without the flag


def test_rule_roofline_streams():
    """The roofline of a rule moves its own streams: param, grad, then its state."""
    wl = bench.Workload.tensor(1000)
    grads = [np.zeros(1000, np.float32)]
    for rule, n in (
        ("adam", 4),
        ("sgd", 3),
        ("adagrad", 3),
        ("rmsprop", 3),
        ("adamax", 4),
        ("nadam", 4),
        ("radam", 4),
        ("lion", 3),
    ):
        spec = bench.RULE_SPECS[rule]
        assert spec.streams == n and spec.bytes_per_elem("float64") == 8 * (2 * n - 1)
        roof = bench.Roofline(
            wl, grads, np.float32, 1, bench._Filler(np.float32, 0.02, 0), rule=spec
        )
        fn, (streams, threads) = roof.call
        assert len(streams) == n and threads == 1
        fn(streams, threads)
        assert bench.Roofline.mem_units(wl, spec) == n


@pytest.mark.parametrize("rule", [r for r in bench.RULE_ORDER if r != "adam"])
def test_rule_peers_compute_the_same_update(rule):
    """fastadam, the NumPy reference and each torch row of a rule run the same rule with the
    same options: after 8 steps (RAdam past its rectification threshold) the parameters
    agree (float64, to rounding; NAdam to 1e-9: torch keeps its mu_product in float32)."""
    torch = pytest.importorskip("torch")
    spec = bench.RULE_SPECS[rule]
    wl = bench.Workload("t", "t", [(300,), (7, 11)], "model")
    dt = np.float64
    grads = [bench._Filler(dt, 1.0, 1).new(s) for s in wl.shapes]

    def filler():
        return bench._Filler(dt, 0.02, 0)

    shared = bench.FastAdam.make_shared(wl, grads, dt, 1, filler(), spec)
    fa = bench.FastAdam(shared, None, True)
    ref = bench.Reference(wl, grads, dt, 1, filler(), rule=spec)
    peers = [bench.TorchForloop, bench.TorchForeach] + ([bench.TorchFused] if spec.fused else [])
    torchs = [c(wl, grads, dt, 1, filler(), rule=spec) for c in peers]
    p0 = [p.copy() for p in shared.params]
    for o in [fa, ref] + torchs:
        for _ in range(8):
            fn, args = o.call
            fn(*args)
    for i, p in enumerate(shared.params):
        assert not np.array_equal(p, p0[i])  # the step moved them
        np.testing.assert_array_equal(p, ref.views[i][0])  # fastadam == reference
        for t in torchs:
            np.testing.assert_allclose(
                t.params[i].detach().numpy(),
                p,
                rtol=1e-12,
                atol=1e-9 if rule == "nadam" else 1e-14,
                err_msg=t.key,
            )
    if rule == "lion":
        assert torchs[0].label == "torch for-loop (written here)"
    torch.set_num_threads(torch.get_num_threads())


def test_rule_summary_targets():
    """In cache: >= torch fused where torch has one, else >= 3x torch's fastest; 1e8:
    >= 95% of the roofline."""

    def rec(rule, w, impl, sec, **kw):
        return dict(
            status="ok",
            optimizer=rule,
            dtype="float32",
            workload=w,
            workload_label=w,
            threads=1,
            n_elems=10**6,
            impl=impl,
            sec_per_step=sec,
            gbps=1.0,
            **kw,
        )

    recs = [
        rec("sgd", "n1e6", "fastadam", 1.0, pct_roofline=50.0),
        rec("sgd", "n1e6", "torch_fused", 0.9, vs_fastadam=0.9),
        rec("sgd", "n1e6", "torch_foreach", 2.0, vs_fastadam=2.0),
        rec("rmsprop", "many_small", "fastadam", 1.0),
        rec("rmsprop", "many_small", "torch_foreach", 3.5, vs_fastadam=3.5),
        rec("rmsprop", "many_small", "torch_forloop", 3.2, vs_fastadam=3.2),
        rec("lion", "n1e8", "fastadam", 1.0, pct_roofline=96.0),
        rec("lion", "n1e8", "roofline", 0.96),
        rec("adam", "n1e3", "fastadam", 1.0),
    ]
    rows = {r["optimizer"]: r for r in bench.rule_summary(recs)}
    assert rows["sgd"]["target"] == ">= torch fused" and rows["sgd"]["target_met"] is False
    assert rows["sgd"]["vs_torch_fastest"] == 0.9 and rows["sgd"]["torch_fastest"] == "torch_fused"
    assert rows["rmsprop"]["target_met"] is True
    assert rows["rmsprop"]["vs_torch_fastest"] == 3.2
    assert rows["rmsprop"]["torch_fastest"] == "torch_forloop"
    assert rows["lion"]["target"] == ">= 95% roofline" and rows["lion"]["target_met"] is True
    assert rows["adam"]["target"] is None and rows["adam"]["target_met"] is None
    text = "\n".join(bench.format_summary(bench.rule_summary(recs)))
    assert "NO" in text and "n/a" in text


def test_bad_optimizer(capsys):
    assert bench.main(["--optimizer", "adam,sophia"]) == 2
    assert "--optimizer" in capsys.readouterr().err


# ----------------------------------------------------------------------------- formats

from fastadam.bench import formats as bench_formats  # noqa: E402

FORMATS_ARGV = [
    "--formats",
    "--sizes",
    "1e4",
    "--models",
    "none",
    "--threads",
    "1",
    "--repeats",
    "3",
    "--batch-time",
    "0.002",
    "--max-time",
    "0.1",
]


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "formats.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "fastadam", "bench", *FORMATS_ARGV, "--json", str(path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    with open(path) as f:
        data = json.load(f)
    return data, proc.stdout, elapsed, path


def test_formats_json_keys(formats_run):
    data, out, elapsed, _ = formats_run
    assert elapsed < 120  # about 25 s on 2 cores with DeepSpeed and bitsandbytes
    assert data["schema"] == bench_formats.SCHEMA
    assert set(data) == {
        "schema",
        "created",
        "elapsed_s",
        "machine",
        "versions",
        "settings",
        "notes",
        "rows",
        "peers",
        "results",
        "targets",
    }
    assert {"deepspeed", "bitsandbytes", "ml_dtypes", "torch", "fastadam"} <= set(data["versions"])
    st = data["settings"]
    assert st["sizes"] == [10_000] and st["models"] == [] and st["threads"] == [1]
    assert st["hyperparameters"] == {
        "lr": 1e-3,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "weight_decay": 1e-2,
    }
    assert st["rows"] == bench_formats.ROW_ORDER
    rows = data["rows"]
    assert {k: rows[k]["bytes_per_elem"] for k in bench_formats.FORMATS} == {
        "fastadam_f32": 28,
        "fastadam_f32_8bit": 16.0625,
        "fastadam_bf16": 14,
        "fastadam_bf16_sr": 14,
        "fastadam_bf16_master": 28,
        "fastadam_bf16_master_8bit": 16.0625,
    }
    assert rows["fastadam_bf16_master"]["roofline_bytes_per_elem"] == 30  # p16 read too
    assert rows["deepspeed_engine"]["bytes_per_elem"] == 40
    # every row is measured or says why not; fastadam's float32 row always runs
    assert set(data["peers"]) == set(st["rows"])
    recs = {r["impl"]: r for r in data["results"]}
    assert recs["fastadam_f32"]["status"] == "ok"
    for key, why in data["peers"].items():
        if why is None:
            assert key in recs
    for r in data["results"]:
        assert {"workload", "n_elems", "threads", "impl", "label", "status"} <= set(r)
        if r["status"] != "ok":
            assert r["note"]
            continue
        assert r["sec_per_step"] > 0 and r["sec_q1"] <= r["sec_per_step"] <= r["sec_q3"]
        assert r["gbps"] == pytest.approx(
            r["bytes_per_elem"] * r["n_elems"] / r["sec_per_step"] / 1e9
        )
        if r["impl"] in bench_formats.FORMATS:
            assert {
                "resident_bytes_per_param",
                "resident_declared",
                "pct_roofline",
                "vs",
                "vs_fp32_best",
                "fp32_best_of",
                "roofline_bytes_per_elem",
            } <= set(r)
            assert r["resident_bytes_per_param"] == pytest.approx(r["resident_declared"])
            assert r["pct_roofline"] > 0
            if r["fp32_best_of"]:
                assert r["vs_fp32_best"] > 0
    assert recs["fastadam_f32"]["resident_bytes_per_param"] == 8
    for t in data["targets"]:
        assert {
            "impl",
            "workload",
            "threads",
            "metric",
            "value",
            "target",
            "threshold",
            "met",
        } <= set(t)
    metrics = {(t["impl"], t["metric"]) for t in data["targets"]}
    assert ("fastadam_f32", "pct_roofline") in metrics
    if recs.get("fastadam_bf16_master", {}).get("status") == "ok":
        assert ("fastadam_bf16_master", "vs deepspeed_engine") in metrics
    assert "== 1e4" in out and "== targets of issue 10" in out


# The JSON schema of `python -m fastadam bench --formats` (fastadam-bench-formats/1), pinned
# key by key (the top-level keys: test_formats_json_keys).
FORMATS_SETTINGS_KEYS = {
    "sizes",
    "models",
    "threads",
    "rows",
    "roofline",
    "repeats",
    "batch_time",
    "max_time",
    "warm_time",
    "max_memory",
    "aligned",
    "quick",
    "seed",
    "argv",
    "hyperparameters",
}
FORMAT_ROW_KEYS = {
    "kind",
    "label",
    "param",
    "grad",
    "master_weights",
    "state_dtype",
    "rounding",
    "options",
    "streams",
    "bytes_per_elem",
    "roofline_of",
    "roofline_streams",
    "roofline_bytes_per_elem",
}
FORMAT_RECORD_KEYS = {  # an "ok" record of a fastadam format
    "workload",
    "workload_label",
    "kind",
    "n_tensors",
    "n_elems",
    "threads",
    "impl",
    "label",
    "row_kind",
    "bytes_per_elem",
    "group",
    "groups",
    "status",
    "sec_per_step",
    "sec_q1",
    "sec_q3",
    "sec_min",
    "sec_max",
    "iqr_rel",
    "batches",
    "steps_per_batch",
    "warmup_steps",
    "capped",
    "samples",
    "rounds",
    "elems_per_s",
    "gbps",
    "resident_bytes_per_param",
    "resident_declared",
    "roofline_bytes_per_elem",
    "pct_roofline",
    "vs",
    "fp32_best_of",
    "vs_fp32_best",
    "cell_seconds",
    "others_cpu",
}
TARGET_KEYS = {
    "impl",
    "label",
    "workload",
    "workload_label",
    "threads",
    "metric",
    "value",
    "target",
    "threshold",
    "met",
    "others_cpu",
}


def test_formats_json_keys_pinned(formats_run):
    data = formats_run[0]
    assert set(data["settings"]) == FORMATS_SETTINGS_KEYS
    assert set(data["rows"]) == set(bench_formats.ROW_ORDER)
    for key in bench_formats.FORMATS:
        assert set(data["rows"][key]) == FORMAT_ROW_KEYS, key
    recs = {r["impl"]: r for r in data["results"]}
    assert set(recs["fastadam_f32"]) == FORMAT_RECORD_KEYS
    assert data["targets"] and all(set(t) == TARGET_KEYS for t in data["targets"])


def test_formats_load_reprints(formats_run, capsys):
    _, out, _, path = formats_run
    assert bench.main(["--load", str(path)]) == 0
    assert capsys.readouterr().out == out


def test_formats_groups_fit_and_keep_families():
    n, gib = 10**8, 2**30
    keys = bench_formats.ROW_ORDER
    groups, too_big, anchors = bench_formats.plan_groups(keys, n, 12 * gib, 6 * n)
    assert anchors == ["torch_fused", "deepspeed"] and not too_big
    assert all(with_anchors for _, with_anchors in groups)
    assert sorted(k for g, _ in groups for k in g) == sorted(
        k for k in keys if k not in bench_formats.ANCHORS
    )
    for fam in bench_formats.FAMILIES:  # each family in one group
        assert sum(any(k in g for k in fam) for g, _ in groups) == 1
    # 7 GiB: more groups; the master family (targets against DeepSpeed's bf16 modes) stays
    # whole, without the float32 anchors
    groups, too_big, _ = bench_formats.plan_groups(keys, n, 7 * gib, 6 * n)
    assert not too_big and len(groups) > 3
    fam = bench_formats.FAMILIES[3]
    assert (fam, False) in groups
    for g, with_anchors in groups:
        assert with_anchors or g == fam
    groups, too_big, anchors = bench_formats.plan_groups(keys, n, 1 * gib, 6 * n)
    assert anchors == [] and "torch_fused" in too_big


def test_formats_roofline_streams():
    """A format's roofline moves its own streams at their element sizes (grad second), each
    page written before it is timed: a never-written stream would be read from the
    kernel's shared zero page, from cache."""
    from fastadam import _core

    fmt = bench_formats.FORMATS["fastadam_bf16_master"]
    assert fmt.roof_sizes == [2, 2, 4, 4, 4] and fmt.roof_bytes_per_elem == 30
    roof = bench_formats.FormatRoofline(fmt, 5000, 1, 0)
    fn, (arrays, threads) = roof.call
    if roof.exact:
        assert fn is _core.traffic and [a.itemsize for a in arrays] == fmt.roof_sizes
    else:
        assert fn is _core.traffic_f32 and len(arrays) == 4
    assert all(np.all(a.view(np.uint8).reshape(-1, a.itemsize).any(axis=1)) for a in arrays)
    fn(arrays, threads)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--formats", "--optimizer", "sgd"], "--optimizer"),
        (["--formats", "--dtype", "float64"], "--dtype"),
        (["--formats", "nosuchformat"], "--formats"),
        (["--formats", "--sizes", "none", "--models", "none"], "nothing to measure"),
    ],
)
def test_formats_bad_arguments(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def _adamw_reference(p0, grads, steps):
    """AdamW in float64 (torch's formulation) from p0 with the same gradient every step."""
    lr, (b1, b2), eps, wd = bench.LR, bench.BETAS, bench.EPS, bench_formats.WD
    out = []
    for p, g in zip(p0, grads):
        p, m, v = p.copy(), np.zeros_like(p), np.zeros_like(p)
        for t in range(1, steps + 1):
            p *= 1 - lr * wd
            m = b1 * m + (1 - b1) * g
            v = b2 * v + (1 - b2) * g * g
            p -= lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
        out.append(p)
    return out


@pytest.mark.parametrize("key", bench_formats.DISPLAY_ORDER)
def test_formats_rows_compute_adamw(key):
    """Every row that runs here is AdamW with the same hyperparameters: after 3 steps its
    parameters moved as float64 AdamW moves them (float32 rows to rounding; 16-bit
    parameters and 8-bit moments: the same direction and size, within their rounding)."""
    torch = (
        pytest.importorskip("torch") if key not in bench_formats.FORMATS else bench._import_torch()
    )
    why = bench_formats.probe(key, torch)
    if why is not None:
        if key == "fastadam_f32":
            pytest.fail(why)
        pytest.skip(why)
    wl = bench.Workload("t", "t", [(5000,), (300,)], "model")
    data = bench_formats.Data(wl, 0, False, torch, need_bf16=True)
    obj = bench_formats._make(key, wl, data, 1, 0, False)
    p0 = obj.values()
    spec = bench_formats.SPECS[key]
    grads = [
        g.astype(np.float64)
        if spec.grad == "float32"
        else g.view(np.int16)
        .astype(np.int32)
        .__lshift__(16)
        .astype(np.uint32)
        .view(np.float32)
        .astype(np.float64)
        for g in (data.g32 if spec.grad == "float32" else data.g16)
    ]
    fn, args = obj.call
    for _ in range(3):
        fn(*args)
    ref = _adamw_reference(p0, grads, 3)
    exact = key in ("fastadam_f32", "torch_fused", "deepspeed")
    for p, q, r in zip(obj.values(), p0, ref):
        d, dr = p - q, r - q
        if exact:
            np.testing.assert_allclose(d, dr, rtol=1e-4, atol=1e-8)
        else:
            assert np.corrcoef(d, dr)[0, 1] > 0.95
            assert 0.8 < np.linalg.norm(d) / np.linalg.norm(dr) < 1.25
    if torch is not None:
        torch.set_num_threads(torch.get_num_threads())
