"""Blockwise 8-bit state (:mod:`scratchopt.quantization`, ``state_dtype="8bit"``): the dynamic map against
the paper's construction, the quantiser's round trip, block edges, zero, constant and non-finite blocks,
the native passes against the torch definition bit for bit, and the optimizers' contract with 8-bit
state (storage, bytes, every strategy, training, state_dicts to and from torch.optim)."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

import scratchopt
from scratchopt import precision, quantization
from scratchopt.algorithms import ALGORITHMS
from scratchopt.strategies.kernels import native, recording, runtime
from scratchopt.testing import gradients, saved_and_loaded

ELEMENTWISE = [name for name, cls in ALGORITHMS.items() if getattr(cls, "elementwise", False)]


@pytest.fixture(scope="module", autouse=True)
def native_runtime():
    if runtime.ready() is None:
        runtime._build(in_process=True)
    assert runtime.ready() is not None, "the native runtime did not build"


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_dynamic_map_spends_its_codes_by_decade(signed):
    """Per decade [10^(e−7), 10^(e−6)), e = 0 … 6: 2ᵉ codes each side (2ᵉ⁺¹ unsigned), the midpoints of a
    linear grid from 0.1 to 1 of that decade; and 0 and 1."""
    values = quantization.dynamic_map(signed)
    assert values.shape == (256,) and values.dtype == torch.float32
    assert bool((values[1:] > values[:-1]).all()), "sorted, no value twice"
    assert 0.0 in values.tolist() and values.max().item() == 1.0
    positive = values[(values > 0) & (values < 1)]
    for e in range(7):
        scale = 10.0 ** (e - 6)
        in_decade = positive[(positive >= 0.1 * scale * 0.999) & (positive < scale)]
        count = 2**e if signed else 2 ** (e + 1)
        assert in_decade.numel() == count, e
        grid = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float64)
        expected = (grid[:-1] + grid[1:]) / 2 * scale
        assert torch.allclose(in_decade.double(), expected, rtol=1e-6, atol=0), e
    if signed:
        negative = values[values < 0]
        assert torch.equal(negative.flip(0), -positive)
    else:
        assert bool((values >= 0).all())


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_dynamic_map_is_bitsandbytes_one(signed):
    from bitsandbytes.functional import create_dynamic_map

    assert torch.equal(quantization.dynamic_map(signed), create_dynamic_map(signed=signed))


def _values(n: int, seed: int, signed: bool = True) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-6, 3, (n,), generator=gen).float()
    return values if signed else values.abs()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("n", [4096, 4097, 5000, 70_001])
def test_the_round_trip_error_is_within_half_a_step_of_the_map(n, signed):
    """x̂ is the map value nearest x / a_b, times a_b: its error is at most half the gap of the map around
    x / a_b (a few float32 roundings aside); a block's largest positive value comes back exactly."""
    x = _values(n, n, signed)
    packed = quantization.quantize(x, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == n + 4 * -(-n // 256)
    back = quantization.dequantize(packed, n, signed)
    absmax = quantization.absmax_of(packed, n)
    block_max = absmax.repeat_interleave(256)[:n]
    normalized = x / block_max
    values = quantization.dynamic_map(signed)
    index = torch.searchsorted(values, normalized).clamp(1, 255)
    gap = values[index] - values[index - 1]
    bound = gap / 2 * block_max * (1 + 1e-5) + block_max * 1e-7
    assert bool(((back - x).abs() <= bound).all())
    # Each block's maximum and the absolute maximum of its values.
    padded = torch.nn.functional.pad(x.abs(), (0, -n % 256)).view(-1, 256)
    assert torch.equal(absmax, padded.amax(1))
    largest = x == block_max
    assert torch.equal(back[largest], x[largest])


def test_block_edges_zero_constant_and_non_finite_blocks():
    n = 256 * 20 + 3  # a short last block
    x = _values(n, 1)
    x[256:512] = 0.0  # a block of zeros
    x[512:768] = -0.0
    x[768:1024] = 2.5  # a constant block
    x[1024 + 7] = float("nan")  # non-finite blocks
    x[1280 + 9] = float("inf")
    x[1536 + 11] = -float("inf")
    x[-3:] = torch.tensor([0.5, -0.25, 0.125])
    packed = quantization.quantize(x)
    back = quantization.dequantize(packed, n)
    absmax = quantization.absmax_of(packed, n)
    assert absmax[1].item() == 0.0 and absmax[2].item() == 0.0
    assert bool((back[256:768] == 0).all())
    assert bool((back[768:1024] == 2.5).all())
    for block in (4, 5, 6):
        assert absmax[block].isnan() and bool(back[block * 256 : (block + 1) * 256].isnan().all())
    assert bool(back[: 4 * 256].isfinite().all()) and bool(back[7 * 256 :].isfinite().all())
    assert absmax[-1].item() == 0.5 and back[-3].item() == 0.5
    assert abs(back[-2].item() + 0.25) <= 0.5 * 0.01 and abs(back[-1].item() - 0.125) <= 0.5 * 0.01


def _hard_values(signed: bool) -> torch.Tensor:
    """Values of every magnitude, blocks whose maximum is 1 holding the float32 numbers on and next to
    every midpoint of the map, signed zeros, zero and non-finite blocks, a short last block."""
    mids = quantization.midpoints(signed)
    bits = mids.view(torch.int32)
    near = torch.cat([(bits + d).view(torch.float32) for d in range(-3, 4)])
    near = near[near.abs() <= 1]
    per_block = 255
    blocks = []
    for start in range(0, near.numel(), per_block):
        chunk = near[start : start + per_block]
        blocks.append(torch.cat([chunk, torch.ones(1), torch.zeros(per_block - chunk.numel())]))
    special = torch.zeros(256 * 3)
    special[5], special[300], special[600] = float("nan"), -0.0, float("inf")
    x = torch.cat([*blocks, special, _values(70_001, 3, signed)])
    return x if signed else x.abs()


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_native_passes_are_the_torch_definition_bit_for_bit(signed):
    """The runtime's quantiser and dequantiser on the hard values; slices."""
    x = _hard_values(signed)
    n = x.numel()
    reference = quantization.quantize_in_torch(x, signed)
    native = quantization.quantize(x, signed)
    assert torch.equal(native, reference)
    assert torch.equal(  # bit patterns: NaN blocks included
        quantization.dequantize(reference, n, signed).view(torch.int32),
        quantization.dequantize_in_torch(reference, n, signed).view(torch.int32),
    )
    # A slice starting on a block boundary quantises into its place.
    part = torch.empty_like(reference)
    quantization.quantize_part(x[:512], part, n, 0, signed)
    quantization.quantize_part(x[512:], part, n, 512, signed)
    assert torch.equal(part, reference)
    assert torch.equal(
        quantization.dequantize_part(reference, n, 512, 2048, signed).view(torch.int32),
        quantization.dequantize_in_torch(reference, n, signed)[512:2048].view(torch.int32),
    )


@pytest.mark.parametrize("per_row", [256, 300, 17])
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_row_by_row_storage_is_each_row_quantised_as_its_own_tensor(per_row, signed):
    """The storage of FSDP2-sharded state: row r of the packed tensor is the flat storage of row r of
    the values (short last blocks, a zero row and a NaN row included), and so is its dequantisation;
    where the rows are whole blocks, the codes are the flat storage's."""
    values = _values(7 * per_row, 5, signed).view(7, per_row)
    values[2] = 0.0
    values[4, 3] = float("nan")
    packed = torch.full(quantization.rows_shape(values.shape), 0xAB, dtype=torch.uint8)
    quantization.quantize_rows(values, packed, signed)
    back = quantization.dequantize_rows(packed, per_row, signed)
    for row in range(7):
        expected = quantization.quantize_in_torch(values[row], signed)
        assert torch.equal(packed[row], expected), row
        assert torch.equal(
            back[row].view(torch.int32), quantization.dequantize_in_torch(expected, per_row, signed).view(torch.int32)
        ), row
    param = torch.zeros(7, per_row)
    assert quantization.is_packed_by_rows(packed, param) and quantization.is_packed(packed, param)
    assert not quantization.is_packed_by_rows(quantization.quantize(values.reshape(-1)), param)
    none = torch.empty(quantization.rows_shape((0, per_row)), dtype=torch.uint8)  # a rank holding no row
    quantization.quantize_rows(values[:0], none, signed)
    assert quantization.dequantize_rows(none, per_row, signed).shape == (0, per_row)
    if per_row % quantization.BLOCK == 0:
        flat = quantization.quantize(values.reshape(-1), signed)
        assert torch.equal(packed[:, :per_row].reshape(-1), quantization.codes_of(flat, values.numel()))


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_runtime_quantises_alike_with_every_vector_extension_of_this_cpu(signed):
    """The runtime's passes use the kernels' block helpers with the CPU's vector extension: each one
    this CPU has (AVX-512, AVX2, none) gives the torch definition bit for bit on the hard values."""
    module = runtime.ready()
    x = _hard_values(signed)
    n = x.numel()
    reference = quantization.quantize_in_torch(x, signed)
    values = quantization.dequantize_in_torch(reference, n, signed)
    levels = range(module.cpu_vector() + 1)
    for level in levels:
        packed = torch.empty_like(reference)
        module.quantize_blockwise(x, packed[:n], packed[n:], quantization.lookup_table(signed), level)
        assert torch.equal(packed, reference), f"vector extension {level}"
        out = torch.empty(n)
        module.dequantize_blockwise(reference[:n], reference[n:], out, quantization.dynamic_map(signed), level)
        assert torch.equal(out.view(torch.int32), values.view(torch.int32)), f"vector extension {level}"
    with pytest.raises(RuntimeError, match="no vector extension"):
        module.quantize_blockwise(x, reference[:n].clone(), reference[n:].clone(), quantization.lookup_table(signed), 3)


def _copy_through(param, grad, state):
    param.copy_(state)
    state.copy_(grad)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_the_generated_kernel_quantises_as_the_definition_bit_for_bit(signed):
    """A generated kernel with 8-bit state dequantises the codes it reads and quantises what it writes,
    block by block, each thread on whole blocks (vector lookups, a short last block): on the hard values,
    bit for bit the torch definition."""
    x = _hard_values(signed)
    n = x.numel()
    old = torch.randn(n, generator=torch.Generator().manual_seed(1))
    old = old if signed else old.abs()
    stored = quantization.quantize_in_torch(old, signed)
    param = torch.empty(n)
    program = recording.record(_copy_through, [param, x, torch.zeros(n)], {})
    kept = native.PACKED if signed else native.PACKED_UNSIGNED
    kernel = native.kernel_for(program, (torch.float32, torch.float32, kept))
    assert kernel is not None
    constants = quantization.native_tables().data_ptr()
    kernel([n | native.PACKED_ROW], [param.data_ptr(), x.data_ptr(), stored.data_ptr()], [0.0], True, 0, constants)
    assert torch.equal(stored, quantization.quantize_in_torch(x, signed))
    expected = quantization.dequantize_in_torch(quantization.quantize_in_torch(old, signed), n, signed)
    assert torch.equal(param.view(torch.int32), expected.view(torch.int32))


# ---- optimizers ----------------------------------------------------------------------------------


def _run(name, impl, steps=3, shapes=((80, 70), (5, 6), (4100,)), **kwargs):
    torch.manual_seed(0)
    params = [torch.randn(shape, requires_grad=True) for shape in shapes]
    cls = ALGORITHMS[name]
    optimizer = cls(params, impl=impl, state_dtype="8bit", **{**cls.example_kwargs, **kwargs})
    for step in range(steps):
        for p, grad in zip(params, gradients(params, step)):
            p.grad = grad
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("name", ELEMENTWISE)
def test_every_elementwise_algorithm_keeps_8bit_state_under_every_impl(name):
    """Large params keep their moments packed (weight-like state such as Schedule-Free's z stays
    float32), small ones float32; foreach is the loop bit for bit, the kernels within a code step."""
    cls = ALGORITHMS[name]
    loop_params, loop = _run(name, "loop")
    big, small = loop_params[0], loop_params[1]
    for key in cls.state_keys:  # the update's state (Prodigy's reduction keeps its own in float32)
        value = loop.state[big].get(key)
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if key in cls.weight_like_state:
            assert value.dtype == torch.float32 and value.shape == big.shape, key
        else:
            assert value.dtype == torch.uint8 and value.numel() == quantization.packed_numel(big.numel()), key
    assert all(v.dtype != torch.uint8 for v in loop.state[small].values() if isinstance(v, torch.Tensor))
    for impl, strategy in scratchopt.strategies.STRATEGIES.items():
        if impl == "loop" or (impl == "compiled" and name != "AdamW"):
            continue  # the dequantising is the strategy's caller, the same for all; torch.compile's is the costliest
        params, ours = _run(name, impl)
        for a, b in zip(params, loop_params):
            if strategy.exact:
                assert torch.equal(a, b), impl
            else:
                assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), impl
        for key, value in ours.state[params[0]].items():
            if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:
                theirs = loop.state[big][key]
                codes = value[: big.numel()].int() - theirs[: big.numel()].int()
                assert strategy.exact and torch.equal(value, theirs) or int(codes.abs().max()) <= 1, (impl, key)


def test_8bit_adamw_keeps_about_2_bytes_per_param_and_trains_like_float32():
    torch.manual_seed(0)
    features = torch.randn(256, 128)
    target = features @ torch.randn(128, 64)

    def fit(**kwargs) -> tuple[float, float]:
        torch.manual_seed(1)
        model = torch.nn.Linear(128, 64)
        optimizer = scratchopt.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0, **kwargs)
        for _ in range(300):
            optimizer.zero_grad()
            loss = (model(features) - target).square().mean()
            loss.backward()
            optimizer.step()
        state = sum(
            t.numel() * t.element_size()
            for s in optimizer.state.values()
            for t in s.values()
            if isinstance(t, torch.Tensor) and t.dim() > 0
        )
        return loss.item(), state / sum(p.numel() for p in model.parameters())

    full, full_bytes = fit()
    eight, eight_bytes = fit(state_dtype="8bit")
    assert full_bytes > 7.9 and eight_bytes <= 2.1, eight_bytes
    assert eight < 2 * full + 1e-3, (eight, full)


