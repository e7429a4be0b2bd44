"""bfloat16 optimizer state and stochastic rounding (:mod:`scratchopt.precision`): the rounding against
its definition, each elementwise algorithm's first step against torch's (or its own float32 loop), and
the state_dict, reproducibility and refusal contracts."""

from __future__ import annotations

import copy

import pytest
import torch

import scratchopt
from scratchopt import precision
from scratchopt.algorithms import ALGORITHMS
from scratchopt.strategies.fused import Fused
from scratchopt.strategies.kernels import runtime
from scratchopt.testing import grad_like, gradients, hard_groups, hard_params, saved_and_loaded

ELEMENTWISE = [name for name, cls in ALGORITHMS.items() if getattr(cls, "elementwise", False)]
NOT_ELEMENTWISE = [
    name for name, cls in ALGORITHMS.items() if issubclass(cls, scratchopt.ScratchOptimizer) and not cls.elementwise
]


def lowbias32(index: int, seed: int, whole: bool = False) -> int:
    """The hash :func:`precision.hash16` computes (all 32 bits where ``whole``), in Python integers."""
    mask = 0xFFFFFFFF
    x = (index * 0x9E3779B1 + seed) & mask
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & mask
    x ^= x >> 15
    x = (x * 0x735A2D97) & mask
    x ^= x >> 15
    return x if whole else x >> 16


