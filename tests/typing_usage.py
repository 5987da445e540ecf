"""Typical user code, checked by the type checker in .ci/run (python -m mypy, see
pyproject.toml) against fastadam's annotations, py.typed and the _core stub. Not a test
module (pytest collects test_*.py only); tests/test_typing.py runs it once, in well under a
second, so that it cannot rot into code that does not run either."""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np
from numpy.typing import NDArray

import fastadam
from fastadam import reference


def numpy_loop(steps: int = 3) -> float:
    rng = np.random.default_rng(0)
    w: NDArray[np.float32] = fastadam.aligned_zeros((8, 4))
    b = np.zeros(4, dtype=np.float32)
    opt = fastadam.AdamW([w, b], lr=1e-3, weight_decay=1e-2, max_grad_norm=1.0)
    sched = fastadam.InverseSqrtDecay(1e-3)
    norm = 0.0
    for t in range(steps):
        gw = rng.standard_normal(w.shape).astype(np.float32)
        gb = rng.standard_normal(b.shape).astype(np.float32)
        norm = fastadam.clip_grad_norm_([gw, gb], max_norm=1.0)
        for group in opt.param_groups:
            group["lr"] = sched(t + 1)
        opt.step([gw, gb])
    saved: dict[str, Any] = opt.state_dict()
    again = fastadam.AdamW([w.copy(), b.copy()], lr=1e-3, weight_decay=1e-2)
    again.load_state_dict(pickle.loads(pickle.dumps(saved)))

    # the functional form and the pure-NumPy specification
    p, g = np.ones(5, np.float32), np.full(5, 0.5, np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    fastadam.adam_step(p, g, m, v, step=1, lr=1e-3)
    reference.adam_step(p.copy(), g, m.copy(), v.copy(), step=2, lr=1e-3)

    info: dict[str, Any] = fastadam.config()
    assert isinstance(info["simd"], str)
    sgd: fastadam.SGD = fastadam.SGD([np.zeros(3)], lr=0.1, momentum=0.9, nesterov=True)
    sgd.step([np.ones(3)])
    return norm


def torch_loop(steps: int = 3) -> float:
    import torch

    from fastadam.torch import Adam, Lion

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = Adam(model.parameters(), lr=1e-3, max_grad_norm=1.0, num_threads=2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    # GradScaler on the CPU (enabled only where the device supports it)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x, y = torch.randn(32, 8), torch.randn(32, 1)
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = Adam(model.parameters(), lr=1e-3)
    resumed.load_state_dict(ckpt["opt"])
    lion = Lion(model.parameters(), lr=1e-4, state_dtype="bfloat16")
    lion.step()
    return loss.item()


def main() -> None:
    numpy_loop()
    try:
        import torch  # noqa: F401
    except ImportError:  # the NumPy API needs no torch
        return
    torch_loop()


if __name__ in ("__main__", "__test__"):
    main()