def test_state_dicts_round_trip_and_move_to_and_from_torch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 4))
    ours = scratchopt.AdamW(model.parameters(), lr=1e-2, state_dtype="8bit")
    model(torch.randn(4, 64)).sum().backward()
    ours.step()
    loaded = saved_and_loaded(ours.state_dict())
    weight = model[0].weight
    assert loaded["param_groups"][0]["state_dtype"] == "8bit"
    assert loaded["state"][0]["exp_avg"].dtype == torch.uint8
    again = scratchopt.AdamW(model.parameters(), state_dtype="8bit")
    again.load_state_dict(loaded)  # torch casts every state tensor to the param's dtype on the way in
    assert torch.equal(again.state[weight]["exp_avg"], ours.state[weight]["exp_avg"])
    # To torch.optim: dequantised, float32, shaped like the params.
    theirs = torch.optim.AdamW(copy.deepcopy(model).parameters())
    theirs.load_state_dict(precision.float32_state_dict(ours))
    theirs_state = theirs.state[theirs.param_groups[0]["params"][0]]
    expected = quantization.dequantize(ours.state[weight]["exp_avg"], weight.numel()).view(weight.shape)
    assert theirs_state["exp_avg"].dtype == torch.float32 and torch.equal(theirs_state["exp_avg"], expected)
    assert "state_dtype" not in theirs.param_groups[0]
    # And back: quantised again, each value within one step of the map of what torch held.
    back = scratchopt.AdamW(model.parameters(), state_dtype="8bit")
    back.load_state_dict(theirs.state_dict())
    packed = back.state[weight]["exp_avg"]
    assert packed.dtype == torch.uint8
    values = quantization.dequantize(packed, weight.numel()).view(weight.shape)
    assert torch.allclose(values, theirs_state["exp_avg"], rtol=0.1, atol=1e-3 * expected.abs().max().item())


