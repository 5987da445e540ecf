"""The report: the terminal table (format_table), the per-rule summary, the JSON
schema name and encoder, and the PNG plot (write_plot).
"""

from __future__ import annotations

import math

import numpy as np

from .impls import IMPL_ORDER
from .rules import RULE_SPECS

SCHEMA = "fastadam-bench/1"
BUSY = 0.05  # other processes' share of all CPUs above which a cell is marked disturbed


# ----------------------------------------------------------------------------- output


def _fmt_time(sec):
    if sec is None:
        return "-"
    for unit, f in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
        if sec >= 0.9995 * f or unit == "ns":
            x = sec / f
            return f"{x:.3g} {unit}" if x < 100 else f"{x:.0f} {unit}"
    return f"{sec:.3g} s"


def _fmt_sci(x):
    if x is None:
        return "-"
    e = math.floor(math.log10(x)) if x > 0 else 0
    return f"{x / 10**e:.2f}e{e}"


_ISA_ORDER = ["avx512", "avx2", "sse2", "neon", "scalar"]


def _row_order(rec):
    key = rec["impl"]
    base = "fastadam" if key.startswith("fastadam") else key
    order = ["roofline"] + IMPL_ORDER
    isa = key[len("fastadam[") : -1] if key.startswith("fastadam[") else ""
    return (
        order.index(base) if base in order else 99,
        _ISA_ORDER.index(isa) if isa in _ISA_ORDER else -1,
        key,
    )


def format_table(data):
    """The terminal report, as a string."""
    m, v, st = data["machine"], data["versions"], data["settings"]
    recs = data["results"]
    out = []
    cfg = v.get("fastadam_config", {})
    out.append(
        f"fastadam {v.get('fastadam')} bench - {m.get('cpu_model')}, "
        f"{m.get('usable_cpus')} CPUs usable, caches {m.get('caches_per_cpu0') or '?'}"
    )
    out.append(
        f"python {v.get('python')}, numpy {v.get('numpy')}, torch "
        f"{v.get('torch') or 'not installed'}; fastadam SIMD in use {cfg.get('simd')} "
        f"(usable: {', '.join(cfg.get('simd_available', []))}), OpenMP "
        f"{'yes' if cfg.get('openmp') else 'no'}"
    )
    if m.get("loadavg_start"):
        out.append(f"load average at start: {m['loadavg_start']}")
    out.append(
        "parameters and gradients: "
        + (
            "64-byte aligned (--aligned)"
            if st.get("aligned")
            else "allocated by NumPy as users pass them (--aligned: 64-byte aligned); fastadam's "
            "moments and the roofline's buffers are 64-byte aligned"
        )
    )
    out.append(
        f"time per step: median over {st.get('repeats')} interleaved batches "
        f"(IQR: interquartile range / median); GB/s at 28 B/element (float32), "
        f"56 (float64); % roof = roofline time / time and 'fastadam is' = this row's "
        f"time / fastadam's, both medians of the ratios within each round"
    )
    cols = [
        "workload",
        "implementation",
        "time/step",
        "IQR",
        "elem/s",
        "GB/s",
        "% roof",
        "fastadam is",
    ]
    keyset = []
    for r in recs:
        k = (_rule_of(r), r["dtype"], r["threads"])
        if k not in keyset:
            keyset.append(k)
    if any(k[0] != "adam" for k in keyset):
        out.append(
            "other rules (--optimizer): the same columns; GB/s and the roofline count "
            "the rule's own streams (each read once, all but grad written once), "
            "given in the section title; options as in the notes below"
        )
    in_use = cfg.get("simd")
    for rule, dtype, threads in keyset:
        rows = []
        sec = [
            r
            for r in recs
            if r["dtype"] == dtype and r["threads"] == threads and _rule_of(r) == rule
        ]
        wls = []
        for r in sec:
            if r["workload"] not in wls:
                wls.append(r["workload"])
        for w in wls:
            rs = sorted([r for r in sec if r["workload"] == w], key=_row_order)
            fa = [r for r in rs if r["impl"] == "fastadam" and r["status"] == "ok"] or [
                r for r in rs if r["impl"] == f"fastadam[{in_use}]" and r["status"] == "ok"
            ]
            fa_t = fa[0]["sec_per_step"] if fa else None
            first = True
            busy = max((r.get("others_cpu") or 0.0) for r in rs)
            for r in rs:
                wl = r["workload_label"] + (" !" if busy > BUSY else "") if first else ""
                first = False
                if r["status"] != "ok":
                    rows.append([wl, r["label"], r["status"], "", "", "", "", r.get("note", "")])
                    continue
                t = r["sec_per_step"]
                x = r.get("vs_fastadam") or (t / fa_t if fa_t else None)
                if r["impl"] == "roofline" or r["impl"] == (fa[0]["impl"] if fa else None) or not x:
                    rel = ""
                else:
                    rel = f"{x:.2f}x faster" if x >= 1 else f"{1 / x:.2f}x slower"
                pct = r.get("pct_roofline")
                rows.append(
                    [
                        wl,
                        r["label"] + (" (capped)" if r.get("capped") else ""),
                        _fmt_time(t),
                        f"{100 * r['iqr_rel']:.1f}%" if r.get("iqr_rel") is not None else "-",
                        _fmt_sci(r["elems_per_s"]),
                        f"{r['gbps']:.1f}",
                        f"{pct:.0f}%" if pct is not None and r["impl"] != "roofline" else "",
                        rel,
                    ]
                )
        out.append("")
        head = f"{dtype}, {threads} thread{'s' if threads != 1 else ''}"
        if rule != "adam":
            spec = RULE_SPECS.get(rule)
            head = f"{spec.title if spec else rule}: {head}" + (
                f", {spec.streams} streams = {spec.bytes_per_elem(dtype)} B/element" if spec else ""
            )
        out.append(f"== {head}")
        out.append(_table(cols, rows, right={2, 3, 4, 5, 6}))
    summ = data.get("rules_summary") or (
        rule_summary(recs) if any(k[0] != "adam" for k in keyset) else None
    )
    if summ:
        out.append("")
        out += format_summary(summ)
    scal = _scaling(recs)
    if scal:
        out.append("")
        out.append("== fastadam thread scaling (time at 1 thread / time at n threads)")
        out.append(_table(scal[0], scal[1], right=set(range(2, len(scal[0])))))
    notes = data.get("notes") or []
    marks = []
    if any(r.get("capped") for r in recs):
        marks.append(
            "(capped): a slow implementation stopped after --max-time seconds of "
            "batches (>= 3 batches)"
        )
    busy = [r.get("others_cpu") or 0.0 for r in recs]
    if busy and max(busy) > BUSY:
        marks.append(
            f"!: other processes used up to {100 * max(busy):.0f}% of the CPUs "
            f"while this workload was measured: its timings are disturbed (threaded "
            f"ones most); rerun on a quiet machine"
        )
    if any(str(r.get("label", "")).endswith(" *") for r in recs):
        marks.append("*: the SIMD path fastadam uses by default here")
    if notes or marks:
        out.append("")
        out += [f"note: {n}" for n in notes + marks]
    return "\n".join(out)


