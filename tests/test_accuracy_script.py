"""bench/accuracy_formats.py (issue 10's accuracy benchmark): a --quick run end to end in a
subprocess, its table and its JSON; the errors for bad arguments."""

import importlib.util
import json
import pathlib
import subprocess
import sys

import pytest

import fastadam._core as _core

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "accuracy_formats.py"
FORMATS = [
    "fp32",
    "bf16_master",
    "fp32_8bit",
    "bf16_master_8bit",
    "bf16_nearest",
    "bf16_stochastic",
]


def _needs(*mods):
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"bench/accuracy_formats.py needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    _needs("torch", "sklearn", "ml_dtypes")
    if not hasattr(_core, "FMT_BF16"):
        pytest.skip("this build of fastadam has no storage formats (fastadam._core.FMT_BF16)")
    out = tmp_path_factory.mktemp("accuracy") / "acc.json"
    p = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p, json.loads(out.read_text())


def test_quick_json(quick_run):
    _, data = quick_run
    assert data["schema"] == "fastadam-accuracy/1"
    for key in ("created", "elapsed_s", "machine", "versions", "settings", "formats", "workloads"):
        assert key in data
    assert data["settings"]["quick"] is True
    assert list(data["formats"]) == FORMATS
    for f in data["formats"].values():
        assert {
            "label",
            "param_dtype",
            "options",
            "state_bytes_per_param",
            "traffic_bytes_per_element",
        } <= set(f)
    assert set(data["workloads"]) == {"mlp", "lm"}
    for name, w in data["workloads"].items():
        for key in (
            "model",
            "n_params",
            "data",
            "steps",
            "lr",
            "schedule",
            "runs",
            "baseline",
            "summary",
        ):
            assert key in w, (name, key)
        runs = [(r["format"], r["seed"]) for r in w["runs"]]
        assert runs == [("fp32", 0), ("fp32", 1), ("fp32", 2)] + [(f, 0) for f in FORMATS[1:]]
        metrics = ["final_train_loss", "val_loss"] + (["test_accuracy"] if name == "mlp" else [])
        for r in w["runs"]:
            for m in metrics:
                assert isinstance(r[m], float), (name, r["format"], m)
            assert r["curve"][0]["step"] == 0 and r["curve"][-1]["step"] == w["steps"]
            assert not r["diverged"] and r["threads"] in (1, 2)
        for m in metrics:
            b = w["baseline"][m]
            assert len(b["values"]) == 3 and b["min"] <= b["mean"] <= b["max"]
        assert list(w["summary"]) == FORMATS
        assert w["summary"]["fp32"]["within_noise"] is None
        for f in FORMATS[1:]:
            s = w["summary"][f]
            assert {"train_loss", "val_loss", "delta_train", "delta_val"} <= set(s)
            assert isinstance(s["within_noise"], bool)
            assert s["verdict"] in ("within noise", "better", "worse")
            assert len(s["paired_delta_val"]["values"]) == 1
        assert set(w["stochastic_vs_nearest"]) == {"delta_train", "delta_val", "fp32_val_std"}


def test_quick_table(quick_run):
    p, _ = quick_run
    assert "MLP on digits" in p.stdout and "transformer LM" in p.stdout
    for label in (
        "float32 AdamW",
        "bf16 + fp32 master",
        "fp32 + 8-bit moments",
        "bf16, no master, nearest",
        "bf16, no master, stochastic",
    ):
        assert p.stdout.count(label) == 2, label
    assert p.stdout.count("stochastic minus nearest rounding") == 2


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--formats", "fp16"], "unknown format"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--format-seeds", "0"], "--format-seeds must be >= 1"),
        (["--threads", "0"], "--threads must be auto or an integer >= 1"),
        (["--only", "cnn"], "invalid choice"),
    ],
)
def test_bad_arguments(args, msg):
    p = subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2
    assert msg in p.stderr