def bf16_neighbours(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bfloat16 numbers next to each float32 value, toward zero and away from it."""
    bits = value.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    toward = bits >> 16
    away = toward + ((bits & 0xFFFF) != 0).to(torch.int64)

    def as_bf16(b: torch.Tensor) -> torch.Tensor:
        return torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(torch.bfloat16)

    return as_bf16(toward), as_bf16(away)


def test_the_noise_table_is_the_permutation_its_hash_orders():
    table = precision.noise_table()
    assert torch.equal(table.sort().values, torch.arange(2**16))
    full_hashes = [lowbias32(k, 0, whole=True) for k in range(2**16)]
    assert table.tolist() == sorted(range(2**16), key=full_hashes.__getitem__)
    doubled = precision.native_noise().to(torch.int64) & 0xFFFF
    assert torch.equal(doubled, torch.cat([table, table]))


def test_the_random_bits_read_a_window_of_the_table_per_block():
    """Element i of block b = i >> 16 reads entry (hash(b, seed) + i) mod 2¹⁶ of the table: every value
    once per block; an offset shifts the indices, not the bits of an element."""
    table = precision.noise_table().tolist()
    for seed in (0, 1, 2**31 - 2, 0xDEADBEEF):
        bits = precision.random_bits(3000, seed, offset=2**16 - 1000).tolist()
        expected = [table[(lowbias32(i >> 16, seed) + i) % 2**16] for i in range(2**16 - 1000, 2**16 + 2000)]
        assert bits == expected, seed
    whole = precision.random_bits(2**17, 7)
    assert torch.equal(whole[: 2**16].sort().values, torch.arange(2**16))
    assert torch.equal(whole[2**16 :].sort().values, torch.arange(2**16))
    assert torch.equal(precision.random_bits(500, 7, offset=70_000), whole[70_000:70_500])


def test_stochastic_rounding_picks_a_neighbour_with_the_right_probability():
    """x = 1 + 2⁻¹⁰ lies 1/8 of the way from 1 to the next bfloat16 (1 + 2⁻⁷): about 1/8 of the elements
    round up. Round-to-nearest would give none."""
    x = torch.full((40_000,), 1 + 2**-10)
    rounded = precision.round_stochastically(x, seed=123)
    assert set(rounded.float().unique().tolist()) <= {1.0, 1 + 2**-7}
    up = int((rounded.float() > 1).sum())
    expected, sigma = 40_000 / 8, (40_000 * 1 / 8 * 7 / 8) ** 0.5
    assert abs(up - expected) < 4 * sigma
    # Unbiased: the mean of the roundings is x, within its standard error.
    assert abs(rounded.float().mean().item() - (1 + 2**-10)) < 4 * sigma / 40_000 * 2**-7


def test_stochastic_rounding_of_every_kind_of_value():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(5000, generator=gen) * 10.0 ** torch.randint(-30, 30, (5000,), generator=gen),
            torch.tensor([0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), 3e38, 1e-40, -1e-40]),
        ]
    )
    rounded = precision.round_stochastically(values, seed=7)
    toward, away = bf16_neighbours(values)
    same = (rounded.view(torch.int16) == toward.view(torch.int16)) | (
        rounded.view(torch.int16) == away.view(torch.int16)
    )
    assert bool(same.all())
    exact = values == values.bfloat16().float()
    assert torch.equal(rounded[exact].float(), values[exact])  # a bfloat16 number stays itself
    nan = precision.round_stochastically(torch.tensor([float("nan"), -float("nan")]), seed=1)
    assert bool(nan.isnan().all())


def test_the_native_rounding_is_the_torch_ones_bit_for_bit():
    """The runtime's one-pass rounding against the torch operations that define it, on values of every
    magnitude, signed zeros, infinities, NaNs and the largest floats, at seeds across the 32 bits."""
    if runtime.ready() is None:
        runtime._build(in_process=True)
    assert runtime.ready() is not None, "the native runtime did not build"
    gen = torch.Generator().manual_seed(0)
    values = torch.cat(
        [
            torch.randn(100_000, generator=gen) * 10.0 ** torch.randint(-40, 39, (100_000,), generator=gen),
            torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), -float("nan"), 3.4e38, -3.4e38, 1e-45]),
        ]
    )
    for seed in (0, 5, 2**31 - 2, 2**32 - 1):
        native = precision.round_stochastically(values, seed)
        reference = precision.round_stochastically_in_torch(values, seed)
        assert torch.equal(native.view(torch.int16), reference.view(torch.int16)), seed


#: Fresh state that bfloat16 cannot hold exactly, so that the first step differs from torch's already.
INEXACT_FRESH_STATE = {"Rprop": "its step sizes start at lr, which bfloat16 rounds"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.skip(INEXACT_FRESH_STATE[n])) if n in INEXACT_FRESH_STATE else n
        for n in ELEMENTWISE
        if ALGORITHMS[n].torch_twin
    ],
)
def test_the_first_step_with_bfloat16_state_is_torchs_step(name):
    """The update runs on float32 copies: the params after one step from fresh state are torch's for-loop
    bit for bit; each state tensor is one of the two bfloat16 numbers next to torch's float32 state."""
    params = [p for p in hard_params(torch.float32) if p.dim() > 0]
    theirs_params = [p.detach().clone().requires_grad_(p.requires_grad) for p in params]
    ours = getattr(scratchopt, name)(params, state_dtype=torch.bfloat16, **ALGORITHMS[name].example_kwargs)
    theirs = getattr(torch.optim, name)(theirs_params, foreach=False, **ALGORITHMS[name].example_kwargs)
    for p_ours, p_theirs, grad in zip(params, theirs_params, gradients(params, 0)):
        p_ours.grad, p_theirs.grad = grad, None if grad is None else grad.clone()
    ours.step()
    theirs.step()
    for a, b in zip(params, theirs_params):
        assert torch.equal(a, b)
        for key, value in theirs.state.get(b, {}).items():
            mine = ours.state[a][key]
            if key == "step" or not value.is_floating_point() or value.dim() == 0:
                assert torch.equal(mine.float(), value.float()), key
                continue
            assert mine.dtype == torch.bfloat16, key
            toward, away = bf16_neighbours(value.contiguous())
            hit = (mine.contiguous().view(torch.int16) == toward.view(torch.int16)) | (
                mine.contiguous().view(torch.int16) == away.view(torch.int16)
            )
            assert bool(hit.all()), key


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_impl_gives_the_loops_numbers_and_a_seed_reproduces_them(name):
    cls = ALGORITHMS[name]

    def run(impl: str) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = hard_params(torch.float32)
        optimizer = cls(hard_groups(params), state_dtype=torch.bfloat16, impl=impl, **cls.example_kwargs)
        for step in range(4):
            for p, grad in zip(params, gradients(params, step)):
                p.grad = grad
            optimizer.step()
        state = [t for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, torch.Tensor)]
        return [p.detach() for p in params] + state

    loop = run("loop")
    again = run("loop")
    assert all(torch.equal(a, b) for a, b in zip(again, loop, strict=True))
    for impl, strategy in scratchopt.strategies.STRATEGIES.items():
        if impl == "compiled" and name != "AdamW":
            continue  # the widening is the strategy's caller, the same for all; torch.compile's is the costliest
        ours = run(impl)
        for a, b in zip(ours, loop, strict=True):
            if strategy.exact or a.dtype != torch.bfloat16:
                # float32 values: the strategy's own bound (and a rounding apart, where they came from one)
                eps = torch.finfo(torch.bfloat16 if not strategy.exact else a.dtype).eps
                assert (
                    strategy.exact and torch.equal(a, b) or torch.allclose(a.float(), b.float(), rtol=2 * eps, atol=0)
                ), impl
            else:
                # bfloat16 state from a kernel a few float32 ulp off: the same rounding, or the neighbour
                apart = (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()
                assert int(apart.max()) <= 1, impl


def test_bfloat16_state_is_half_the_bytes_and_trains_like_float32():
    """AdamW's state: 4 bytes per parameter instead of 8; a least-squares fit ends where float32's does."""
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(256, 32, generator=gen)
    targets = inputs @ torch.randn(32, 4, generator=gen)
    finals = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = torch.nn.Linear(32, 4)
        optimizer = scratchopt.AdamW(model.parameters(), lr=3e-2, weight_decay=0.0, state_dtype=dtype)
        for _ in range(400):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(inputs), targets)
            loss.backward()
            optimizer.step()
        state_bytes = sum(
            t.numel() * t.element_size()
            for p in model.parameters()
            for key, t in optimizer.state[p].items()
            if key != "step"
        )
        assert state_bytes == (8 if dtype == torch.float32 else 4) * sum(p.numel() for p in model.parameters())
        finals[dtype] = loss.item()
    assert finals[torch.float32] < 1e-8 and finals[torch.bfloat16] < 1e-8


