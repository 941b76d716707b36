"""Our CUDA selective scan against the sequential reference (run on a GPU machine; skipped cleanly without CUDA).

Tolerances: float32 — rtol 1e-4 / atol 1e-4 relative to the largest value, as the CPU paths (sums over up to 256
states in another order); float16 / bfloat16 inputs — both sides compute in float32 from the same rounded inputs,
so they agree to the rounding of the result (rtol 1e-2 float16, 2e-2 bfloat16). Gradients of low-precision
inputs come back in their dtype: compared at 3e-2 / 6e-2 relative to the largest value.
"""

from __future__ import annotations

import pytest
import torch

from cil.ops.selective_scan import cuda_unavailable_reason, selective_scan, selective_scan_reference
from tests.helpers import VARIANTS, assert_bitwise_equal, assert_close, make_inputs, run

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_run(inputs, softplus, dtype):
    gpu = {k: (v.detach().to("cuda", dtype).requires_grad_() if v is not None else None) for k, v in inputs.items()}
    for key in ("A", "D", "delta_bias"):  # parameters stay float32, as in Mamba
        if gpu[key] is not None:
            gpu[key] = inputs[key].detach().cuda().float().requires_grad_()
    return run(selective_scan, gpu, softplus, impl="cuda")


def reference_run(inputs, softplus, dtype):
    rounded = {k: (v.detach().to(dtype).float().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    for key in ("A", "D", "delta_bias"):
        if rounded[key] is not None:
            rounded[key] = inputs[key].detach().float().requires_grad_()
    return run(selective_scan_reference, rounded, softplus)


TOLERANCE = {torch.float32: (1e-4, 1e-4, 1e-4), torch.float16: (1e-2, 1e-2, 3e-2), torch.bfloat16: (2e-2, 2e-2, 6e-2)}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("length", [1, 7, 64, 257])
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cuda_equals_reference(variant, n, length, dtype):
    form, groups, z, D, bias, softplus = VARIANTS[variant]
    inputs = make_inputs(2, 8, length, n, form, groups, z, D, bias, positive_delta=not softplus)
    ref = reference_run(inputs, softplus, dtype)
    fast = cuda_run(inputs, softplus, dtype)
    rtol, atol, grad_tol = TOLERANCE[dtype]
    assert fast[0].dtype == dtype
    assert_close(fast[0].cpu(), ref[0], rtol, atol, "out")
    assert_close(fast[1].cpu(), ref[1], rtol, atol, "last state")
    for name in ref[2]:
        assert_close(fast[2][name].cpu(), ref[2][name], grad_tol, grad_tol, f"d{name}")


@needs_cuda
@pytest.mark.parametrize("length, n", [(4096, 16), (49, 256), (300, 256)])
def test_long_sequences_and_large_state(length, n):
    inputs = make_inputs(2, 8, length, n, "varying", 2, True, True, True)
    ref = reference_run(inputs, True, torch.float32)
    fast = cuda_run(inputs, True, torch.float32)
    assert_close(fast[0].cpu(), ref[0], 1e-4, 1e-4, "out")
    assert_close(fast[1].cpu(), ref[1], 1e-4, 1e-4, "last state")
    for name in ref[2]:
        assert_close(fast[2][name].cpu(), ref[2][name], 2e-4, 2e-4, f"d{name}")


@needs_cuda
def test_two_runs_are_bitwise_identical():
    inputs = make_inputs(4, 64, 300, 16, "varying", 4, True, True, True)
    first, second = cuda_run(inputs, True, torch.float32), cuda_run(inputs, True, torch.float32)
    assert_bitwise_equal(first, second)


def test_without_cuda_forcing_the_kernel_says_why():
    if torch.cuda.is_available():
        assert cuda_unavailable_reason(torch.zeros(1, device="cuda", dtype=torch.float64)) is not None
        return
    assert cuda_unavailable_reason(torch.zeros(1)) == "the inputs are on cpu, not on a CUDA device"
    inputs = {k: v.detach() if v is not None else None for k, v in make_inputs(1, 4, 5, 2, "fixed", 1, 0, 0, 0).items()}
    with pytest.raises(RuntimeError, match="impl='cuda' is unavailable"):
        selective_scan(**inputs, impl="cuda")


@pytest.mark.slow
def test_the_cuda_kernel_compiles_and_links_here(tmp_path, monkeypatch):
    """Compiles the kernel for sm_80 and sm_90 with nvcc (no GPU needed) and loads the module."""
    import shutil

    from cil.ops.selective_scan import _cuda

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    module = _cuda.build()
    assert hasattr(module, "fwd") and hasattr(module, "bwd")
