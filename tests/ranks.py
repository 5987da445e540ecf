"""Multi-process jobs for the distributed tests (ZeroRedundancyOptimizer, FSDP2, DeepSpeed):
`launch` runs a worker script as `world` ranks on a gloo mesh on 127.0.0.1 and fails the
test if any rank fails or the job runs too long. Not a test module (no test_ prefix).
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill(procs):
    """Kill every rank's process group (the rank and anything it started, also when the
    rank itself has exited) and reap the ranks."""
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    for p in procs:
        p.wait()


def launch(tmp_path, worker, args, world=2, timeout=180, what="job", env=None):
    """Run the script text `worker` as `world` processes, each in its own process group,
    with argv (rank, world, port, tmp_path, *args) and the environment torch's and
    DeepSpeed's launchers set (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, MASTER_ADDR,
    MASTER_PORT; OMP_NUM_THREADS=1; `env` on top). Each rank's output goes to
    tmp_path/rank<r>.log. Fails the test if one rank fails (the others are killed at once,
    instead of hanging in a collective) or if the job runs past `timeout` seconds (all
    killed); `what` names the job in the message. A port taken between choosing and
    binding it gets one more try on another."""
    script = tmp_path / "worker.py"
    script.write_text(worker)
    base = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        WORLD_SIZE=str(world),
        LOCAL_SIZE=str(world),
        **(env or {}),
    )
    loopback = {"linux": "lo", "darwin": "lo0"}.get(sys.platform)
    if loopback:  # gloo binds to the host name's interface unless told otherwise
        base.setdefault("GLOO_SOCKET_IFNAME", loopback)
    for attempt in range(2):
        port = str(free_port())
        logs = [tmp_path / f"rank{r}.log" for r in range(world)]
        procs = []
        timed_out = False
        try:
            for r in range(world):
                with open(logs[r], "w") as log:
                    procs.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                str(script),
                                str(r),
                                str(world),
                                port,
                                str(tmp_path),
                                *map(str, args),
                            ],
                            env=dict(base, RANK=str(r), LOCAL_RANK=str(r), MASTER_PORT=port),
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
            deadline = time.monotonic() + timeout  # for the whole job
            while any(p.poll() is None for p in procs) and not any(p.poll() for p in procs):
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                time.sleep(0.1)
        finally:
            kill(procs)
        output = "\n---\n".join(
            f"rank {r}:\n{log.read_text()[-6000:]}" for r, log in enumerate(logs)
        )
        if not timed_out and all(p.returncode == 0 for p in procs):
            return
        if attempt == 0 and not timed_out and "address already in use" in output.lower():
            continue
        why = f"did not finish in {timeout} s" if timed_out else "failed"
        pytest.fail(f"the {world}-process {what} {why}:\n{output}")
