#!/usr/bin/env python
"""The optimizer inside the engines: DeepSpeed ZeRO-2 offload and FSDP2, 2 ranks on the CPU.

Trains a transformer (pre-LayerNorm ``torch.nn.TransformerEncoderLayer`` blocks on random
inputs, MSE loss) for a few steps on a two-rank gloo mesh on 127.0.0.1, each rank with
--threads threads (default: the CPUs / 2), and times, per step:

    optimizer    the client optimizer's step() as the engine calls it (DeepSpeed: the
                 optimizer ZeRO wraps, over this rank's fp32 partition; FSDP2: the
                 optimizer over the DTensor shards)
    ZeRO norm + clip, rest of engine.step, engine.step
                 DeepSpeed only: engine.step() is the optimizer plus ZeRO's own passes: the
                 global gradient norm and the unscale/clip pass over the fp32 gradient
                 partition (timed), and the rest (the copy of the updated fp32 partition
                 into the 16-bit parameters, the all-gather of the parameters, buffer resets)
    whole step   forward + backward + step (+ zero_grad)

Engines and optimizers:

    deepspeed   ZeRO-2, offload_optimizer to the CPU, --dtype (default bf16: fp32 masters):
                DeepSpeedCPUAdam (its JIT-compiled AVX kernel; built once here, ~1 min the
                first time) and fastadam.torch.AdamW (client optimizer, with
                zero_force_ds_cpu_optimizer false and zero_allow_untested_optimizer true)
    fsdp2       fully_shard per block and at the root, fp32 shards (--dtype bf16: bf16
                compute through MixedPrecisionPolicy): torch.optim.AdamW fused, foreach and
                for-loop, and fastadam.torch.AdamW (needs fastadam.torch's DTensor support;
                reported as an error where it is missing)

Every optimizer of an engine has its own model copy (same seed) in the same two processes;
they run interleaved: in each round every optimizer trains --steps-per-round steps, in an
order that rotates from round to round, after --warmup untimed steps each. A step's time is
the slower rank's (the ranks synchronise each step). The table gives medians and the
interquartile range over all timed steps.

    python bench/engines.py                         # both engines, a few minutes on 2 cores
    python bench/engines.py --engines deepspeed --d-model 256 --layers 4 --rounds 3  # quick
    python bench/engines.py --json engines.json

Not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

DS_VARIANTS = ("DeepSpeedCPUAdam", "fastadam")
FSDP_VARIANTS = ("torch fused", "torch foreach", "torch for-loop", "fastadam")


# ---------------------------------------------------------------------------------- ranks
def _model(args, torch):
    torch.manual_seed(0)
    layer = lambda: torch.nn.TransformerEncoderLayer(  # noqa: E731
        args.d_model, args.heads, 4 * args.d_model, dropout=0.0, batch_first=True, norm_first=True
    )
    return torch.nn.Sequential(
        *[layer() for _ in range(args.layers)], torch.nn.LayerNorm(args.d_model)
    )


def _data(args, torch, rank, dtype):
    g = torch.Generator().manual_seed(1 + rank)
    x = torch.randn(args.batch, args.seq, args.d_model, generator=g)
    y = torch.randn(args.batch, args.seq, args.d_model, generator=g)
    return x.to(dtype), y.to(dtype)


def _quiet_deepspeed():
    """Import DeepSpeed with its log lines on stderr and at WARNING; skip the JIT build of
    its shared-memory all-reduce (only inference_all_reduce uses it; training's collectives
    are gloo's); ask py-cpuinfo once (DeepSpeedCPUAdam's constructor runs it, ~2 s)."""
    import functools
    import logging

    with contextlib.redirect_stdout(sys.stderr):
        import deepspeed
        import deepspeed.comm.torch
    # (deepspeed.comm.torch as an attribute is torch itself: the module is in sys.modules)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    try:
        import cpuinfo

        if not hasattr(cpuinfo.get_cpu_info, "cache_info"):
            cpuinfo.get_cpu_info = functools.lru_cache(maxsize=1)(cpuinfo.get_cpu_info)
    except ImportError:
        pass
    return deepspeed


def _timed(obj, name, sink):
    """Wrap obj.name (a method) so that each call's duration is added to sink[0]."""
    inner = getattr(obj, name)

    def wrapper(*a, **kw):
        t0 = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            sink[0] += time.perf_counter() - t0

    setattr(obj, name, wrapper)


