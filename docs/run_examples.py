"""Execute every ```python block of the documentation pages, so the examples cannot rot.

    python docs/run_examples.py            # all pages under docs/ (not _build)
    python docs/run_examples.py -v PAGE..  # some pages, printing each block's output

A page's blocks run in order in one namespace (a later block may use an earlier one's
names), in a fresh temporary working directory; each page gets a fresh namespace. A block
fails the run by raising (the examples check what they claim with ``assert``). Only blocks
fenced as ```python run; ```bash, ```text and ```json are shown, never run.

A block that cannot run here says so on the line right above its fence:

    <!-- not executed: the reason -->

and pages kept as they were written before the site (whose blocks are fragments of a
multi-process program) are listed in NOT_EXECUTED with the reason. Every block skipped is
printed with its reason, so skipping stays visible.
"""

import argparse
import contextlib
import io
import linecache
import os
import re
import sys
import tempfile
import time
import traceback

DOCS = os.path.dirname(os.path.abspath(__file__))

# page (relative to docs/) -> why none of its python blocks is executed
NOT_EXECUTED = {
    "engines.md": "fragments of DeepSpeed / FSDP2 programs started by a launcher "
    "(deepspeed, torchrun) on several processes; tests/test_deepspeed.py and "
    "tests/test_fsdp2.py run these recipes",
}

FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^\n`]*)$")
SKIP = re.compile(r"^\s*<!--\s*not executed:\s*(?P<why>.+?)\s*-->\s*$")


def blocks(path):
    """(first line number, info string, code, skip reason or None) of each fenced block."""
    lines = open(path, encoding="utf-8").read().split("\n")
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info").strip()
        prev = lines[i - 1] if i else ""
        skip = SKIP.match(prev)
        j = i + 1
        while j < len(lines) and not (
            lines[j].strip().startswith(fence) and lines[j].strip().strip(fence[0]) == ""
        ):
            j += 1
        out.append(
            (i + 2, info, "\n".join(lines[i + 1 : j]) + "\n", skip.group("why") if skip else None)
        )
        i = j + 1
    return out


def pages(args):
    if args:
        return [os.path.relpath(os.path.abspath(a), DOCS) for a in args]
    found = []
    for root, dirs, files in os.walk(DOCS):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        found += [
            os.path.relpath(os.path.join(root, f), DOCS) for f in sorted(files) if f.endswith(".md")
        ]
    return found


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("pages", nargs="*")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each block's output")
    a = ap.parse_args(argv)
    ran = skipped = failed = 0
    start = time.perf_counter()
    cwd = os.getcwd()
    for page in pages(a.pages):
        code_blocks = [b for b in blocks(os.path.join(DOCS, page)) if b[1] == "python"]
        if not code_blocks:
            continue
        if page in NOT_EXECUTED:
            skipped += len(code_blocks)
            print(f"{page}: {len(code_blocks)} block(s) not executed: {NOT_EXECUTED[page]}")
            continue
        ns = {"__name__": "__main__"}
        t0 = time.perf_counter()
        n_page = 0
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            try:
                for line, _, code, why in code_blocks:
                    if why is not None:
                        skipped += 1
                        print(f"{page}:{line}: not executed: {why}")
                        continue
                    name = f"{page}:{line}"
                    # tracebacks show the example's lines (line 1 = the fence's next line)
                    linecache.cache[name] = (len(code), None, code.splitlines(True), name)
                    buf = io.StringIO()
                    try:
                        with contextlib.redirect_stdout(buf):
                            exec(compile(code, name, "exec"), ns)
                    except (Exception, SystemExit):  # any failure of the example, reported
                        failed += 1
                        print(
                            f"{page}:{line}: FAILED\n{buf.getvalue()}{traceback.format_exc()}",
                            file=sys.stderr,
                        )
                        break  # later blocks of the page depend on this one
                    n_page += 1
                    if a.verbose and buf.getvalue():
                        print(f"--- {page}:{line}\n{buf.getvalue()}", end="")
            finally:
                os.chdir(cwd)
        ran += n_page
        print(f"{page}: {n_page} block(s) ran in {time.perf_counter() - t0:.1f} s")
    print(f"docs examples ran in {time.perf_counter() - start:.1f} s")
    print(f"examples: {ran} passed, {failed} failed, {skipped} skipped")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
