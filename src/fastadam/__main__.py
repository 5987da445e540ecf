"""Command line: ``python -m fastadam info`` (build and machine), ``bench`` and ``compare``."""

from __future__ import annotations

import argparse
import sys


def info(argv=None):
    import fastadam

    c = fastadam.config()
    print(f"fastadam {c['version']}")
    print(f"  SIMD path in use : {c['simd']}")
    print(f"  usable here      : {', '.join(c['simd_available'])}")
    print(f"  compiled in      : {', '.join(c['simd_compiled'])}")
    print(f"  update rules     : {', '.join(c['rules'])}")
    print(f"  OpenMP           : {'yes' if c['openmp'] else 'no (serial build)'}")
    print(
        f"  max threads      : {c['max_threads']} (at most {c['thread_cap']} used, whatever "
        f"num_threads asks)"
    )
    if c["forked"]:
        print(
            "  forked child     : yes: steps run on one thread (GNU OpenMP does not survive fork)"
        )
    lo, hi = c["prefetch_window"]
    print(
        "  prefetch         : "
        + (
            f"steps with {lo / 2**20:g} MiB < state <= {hi / 2**20:g} MiB"
            if hi
            else "never (not measured to pay on this CPU)"
        )
    )
    print("  force a path with FASTADAM_SIMD=" + "|".join(c["simd_compiled"] + ["auto"]))
    return 0


def bench_main(argv=None):
    from .bench import main

    return main(argv)


def compare_main(argv=None):
    from .compare import main

    return main(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"info": info, "bench": bench_main, "compare": compare_main}
    if argv and argv[0] in commands:  # the subcommand parses (and documents) the rest
        return commands[argv[0]](argv[1:])
    parser = argparse.ArgumentParser(
        prog="python -m fastadam",
        description="fastadam command line",
        epilog="'python -m fastadam bench --help' lists the benchmark's options, "
        "'python -m fastadam compare --help' the comparison's",
    )
    parser.add_argument(
        "command",
        choices=list(commands),
        help="info: build and machine; "
        "bench: benchmark one Adam step against NumPy and torch; "
        "compare: the Adam paper's Section 6 comparison of optimizers "
        "(logistic regression and an MLP on handwritten digits)",
    )
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