def test_stochastic_rounding_moves_bfloat16_params_by_updates_below_half_an_ulp():
    """SGD with lr·g = 10⁻⁴ on bfloat16 ones (half an ulp at 1 is 2⁻⁸ ≈ 0.0039): round to nearest never
    moves them; with stochastic rounding their mean follows float32's 1 − 100·10⁻⁴ = 0.99."""
    means = {}
    for stochastic in (False, True):
        torch.manual_seed(0)
        param = torch.ones(20_000, dtype=torch.bfloat16, requires_grad=True)
        optimizer = scratchopt.SGD([param], lr=1e-4, stochastic_rounding=stochastic)
        for _ in range(100):
            param.grad = torch.ones_like(param)
            optimizer.step()
        means[stochastic] = param.float().mean().item()
    assert means[False] == 1.0
    assert abs(means[True] - 0.99) < 1e-3


def test_state_dicts_round_trip_and_move_to_and_from_torch():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3)
    ours = scratchopt.AdamW(model.parameters(), lr=1e-2, state_dtype=torch.bfloat16)
    model(torch.randn(4, 8)).sum().backward()
    ours.step()
    loaded = saved_and_loaded(ours.state_dict())
    assert loaded["param_groups"][0]["state_dtype"] == torch.bfloat16
    assert loaded["state"][0]["exp_avg"].dtype == torch.bfloat16
    # torch.optim casts the state to the params' dtype; its values are ours.
    theirs = torch.optim.AdamW(copy.deepcopy(model).parameters())
    theirs.load_state_dict(copy.deepcopy(loaded))
    theirs_state = theirs.state[theirs.param_groups[0]["params"][0]]
    assert theirs_state["exp_avg"].dtype == torch.float32
    assert torch.equal(theirs_state["exp_avg"], loaded["state"][0]["exp_avg"].float())
    # and back: the group's state_dtype holds again after torch's cast.
    again = scratchopt.AdamW(model.parameters(), state_dtype=torch.bfloat16)
    again.load_state_dict(theirs.state_dict())
    assert again.state[model.weight]["exp_avg"].dtype == torch.bfloat16
    again.load_state_dict(loaded)
    assert again.state[model.weight]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("name", NOT_ELEMENTWISE)
