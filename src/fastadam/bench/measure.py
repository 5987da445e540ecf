"""The measurement: the interleaved timing of a cell's implementations
(measure_interleaved), the timing settings every mode shares, the progress line, the
monitor of other processes' CPU use, and the loop over cells (run) that packs the
implementations into memory groups and turns timings into result records.
"""

from __future__ import annotations

import gc
import math
import os
import statistics
import sys
import time

import numpy as np

from .impls import PEERS, SLOW_IMPLS, TORCH_IMPLS, FastAdam, Roofline
from .machine import _read
from .rules import ADAM, RULE_SPECS
from .workloads import Workload, _Filler, _fmt_count

# ----------------------------------------------------------------------------- timing


class Progress:
    """One status line on stderr (rewritten in place on a terminal; one line per cell
    otherwise)."""

    def __init__(self, total, enabled=True, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.enabled = total, enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.i = 0
        self.cell = ""
        self._last = 0.0
        self._width = 0

    def start_cell(self, text):
        self.i += 1
        self.cell = text
        if self.enabled and not self.tty:
            print(
                f"[{self.i:>3}/{self.total}] {self._elapsed()} {text}", file=self.stream, flush=True
            )
        self.update("")

    def _elapsed(self):
        return f"{time.perf_counter() - self.t0:6.1f}s"

    def update(self, what, force=False):
        if not self.tty:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        line = f"[{self.i:>3}/{self.total}] {self._elapsed()} {self.cell}  {what}"
        line = line[:150]
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def done(self):
        if self.tty:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
        if self.enabled:
            print(f"done in {time.perf_counter() - self.t0:.1f} s", file=self.stream, flush=True)


def _quartiles(v):
    v = sorted(v)
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def measure_interleaved(
    impls, *, repeats, batch_time, warm_time, max_time, progress, min_batches=3
):
    """Warm up and calibrate every implementation, then time them round-robin.

    Returns {key: dict(samples=[seconds per step, one per batch], steps_per_batch=...,
    ...)} or {key: {"error": message}}."""
    perf = time.perf_counter
    out, cal = {}, {}
    for imp in impls:
        fn, args = imp.call
        progress.update(f"{imp.key}: warm-up")
        try:
            imp.before_batch()
            for _ in range(imp.prime_steps):
                fn(*args)
            fn(*args)  # the first step may allocate state: untimed
            k, t0 = 0, perf()
            while True:
                fn(*args)
                k += 1
                el = perf() - t0
                if (k >= 2 and el >= warm_time) or el >= 0.2:
                    break
            one = el / k
        except Exception as e:
            out[imp.key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
            continue
        reps = max(1, math.ceil(batch_time / max(one, 1e-9)))
        cal[imp.key] = dict(
            reps=reps, rewarm=one < 0.02, warmup_steps=k + 1, spent=0.0, samples=[], rounds=[]
        )
    live = [imp for imp in impls if imp.key in cal]
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            s = r % max(len(live), 1)
            for imp in live[s:] + live[:s]:
                c = cal[imp.key]
                if imp.key in out or c.get("stop"):
                    continue
                progress.update(f"{imp.key}: batch {r + 1}/{repeats}")
                fn, args = imp.call
                rng = range(c["reps"])
                try:
                    imp.before_batch()
                    if c["rewarm"]:
                        fn(*args)
                    t0 = perf()
                    for _ in rng:
                        fn(*args)
                    dt = perf() - t0
                except Exception as e:
                    out[imp.key] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
                    continue
                c["samples"].append(dt / c["reps"])
                c["rounds"].append(r)
                c["spent"] += dt
                if c["spent"] > max_time and len(c["samples"]) >= min_batches:
                    c["stop"] = True
    finally:
        if was_enabled:
            gc.enable()
    for key, c in cal.items():
        if key not in out:
            out[key] = {
                "samples": c["samples"],
                "rounds": c["rounds"],
                "steps_per_batch": c["reps"],
                "warmup_steps": c["warmup_steps"],
                "rewarm": c["rewarm"],
                "capped": bool(c.get("stop")) and len(c["samples"]) < repeats,
            }
    return out


class CpuMonitor:
    """How much CPU time *other* processes took while we measured (from /proc/stat and
    this process's own CPU time): a busy machine makes every timing unreliable, threaded
    ones most (an OpenMP team waits for its slowest, descheduled thread)."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            v = [int(x) for x in _read("/proc/stat").splitlines()[0].split()[1:9]]
        except (IndexError, ValueError):
            return None
        t = os.times()  # this process's threads and its finished children are ours
        return sum(v), v[3] + v[4], t[0] + t[1] + t[2] + t[3]

    def others(self, reset=True):
        """Fraction (0..1) of all CPUs' time used by other processes since the last call,
        or None where /proc/stat is not available."""
        now = self._sample()
        a, self.start = self.start, (now if reset else self.start)
        if now is None or a is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        total = (now[0] - a[0]) / hz
        if total <= 0:
            return None
        busy = total - (now[1] - a[1]) / hz
        return min(1.0, max(0.0, (busy - (now[2] - a[2])) / total))


def _timing_settings(s, args, pick, q):
    """The roofline and timing options every bench mode shares (--no-roofline, --repeats,
    --batch-time, --max-time), with their defaults (quick: --quick's)."""
    s.roofline = not args.no_roofline
    s.repeats = pick(args.repeats, 7, 3)
    s.batch_time = pick(args.batch_time, 0.02, 0.004)
    s.max_time = pick(args.max_time, 1.5, 0.3)
    s.warm_time = min(0.05, max(s.batch_time, 0.002)) if not q else 0.004
    if s.repeats < 1 or s.batch_time <= 0 or s.max_time <= 0:
        raise SystemExit("--repeats, --batch-time and --max-time must be positive")


# ----------------------------------------------------------------------------- running


def _plan_groups(entries, budget, shared_bytes):
    """Pack (key, bytes) entries into groups that fit in budget; the roofline (if any) goes
    into every group. Entries that do not fit even alone are returned separately."""
    roof = [e for e in entries if e[0] == "roofline"]
    rest = [e for e in entries if e[0] != "roofline"]
    base = shared_bytes + sum(b for _, b in roof)
    groups, cur, used, too_big = [], [], base, []
    for key, b in rest:
        if base + b > budget:
            too_big.append(key)
            continue
        if cur and used + b > budget:
            groups.append(cur)
            cur, used = [], base
        cur.append(key)
        used += b
    if cur or not groups:
        groups.append(cur)
    return [[k for k, _ in roof] + g for g in groups], too_big


def run(s, torch_mod, progress_enabled=True, log=None):
    """Measure every cell; returns the list of result records and the notes."""
    optimizers = getattr(s, "optimizers", ["adam"])
    by_rule = {}
    for name in optimizers:
        sizes, models = (
            (s.sizes, s.models)
            if name == "adam"
            else (getattr(s, "rule_sizes", s.sizes), getattr(s, "rule_models", s.models))
        )
        by_rule[name] = [Workload.tensor(n) for n in sizes] + [Workload.model(m) for m in models]
    workloads = [w for ws in by_rule.values() for w in ws]
    records, notes = [], []
    torch_threads0 = torch_mod.get_num_threads() if torch_mod is not None else None
    impls = list(s.impls)
    if torch_mod is None and any(i in TORCH_IMPLS for i in impls):
        notes.append(
            "torch is not importable here: the torch.optim.Adam rows are skipped "
            "(pip install torch to compare)"
        )
        impls = [i for i in impls if i not in TORCH_IMPLS]
    slow = [k for k in SLOW_IMPLS if k in impls]
    if s.slow_limit and slow and any(w.n_elems > s.slow_limit for w in workloads):
        notes.append(
            f"{', '.join(_label_of(k) for k in slow)}: skipped above "
            f"{_fmt_count(s.slow_limit)} elements to keep the run short "
            f"(--slow-limit 0 to include them)"
        )
    if not s.numpy_all_threads and len(s.threads) > 1 and ({"numpy", "reference"} & set(impls)):
        notes.append(
            f"the NumPy implementations are single-threaded: measured at "
            f"{s.threads[0]} thread(s) only (--numpy-all-threads to repeat them)"
        )
    others = [RULE_SPECS[o] for o in optimizers if o != "adam"]
    if others and "numpy" in impls:
        notes.append("NumPy in-place: Adam only (the other rules have the NumPy reference)")
    if others and torch_mod is not None and any(i in TORCH_IMPLS for i in impls):
        nofused = [r.title for r in others if not r.fused]
        if nofused:
            notes.append(
                f"torch fused: torch {torch_mod.__version__} has no fused CPU kernel "
                f"for {', '.join(nofused)}"
            )
        for r in others:
            notes.append(
                f"{r.title}: {r.options_text()}; {r.streams} streams, "
                f"{r.bytes_per_elem('float32')} B/element (float32)"
                + (f"; {r.note}" if r.note else "")
            )
    cells = [
        (RULE_SPECS[o], d, t, w)
        for o in optimizers
        for d in s.dtypes
        for t in s.threads
        for w in by_rule[o]
    ]
    prog = Progress(len(cells), enabled=progress_enabled)
    grouped_note = False
    mon = CpuMonitor()
    try:
        for ci, (rule, dtype, threads, wl) in enumerate(cells):
            first_rec, t_cell = len(records), time.perf_counter()
            mon.others()
            itemsize = np.dtype(dtype).itemsize
            prog.start_cell(
                ("" if rule is ADAM else f"{rule.title} ") + f"{dtype} {threads}T {wl.label}"
            )
            if torch_mod is not None:
                torch_mod.set_num_threads(threads)
            unit = wl.n_elems * itemsize
            want, skipped = [], {}
            for key in impls:
                if key == "numpy" and rule is not ADAM:
                    continue
                if key == "torch_fused" and not rule.fused:
                    continue
                if (
                    key in ("numpy", "reference")
                    and threads != s.threads[0]
                    and not s.numpy_all_threads
                ):
                    continue
                if key in SLOW_IMPLS and s.slow_limit and wl.n_elems > s.slow_limit:
                    skipped[key] = (
                        f"skipped above {_fmt_count(s.slow_limit)} elements (--slow-limit)"
                    )
                    continue
                want.append(key)
            entries = []
            if s.roofline:
                entries.append(("roofline", Roofline.mem_units(wl, rule) * unit))
            for key in want:
                units = (
                    FastAdam.mem_units(wl, rule)
                    if key == "fastadam"
                    else PEERS[key].mem_units(wl, rule)
                )
                entries.append((key, int(units * unit)))
            groups, too_big = _plan_groups(entries, s.max_memory, unit)
            for key in too_big:
                skipped[key] = f"needs more than --max-memory {s.max_memory / 2**30:.1f} GiB"
            if len(groups) > 1 and not grouped_note:
                notes.append(
                    "large workloads: implementations were measured in groups that "
                    "fit in --max-memory; the roofline was re-measured in each group "
                    "and % roof uses the one of the same group"
                )
                grouped_note = True
            filler_g = _Filler(dtype, 1.0, s.seed + 1, s.aligned)
            grads = [filler_g.new(shape) for shape in wl.shapes]
            roof_runs = []
            for gi, group in enumerate(groups):
                filler = _Filler(dtype, 0.02, s.seed, s.aligned)
                objs, shared = [], None
                for key in group:
                    try:
                        if key == "roofline":
                            objs.append(Roofline(wl, grads, dtype, threads, filler, rule))
                        elif key == "fastadam":
                            shared = FastAdam.make_shared(wl, grads, dtype, threads, filler, rule)
                            for isa in s.simd:
                                objs.append(FastAdam(shared, isa, isa == s.simd_in_use))
                        else:
                            objs.append(PEERS[key](wl, grads, dtype, threads, filler, rule=rule))
                    except Exception as e:  # e.g. MemoryError, a torch dtype it lacks
                        skipped[key] = f"error: {type(e).__name__}: {e}".splitlines()[0][:200]
                res = measure_interleaved(
                    objs,
                    repeats=s.repeats,
                    batch_time=s.batch_time,
                    warm_time=s.warm_time,
                    max_time=s.max_time,
                    progress=prog,
                )
                labels = {o.key: o for o in objs}
                objs = shared = None
                gc.collect()
                roof = res.get("roofline")
                roof_med = (
                    statistics.median(roof["samples"]) if roof and "samples" in roof else None
                )
                fa_key = next(
                    (
                        o.key
                        for o in labels.values()
                        if o.key == "fastadam" or (o.kind == "fastadam" and o.isa == -1)
                    ),
                    None,
                )
                for key, r in res.items():
                    o = labels[key]
                    rec = _record(wl, dtype, threads, key, o, r, gi, roof_med, len(groups), rule)
                    if rec["status"] == "ok":
                        pr = _paired(roof, r)
                        if pr is not None and key != "roofline":
                            rec["pct_roofline"] = 100.0 * pr
                        if fa_key is not None and key != fa_key and o.kind != "roofline":
                            rec["vs_fastadam"] = _paired(r, res.get(fa_key))
                    if key == "roofline":
                        roof_runs.append(rec)
                    else:
                        records.append(rec)
            if roof_runs:
                best = sorted(roof_runs, key=lambda r: r.get("sec_per_step", math.inf))
                rec = dict(best[len(best) // 2])
                rec["group_sec_per_step"] = [r.get("sec_per_step") for r in roof_runs]
                records.append(rec)
            for key, why in skipped.items():
                records.append(
                    dict(
                        _base(wl, dtype, threads, rule),
                        impl=key,
                        label=_label_of(key, rule),
                        status="skipped",
                        note=why,
                    )
                )
            del grads
            gc.collect()
            others = mon.others()
            for rec in records[first_rec:]:
                rec["cell_seconds"] = time.perf_counter() - t_cell
                rec["others_cpu"] = others
            if log:
                log(ci)
    finally:
        prog.done()
        if torch_mod is not None and torch_threads0:
            torch_mod.set_num_threads(torch_threads0)
    return records, notes


def _paired(num, den):
    """Median over the rounds both ran of num's time / den's time (batches of one round run
    back to back, so the ratio is robust to the machine's drift), or None."""
    if not num or not den or "samples" not in num or "samples" not in den:
        return None
    a = dict(zip(num["rounds"], num["samples"]))
    ratios = [a[r] / x for r, x in zip(den["rounds"], den["samples"]) if r in a and x > 0]
    return statistics.median(ratios) if ratios else None


def _label_of(key, rule=ADAM):
    if key == "roofline":
        return Roofline.label
    if key == "fastadam":
        return "fastadam"
    if key in TORCH_IMPLS:
        return PEERS[key].label_for(rule)
    return PEERS[key].label if key in PEERS else key


def _base(wl, dtype, threads, rule=ADAM):
    b = {
        "workload": wl.name,
        "workload_label": wl.label,
        "kind": wl.kind,
        "n_tensors": wl.n_tensors,
        "n_elems": wl.n_elems,
        "dtype": dtype,
        "threads": threads,
        "optimizer": rule.name,
    }
    if rule is not ADAM:
        b.update(streams=rule.streams, bytes_per_elem=rule.bytes_per_elem(dtype))
    return b


def _record(wl, dtype, threads, key, obj, r, group, roof_med, ngroups, rule=ADAM):
    rec = dict(
        _base(wl, dtype, threads, rule),
        impl=key,
        label=obj.label,
        simd=getattr(obj, "isa_name", None),
        group=group,
        groups=ngroups,
    )
    if hasattr(obj, "offsets"):
        rec["buffer_offsets_mod64"] = obj.offsets  # of the params and grads passed in
    if "error" in r:
        rec.update(status="error", note=r["error"])
        return rec
    v = r["samples"]
    q1, med, q3 = _quartiles(v)
    nbytes = rule.bytes_per_elem(dtype) * wl.n_elems
    rec.update(
        status="ok",
        sec_per_step=med,
        sec_q1=q1,
        sec_q3=q3,
        sec_min=min(v),
        sec_max=max(v),
        iqr_rel=(q3 - q1) / med if med > 0 else None,
        batches=len(v),
        steps_per_batch=r["steps_per_batch"],
        warmup_steps=r["warmup_steps"],
        rewarm=r["rewarm"],
        capped=r["capped"],
        samples=v,
        rounds=r["rounds"],
        elems_per_s=wl.n_elems / med,
        gbps=nbytes / med / 1e9,
        roofline_sec_per_step=roof_med,
        pct_roofline=(100.0 * roof_med / med) if roof_med else None,
    )
    return rec