def _deepspeed_runs(args, torch, rank):
    deepspeed = _quiet_deepspeed()
    import fastadam.torch as ft

    deepspeed.init_distributed(dist_backend="gloo")
    bf16 = args.dtype == "bf16"
    runs = {}
    for name in args.variants:
        model = _model(args, torch)
        kw = dict(lr=1e-4, weight_decay=0.01)
        if name == "fastadam":
            opt = ft.AdamW(model.parameters(), num_threads=args.threads, **kw)
        else:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(model.parameters(), adamw_mode=True, **kw)
        cfg = {
            "train_micro_batch_size_per_gpu": args.batch,
            "steps_per_print": 10**9,
            "gradient_clipping": args.clip,
            "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
            "zero_force_ds_cpu_optimizer": False,
            "zero_allow_untested_optimizer": True,
        }
        if bf16:
            cfg["bf16"] = {"enabled": True}
        with contextlib.redirect_stdout(sys.stderr):
            engine, zero_opt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        opt_s, clip_s = [0.0], [0.0]
        _timed(zero_opt.optimizer, "step", opt_s)  # the client optimizer ZeRO calls
        # ZeRO's gradient passes around it: the global norm, then unscale and clip
        _timed(zero_opt, "scaled_global_norm", clip_s)
        _timed(zero_opt, "unscale_and_clip_grads", clip_s)
        x, y = _data(args, torch, rank, torch.bfloat16 if bf16 else torch.float32)

        def step(engine=engine, x=x, y=y, opt_s=opt_s, clip_s=clip_s):
            opt_s[0] = clip_s[0] = 0.0
            t0 = time.perf_counter()
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            t1 = time.perf_counter()
            engine.step()
            t2 = time.perf_counter()
            return (opt_s[0], clip_s[0], t2 - t1, t2 - t0), loss.item()

        runs[name] = step
    numel = sum(p.numel() for p in _model(args, torch).parameters())
    return runs, numel


def _fsdp2_runs(args, torch, rank):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    import fastadam.torch as ft

    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if args.dtype == "bf16" else None
    runs, errors = {}, {}
    for name in args.variants:
        model = _model(args, torch)
        extra = {"mp_policy": mp} if mp is not None else {}
        for block in model[:-1]:
            fully_shard(block, mesh=mesh, **extra)
        fully_shard(model, mesh=mesh, **extra)
        kw = dict(lr=1e-4, weight_decay=0.01)
        if name == "fastadam":
            opt = ft.AdamW(model.parameters(), num_threads=args.threads, **kw)
        else:
            mode = {
                "torch fused": "fused",
                "torch foreach": "foreach",
                "torch for-loop": "foreach",
            }[name]
            opt = torch.optim.AdamW(model.parameters(), **kw, **{mode: name != "torch for-loop"})
        x, y = _data(args, torch, rank, torch.float32)

        def step(model=model, opt=opt, x=x, y=y):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            return (t2 - t1, None, None, t2 - t0), loss.item()

        try:  # one step: an optimizer that cannot run under FSDP2 is reported, not timed
            step()
        except Exception as e:
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            continue
        runs[name] = step
    numel = sum(p.numel() for p in _model(args, torch).parameters())
    return runs, numel, errors