def _rule_of(rec):
    return rec.get("optimizer", "adam")


def _scaling(recs):
    fa = [r for r in recs if r["impl"] == "fastadam" and r["status"] == "ok"]
    threads = sorted({r["threads"] for r in fa})
    if len(threads) < 2 or 1 not in threads:
        return None
    rows = []
    rules = list(dict.fromkeys(_rule_of(r) for r in fa))
    for rule, dtype in dict.fromkeys((_rule_of(r), r["dtype"]) for r in fa):
        for w in dict.fromkeys(
            r["workload"] for r in fa if r["dtype"] == dtype and _rule_of(r) == rule
        ):
            by = {
                r["threads"]: r
                for r in fa
                if r["dtype"] == dtype and r["workload"] == w and _rule_of(r) == rule
            }
            if 1 not in by:
                continue
            title = RULE_SPECS[rule].title if rule in RULE_SPECS else rule
            row = [(f"{title}: " if rules != ["adam"] else "") + by[1]["workload_label"], dtype]
            for t in threads[1:]:
                row.append(
                    f"{by[1]['sec_per_step'] / by[t]['sec_per_step']:.2f}x" if t in by else "-"
                )
            rows.append(row)
    return ["workload", "dtype"] + [f"{t} threads" for t in threads[1:]], rows


# the targets (float32): in cache, at least as fast as torch fused where torch has
# one for the rule, else SPEED_TARGET x torch's fastest; out of cache within ROOF_TARGET % of
# the rule's roofline
TARGET_FAST = ("n1e6", "many_small")
TARGET_ROOF = ("n1e8",)
SPEED_TARGET, ROOF_TARGET = 3.0, 95.0
_TORCH_KEYS = ("torch_fused", "torch_foreach", "torch_forloop")