def test_an_algorithm_that_is_not_elementwise_refuses_low_precision(name):
    params = [torch.zeros(3, 3, requires_grad=True)]
    with pytest.raises(ValueError, match="not elementwise"):
        getattr(scratchopt, name)(params, state_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="not elementwise"):
        getattr(scratchopt, name)(params, stochastic_rounding=True)


def test_bad_settings_are_refused_naming_the_argument():
    params = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="state_dtype"):
        scratchopt.AdamW(params, state_dtype=torch.float16)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        scratchopt.AdamW(params, stochastic_rounding="yes")
    optimizer = scratchopt.AdamW(params)
    with pytest.raises(ValueError, match="state_dtype"):
        optimizer.add_param_group({"params": [torch.zeros(2, requires_grad=True)], "state_dtype": torch.int8})


def test_a_subclass_constructor_passes_the_settings_on():
    """AdamW's constructor calls Adam's; a user's subclass calling AdamW's keeps what it was given."""

    class MyAdamW(scratchopt.AdamW):
        def __init__(self, params, lr=1e-3, **kwargs):
            super().__init__(params, lr=lr, **kwargs)

    optimizer = MyAdamW([torch.zeros(3, requires_grad=True)], state_dtype=torch.bfloat16)
    assert optimizer.param_groups[0]["state_dtype"] == torch.bfloat16
    assert scratchopt.AdamW([torch.zeros(3, requires_grad=True)]).param_groups[0]["state_dtype"] == torch.float32


def test_state_of_another_dtype_is_still_refused():
    """A bfloat16 group expects bfloat16 state for a float32 param: float32 state there (after an edit) is
    refused before anything changes, as any dtype mismatch is."""
    param = torch.randn(5, requires_grad=True)
    optimizer = scratchopt.AdamW([param], state_dtype=torch.bfloat16)
    param.grad = torch.randn(5)
    optimizer.step()
    optimizer.state[param]["exp_avg"] = torch.zeros(5, dtype=torch.float64)
    before = param.detach().clone()
    with pytest.raises(RuntimeError, match="exp_avg"):
        optimizer.step()
    assert torch.equal(param.detach(), before)


def test_grad_like_is_used_for_non_contiguous_params():
    """The non-contiguous param of the hard set keeps its layout through the float32 copies."""
    params = hard_params(torch.float32)
    optimizer = scratchopt.Adam(params, state_dtype=torch.bfloat16)
    for p, grad in zip(params, gradients(params, 0)):
        p.grad = None if grad is None else grad_like(grad, p)
    optimizer.step()
    assert not params[2].is_contiguous() and optimizer.state[params[2]]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_state_made_by_the_bookkeeping_and_sparse_steps_is_bfloat16_too(sparse):
    """SGD starts its momentum buffer in its own bookkeeping, and sparse gradients take the loop: both
    keep the group's state_dtype, step after step."""
    embedding = torch.nn.Embedding(50, 8, sparse=sparse)
    optimizer = scratchopt.SGD(embedding.parameters(), lr=0.1, momentum=0.9, state_dtype=torch.bfloat16)
    for _ in range(3):
        optimizer.zero_grad()
        embedding(torch.tensor([1, 2, 3])).square().sum().backward()
        optimizer.step()
    assert optimizer.state[embedding.weight]["momentum_buffer"].dtype == torch.bfloat16


@pytest.mark.parametrize("impl", ["loop", "fused"])
@pytest.mark.parametrize(
    ("name", "kwargs", "dtype"),
    [
        ("AdamW", {"state_dtype": torch.bfloat16}, torch.float32),
        ("SGD", {"momentum": 0.9, "state_dtype": torch.bfloat16}, torch.float32),
        ("Adam", {"stochastic_rounding": True}, torch.bfloat16),
        ("SGD", {"momentum": 0.9, "stochastic_rounding": True}, torch.bfloat16),
    ],
)
def test_chunks_and_slices_change_no_number(name, kwargs, dtype, impl, monkeypatch):
    """A step in chunks of at most 7 elements (every param cut in slices) is bit for bit the step in one
    chunk: the roundings depend on each element's index in its param, not on the slicing."""

    def run(chunk: int) -> list[torch.Tensor]:
        monkeypatch.setattr(precision, "CHUNK_ELEMENTS", chunk)
        torch.manual_seed(0)
        params = [torch.randn(shape).to(dtype).requires_grad_() for shape in ((5, 6), (29,), (3,))]
        optimizer = getattr(scratchopt, name)(params, lr=0.01, impl=impl, **kwargs)
        for step in range(3):
            for p, grad in zip(params, gradients(params, step)):
                p.grad = grad
            optimizer.step()
        state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
        return [p.detach().clone() for p in params] + state

    whole, sliced = run(1 << 22), run(7)
    assert len(whole) == len(sliced)
    for a, b in zip(whole, sliced):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("name", ["ScheduleFreeAdamW", "ScheduleFreeSGD"])
