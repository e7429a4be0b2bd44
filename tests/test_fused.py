"""``impl="fused"``: one native kernel per group and step over torch's own state.

No fixture lowers a threshold here: the kernels run at every size. Each test compares with the loop
(itself bit-for-bit torch's for-loop) within the strategy's declared ulp bound.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import scratchopt
from scratchopt.strategies import STRATEGIES
from scratchopt.strategies import fused as fused_module
from scratchopt.strategies.kernels import native, recording, runtime, tracing
from scratchopt.testing import assert_same_state, copy_params, gradients, hard_groups, hard_params, set_gradients

ELEMENTWISE = [name for name, cls in scratchopt.algorithms.ALGORITHMS.items() if cls.elementwise]


@pytest.fixture
def python_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    """The tables built in Python (as before the native runtime is built)."""
    monkeypatch.setattr(runtime, "get", lambda: None)
    monkeypatch.setattr(runtime, "ready", lambda: None)


@pytest.fixture
def native_runtime() -> Any:
    """The native runtime, built here if no earlier test built it (tens of seconds once per machine)."""
    if runtime.ready() is None:
        runtime._build(in_process=True)
    module = runtime.ready()
    assert module is not None, "the native runtime did not build"
    return module


def _count_kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = native.NativeKernel.__call__

    def counting(self: native.NativeKernel, numels: Any, *args: Any) -> None:
        calls.append(len(numels))
        original(self, numels, *args)

    monkeypatch.setattr(native.NativeKernel, "__call__", counting)
    return calls


def _run(name: str, impl: str | None, steps: int = 6, dtype: torch.dtype = torch.float32) -> tuple[Any, list[Tensor]]:
    params = hard_params(dtype)
    optimizer = getattr(scratchopt, name)(
        hard_groups(params), **scratchopt.algorithms.ALGORITHMS[name].example_kwargs, impl=impl
    )
    for step in range(steps):
        set_gradients(params, gradients(params, step))
        optimizer.step()
    return optimizer, params


@pytest.mark.usefixtures("python_tables")
def test_one_kernel_call_per_group_and_step_at_default_sizes(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 1))  # small tensors, a norm first
    optimizer = scratchopt.AdamW(model.parameters(), lr=0.01, impl="fused")
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 7)).square().mean().backward()
        optimizer.step()
    assert calls == [6, 6, 6], calls


@pytest.mark.parametrize("name", ELEMENTWISE)
@pytest.mark.parametrize("tables", ["python", "runtime"])
def test_every_elementwise_algorithm_matches_the_loop(name, tables, request, monkeypatch):
    request.getfixturevalue("python_tables" if tables == "python" else "native_runtime")
    calls = _count_kernel_calls(monkeypatch)
    for dtype in (torch.float32, torch.float64):
        loop, loop_params = _run(name, None, dtype=dtype)
        fused, fused_params = _run(name, "fused", dtype=dtype)
        assert_same_state(
            fused, loop, fused_params, loop_params, f"{name} fused ({tables} tables) {dtype}", exact=False
        )
    if tables == "python":
        assert calls, f"{name}: no native kernel ran"


def test_the_runtime_counts_steps_and_runs_the_kernel(native_runtime, monkeypatch):
    """With the runtime built, a steady step builds its table in C++ and counts ``step`` there."""
    launches: list[int] = []
    original = native_runtime.Tables

    class Counting:
        def __init__(self, *args: Any) -> None:
            self.inner = original(*args)
            launches.append(self.inner.status)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

    monkeypatch.setattr(native_runtime, "Tables", Counting)
    optimizer, params = _run("AdamW", "fused", steps=5)
    assert -1 in launches, launches
    expected = [float(sum(gradients(params, step)[index] is not None for step in range(5))) for index in range(4)]
    assert [optimizer.state[p]["step"].item() for p in params if p.requires_grad] == expected


# ---------------------------------------------------------------------------------------------------
# torch's state contract: an edit to optimizer.state or param_groups takes effect on the next step
# ---------------------------------------------------------------------------------------------------


def _edited_run(impl: str | None, edit: str) -> tuple[Any, list[Tensor]]:
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(300, generator=gen).requires_grad_(), torch.randn(40, 3, generator=gen).requires_grad_()]
    spare = torch.randn(40, 3, generator=gen).requires_grad_()
    optimizer = scratchopt.AdamW(params, lr=0.05, impl=impl)
    for step in range(6):
        if step == 3:
            if edit == "reset state":
                optimizer.state[params[0]] = {}
            elif edit == "delete state":
                del optimizer.state[params[1]]
            elif edit == "replace a state tensor":
                optimizer.state[params[0]]["exp_avg_sq"] = torch.zeros_like(params[0])
            elif edit == "swap a param":
                optimizer.param_groups[0]["params"][1] = spare
                params[1] = spare
        for p in params:
            p.grad = torch.full_like(p, 0.5) + 0.1 * step * p.detach()
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize("edit", ["reset state", "delete state", "replace a state tensor", "swap a param"])
@pytest.mark.parametrize("impl", ["foreach", "compiled", "fused"])
def test_edits_to_the_state_and_the_groups_take_effect_as_in_the_loop(impl, edit):
    loop, loop_params = _edited_run(None, edit)
    ours, ours_params = _edited_run(impl, edit)
    assert_same_state(ours, loop, ours_params, loop_params, f"{impl} after {edit!r}", exact=STRATEGIES[impl].exact)
    if edit != "swap a param":  # torch's state_dict() itself fails on the removed param's leftover state
        assert len(ours.state_dict()["state"]) == len(loop.state_dict()["state"])


def test_fused_keeps_no_memory_besides_the_state():
    """The state is torch's per-parameter tensors, and nothing else holds parameter-sized memory."""
    params = [torch.randn(1000, 10).requires_grad_() for _ in range(3)]
    optimizer = scratchopt.AdamW(params, impl="fused")
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    state_bytes = sum(t.untyped_storage().nbytes() for s in optimizer.state.values() for t in s.values())
    assert state_bytes == sum(2 * p.numel() * 4 + 4 for p in params)
    assert all(
        t.untyped_storage().nbytes() == t.numel() * t.element_size()
        for s in optimizer.state.values()
        for t in s.values()
    ), "a state tensor is a view of a larger buffer"


