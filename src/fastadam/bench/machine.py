"""The machine and the software measured on: CPU, caches, memory, load
(machine_info) and versions (recorded in the JSON and printed in the report).
"""

from __future__ import annotations

import os
import platform

import numpy as np

# ----------------------------------------------------------------------------- machine


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info():
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
    }
    cpuinfo = _read("/proc/cpuinfo")
    model, phys = None, set()
    cur = {}
    for line in cpuinfo.splitlines() + [""]:
        if not line.strip():
            if "physical id" in cur and "core id" in cur:
                phys.add((cur["physical id"], cur["core id"]))
            cur = {}
            continue
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        cur[k] = v
        if k in ("model name", "Model", "cpu model") and model is None:
            model = v
    info["cpu_model"] = model or platform.processor() or "unknown"
    info["physical_cores"] = len(phys) or None
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        info["usable_cpus"] = os.cpu_count()
    caches = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    if os.path.isdir(base):
        for d in sorted(os.listdir(base)):
            if d.startswith("index"):
                lvl = _read(f"{base}/{d}/level").strip()
                typ = _read(f"{base}/{d}/type").strip()
                size = _read(f"{base}/{d}/size").strip()
                if lvl and size and typ != "Instruction":
                    caches[f"L{lvl}"] = size
    info["caches_per_cpu0"] = caches
    meminfo = _read("/proc/meminfo")
    for key, name in (("MemTotal", "mem_total_bytes"), ("MemAvailable", "mem_available_bytes")):
        for line in meminfo.splitlines():
            if line.startswith(key + ":"):
                info[name] = int(line.split()[1]) * 1024
    info["loadavg_start"] = _read("/proc/loadavg").strip()
    info["hypervisor"] = " hypervisor " in f" {cpuinfo.replace(chr(10), ' ')} "
    return info


def _mem_available():
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def versions(torch_mod):
    import fastadam

    v = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "fastadam": fastadam.__version__,
        "fastadam_config": fastadam.config(),
        "torch": getattr(torch_mod, "__version__", None),
    }
    if torch_mod is not None:
        v["torch_num_threads_default"] = torch_mod.get_num_threads()
    for k in (
        "OMP_NUM_THREADS",
        "OMP_PROC_BIND",
        "OMP_WAIT_POLICY",
        "GOMP_SPINCOUNT",
        "FASTADAM_SIMD",
    ):
        if os.environ.get(k) is not None:
            v.setdefault("environment", {})[k] = os.environ[k]
    return v