def test_schedule_free_switches_modes_with_bfloat16_state(name):
    """eval() and train() interpolate toward the bfloat16 z in the params' dtype."""
    param = torch.randn(50, requires_grad=True)
    optimizer = getattr(scratchopt, name)([param], lr=0.01, state_dtype=torch.bfloat16)
    param.grad = torch.randn(50)
    optimizer.step()
    y = param.detach().clone()
    optimizer.eval()
    optimizer.train()
    assert optimizer.state[param]["z"].dtype == torch.bfloat16
    torch.testing.assert_close(param.detach(), y, rtol=1e-5, atol=1e-6)
    optimizer.step()


def test_a_torch_state_dict_keeps_the_constructors_precision():
    """torch.optim's state_dict has no state_dtype: the group keeps the one it was built with."""
    model = torch.nn.Linear(4, 2)
    theirs = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    theirs.step()
    ours = scratchopt.AdamW(model.parameters(), state_dtype=torch.bfloat16)
    ours.load_state_dict(theirs.state_dict())
    assert ours.param_groups[0]["state_dtype"] == torch.bfloat16
    assert ours.state[model.weight]["exp_avg"].dtype == torch.bfloat16


def test_a_subclass_that_names_the_setting_receives_it():
    seen = []

    class Mine(scratchopt.AdamW):
        def __init__(self, params, lr=1e-3, state_dtype=torch.float32):
            seen.append(state_dtype)
            super().__init__(params, lr=lr, state_dtype=state_dtype)

    optimizer = Mine([torch.zeros(3, requires_grad=True)], state_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16] and optimizer.param_groups[0]["state_dtype"] == torch.bfloat16


_FSDP2_REFUSAL = """
import os, sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard
import scratchopt
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
model = fully_shard(torch.nn.Linear(64, 128), shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
optimizer = scratchopt.AdamW(model.parameters(), state_dtype="8bit")
model(torch.randn(2, 64)).sum().backward()
before = [p.to_local().clone() for p in model.parameters()]
try:
    optimizer.step()
except NotImplementedError as error:
    unchanged = all(torch.equal(b, p.to_local()) for b, p in zip(before, model.parameters()))
    print("refused" if unchanged and not optimizer.state else "changed", error)
dist.destroy_process_group()
"""