def rule_summary(recs):
    """One row per rule x dtype x workload x threads where fastadam ran: the times of
    fastadam and torch's three, fastadam's lead ("vs": torch time / fastadam time, the
    median of the per-round ratios; > 1 means fastadam is faster) over torch fused and over
    torch's fastest, % of the rule's roofline, and the target of that workload."""
    ok = [r for r in recs if r.get("status") == "ok"]
    cells = {}
    for r in ok:
        cells.setdefault((_rule_of(r), r["dtype"], r["workload"], r["threads"]), {})[r["impl"]] = r
    rows = []
    for (rule, dtype, w, th), cell in cells.items():
        fa = cell.get("fastadam")
        if fa is None:
            continue
        t_fa = fa["sec_per_step"]

        def vs(rec, t_fa=t_fa):
            return rec.get("vs_fastadam") or rec["sec_per_step"] / t_fa

        row = dict(
            optimizer=rule,
            dtype=dtype,
            workload=w,
            workload_label=fa["workload_label"],
            threads=th,
            n_elems=fa["n_elems"],
            fastadam=t_fa,
            fastadam_gbps=fa.get("gbps"),
            pct_roofline=fa.get("pct_roofline"),
            others_cpu=max((r.get("others_cpu") or 0.0) for r in cell.values()),
        )
        for k in _TORCH_KEYS + ("reference", "roofline"):
            row[k] = cell[k]["sec_per_step"] if k in cell else None
        if "roofline" in cell:
            row["roofline_gbps"] = cell["roofline"]["gbps"]
        row["vs_torch_fused"] = vs(cell["torch_fused"]) if "torch_fused" in cell else None
        tr = {k: vs(cell[k]) for k in _TORCH_KEYS if k in cell}
        row["torch_fastest"] = min(tr, key=tr.get) if tr else None
        row["vs_torch_fastest"] = min(tr.values()) if tr else None
        spec = RULE_SPECS.get(rule)
        target = met = None
        if w in TARGET_FAST:
            if spec is not None and spec.fused:
                target = ">= torch fused"
                met = None if row["vs_torch_fused"] is None else row["vs_torch_fused"] >= 1.0
            else:
                target = f">= {SPEED_TARGET:g}x torch fastest"
                met = (
                    None
                    if row["vs_torch_fastest"] is None
                    else row["vs_torch_fastest"] >= SPEED_TARGET
                )
        elif w in TARGET_ROOF:
            target = f">= {ROOF_TARGET:g}% roofline"
            met = None if row["pct_roofline"] is None else row["pct_roofline"] >= ROOF_TARGET
        row["target"], row["target_met"] = target, met
        rows.append(row)
    return rows


def format_summary(rows):
    """The per-rule summary table (a list of lines)."""
    cols = [
        "rule",
        "workload",
        "threads",
        "fastadam",
        "torch fused",
        "torch foreach",
        "torch for-loop",
        "vs fused",
        "vs fastest",
        "% roof",
        "target",
        "met",
    ]
    out_rows = []
    for r in rows:
        spec = RULE_SPECS.get(r["optimizer"])
        x = r.get("vs_torch_fastest")
        fastest = {"torch_fused": "fused", "torch_foreach": "foreach", "torch_forloop": "loop"}.get(
            r.get("torch_fastest"), ""
        )
        met = r.get("target_met")
        out_rows.append(
            [
                spec.title if spec else r["optimizer"],
                r["workload_label"]
                + ("" if r["dtype"] == "float32" else f" {r['dtype']}")
                + (" !" if (r.get("others_cpu") or 0.0) > BUSY else ""),
                r["threads"],
                _fmt_time(r["fastadam"]),
                _fmt_time(r["torch_fused"])
                if r.get("torch_fused")
                else "n/a"
                if spec is not None and not spec.fused
                else "-",
                _fmt_time(r.get("torch_foreach")),
                _fmt_time(r.get("torch_forloop")),
                f"{r['vs_torch_fused']:.2f}x" if r.get("vs_torch_fused") else "-",
                f"{x:.2f}x ({fastest})" if x else "-",
                f"{r['pct_roofline']:.0f}%" if r.get("pct_roofline") else "-",
                r.get("target") or "",
                "" if met is None else ("yes" if met else "NO"),
            ]
        )
    return [
        (
            "== summary: fastadam against torch per rule (vs = torch time / fastadam time, "
            "median of per-round ratios; > 1: fastadam faster; n/a: torch has no fused "
            "CPU kernel for the rule; -: not measured; !: disturbed by other processes)"
        ),
        _table(cols, out_rows, right={2, 3, 4, 5, 6, 7, 8, 9}),
    ]