def test_an_algorithm_that_is_not_elementwise_refuses_8bit_state():
    with pytest.raises(ValueError, match="not elementwise"):
        scratchopt.Lamb([torch.zeros(3, 3, requires_grad=True)], state_dtype="8bit")
    with pytest.raises(ValueError, match="state_dtype"):
        scratchopt.AdamW([torch.zeros(3, requires_grad=True)], state_dtype="4bit")


def test_packed_state_of_the_wrong_size_is_refused_naming_the_key():
    param = torch.zeros(5000, requires_grad=True)
    optimizer = scratchopt.AdamW([param], state_dtype="8bit")
    param.grad = torch.ones(5000)
    optimizer.step()
    optimizer.state[param]["exp_avg"] = optimizer.state[param]["exp_avg"][:-4].clone()
    before = param.detach().clone()
    with pytest.raises(RuntimeError, match="exp_avg"):
        optimizer.step()
    assert torch.equal(param.detach(), before)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_8bit_adamw_and_bitsandbytes_adamw8bit_track_float32_alike():
    """Same map and block size; bitsandbytes rounds its updates in other places (its CPU path), so the
    two are not equal, but after 100 steps each is about as far from float32 AdamW as the other."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    start = torch.randn(64, 256)
    grads = [torch.randn(64, 256) for _ in range(100)]

    def run(make):
        param = start.clone().requires_grad_()
        optimizer = make([param])
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        return param.detach()

    full = run(lambda p: torch.optim.AdamW(p, lr=1e-3))
    ours = run(lambda p: scratchopt.AdamW(p, lr=1e-3, state_dtype="8bit"))
    theirs = run(lambda p: bnb.optim.AdamW8bit(p, lr=1e-3, min_8bit_size=4096))
    ours_apart, theirs_apart = (ours - full).abs().max().item(), (theirs - full).abs().max().item()
    assert ours_apart > 0 and ours_apart < 3 * theirs_apart + 1e-6, (ours_apart, theirs_apart)


def test_the_float32_state_that_8bit_state_replaces_is_handed_back(monkeypatch):
    """Each param's first step makes float32 state and quantises it: every RELEASE_BYTES of float32 freed,
    the freed heap pages are handed back (glibc's malloc_trim), so the holes between the packed tensors do
    not stay resident."""
    quantization.native_tables()  # made once per process, and trimmed after: not this test's count
    trims = []
    monkeypatch.setattr(precision, "_malloc_trim", lambda: trims.append)
    monkeypatch.setattr(precision, "_FREED", [0])
    monkeypatch.setattr(precision, "RELEASE_BYTES", 1 << 20)
    params = [torch.randn(256, 256, requires_grad=True) for _ in range(10)]  # 2 × 256 KiB of moments each
    optimizer = scratchopt.AdamW(params, state_dtype="8bit")
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    assert len(trims) == 5 and precision._FREED[0] == 0
    optimizer.step()  # no state made: nothing freed
    assert len(trims) == 5
