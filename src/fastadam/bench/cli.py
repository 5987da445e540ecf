"""``python -m fastadam bench`` / ``fastadam-bench``: the arguments (build_parser), their
defaults and validation (resolve), and main.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .impls import IMPL_ORDER, TORCH_IMPLS, _import_torch
from .machine import _mem_available, _read, machine_info, versions
from .measure import _timing_settings, run
from .report import SCHEMA, _json_default, check_matplotlib, format_table, rule_summary, write_plot
from .rules import RULE_MODELS, RULE_ORDER, RULE_SIZES, RULE_SPECS
from .workloads import BETAS, BYTES_PER_ELEM, EPS, LR, MODELS

# ----------------------------------------------------------------------------- arguments


def _parse_list(s, conv, what):
    out = []
    for tok in str(s).split(","):
        tok = tok.strip()
        if tok:
            try:
                out.append(conv(tok))
            except (ValueError, TypeError):
                raise argparse.ArgumentTypeError(f"{what}: cannot read {tok!r}") from None
    return out


def _size(tok):
    x = float(tok)
    if not (x >= 1 and x == int(x)):
        raise ValueError(tok)
    return int(x)


def build_parser(prog=None):
    p = argparse.ArgumentParser(
        prog=prog or "python -m fastadam bench",
        description="Time one Adam step of fastadam against the NumPy reference, an in-place "
        "NumPy Adam and torch.optim.Adam (when installed), interleaved, with the "
        "memory roofline of this machine for the Adam access pattern; "
        "--optimizer does the same for SGD, Adagrad, RMSprop, Adamax, NAdam, "
        "RAdam and Lion.",
        epilog="examples:\n"
        "  %(prog)s                  # the default (about a minute on 2 cores)\n"
        "  %(prog)s --optimizer all  # every rule (Adam's sweep + 1e6, 1e8, 1000 x 1000)\n"
        "  %(prog)s --sizes 1e3,1e6 --models none --threads 1\n"
        "  %(prog)s --dtype float32,float64 --simd all --threads all\n"
        "  %(prog)s --json out.json --plot out.png\n"
        "  %(prog)s --load out.json --plot out.png   # re-print / re-plot a run\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--sizes",
        default=None,
        help="single-tensor sizes, comma separated (default 1e3,1e4,1e5,1e6,1e7,1e8; "
        "'none' for no single tensors)",
    )
    p.add_argument(
        "--models",
        default=None,
        help="model-shaped workloads: gpt2_small, resnet50, many_small (1000 tensors "
        "x 1000), 'all' or 'none' (default all)",
    )
    p.add_argument("--dtype", default=None, help="float32, float64 or both (default float32)")
    p.add_argument(
        "--threads",
        default=None,
        help="thread counts, comma separated; 'max' = OpenMP's maximum, 'all' = "
        "1..max (default 1,max)",
    )
    p.add_argument(
        "--simd",
        default=None,
        help="fastadam SIMD paths: 'auto' (the one in use, default), 'all' (every "
        "path usable here, one row each) or a list such as sse2,avx2",
    )
    p.add_argument(
        "--optimizer",
        default=None,
        metavar="LIST",
        help="update rules, comma separated: "
        + ", ".join(RULE_ORDER)
        + " or 'all' (default adam). Each runs fastadam's class, torch.optim's "
        "for-loop, foreach and (SGD, Adagrad, Adam) fused, the NumPy reference "
        "and a roofline over the rule's own streams; without --sizes/--models "
        "rules other than Adam run 1e6, 1e8 and 1000 x 1000 only",
    )
    p.add_argument(
        "--impls",
        default=None,
        help="implementations besides the roofline: fastadam, reference, numpy, "
        "torch (= torch_fused,torch_foreach,torch_forloop) or any of those "
        "(default: all that can run)",
    )
    p.add_argument("--no-roofline", action="store_true", help="skip the roofline rows")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed batches per implementation and cell (default 7)",
    )
    p.add_argument(
        "--batch-time",
        type=float,
        default=None,
        help="seconds per timed batch; sets the steps per batch (default 0.02)",
    )
    p.add_argument(
        "--max-time",
        type=float,
        default=None,
        help="seconds of timed batches per implementation and cell, after which a "
        "slow implementation stops at >= 3 batches (default 1.5)",
    )
    p.add_argument(
        "--slow-limit",
        type=float,
        default=None,
        help="run the slow implementations (torch for-loop and foreach, both NumPy "
        "ones) only up to this many elements per workload, to keep the default "
        "run short (default 3e7: 1e8 and GPT-2 small run fastadam, torch fused "
        "and the roofline only; 0 = no limit)",
    )
    p.add_argument(
        "--numpy-all-threads",
        action="store_true",
        help="measure the single-threaded NumPy implementations at every thread "
        "count (default: at the first one only)",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        help="GiB the buffers of one group of implementations may take (default "
        "min(6, 60%% of available memory))",
    )
    p.add_argument(
        "--aligned",
        action="store_true",
        help="allocate parameters and gradients 64-byte aligned (default: as NumPy "
        "allocates them, usually 16-byte aligned, as users pass them; torch "
        "allocates its parameters itself, 64-byte aligned)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few seconds: sizes 1e3,1e5, no models, 1 thread, 3 short batches",
    )
    p.add_argument("--json", metavar="PATH", help="write all results as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG plot (needs matplotlib)")
    p.add_argument(
        "--load",
        metavar="PATH",
        help="do not measure: print (and --plot) the results of an earlier --json",
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--formats",
        nargs="?",
        const="all",
        default=None,
        metavar="LIST",
        help="storage formats instead (docs/formats.md): fastadam's AdamW in "
        "fp32, fp32 + 8-bit state, bf16 + bf16 state, bf16 + fp32 master (+ "
        "8-bit state) against torch fused, DeepSpeed CPUAdam (fp32, bf16, its "
        "engine path) and bitsandbytes' 8-bit AdamW where installed, with "
        "each format's bytes and own roofline (default workloads 1e8 and "
        "gpt2_small; --sizes shrinks them). LIST: rows (see fastadam.bench."
        "formats.DISPLAY_ORDER) or 'all' (the default)",
    )
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return p


class Settings:
    pass


def resolve(args):
    """Defaults, --quick, and validation. Returns a Settings object (raises SystemExit)."""
    import fastadam

    cfg = fastadam.config()
    s = Settings()
    q = args.quick

    def pick(val, default, quick):
        return val if val is not None else (quick if q else default)

    sizes = pick(args.sizes, "1e3,1e4,1e5,1e6,1e7,1e8", "1e3,1e5")
    s.sizes = [] if sizes.strip().lower() == "none" else _parse_list(sizes, _size, "--sizes")
    models = pick(args.models, "all", "none").strip().lower()
    if models == "all":
        s.models = list(MODELS)
    elif models in ("none", ""):
        s.models = []
    else:
        s.models = _parse_list(models, str, "--models")
        s.models = ["gpt2_small" if m in ("gpt2", "gpt-2") else m for m in s.models]
        bad = [m for m in s.models if m not in MODELS]
        if bad:
            raise SystemExit(f"--models: unknown {bad}; choose from {', '.join(MODELS)}")
    opt = (args.optimizer or "adam").strip().lower()
    if opt == "all":
        s.optimizers = list(RULE_ORDER)
    else:
        want = _parse_list(opt, str, "--optimizer")
        bad = [x for x in want if x not in RULE_SPECS]
        if bad or not want:
            raise SystemExit(
                f"--optimizer: unknown {bad}; choose from {', '.join(RULE_ORDER)} or all"
            )
        s.optimizers = list(dict.fromkeys(want))
    # rules other than Adam: the workloads of their targets unless --sizes/--models say
    s.rule_sizes = s.sizes if (args.sizes is not None or q) else list(RULE_SIZES)
    s.rule_models = s.models if (args.models is not None or q) else list(RULE_MODELS)
    s.dtypes = _parse_list(pick(args.dtype, "float32", "float32"), str, "--dtype")
    bad = [d for d in s.dtypes if d not in BYTES_PER_ELEM]
    if bad:
        raise SystemExit(f"--dtype: unknown {bad}; choose float32 and/or float64")
    maxt = cfg["max_threads"] if cfg["openmp"] else 1
    th = pick(args.threads, "1,max", "1").strip().lower()
    if th == "all":
        s.threads = list(range(1, maxt + 1))
    else:
        s.threads = _parse_list(th, lambda t: maxt if t == "max" else int(t), "--threads")
    if any(t < 1 for t in s.threads):
        raise SystemExit("--threads: thread counts must be >= 1")
    s.threads = list(dict.fromkeys(s.threads))
    avail = cfg["simd_available"]
    simd = pick(args.simd, "auto", "auto").strip().lower()
    if simd == "auto":
        s.simd = [None]
    elif simd == "all":
        s.simd = list(avail)
    else:
        s.simd = _parse_list(simd, str, "--simd")
        bad = [x for x in s.simd if x not in avail]
        if bad:
            raise SystemExit(f"--simd: {bad} not usable here; usable: {', '.join(avail)}")
    s.simd_in_use = cfg["simd"]
    impls = pick(args.impls, "all", "all").strip().lower()
    if impls == "all":
        s.impls = list(IMPL_ORDER)
    else:
        want = []
        for x in _parse_list(impls, str, "--impls"):
            want += sorted(TORCH_IMPLS) if x == "torch" else [x]
        bad = [x for x in want if x not in IMPL_ORDER]
        if bad:
            raise SystemExit(
                f"--impls: unknown {bad}; choose from {', '.join(IMPL_ORDER + ['torch'])}"
            )
        s.impls = [x for x in IMPL_ORDER if x in want]
    _timing_settings(s, args, pick, q)
    s.slow_limit = pick(args.slow_limit, 3e7, 3e7)
    s.numpy_all_threads = args.numpy_all_threads
    avail_mem = _mem_available()
    gib = args.max_memory if args.max_memory is not None else min(6.0, 0.6 * avail_mem / 2**30)
    s.max_memory = int(gib * 2**30)
    s.quick = q
    s.aligned = args.aligned
    s.seed = args.seed
    return s


def main(argv=None, prog=None):
    """Entry point of ``python -m fastadam bench`` and ``fastadam-bench``; returns an exit
    code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if prog is None and sys.argv and os.path.basename(sys.argv[0]).startswith("fastadam-bench"):
        prog = "fastadam-bench"
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.formats is not None and not args.load:
        from . import formats as bench_formats

        return bench_formats.main(args, argv)
    if args.plot:
        why = check_matplotlib()
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
    if args.load:
        try:
            with open(args.load) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            print(f"error: --load {args.load}: {e}", file=sys.stderr)
            return 2
        if data.get("schema") == "fastadam-bench-formats/1":
            from . import formats as bench_formats

            if args.plot:
                print("error: --plot: a --formats run has no plot", file=sys.stderr)
                return 2
            print(bench_formats.format_report(data), flush=True)
            return 0
        if data.get("schema") != SCHEMA:
            print(f"error: --load {args.load}: not a fastadam bench file", file=sys.stderr)
            return 2
    else:
        try:
            s = resolve(args)
        except (argparse.ArgumentTypeError, SystemExit) as e:
            msg = str(e) if str(e) else "bad arguments"
            print(f"error: {msg}", file=sys.stderr)
            return 2
        if (
            not s.sizes
            and not s.models
            and (s.optimizers == ["adam"] or (not s.rule_sizes and not s.rule_models))
        ):
            print("error: nothing to measure (--sizes none and --models none)", file=sys.stderr)
            return 2
        torch_mod = _import_torch() if any(i in TORCH_IMPLS for i in s.impls) else None
        t0 = time.time()
        machine = machine_info()
        records, notes = run(s, torch_mod, progress_enabled=not args.quiet)
        machine["loadavg_end"] = _read("/proc/loadavg").strip()
        settings = {
            k: getattr(s, k)
            for k in (
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
            )
        }
        settings["argv"] = argv
        settings["hyperparameters"] = {"lr": LR, "betas": list(BETAS), "eps": EPS}
        settings["optimizers"] = s.optimizers
        data = {
            "schema": SCHEMA,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "elapsed_s": time.time() - t0,
            "machine": machine,
            "versions": versions(torch_mod),
            "settings": settings,
            "notes": notes,
            "results": records,
        }
        if s.optimizers != ["adam"]:  # the other rules: new keys, Adam's stay as they were
            settings["rule_sizes"], settings["rule_models"] = s.rule_sizes, s.rule_models
            settings["rules"] = {o: RULE_SPECS[o].as_json() for o in s.optimizers}
            data["rules_summary"] = rule_summary(records)
    print(format_table(data), flush=True)
    code = 0
    if args.json and not args.load:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, default=_json_default)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        try:
            write_plot(data, args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
        except Exception as e:
            print(f"error: --plot {args.plot}: {type(e).__name__}: {e}", file=sys.stderr)
            code = 1
    return code