def _table(cols, rows, right=()):
    widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(cols)]

    def line(cells):
        parts = []
        for i, c in enumerate(cells):
            c = str(c)
            parts.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "  ".join(parts).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cols), sep] + [line(r) for r in rows])


def check_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return (
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install 'fastadam[bench]')"
        )
    return None


def write_plot(data, path):
    """PNG: time per step and % of roofline against the number of elements, one line per
    implementation; one row of panels per (dtype, threads). One rule: Adam when it was
    measured, else the first (the other rules' figures are in the table and the JSON)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    recs = [r for r in data["results"] if r["status"] == "ok"]
    rules = list(dict.fromkeys(_rule_of(r) for r in recs))
    rule = "adam" if "adam" in rules else (rules[0] if rules else "adam")
    recs = [r for r in recs if _rule_of(r) == rule]
    title_rule = RULE_SPECS[rule].title if rule in RULE_SPECS else rule
    keys = list(dict.fromkeys((r["dtype"], r["threads"]) for r in recs))
    if not keys:
        raise ValueError("nothing to plot: no successful measurements")
    fig, axes = plt.subplots(len(keys), 2, figsize=(13, 4.2 * len(keys)), squeeze=False)
    impls = sorted(dict.fromkeys(r["impl"] for r in recs), key=lambda k: _row_order({"impl": k}))
    labels = {r["impl"]: r["label"] for r in recs}
    cmap = plt.get_cmap("tab10")
    color = {k: cmap(i % 10) for i, k in enumerate(impls)}
    markers = {"gpt2_small": "D", "resnet50": "s", "many_small": "^"}
    for row, (dtype, threads) in enumerate(keys):
        ax_t, ax_p = axes[row]
        sec = [r for r in recs if r["dtype"] == dtype and r["threads"] == threads]
        for k in impls:
            rs = sorted(
                [r for r in sec if r["impl"] == k and r["kind"] == "tensor"],
                key=lambda r: r["n_elems"],
            )
            style = dict(
                color=color[k],
                lw=2.2 if k.startswith("fastadam") else 1.4,
                ls="--" if k == "roofline" else "-",
            )
            if rs:
                x = [r["n_elems"] for r in rs]
                ax_t.plot(
                    x, [r["sec_per_step"] for r in rs], marker="o", ms=4, label=labels[k], **style
                )
                if k != "roofline":
                    ax_p.plot(
                        x,
                        [r["pct_roofline"] or float("nan") for r in rs],
                        marker="o",
                        ms=4,
                        label=labels[k],
                        **style,
                    )
            for r in sec:
                if r["impl"] == k and r["kind"] == "model":
                    mk = markers.get(r["workload"], "x")
                    ax_t.scatter(
                        [r["n_elems"]],
                        [r["sec_per_step"]],
                        marker=mk,
                        color=color[k],
                        s=40,
                        zorder=3,
                    )
                    if k != "roofline" and r.get("pct_roofline"):
                        ax_p.scatter(
                            [r["n_elems"]],
                            [r["pct_roofline"]],
                            marker=mk,
                            color=color[k],
                            s=40,
                            zorder=3,
                        )
        title = f"{dtype}, {threads} thread{'s' if threads != 1 else ''}"
        ax_t.set(
            xscale="log",
            yscale="log",
            xlabel="elements per step",
            ylabel="time per step [s]",
            title=f"time per {title_rule} step ({title})",
        )
        ax_p.set(
            xscale="log",
            yscale="log",
            xlabel="elements per step",
            ylabel="% of roofline (roofline time / time)",
            title=f"% of the memory roofline ({title})",
        )
        ax_p.axhline(100, color="grey", lw=0.8, ls=":")
        for ax in (ax_t, ax_p):
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8, loc="upper left")
        present = [w for w in markers if any(r["workload"] == w for r in sec)]
        if present:
            from matplotlib.lines import Line2D

            names = {
                "gpt2_small": "GPT-2 small",
                "resnet50": "ResNet-50",
                "many_small": "1000 x 1000",
            }
            ax_p.legend(
                handles=[
                    Line2D([], [], color="k", marker=markers[w], ls="", label=names[w])
                    for w in present
                ],
                fontsize=8,
                loc="lower left",
                title="model-shaped sets",
                title_fontsize=8,
            )
    m, v = data["machine"], data["versions"]
    fig.suptitle(
        f"fastadam {v.get('fastadam')} - {m.get('cpu_model')}, "
        f"{m.get('usable_cpus')} CPUs; numpy {v.get('numpy')}, "
        f"torch {v.get('torch') or '-'}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)