def test_8bit_state_of_a_param_sharded_along_its_columns_is_refused_before_anything_changes(tmp_path):
    """8-bit state of a DTensor is kept row by row: a weight FSDP2 shards along its second dimension
    (``shard_placement_fn``) is refused with NotImplementedError, params and state untouched. Sharded
    params in low-precision groups otherwise train as unsharded ones (``tests/test_distributed.py``)."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", _FSDP2_REFUSAL, str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert done.stdout.startswith("refused"), done.stdout + done.stderr
    assert "Shard(dim=1)" in done.stdout and "parameter 0" in done.stdout, done.stdout


#: Algorithms whose bfloat16 step the fused kernel takes natively here, each for a reason: the default
#: bookkeeping (AdamW), state made by the algorithm's own (SGD), scalars counted by it (NAdam), a program
#: that changes between steps (RAdam), several state tensors (Adan), sign updates (Lion) and an
#: algorithm keeping counters in the group (ScheduleFreeAdamW).
NATIVE_LOW = [
    ("AdamW", {"state_dtype": torch.bfloat16}, torch.float32),
    ("AdamW", {"state_dtype": torch.bfloat16, "amsgrad": True}, torch.float32),
    ("SGD", {"momentum": 0.9, "state_dtype": torch.bfloat16}, torch.float32),
    ("NAdam", {"state_dtype": torch.bfloat16}, torch.float32),
    ("RAdam", {"state_dtype": torch.bfloat16}, torch.float32),
    ("Adan", {"state_dtype": torch.bfloat16}, torch.float32),
    ("Lion", {"state_dtype": torch.bfloat16}, torch.float32),
    ("ScheduleFreeAdamW", {"state_dtype": torch.bfloat16}, torch.float32),
    ("AdamW", {"stochastic_rounding": True}, torch.bfloat16),
    ("SGD", {"momentum": 0.9, "stochastic_rounding": True}, torch.bfloat16),
    # 8-bit state: the large param's packed, the small ones' float32, in one kernel.
    ("AdamW", {"state_dtype": "8bit"}, torch.float32),
    ("AdamW", {"state_dtype": "8bit", "amsgrad": True}, torch.float32),
    ("SGD", {"momentum": 0.9, "state_dtype": "8bit"}, torch.float32),
    ("Adan", {"state_dtype": "8bit"}, torch.float32),
    ("Lion", {"state_dtype": "8bit"}, torch.float32),
    ("ScheduleFreeAdamW", {"state_dtype": "8bit"}, torch.float32),
]


def _low_run(name, kwargs, dtype, steps=4):
    torch.manual_seed(0)
    # 70,000 elements: a param that crosses a block of the noise table; two small ones.
    params = [torch.randn(shape).to(dtype).requires_grad_() for shape in ((70_000,), (5, 6), (3,))]
    optimizer = getattr(scratchopt, name)(params, impl="fused", **kwargs)
    for step in range(steps):
        for p, grad in zip(params, gradients(params, step)):
            p.grad = grad
        optimizer.step()
    state = [t for p in params for t in optimizer.state[p].values() if isinstance(t, torch.Tensor)]
    return [p.detach().clone() for p in params] + state


@pytest.mark.parametrize(("name", "kwargs", "dtype"), NATIVE_LOW, ids=lambda v: str(v) if isinstance(v, str) else "")
def test_the_fused_kernel_keeps_low_precision_state_in_place_bit_for_bit_the_widened_step(
    name, kwargs, dtype, monkeypatch
):
    """The generated kernel reads the bfloat16 (or 8-bit) tensors, updates in float32 and rounds (or
    quantises) them back in one pass: bit for bit the eager widen-update-narrow of precision.update running
    the same strategy, at the same seeds; after the first step (which makes the state) no float32 copy is
    made."""
    if runtime.ready() is None:
        runtime._build(in_process=True)
    widened = []
    eager_update = precision.update

    def counting(*args, **kw):
        widened.append(1)
        return eager_update(*args, **kw)

    monkeypatch.setattr(precision, "update", counting)
    native = _low_run(name, kwargs, dtype)
    assert len(widened) <= 1, f"{len(widened)} steps took the widened path"
    monkeypatch.setattr(Fused, "plan_group", lambda *args: None)
    reference = _low_run(name, kwargs, dtype)
    assert len(native) == len(reference)
    for a, b in zip(native, reference):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert any(t.dtype in (torch.bfloat16, torch.uint8) for t in native[3:])


def test_a_table_the_kernel_cannot_take_falls_back_with_the_same_seed(monkeypatch):
    """Where no kernel can run once the steps are counted, the step is the widened one with the seed
    already drawn and the steps counted once: the same numbers, and torch's generator drawn as often."""
    if runtime.ready() is None:
        runtime._build(in_process=True)
    case = ("AdamW", {"state_dtype": torch.bfloat16}, torch.float32)
    monkeypatch.setattr(Fused, "plan_group", lambda *args: None)
    reference = _low_run(*case)
    after_reference = torch.rand(())
    monkeypatch.undo()
    monkeypatch.setattr(Fused, "launch", lambda *args, **kwargs: False)
    fallen_back = _low_run(*case)
    assert torch.equal(torch.rand(()), after_reference)
    for a, b in zip(fallen_back, reference):
        assert torch.equal(a, b)
