"""impl="loop" is bit-for-bit equal to torch.optim's for-loop on every optim_db configuration."""

from __future__ import annotations

import pytest
import torch

from parity import implemented, optim_db_configs, run_side_by_side

REAL_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
COMPLEX_DTYPES = [torch.complex64, torch.complex128]


def _cases(dtypes: list[torch.dtype]) -> list:
    return [
        pytest.param(name, desc, kwargs, dtype, id=f"{name}-{desc}-{str(dtype).removeprefix('torch.')}")
        for name in implemented()
        for dtype in dtypes
        for desc, kwargs in optim_db_configs(name)
    ]


@pytest.mark.parametrize("name,desc,kwargs,dtype", _cases(REAL_DTYPES))
def test_loop_matches_torch_bit_for_bit(name, desc, kwargs, dtype):
    run_side_by_side(name, kwargs, dtype)


@pytest.mark.parametrize("name,desc,kwargs,dtype", _cases(COMPLEX_DTYPES))
def test_loop_matches_torch_on_complex_params(name, desc, kwargs, dtype):
    run_side_by_side(name, kwargs, dtype)
