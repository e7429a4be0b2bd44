"""The first fused step, in fresh processes: what a new user waits for while the kernel compiles.

A child process is started for each measurement, with ``TORCHINDUCTOR_CACHE_DIR`` and
``SCRATCHOPT_CACHE`` (the native kernels) pointing at one temporary directory that starts empty, and the
native runtime's background build off (``SCRATCHOPT_RUNTIME=0``: the first steps build their tables in
Python, as they do on a new machine while the runtime compiles): the first child runs every algorithm in turn (the first pays
Inductor's once-per-machine setup and its own compile, each further one compiles its own kernel), the
second runs the first algorithm again and is served from the cache. A child that fails, times out or
prints nothing is reported in its rows, with the reason; the benchmark carries on.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from typing import Any

import torch

from scratchopt.tools.bench.columns import DEFAULT_MODE, MODES, OURS_FUSED, algorithm_rows
from scratchopt.tools.bench.timing import Runner
from scratchopt.tools.presets import PRESETS
from scratchopt.tools.workloads import make_workload

EMPTY_CACHE = "empty caches, new process"
SAME_PROCESS = "new kernel, same process"
CACHED = "cached, new process"
#: Seconds a child may take before it is stopped and its rows say so.
CHILD_TIMEOUT_S = 900.0


def first_fused_steps(algorithms: list[str], mlp_layers: int, device: str, threads: int) -> list[dict[str, float]]:
    """Per row label, in turn: seconds of the first and second ``impl="fused"`` ``opt.step()`` on the seed
    MLP, each after a forward+backward.

    Meant for a fresh process (see :func:`compile_warmup`): the first step then includes compiling the
    kernel, or loading it from the Inductor cache.
    """
    torch.set_num_threads(threads)
    dev = torch.device(device)
    workload = make_workload("mlp", replace(PRESETS["full"], mlp_layers=mlp_layers), dev)
    rows, _ = algorithm_rows()
    found = []
    for label in algorithms:
        runner = Runner(OURS_FUSED, rows[label], workload, MODES[DEFAULT_MODE], dev)
        first_step, _ = runner.train_step()
        second_step, _ = runner.train_step()
        found.append({"first_step_s": first_step, "second_step_s": second_step})
    return found


_FIRST_STEPS_SCRIPT = """
import json
from scratchopt.tools.bench.cold_start import first_fused_steps
print(json.dumps(first_fused_steps({algorithms!r}, {layers}, {device!r}, {threads})))
"""


def _tail(text: str | bytes | None, characters: int = 200) -> str:
    """The last non-empty line of a child's output, shortened; "(empty)" when there is none."""
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1][-characters:] if lines else "(empty)"


def json_from_child(script: str, environment: dict[str, str], timeout_s: float) -> tuple[Any, str | None]:
    """Run ``script`` in a fresh Python process; (the JSON its last line of output holds, None), or
    (None, why) when it timed out, failed, or printed nothing of the kind."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", script],
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as expired:
        return None, f"timed out after {timeout_s:.0f} s (last output: {_tail(expired.stderr)})"
    except OSError as error:
        return None, f"could not start a Python process: {error}"
    if done.returncode != 0:
        return None, f"child exited with status {done.returncode}: {_tail(done.stderr)}"
    lines = (done.stdout or "").strip().splitlines()
    if not lines:
        return None, f"child printed nothing: {_tail(done.stderr)}"
    try:
        return json.loads(lines[-1]), None
    except json.JSONDecodeError:
        return None, f"child printed no result: {_tail(lines[-1])}"


def run_child(
    algorithms: list[str],
    layers: int,
    device: str,
    threads: int,
    environment: dict[str, str],
    timeout_s: float = CHILD_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """One child's measurements, one per algorithm; each is ``{"error": why}`` when the child did not
    give it (timed out, failed, printed nothing or something that is not its result)."""
    script = _FIRST_STEPS_SCRIPT.format(algorithms=algorithms, layers=layers, device=device, threads=threads)
    measured, why = json_from_child(script, environment, timeout_s)
    if why is None and (not isinstance(measured, list) or len(measured) != len(algorithms)):
        why = f"child printed {_tail(json.dumps(measured))}, not one measurement per algorithm"
    if why is not None:
        return [{"error": why} for _ in algorithms]
    return list(measured)


def compile_warmup(
    algorithms: list[str], layers: int, device: torch.device, threads: int, timeout_s: float = CHILD_TIMEOUT_S
) -> list[dict[str, Any]]:
    """First fused steps on the seed MLP in fresh processes sharing one Inductor cache that starts empty.

    One result per (algorithm, cache state): ``first_step_s`` and ``second_step_s``, or ``error``.
    """
    if not algorithms:
        return []
    runs = [(algorithms, [EMPTY_CACHE] + [SAME_PROCESS] * (len(algorithms) - 1)), (algorithms[:1], [CACHED])]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="scratchopt-inductor-") as cache:
        environment = {
            **os.environ,
            "TORCHINDUCTOR_CACHE_DIR": cache,
            "SCRATCHOPT_CACHE": cache,
            "SCRATCHOPT_RUNTIME": "0",
        }
        for names, labels in runs:
            measured = run_child(names, layers, device.type, threads, environment, timeout_s)
            for algorithm, label, found in zip(names, labels, measured, strict=True):
                results.append({"algorithm": algorithm, "cache": label, "layers": layers, **found})
    return results
