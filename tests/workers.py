"""Scenarios that could crash, hang or need signals: tests/test_reliability.py runs each
in its own interpreter (``python tests/workers.py NAME``) under a timeout, so that a
regression fails one test instead of killing the test run. Each prints "ok" last and
exits 0 when everything held; an assertion error exits non-zero with its message.
"""

import os
import signal
import sys
import threading

import numpy as np

import fastadam

N_BIG = 2_000_000  # > 2 x the default chunk: the pass is threaded; 8 MB: freed by munmap


def _exact(params, **kw):
    """An Adam whose every step moves each element by exactly -lr: beta1 = beta2 = 0 and no
    bias correction make m/sqrt(v) = g/|g| = 1, and lr = 2**-10 keeps every sum exact, so
    that a lost or doubled update shows as a wrong value whatever the order of steps."""
    return fastadam.Adam(
        params, lr=2.0**-10, betas=(0.0, 0.0), eps=0.0, bias_correction=False, **kw
    )


def grads_dropped_during_step():
    """Another thread empties (or overwrites) the grads list while the step runs in C:
    the step must keep every gradient alive until it returns (without that, the 8 MB
    gradient is unmapped under the kernel: SIGSEGV)."""
    p = np.zeros(N_BIG, np.float32)
    opt = _exact([p], num_threads=2)
    steps = 30
    for k in range(steps):
        grads = [np.ones(N_BIG, np.float32)]
        started = threading.Event()

        def run(started=started, grads=grads):
            started.set()
            opt.step(grads)

        t = threading.Thread(target=run)
        t.start()
        started.wait()
        if k % 2:
            grads.clear()
        else:
            grads[0] = None
        t.join()
    # every step saw its gradient: each moved p by exactly -lr
    assert np.all(p == np.float32(-steps * 2.0**-10)), np.unique(p)
    assert opt.state_dict()["step_count"] == steps


def torch_grads_dropped_during_step():
    """fastadam.torch: every .grad is dropped (p.grad = None, as zero_grad does, from
    another thread) after the step has read them and before its C call: the step must
    own a reference to each until the call returns (else the 8 MB gradients are unmapped
    under the kernel: SIGSEGV). The other thread acts at that exact point because torch
    itself crashes when one thread reads p.grad while another assigns it (torch 2.13,
    without fastadam), so a free-running race would test torch, not fastadam."""
    import gc

    import torch

    import fastadam.torch as ft

    ps = [
        torch.zeros(N_BIG, requires_grad=True),
        torch.zeros(N_BIG, dtype=torch.float64, requires_grad=True),
    ]
    opt = ft.Adam(ps, lr=2.0**-10, betas=(0.0, 0.0), eps=0.0, num_threads=2)
    real = fastadam._core.step_plans

    def drop_then_step(*args):
        def drop():
            for p in ps:
                p.grad = None
            gc.collect()

        t = threading.Thread(target=drop)
        t.start()
        t.join()
        return real(*args)

    fastadam._core.step_plans = drop_then_step
    steps = 10
    for _ in range(steps):
        for p in ps:
            p.grad = torch.ones_like(p)
        opt.step()
        assert all(p.grad is None for p in ps)
    # with beta = 0 the bias corrections are 1: each step moved p by exactly -lr
    for p in ps:
        assert torch.all(p.detach() == -steps * 2.0**-10)
        assert float(opt.state[p]["step"]) == steps


