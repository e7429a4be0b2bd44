"""Run a function on several gloo ranks on one machine, bounded in time, with every rank's output kept.

Distributed code fails in three ways a test must tell apart from a pass: a rank raises, a rank dies (a
C++ abort takes the interpreter with it), and ranks wait on each other forever. So each rank is a
separate ``python`` process whose stdout and stderr go to a file; the parent waits for all of them until
a deadline, kills every rank still alive (with its process group: Inductor's compile workers go too),
and raises :class:`RanksFailed` with each rank's exit status and output when any rank did not exit 0.

Rendezvous: the parent opens a :class:`torch.distributed.TCPStore` on 127.0.0.1, port 0 (the kernel
picks a free port and the store keeps it bound, so no other process can take it between choosing and
using), and the ranks join it as clients. Gloo's own connections are made on the loopback interface.

Inside a rank, :func:`run_checks` runs named checks one after another and writes each one's result
(or its traceback) as soon as it is known, so one failing check does not hide the others. A check that
raised on one rank may leave the other waiting in a collective: the failing rank destroys its process
group first (the waiting rank's collective then fails instead of hanging), the ranks agree through the
store that something failed, and both start a new process group before the next check.

Run as a script, this module is one rank: ``python ranks.py RANK WORLD_SIZE PORT OUT_DIR MODULE:FUNCTION``.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
#: How long a collective may wait for the other rank before gloo gives up (a backstop: the parent's
#: deadline is what bounds a test).
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


class RanksFailed(AssertionError):
    """A rank exited with a non-zero status, or the ranks ran past their deadline."""


def _loopback_interface() -> str | None:
    names = [name for _, name in socket.if_nameindex()]
    return "lo" if "lo" in names else None


def rank_environment() -> dict[str, str]:
    """The environment of a rank: this one, single-threaded, gloo on the loopback interface."""
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    interface = _loopback_interface()
    if interface is not None:
        env["GLOO_SOCKET_IFNAME"] = interface  # torch's own switch for gloo's network interface
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _stop(process: subprocess.Popen) -> None:
    """Kill a rank and whatever it started (its own process group, made at launch)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def _outputs(logs: list[Path], processes: list[subprocess.Popen]) -> str:
    parts = []
    for rank, (log, process) in enumerate(zip(logs, processes)):
        text = log.read_text(errors="replace") if log.exists() else ""
        parts.append(f"----- rank {rank} (exit status {process.returncode}) -----\n{text[-20000:]}")
    return "\n".join(parts)


def launch(target: str, out_dir: Path, *, world_size: int = 2, timeout_s: float = 120) -> list[dict[str, Any]]:
    """Run ``target`` (``"module:function"``, a module importable from ``tests/``) on ``world_size`` ranks.

    Each rank calls ``function(rank, world_size, store, out_dir)`` with a process group already made,
    and its return value (JSON-serialisable) comes back in a list by rank. Raises :class:`RanksFailed`
    with every rank's output when a rank fails or the deadline passes.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore("127.0.0.1", 0, None, True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    logs = [out_dir / f"rank{rank}.log" for rank in range(world_size)]
    processes = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "w") as output:
                processes.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            str(Path(__file__)),
                            str(rank),
                            str(world_size),
                            str(store.port),
                            str(out_dir),
                            target,
                        ],
                        stdout=output,
                        stderr=subprocess.STDOUT,
                        env=rank_environment(),
                        cwd=HERE,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in processes) and time.monotonic() < deadline:
            if any(p.returncode not in (None, 0) for p in processes):
                time.sleep(2)  # let the other ranks notice and write what they know
                break
            time.sleep(0.05)
        late = any(p.poll() is None for p in processes)
    finally:
        for process in processes:
            _stop(process)
        del store
    if late or any(p.returncode != 0 for p in processes):
        reason = f"ranks ran past {timeout_s:.0f} s and were killed" if late else "a rank failed"
        raise RanksFailed(f"{target}: {reason}\n{_outputs(logs, processes)}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


def _init(rank: int, world_size: int, store: dist.Store, generation: int) -> None:
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"generation{generation}", store),
        rank=rank,
        world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def run_checks(
    checks: Iterable[tuple[str, Callable[[], dict[str, Any]]]],
    rank: int,
    world_size: int,
    store: dist.Store,
    out_dir: Path,
) -> dict[str, Any]:
    """Run each named check on every rank; return ``{name: {"ok": bool, ...}}``.

    A check returns a JSON-serialisable dict of what it measured; a check that raises is recorded with
    its traceback. The results so far are written to ``out_dir/partial-rank{rank}.json`` after every
    check, so a rank that dies later still leaves them behind.
    """
    results: dict[str, Any] = {}
    generation = 0
    for name, check in checks:
        started = time.perf_counter()
        try:
            result = {"ok": True, **check()}
        except Exception:
            result = {"ok": False, "error": traceback.format_exc()}
            dist.destroy_process_group()  # a rank waiting for us in a collective fails instead of hanging
        result["seconds"] = time.perf_counter() - started
        results[name] = result
        (out_dir / f"partial-rank{rank}.json").write_text(json.dumps(results, indent=1))
        store.set(f"{name}/{rank}", "ok" if result["ok"] else "failed")
        everyone_ok = all(store.get(f"{name}/{other}") == b"ok" for other in range(world_size))
        if not everyone_ok:
            if result["ok"]:
                dist.destroy_process_group()
            generation += 1
            _init(rank, world_size, store, generation)
    return results


def _rank_main(rank: int, world_size: int, port: int, out_dir: Path, target: str) -> None:
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, None, False, timeout=COLLECTIVE_TIMEOUT)
    module_name, function_name = target.split(":")
    function = getattr(importlib.import_module(module_name), function_name)
    _init(rank, world_size, store, 0)
    try:
        result = function(rank, world_size, store, out_dir)
        # Every rank's last collective is done before any tears gloo down.
        if dist.is_initialized():
            dist.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result, indent=1))
    # The result is written: leave without the libraries' teardown at exit, which now and then aborts a
    # rank that compiled a native kernel in this process ("terminate called without an active
    # exception", no Python frame left) after its work is done, in about one run in ten on 2 cores.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    _rank_main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
