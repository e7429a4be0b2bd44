"""impl="loop" is bit-for-bit equal to torch.optim's for-loop on every optim_db configuration."""

from __future__ import annotations

import pytest
import torch
from parity import complex_skip_reason, harness_skip_reason, implemented, optim_db_configs, run_side_by_side

REAL_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
COMPLEX_DTYPES = [torch.complex64, torch.complex128]


def _cases(dtypes: list[torch.dtype]) -> list:
    """Every optim_db configuration in every dtype; one skipped case (with the reason) per algorithm that
    the harness cannot drive or whose torch class refuses these dtypes."""
    cases = []
    for name in implemented():
        reason = harness_skip_reason(name) or (complex_skip_reason(name) if dtypes[0].is_complex else None)
        if reason is not None:
            cases.append(pytest.param(name, "-", {}, dtypes[0], id=f"{name}-skipped", marks=pytest.mark.skip(reason)))
            continue
        cases += [
            pytest.param(name, desc, kwargs, dtype, id=f"{name}-{desc}-{str(dtype).removeprefix('torch.')}")
            for dtype in dtypes
            for desc, kwargs in optim_db_configs(name)
        ]
    return cases


@pytest.mark.parametrize("name,desc,kwargs,dtype", _cases(REAL_DTYPES))
def test_loop_matches_torch_bit_for_bit(name, desc, kwargs, dtype):
    run_side_by_side(name, kwargs, dtype)


@pytest.mark.parametrize("name,desc,kwargs,dtype", _cases(COMPLEX_DTYPES))
def test_loop_matches_torch_on_complex_params(name, desc, kwargs, dtype):
    run_side_by_side(name, kwargs, dtype)
