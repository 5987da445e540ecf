#!/usr/bin/env python3
"""Run the test suite against an *installed* fastadam (a wheel), once per SIMD path.

cibuildwheel's test-command (pyproject.toml, [tool.cibuildwheel]) and the README's wheel
check call this. It is plain Python, so it runs the same on Linux, macOS and Windows (whose
test-command goes through cmd.exe, not bash):

  1. refuses to run if `fastadam` would be imported from a source tree (src/) rather than
     from site-packages;
  2. runs the whole suite once with the default (auto) path;
  3. for every path the wheel has compiled in and this CPU supports
     (fastadam.config()['simd_available']), runs tests/test_optim.py and tests/test_errors.py
     with FASTADAM_SIMD forcing that path.

Usage: run_wheel_tests.py TESTS_DIR [--quick]
--quick (or FASTADAM_WHEEL_TESTS=quick): skip step 2 (e.g. under emulation).
Run it from a directory in which `import fastadam` does not find the source tree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--quick"]
    quick = "--quick" in argv or os.environ.get("FASTADAM_WHEEL_TESTS") == "quick"
    if len(args) != 1 or not os.path.isdir(args[0]):
        print(__doc__)
        return 2
    tests = os.path.abspath(args[0])
    env = {k: v for k, v in os.environ.items() if k != "FASTADAM_SIMD"}
    env.pop("PYTHONPATH", None)

    info = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import fastadam, sysconfig; c = fastadam.config(); "
                "print(fastadam.__file__); print(sysconfig.get_paths()['purelib']); "
                "print(sysconfig.get_paths()['platlib']); print(' '.join(c['simd_available'])); "
                "print(c['openmp'], c['simd'], c['simd_compiled'])"
            ),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    where, purelib, platlib, simds = info[0], info[1], info[2], info[3].split()
    print(f"fastadam from {where}\n  openmp, default path, compiled in: {info[4]}")
    site = [os.path.normcase(os.path.realpath(p)) for p in (purelib, platlib)]
    if not any(os.path.normcase(os.path.realpath(where)).startswith(p + os.sep) for p in site):
        print("fastadam is not imported from site-packages: not testing an installed wheel")
        return 1

    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    runs = [] if quick else [("auto", [tests])]
    runs += [
        (s, [os.path.join(tests, "test_optim.py"), os.path.join(tests, "test_errors.py")])
        for s in simds
    ]
    failed = []
    for simd, paths in runs:
        run_env = dict(env)
        if simd != "auto":
            run_env["FASTADAM_SIMD"] = simd
        print(
            f"== FASTADAM_SIMD={simd}: {' '.join(os.path.basename(p) for p in paths)}", flush=True
        )
        t0 = time.perf_counter()
        rc = subprocess.call(pytest + paths, env=run_env)
        print(f"   exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(simd)
    if failed:
        print("failed on:", " ".join(failed))
        return 1
    print("all runs passed:", " ".join(s for s, _ in runs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