def test_without_a_compiler_fused_falls_back_with_one_warning(tmp_path):
    """``CXX`` naming no compiler: one warning, and the same numbers through torch.compile (or eagerly)."""
    script = textwrap.dedent("""
        import warnings, torch, scratchopt
        from scratchopt.testing import hard_params, hard_groups, gradients, set_gradients, assert_same_state
        results = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for impl in (None, "fused"):
                params = hard_params(torch.float64)
                opt = scratchopt.Adam(hard_groups(params), impl=impl)
                for step in range(4):
                    set_gradients(params, gradients(params, step))
                    opt.step()
                results[impl] = (opt, params)
        assert_same_state(*[results["fused"][0], results[None][0]], results["fused"][1], results[None][1], "fallback",
                          exact=False)
        native = [w for w in caught if "no native kernels" in str(w.message)]
        print(len(native))
    """)
    env = {
        "CXX": str(tmp_path / "no-such-compiler"),
        "SCRATCHOPT_CACHE": str(tmp_path / "cache"),
        "SCRATCHOPT_RUNTIME": "0",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "1", result.stdout


def test_processes_compiling_one_kernel_at_once_share_one_cached_library(tmp_path):
    script = textwrap.dedent("""
        import torch, scratchopt
        from scratchopt.strategies.kernels import native
        p = [torch.randn(50, requires_grad=True)]
        opt = scratchopt.RAdam(p, impl="fused", weight_decay=0.25)
        p[0].grad = torch.ones(50)
        opt.step()
        print(sorted(x.name for x in native.cache_dir().glob("*.so")))
    """)
    env = {"SCRATCHOPT_CACHE": str(tmp_path), "SCRATCHOPT_RUNTIME": "0", "PATH": "/usr/bin:/bin"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert all(run.returncode == 0 for run in runs), [err[-2000:] for _, err in outputs]
    libraries = {out.strip() for out, _ in outputs}
    assert len(libraries) == 1 and libraries != {"[]"}, libraries
    assert not [x for x in (tmp_path / "kernels").iterdir() if x.is_dir()], "a temporary build was left behind"


def _mixed_run(impl: str | None, case: str) -> tuple[Any, list[Tensor]]:
    gen = torch.Generator().manual_seed(4)
    dtypes = (torch.float32, torch.float64) if case == "dtypes" else (torch.float32, torch.float32)
    params = [torch.randn(200, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for dtype in dtypes]
    optimizer = scratchopt.Adam(params, lr=0.05, impl=impl)
    for step in range(4):
        if step == 1 and case == "state keys":  # a key the update takes but, without amsgrad, leaves alone
            optimizer.state[params[0]]["max_exp_avg_sq"] = torch.full_like(params[0], 7.0)
        for p in params:
            p.grad = torch.full_like(p, 0.3) - 0.2 * step * p.detach()
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize("case", ["dtypes", "state keys"])
@pytest.mark.parametrize("tables", ["python", "runtime"])
def test_a_group_mixing_dtypes_or_state_keys_runs_each_param_with_its_own_kernel(case, tables, request):
    """One table holds one dtype and one set of state keys: params that differ get their own call."""
    request.getfixturevalue("python_tables" if tables == "python" else "native_runtime")
    loop, loop_params = _mixed_run(None, case)
    fused, fused_params = _mixed_run("fused", case)
    assert_same_state(fused, loop, fused_params, loop_params, f"{case} ({tables} tables)", exact=False)


def test_the_background_build_never_imports_the_runtime_off_the_main_thread():
    """The runtime is compiled in a child process; this process imports it on the thread that next asks
    for it. An import on a background thread aborts a process that exits meanwhile ("terminate called
    without an active exception"), as a short script on a new machine does."""
    script = textwrap.dedent("""
        import time, torch, scratchopt
        from scratchopt.strategies.kernels import runtime
        p = [torch.randn(8, requires_grad=True)]
        opt = scratchopt.AdamW(p, impl="fused")
        p[0].grad = torch.ones(8)
        opt.step()
        start = time.time()
        while runtime.state() == "building" and time.time() - start < 600:
            time.sleep(0.1)
        print(runtime.state())
        print("ready" if runtime.get() is not None else runtime.state())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=700)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["built", "ready"], result.stdout


# ---------------------------------------------------------------------------------------------------
# The steady step: one native pass over the group, and a traced tape instead of a recording
# ---------------------------------------------------------------------------------------------------

_VARIANTS = [{}, {"weight_decay": 0.1}, {"maximize": True}]


def _captured_calls(name: str, variant: dict[str, Any], steps: int = 8) -> list[tuple[list[Tensor | None], dict]]:
    """The first param's tensors and the arguments of its ``update`` at each step of the loop, with a
    changing learning rate (a scheduler's)."""
    cls = scratchopt.algorithms.ALGORITHMS[name]
    kwargs = {**cls.example_kwargs, **variant}
    params = hard_params(torch.float64)
    try:
        optimizer = cls(params, **kwargs)
    except (TypeError, ValueError):
        pytest.skip(f"{name} takes no {variant}")
    calls: list[tuple[list[Tensor | None], dict]] = []
    update = optimizer.update

    def capturing(param: Tensor, grad: Tensor, *states: Any, **arguments: Any) -> None:
        if param is params[0]:
            views = [t if t is None else t.detach().clone().view(-1) for t in (param, grad, *states)]
            calls.append((views, dict(arguments)))
        update(param, grad, *states, **arguments)

    optimizer.update = capturing  # type: ignore[method-assign]
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 0.01 * (1 + step) ** -0.5
        set_gradients(params, [torch.full_like(p, 0.5 - 0.1 * step) for p in params])
        optimizer.step()
    return calls


@pytest.mark.parametrize("variant", _VARIANTS, ids=["defaults", "weight decay", "maximize"])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_a_traced_tape_is_the_tape_a_recording_gives(name, variant):
    """Traced at the first step (and at the second, for an update whose first step is a branch of its
    own, as ADOPT's), the generated function gives bit for bit the tape (and, through its guards, the
    program) a new recording gives at every later step, or declines."""
    calls = _captured_calls(name, variant)
    update = scratchopt.algorithms.ALGORITHMS[name].update
    applies_later = False
    for start in (0, 1):
        first_tensors, first_arguments = calls[start]
        traced_program, trace = tracing.trace(update, first_tensors, first_arguments, recording.record)
        assert traced_program.tape == recording.record(update, first_tensors, first_arguments).tape
        if trace is None:
            pytest.skip(f"{name}'s update is not traceable")
        for step, (tensors, arguments) in enumerate(calls):
            expected = recording.record(update, tensors, arguments)
            tape = trace.tape_of(arguments)
            if tape is None:
                continue  # a guard failed: the caller records again
            assert expected.structure() == traced_program.structure(), f"{name} step {step}: a guard missed a branch"
            assert [struct.pack("d", x) for x in tape] == [struct.pack("d", x) for x in expected.tape], (
                f"{name} step {step}: tape {tape} != {expected.tape}"
            )
        applies_later = applies_later or any(
            trace.tape_of(arguments) is not None for _, arguments in calls[start + 1 :]
        )
    assert applies_later or name in _GUARDED_EACH_STEP, f"{name}: the trace applies to no later step"


#: Algorithms whose update branches on a value that changes at every step (none today).
_GUARDED_EACH_STEP: frozenset[str] = frozenset()


def test_a_guard_declines_a_branch_the_trace_did_not_take():
    tensors: list[Tensor | None] = [torch.zeros(4) for _ in range(4)] + [None]
    arguments = dict(
        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
        decoupled_weight_decay=True, step=3.0,
    )  # fmt: skip
    _, trace = tracing.trace(scratchopt.algorithms.adam.update, tensors, arguments, recording.record)
    assert trace is not None
    assert trace.tape_of({**arguments, "step": 4.0, "lr": 2e-3}) is not None
    assert trace.tape_of({**arguments, "weight_decay": 0.01}) is None  # `if weight_decay != 0` flips


def test_an_update_with_a_closure_or_float_conversion_is_recorded_every_time():
    scale = [2.0]

    def closure_update(param: Any, grad: Any, *, lr: float) -> None:
        param.add_(grad, alpha=-lr * scale[0])

    def float_update(param: Any, grad: Any, *, lr: float) -> None:
        param.add_(grad, alpha=-float(lr))

    tensors = [torch.zeros(3), torch.ones(3)]
    for update in (closure_update, float_update):
        program, trace = tracing.trace(update, tensors, {"lr": 0.5}, recording.record)
        assert trace is None and program.tape == recording.record(update, tensors, {"lr": 0.5}).tape


def test_the_steady_step_records_nothing(native_runtime, monkeypatch):
    """After the first steps, a step runs the traced function and one kernel call, whatever the lr."""
    model = nn.Sequential(nn.Linear(7, 5), nn.LayerNorm(5), nn.Linear(5, 1))
    optimizer = scratchopt.AdamW(model.parameters(), lr=0.01, impl="fused")
    reference = scratchopt.AdamW(copy_params(list(model.parameters())), lr=0.01)
    recordings: list[int] = []
    original = fused_module.record

    def counting(*args: Any) -> Any:
        recordings.append(1)
        return original(*args)

    monkeypatch.setattr(fused_module, "record", counting)
    launches = native.LAUNCHES[0]
    for step in range(6):
        for group in (*optimizer.param_groups, *reference.param_groups):
            group["lr"] = 0.01 / (1 + step)
        model.zero_grad()
        model(torch.randn(4, 7, generator=torch.Generator().manual_seed(step))).square().mean().backward()
        for p, q in zip(model.parameters(), reference.param_groups[0]["params"]):
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
        if step == 2:
            recordings.clear()
    assert recordings == [], f"{len(recordings)} recordings in the steady steps"
    assert native.LAUNCHES[0] - launches >= 5
    assert_same_state(
        optimizer, reference, list(model.parameters()), reference.param_groups[0]["params"], "traced", exact=False
    )


def _declined_run(impl: str | None, case: str) -> tuple[Any, list[Tensor]]:
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(30, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3)]
    group = [params[0], params[1], params[1], params[2]] if case == "a param twice" else params
    optimizer = scratchopt.Adam(group, lr=0.05, weight_decay=0.1, impl=impl)
    for step in range(5):
        for index, p in enumerate(params):
            missing = case == "missing gradients" and (step + index) % 2 == 0
            p.grad = None if missing else torch.full_like(p, 0.3) - 0.1 * step * p.detach()
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize("case", ["a param twice", "missing gradients"])
def test_the_native_pass_leaves_what_it_cannot_take_to_the_dispatcher(native_runtime, case):
    loop, loop_params = _declined_run(None, case)
    fused, fused_params = _declined_run("fused", case)
    assert_same_state(fused, loop, fused_params, loop_params, f"fused, {case}", exact=False)


@pytest.mark.parametrize("case", ["sparse gradient", "state of another dtype"])
def test_bad_input_raises_before_anything_changes_with_the_native_pass(native_runtime, case):
    params = [torch.randn(6, dtype=torch.float64).requires_grad_() for _ in range(3)]
    optimizer = scratchopt.Adam(params, lr=0.1, impl="fused")
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p)
        optimizer.step()
    if case == "sparse gradient":
        params[2].grad = torch.ones(6, dtype=torch.float64).to_sparse()
    else:
        optimizer.state[params[2]]["exp_avg"] = optimizer.state[params[2]]["exp_avg"].float()
    before = [p.detach().clone() for p in params]
    steps = [optimizer.state[p]["step"].item() for p in params]
    with pytest.raises(RuntimeError, match="sparse|dtype|float32"):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [optimizer.state[p]["step"].item() for p in params] == steps


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_elementwise_kernel_vectorises(name, tmp_path):
    """The element loop of each algorithm's kernel is vectorised (a select or a comparison the compiler
    cannot if-convert leaves it scalar, several times slower)."""
    found = native.compiler()
    if found is None or "g++" not in found[0] and "GCC" not in found[1]:
        pytest.skip("the vectoriser's report is read in GCC's words")
    tensors, arguments = _captured_calls(name, {}, steps=3)[-1]
    program = recording.record(
        scratchopt.algorithms.ALGORITHMS[name].update, [t if t is None else t.float() for t in tensors], arguments
    )
    source = native.cpp_source(program)
    (tmp_path / "kernel.cpp").write_text(source)
    report = subprocess.run(
        [found[0], *native.CXX_FLAGS, "-fopt-info-vec-optimized", "kernel.cpp", "-o", "kernel.so"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stderr
    loops = [n for n, line in enumerate(source.splitlines(), 1) if "for (int64_t e = lo" in line]
    assert loops
    vectorised = {int(line.split(":")[1]) for line in report.splitlines() if "loop vectorized" in line}
    assert all({n, n + 1} & vectorised for n in loops), f"{name}: element loop not vectorised\n{report[-2000:]}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", ELEMENTWISE)
def test_16_bit_params_are_bit_exact_with_the_loop(name, dtype, native_runtime):
    """The generated kernels are written for float32 and float64: a 16-bit param runs the eager update
    (ATen rounds every op to 16 bits, which a kernel keeping float32 intermediates would not), so the
    bound in 16 bits is 0 ulp."""
    loop, loop_params = _run(name, None, dtype=dtype)
    fused, fused_params = _run(name, "fused", dtype=dtype)
    assert_same_state(fused, loop, fused_params, loop_params, f"{name} fused {dtype}", exact=True)


def test_a_kept_trace_does_not_keep_a_gradient_alive(native_runtime):
    """The trace recorded at one step is kept for later ones; the gradient it was recorded on is not."""
    import gc
    import weakref

    param = torch.randn(1000, requires_grad=True)
    optimizer = scratchopt.AdamW([param], lr=1e-3, impl="fused")
    grads = []
    for _ in range(4):
        optimizer.zero_grad()
        param.grad = torch.randn(1000)
        grads.append(weakref.ref(param.grad))
        optimizer.step()
    optimizer.zero_grad()
    gc.collect()
    assert [g() is None for g in grads] == [True] * 4


def test_a_recording_is_freed_without_the_garbage_collector():
    """No reference cycle: a gradient recorded once is freed when the step lets go of it, not at the
    next collection (until then it would add a gradient's size to the peak memory)."""
    import gc
    import weakref

    grad = torch.randn(100)
    seen = weakref.ref(grad)
    tensors = [torch.zeros(100), grad.view(-1), torch.zeros(100), torch.zeros(100), None]
    arguments = dict(
        lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
        decoupled_weight_decay=True, step=1.0,
    )  # fmt: skip
    gc.disable()
    try:
        recording.record(scratchopt.algorithms.adam.update, tensors, arguments)
        del tensors, grad
        assert seen() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("tables", ["python", "runtime"])
@pytest.mark.parametrize("name", ["NAdam", "ASGD", "Rprop", "Adam", "SGD", "ADOPT", "AdEMAMix"])
def test_a_groups_bookkeeping_at_once_is_count_step_for_each_param(name, tables, request):
    """``count_steps`` (a whole group, by multi-tensor or native ops on the 0-d state) leaves the state and
    returns the arguments that ``count_step`` gives param by param, bit for bit, with a param that misses
    steps and state scalars of both float dtypes."""
    request.getfixturevalue("python_tables" if tables == "python" else "native_runtime")
    cls = scratchopt.algorithms.ALGORITHMS[name]
    kwargs = {**cls.example_kwargs, "impl": "loop"}
    params = [torch.randn(3) for _ in range(4)]
    for p in params:
        p.grad = torch.randn(3)  # Rprop sizes its state by the gradient
    group_wise, param_wise = cls(params, **kwargs), cls(params, **kwargs)
    for step in range(7):
        active = params if step % 3 else params[:2]  # params 2 and 3 miss every third step
        at_once = group_wise.count_steps(active, group_wise.param_groups[0])
        each = [
            {
                k: v.item() if isinstance(v, Tensor) else v
                for k, v in param_wise.count_step(p, param_wise.param_groups[0]).items()
            }
            for p in active
        ]
        assert at_once == each, (step, at_once, each)
        for p in params:
            for key, value in param_wise.state[p].items():
                other = group_wise.state[p][key]
                assert other.dtype == value.dtype and torch.equal(other, value), (step, key)
        if step == 3:  # the 0-d state of one param in float64 from here on, in both
            for optimizer in (group_wise, param_wise):
                state = optimizer.state[params[1]]
                for key in [k for k, v in state.items() if isinstance(v, Tensor) and v.dim() == 0]:
                    state[key] = state[key].double()


def test_a_float32_kernel_reads_no_low_precision_tables(native_runtime, monkeypatch):
    """A float32 group's kernel is handed neither the noise table nor the quantisation tables (they are
    made on first use, and a process training in float32 never holds them)."""
    from scratchopt import precision, quantization

    def refused() -> Tensor:
        raise AssertionError("a float32 step asked for a low-precision table")

    monkeypatch.setattr(precision, "native_noise", refused)
    monkeypatch.setattr(quantization, "native_tables", refused)
    model = nn.Linear(64, 64)
    optimizer = scratchopt.AdamW(model.parameters(), impl="fused")
    launches = native.LAUNCHES[0]
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(4, 64)).square().mean().backward()
        optimizer.step()
    assert native.LAUNCHES[0] > launches