def one_optimizer_many_threads():
    """Four threads step one optimizer 25 times each: every step lands exactly once."""
    p = np.zeros(N_BIG // 2, np.float32)
    q = np.zeros(1000, np.float64)  # and a small float64 optimizer, stepped in between
    opt = _exact([p], num_threads=2)
    g = [np.ones_like(p)]
    small = fastadam.Adam([q], lr=2.0**-10, betas=(0.0, 0.0), eps=0.0, bias_correction=False)
    gs = [np.ones_like(q)]

    def run():
        for _ in range(25):
            opt.step(g)
            small.step(gs)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.all(p == np.float32(-100 * 2.0**-10)), np.unique(p)
    assert np.all(q == -100 * 2.0**-10), np.unique(q)
    sd = opt.state_dict()
    assert sd["step_count"] == 100 and sd["state"][0]["step"] == 100, sd["step_count"]
    assert small.state_dict()["step_count"] == 100


def two_optimizers_share_a_buffer():
    """Two optimizers over the same array, stepped from two threads: their passes never
    interleave (a read-modify-write of one would otherwise overwrite the other's)."""
    p = np.zeros(N_BIG, np.float32)
    a, b = _exact([p], num_threads=2), _exact([p], num_threads=2)
    g = [np.ones_like(p)]
    threads = [threading.Thread(target=lambda o=o: [o.step(g) for _ in range(40)]) for o in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.all(p == np.float32(-80 * 2.0**-10)), np.unique(p)


def functional_many_threads():
    """adam_step from many threads on one shared parameter: every call lands once."""
    p = np.zeros(N_BIG // 2, np.float32)
    g = np.ones_like(p)
    kw = dict(lr=2.0**-10, betas=(0.0, 0.0), eps=0.0, bias_correction=False)

    def run():
        m, v = np.zeros_like(p), np.zeros_like(p)
        for t in range(1, 21):
            fastadam.adam_step(p, g, m, v, step=t, **kw)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert np.all(p == np.float32(-60 * 2.0**-10)), np.unique(p)


def _child_steps(opt, g, expect):
    """In a forked child: step with threads requested, check, exit with a status."""
    try:
        opt.step(g)
        assert fastadam._core.forked()
        ok = np.all(opt._params[0] == np.float32(expect))
        os._exit(0 if ok else 3)
    except BaseException:
        os._exit(4)


def fork_after_threaded_step():
    """os.fork() after a multithreaded step: the child's step must not wait for GNU
    OpenMP's thread pool, which does not exist in a child (without the fork handler the
    child hangs for ever); twice, and from a child of a child."""
    p = np.zeros(N_BIG, np.float32)
    opt = _exact([p], num_threads=2)
    g = [np.ones_like(p)]
    opt.step(g)
    for expect in (-2, -3):
        pid = os.fork()
        if pid == 0:
            _child_steps(opt, g, expect * 2.0**-10)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        opt.step(g)  # the parent still steps, threaded
    assert not fastadam._core.forked()
    assert np.all(p == np.float32(-3 * 2.0**-10))
    pid = os.fork()
    if pid == 0:  # a grandchild
        pid2 = os.fork()
        if pid2 == 0:
            _child_steps(opt, g, -4 * 2.0**-10)
        _, status = os.waitpid(pid2, 0)
        os._exit(os.waitstatus_to_exitcode(status))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status


def _mp_child(conn, opt, g):
    opt.step(g)
    conn.send((fastadam._core.forked(), float(opt._params[0][0])))


def multiprocessing_fork_start_method():
    """multiprocessing's 'fork' start method after a threaded step, and a fork while
    another thread is in the middle of steps (the child must not inherit a held lock)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    p = np.zeros(N_BIG, np.float32)
    opt = _exact([p], num_threads=2)
    g = [np.ones_like(p)]
    opt.step(g)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_mp_child, args=(child, opt, g))
    proc.start()
    forked, value = parent.recv()
    proc.join(60)
    assert proc.exitcode == 0 and forked and value == -2 * 2.0**-10, (proc.exitcode, value)
    # Fork while a second thread keeps stepping another optimizer.
    q = np.zeros(N_BIG, np.float32)
    busy = _exact([q], num_threads=2)
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            busy.step(g)

    t = threading.Thread(target=spin)
    t.start()
    try:
        for _ in range(5):
            proc = ctx.Process(target=_mp_child, args=(child, busy, g))
            proc.start()
            forked, value = parent.recv()
            proc.join(60)
            assert proc.exitcode == 0 and forked, proc.exitcode
    finally:
        stop.set()
        t.join()
    # no step of the spinning thread was lost or torn
    n = busy.state_dict()["step_count"]
    assert np.all(q == np.float32(-n * 2.0**-10)), (n, np.unique(q))


def _interrupt_storm(make, step, state_of, steps=3000):
    """Run `steps` steps while SIGALRM raises KeyboardInterrupt wherever the main thread
    is, about once per step; a step that it cut short is retried. Returns the optimizer
    and the number of interrupts."""
    import time

    probe = make()
    t0 = time.perf_counter()
    for _ in range(50):
        step(probe)
        state_of(probe)
    interval = max(50e-6, 1.5 * (time.perf_counter() - t0) / 50)
    opt = make()
    interrupts = 0
    armed = [False]  # an interrupt only inside the try below, one at a time

    def interrupt(*args):
        if armed[0]:
            armed[0] = False
            raise KeyboardInterrupt

    signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, interval, interval)
    in_a_row = 0  # interrupts of the current step
    try:
        while True:
            try:
                # A step that takes longer than the interval (the first one, which makes
                # the state, on a loaded machine) would be cut short for ever: after 3
                # interrupts in a row, one attempt runs unarmed, so the storm always
                # makes progress.
                armed[0] = in_a_row < 3
                if state_of(opt)[0] >= steps:
                    armed[0] = False
                    break
                step(opt)
                armed[0] = False
                in_a_row = 0
            except KeyboardInterrupt:
                interrupts += 1
                in_a_row += 1
    finally:
        armed[0] = False
        signal.setitimer(signal.ITIMER_REAL, 0, 0)
    return opt, interrupts


def interrupts_keep_counts_consistent():
    """KeyboardInterrupt raised around steps (about once per step): whatever step it cuts
    short, the counters (the optimizer's, which drives the lr schedule, and each
    parameter's) must agree with the buffers, so the final state equals that of an
    uninterrupted run bit for bit."""
    rng = np.random.default_rng(0)
    g = [rng.standard_normal(300).astype(np.float32), rng.standard_normal(7)]
    g = [g[0], g[0][:7].copy()]

    def make():
        return fastadam.Adam(
            [np.zeros(300, np.float32), np.zeros(7, np.float32)], lr=lambda t: 1e-3 / t**0.5
        )

    def counts(o):
        sd = o.state_dict()
        return sd["step_count"], [e["step"] for e in sd["state"].values()]

    opt, interrupts = _interrupt_storm(make, lambda o: o.step(g), counts)
    clean = make()
    for _ in range(counts(opt)[0]):
        clean.step(g)
    assert interrupts > 100, interrupts
    assert counts(opt) == counts(clean), (counts(opt), counts(clean))
    for a, b in zip(opt._params, clean._params):
        assert np.array_equal(a, b), "an interrupted step left the counts behind the buffers"


def family_interrupts_keep_counts_consistent():
    """As interrupts_keep_counts_consistent, for a rule with per-parameter scalar state
    (NAdam's mu_product) and the temporal average's count, and for SGD, whose first
    step differs (buf = g): everything an interrupt could leave behind is compared."""
    rng = np.random.default_rng(1)
    g = [rng.standard_normal(300).astype(np.float32), rng.standard_normal(7).astype(np.float32)]
    for cls, kw in (
        (fastadam.NAdam, dict(lr=1e-3, ema_decay=0.9)),
        (fastadam.SGD, dict(lr=1e-3, momentum=0.9, dampening=0.5, ema_decay=0.5)),
    ):

        def make(cls=cls, kw=kw):
            return cls([np.zeros(300, np.float32), np.zeros(7, np.float32)], **kw)

        def counts(o):
            sd = o.state_dict()
            return sd["step_count"], [
                (e.get("step"), e.get("mu_product"), e["param_ema_step"])
                for e in sd["state"].values()
            ]

        opt, interrupts = _interrupt_storm(make, lambda o: o.step(g), counts, steps=1500)
        clean = make()
        for _ in range(counts(opt)[0]):
            clean.step(g)
        assert interrupts > 50, interrupts
        assert counts(opt) == counts(clean), (cls, counts(opt), counts(clean))
        for a, b in zip(opt._params, clean._params):
            assert np.array_equal(a, b), cls
        for s, t in zip(opt.state, clean.state):
            for k in s:
                assert np.array_equal(s[k], t[k]), (cls, k)


def torch_interrupts_keep_counts_consistent():
    import torch

    import fastadam.torch as ft

    def make():
        ps = [torch.zeros(300, requires_grad=True), torch.zeros(7, requires_grad=True)]
        for p, s in zip(ps, (0.5, -2.0)):
            p.grad = torch.full_like(p, s)
        return ft.Adam(ps, lr=1e-3)

    def step(o):
        o.step()

    def counts(o):
        return [
            float(o.state[p]["step"]) if o.state else 0.0
            for g in o.param_groups
            for p in g["params"]
        ]

    opt, interrupts = _interrupt_storm(make, step, counts, steps=2000)
    clean = make()
    for _ in range(int(counts(opt)[0])):
        clean.step()
    assert interrupts > 100, interrupts
    assert counts(opt) == counts(clean)
    for a, b in zip(opt.param_groups[0]["params"], clean.param_groups[0]["params"]):
        assert torch.equal(a, b)


def resized_under_the_optimizer():
    """ndarray.resize(refcheck=False) reallocates a parameter (or a state array) between
    steps: the step must notice the new pointer and refuse, never read or write the
    freed memory."""
    p = np.zeros(1_000_000, np.float32)
    opt = fastadam.Adam([p])
    g = [np.ones_like(p)]
    opt.step(g)
    p.resize(3_000_000, refcheck=False)
    try:
        opt.step([np.ones_like(p)])
    except ValueError as e:
        assert "param group 0, params[0]" in str(e) and "size" in str(e), e
    else:
        raise AssertionError("a resized parameter was stepped")
    p.resize(1_000_000, refcheck=False)  # same size again: accepted, state kept
    opt.step(g)
    assert opt.state_dict()["state"][0]["step"] == 2
    m = opt._states[0]["exp_avg"]
    m.dtype = np.float64  # the same bytes seen as half as many float64
    try:
        opt.step(g)
    except ValueError as e:
        assert "'exp_avg' is a (500000,) float64 array" in str(e), e
    else:
        raise AssertionError("a state array of another dtype was stepped")


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    print("ok")