def rank_main(args):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    rank = int(os.environ["RANK"])
    if args.engine == "deepspeed":
        runs, numel = _deepspeed_runs(args, torch, rank)
        errors = {}
    else:
        runs, numel, errors = _fsdp2_runs(args, torch, rank)
    names = [n for n in args.variants if n in runs]
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    for n in names:
        for _ in range(args.warmup):
            runs[n]()
    t_start = time.perf_counter()
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if names else []
        for n in order:
            for _ in range(args.steps_per_round):
                t, loss = runs[n]()
                times[n].append(t)
                losses[n].append(loss)
    elapsed = time.perf_counter() - t_start
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, times)
    if rank == 0:
        # a step lasts as long as its slower rank
        slow = {
            n: [
                tuple(None if v[0] is None else max(v) for v in zip(*col))
                for col in zip(*(g[n] for g in gathered))
            ]
            for n in names
        }
        with open(args.out, "w") as f:
            json.dump(
                {
                    "engine": args.engine,
                    "numel": numel,
                    "elapsed": elapsed,
                    "times": slow,
                    "losses": losses,
                    "errors": errors,
                    "threads": args.threads,
                },
                f,
            )
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------- parent
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, engine, out, timeout):
    """Run this script's rank mode as 2 processes (own process groups, killed on a timeout
    or a failure); the rank-0 JSON."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        WORLD_SIZE="2",
        OMP_NUM_THREADS=str(args.threads),
        DS_ACCELERATOR="cpu",
    )
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    variants = args.ds_variants if engine == "deepspeed" else args.fsdp_variants
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--rank-engine",
        engine,
        "--out",
        out,
        "--variants",
        ",".join(variants),
    ] + args.passthrough
    procs = []
    try:
        for r in range(2):
            procs.append(
                subprocess.Popen(
                    cmd,
                    env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    start_new_session=True,
                )
            )
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        sys.exit(f"{engine}: the ranks did not finish in {timeout} s")
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
    if any(p.returncode for p in procs):
        sys.exit(f"{engine}: a rank failed:\n" + "\n---\n".join(o[-5000:] for o in outs))
    with open(out) as f:
        return json.load(f)


def _quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")  # within the samples' range
    return q[0], statistics.median(xs), q[2]


def _cell(xs):
    lo, med, hi = _quartiles([x * 1e3 for x in xs])
    return f"{med:.1f} [{lo:.1f}-{hi:.1f}]", med


def _table(res, reference):
    """Columns (ms): the client optimizer's step; DeepSpeed also: ZeRO's norm and clip
    passes, the rest of engine.step() (copy of the fp32 partition into the 16-bit
    parameters, all-gather, buffer resets), engine.step() in all; the whole training step."""
    names = list(res["times"])
    zero = res["engine"] == "deepspeed"
    head = ["optimizer", "optimizer (ms)"]
    if zero:
        head += ["ZeRO norm + clip (ms)", "rest of engine.step (ms)", "engine.step (ms)"]
    head += ["whole step (ms)", "optimizer share of step", f"optimizer speedup over {reference}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    meds = {}
    for n in names:
        opt, clip, eng, whole = (list(c) for c in zip(*res["times"][n]))
        o, meds[n] = _cell(opt)
        row = [n, o]
        if zero:
            row += [
                _cell(clip)[0],
                _cell([a - b - d for a, b, d in zip(eng, opt, clip)])[0],
                _cell(eng)[0],
            ]
        w, wmed = _cell(whole)
        ref = meds.get(reference)
        row += [
            w,
            f"{meds[n] / wmed:.0%}",
            f"{ref / meds[n]:.2f}x" if ref and n != reference else "-",
        ]
        print("| " + " | ".join(row) + " |")
    for n, err in res["errors"].items():
        print("| " + " | ".join([n, err] + [""] * (len(head) - 2)) + " |")
    return meds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default="deepspeed,fsdp2", help="deepspeed, fsdp2 or both")
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2, help="sequences per rank and step")
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument(
        "--dtype",
        choices=["bf16", "fp32"],
        default="bf16",
        help="DeepSpeed: the model's dtype (bf16: fp32 masters); FSDP2: bf16 "
        "compute via MixedPrecisionPolicy (shards and optimizer stay fp32)",
    )
    ap.add_argument(
        "--clip",
        type=float,
        default=1.0,
        help="DeepSpeed's gradient_clipping (its default 1.0; 0: off)",
    )
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps-per-round", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="threads per rank (torch, fastadam, DeepSpeedCPUAdam's OpenMP)",
    )
    ap.add_argument("--timeout", type=int, default=600, help="seconds per engine")
    ap.add_argument("--json", default=None, help="write the raw per-step timings here")
    # rank mode (internal)
    ap.add_argument("--rank-engine", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--variants", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.rank_engine:
        args.engine = args.rank_engine
        args.variants = args.variants.split(",")
        rank_main(args)
        return 0

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in ("deepspeed", "fsdp2"):
            ap.error(f"unknown engine {e!r}")
    args.ds_variants, args.fsdp_variants = DS_VARIANTS, FSDP_VARIANTS
    args.passthrough = [
        f"--d-model={args.d_model}",
        f"--heads={args.heads}",
        f"--layers={args.layers}",
        f"--batch={args.batch}",
        f"--seq={args.seq}",
        f"--dtype={args.dtype}",
        f"--clip={args.clip}",
        f"--rounds={args.rounds}",
        f"--steps-per-round={args.steps_per_round}",
        f"--warmup={args.warmup}",
        f"--threads={args.threads}",
    ]
    import torch

    import fastadam

    cfg = fastadam.config()
    numel = sum(p.numel() for p in _model(args, torch).parameters())
    ntensors = len(list(_model(args, torch).parameters()))
    print(
        f"model: {args.layers} pre-LN TransformerEncoderLayer(d_model {args.d_model}, "
        f"{args.heads} heads, ff {4 * args.d_model}) + LayerNorm: {ntensors} tensors, "
        f"{numel / 1e6:.1f}M parameters; per rank {args.batch} x {args.seq} tokens; "
        f"2 ranks (gloo, 127.0.0.1) x {args.threads} thread(s); {args.dtype}"
    )
    print(
        f"torch {torch.__version__}; fastadam {cfg['version']} (SIMD {cfg['simd']}, "
        f"OpenMP {'on' if cfg['openmp'] else 'off'}); {os.cpu_count()} CPUs"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in engines:
            if engine == "deepspeed":
                try:
                    _quiet_deepspeed()
                except ImportError:
                    print("\nDeepSpeed is not installed: skipped (docs/engines.md)")
                    continue
                # build DeepSpeedCPUAdam's op once here, not in both ranks at once
                from deepspeed.ops.op_builder import CPUAdamBuilder

                t0 = time.perf_counter()
                with contextlib.redirect_stdout(sys.stderr):
                    CPUAdamBuilder().load()
                print(f"DeepSpeedCPUAdam op loaded in {time.perf_counter() - t0:.0f} s")
            sys.stdout.flush()
            res = _launch(args, engine, os.path.join(tmp, f"{engine}.json"), args.timeout)
            results[engine] = res
            if engine == "deepspeed":
                title = (
                    f"DeepSpeed {_version('deepspeed')} ZeRO-2, offload_optimizer cpu, "
                    f"gradient_clipping {args.clip}"
                )
                reference = "DeepSpeedCPUAdam"
            else:
                title = "FSDP2 (fully_shard per layer and root), fp32 shards, " + (
                    "bf16 compute (MixedPrecisionPolicy)"
                    if args.dtype == "bf16"
                    else "fp32 compute"
                )
                fast = [n for n in res["times"] if n.startswith("torch")]
                med = {n: statistics.median(t[0] for t in res["times"][n]) for n in fast}
                reference = min(med, key=med.get) if med else "torch fused"
            steps = args.rounds * args.steps_per_round
            print(
                f"\n{title}: {steps} timed steps per optimizer, interleaved "
                f"({res['elapsed']:.0f} s); medians [IQR], the slower rank's time\n"
            )
            _table(res, reference)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": {
                        k: v
                        for k, v in vars(args).items()
                        if k not in ("ds_variants", "fsdp_variants")
                    },
                    "fastadam": cfg,
                    "torch": torch.__version__,
                    "results": results,
                },
                f,
                indent=1,
            )
    return 0


def _version(module):
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
