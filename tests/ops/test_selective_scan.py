"""The chunked and fused-CPU selective scans against the sequential reference: outputs, final states, gradients.

Tolerances: float64 — 1e-10 (same arithmetic, another order of summation); float32 — rtol 1e-4 / atol 1e-4 relative
to the largest value (sums of up to 257 terms in another order); bfloat16 inputs — both compute in float32 from the
same rounded inputs, so outputs agree to bfloat16 rounding of the result (rtol 2e-2).
"""

from __future__ import annotations

import pytest
import torch

from cil.ops.selective_scan import selective_scan, selective_scan_chunked, selective_scan_reference
from cil.ops.selective_scan.cpu import selective_scan_cpu
from tests.helpers import NAMES, VARIANTS, assert_close, make_inputs, run

FAST = {"chunked": selective_scan_chunked, "cpu": selective_scan_cpu}


@pytest.mark.parametrize("length", [1, 7, 64, 257])
@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("impl", sorted(FAST))
def test_fast_paths_equal_reference_fp32(impl, length, n, variant):
    form, groups, z, D, bias, softplus = VARIANTS[variant]
    inputs = make_inputs(2, 8, length, n, form, groups, z, D, bias, positive_delta=not softplus)
    ref = run(selective_scan_reference, inputs, softplus)
    fast = run(FAST[impl], inputs, softplus)
    assert fast[0].dtype == torch.float32 and fast[1].shape == (2, 8, n)
    assert_close(fast[0], ref[0], 1e-4, 1e-4, "out")
    assert_close(fast[1], ref[1], 1e-4, 1e-4, "last state")
    assert fast[2].keys() == ref[2].keys()
    for name in ref[2]:
        assert fast[2][name].shape == inputs[name].shape
        assert_close(fast[2][name], ref[2][name], 1e-4, 1e-4, f"d{name}")


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("chunk, tile_bytes", [(1, 1), (3, 1), (3, 384), (8, 2**30), (300, 2**30)])
def test_every_chunking_and_tiling_gives_the_same_float64_result(parallel, chunk, tile_bytes):
    """Chunk of 1 step, ragged chunks, one chunk for all; a batch row per tile or one tile; both chunk solvers."""
    inputs = make_inputs(3, 8, 45, 4, "varying", 2, True, True, True, dtype=torch.float64)
    ref = run(selective_scan_reference, inputs, True)
    fast = run(selective_scan_chunked, inputs, True, chunk=chunk, tile_bytes=tile_bytes, parallel=parallel)
    for a, b, name in [(fast[0], ref[0], "out"), (fast[1], ref[1], "last")] + [
        (fast[2][k], ref[2][k], f"d{k}") for k in ref[2]
    ]:
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("impl", sorted(FAST))
def test_bfloat16_inputs(impl):
    inputs = make_inputs(2, 8, 33, 4, "varying", 2, True, True, True, dtype=torch.bfloat16)
    ref = run(selective_scan_reference, inputs, True)
    fast = run(FAST[impl], inputs, True)
    assert fast[0].dtype == torch.bfloat16 and fast[1].dtype == torch.float32  # computed in float32
    assert_close(fast[0], ref[0], 2e-2, 2e-2, "out")
    assert_close(fast[1], ref[1], 1e-4, 1e-4, "last")
    for name in ref[2]:
        assert fast[2][name].dtype == torch.bfloat16
        assert_close(fast[2][name], ref[2][name], 2e-2, 2e-2, f"d{name}")


@pytest.mark.parametrize("impl", ["chunked-sequential", "chunked-parallel", "cpu"])
@pytest.mark.parametrize("form", ["varying", "fixed"])
def test_gradcheck_float64(impl, form):
    inputs = make_inputs(2, 4, 5, 3, form, 2 if form == "varying" else 1, True, True, True, dtype=torch.float64)
    order = [inputs[k] for k in NAMES]

    def fn(*args):
        kwargs = dict(zip(NAMES, args), delta_softplus=True, return_last_state=True)
        if impl == "cpu":
            return selective_scan_cpu(**kwargs)
        return selective_scan_chunked(**kwargs, chunk=2, parallel=impl.endswith("parallel"))

    assert torch.autograd.gradcheck(fn, order, eps=1e-6, atol=1e-6)


def test_saved_memory_grows_with_chunks_not_steps():
    """Autograd keeps the inputs, y and one state per chunk; the reference keeps about a state per step."""
    batch, dim, length, n, chunk = 2, 8, 256, 16, 32
    inputs = make_inputs(batch, dim, length, n, "varying", 1, True, True, True)
    inputs_numel = sum(t.numel() for t in inputs.values() if t is not None)
    states = batch * dim * n

    def saved_beyond_inputs(fn, **kwargs):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn(**inputs, delta_softplus=True, **kwargs)
        unique = {t.data_ptr(): t.numel() for t in saved}  # a tensor saved twice is kept once
        return sum(unique.values()) - inputs_numel

    assert saved_beyond_inputs(selective_scan_chunked, chunk=chunk) == batch * dim * length + (length // chunk) * states
    assert saved_beyond_inputs(selective_scan_reference) >= length * states


def test_dispatch():
    inputs = {
        k: v.detach() if v is not None else None
        for k, v in make_inputs(2, 8, 9, 4, "varying", 2, True, True, True).items()
    }
    auto = selective_scan(**inputs, delta_softplus=True)  # CPU tensors: the fused CPU kernel
    torch.testing.assert_close(auto, selective_scan_cpu(**inputs, delta_softplus=True), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="impl='cuda' is unavailable: "):
        selective_scan(**inputs, impl="cuda")
    with pytest.raises(ValueError, match="impl='fast' is not valid"):
        selective_scan(**inputs, impl="fast")


BAD = [
    ({"u": torch.zeros(2, 8)}, r"u has shape \(2, 8\); expected \(batch, dim, L\)"),
    ({"delta": torch.zeros(2, 8, 5)}, r"delta has shape \(2, 8, 5\); expected u's shape .* \(2, 8, 9\)"),
    ({"A": torch.zeros(7, 4)}, r"A has shape \(7, 4\); expected \(dim, dstate\) with dim = 8"),
    ({"B": torch.zeros(2, 3, 4, 9)}, r"B has shape \(2, 3, 4, 9\); expected .*with 8 divisible by groups"),
    ({"C": torch.zeros(2, 4, 8)}, r"C has shape \(2, 4, 8\); expected .*\(batch, dstate, L\) = \(2, 4, 9\)"),
    ({"D": torch.zeros(4)}, r"D has shape \(4,\); expected \(dim,\) = \(8,\)"),
    ({"u": torch.zeros(2, 8, 9, dtype=torch.long)}, "u has dtype torch.int64; expected a real floating dtype"),
    ({"A": torch.zeros(8, 4, dtype=torch.complex64)}, "A has dtype torch.complex64"),
]


@pytest.mark.parametrize("bad, message", BAD)
def test_bad_inputs_name_the_argument_and_the_expected_shape(bad, message):
    inputs = {
        k: v.detach() if v is not None else None
        for k, v in make_inputs(2, 8, 9, 4, "varying", 2, True, True, True).items()
    }
    with pytest.raises(ValueError, match=message):
        selective_scan(**{**inputs, **bad})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_chunked_on_gpu_equals_reference():
    inputs = make_inputs(2, 16, 130, 16, "varying", 4, True, True, True)
    gpu = {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    ref = run(selective_scan_reference, inputs, True)
    fast = run(selective_scan_chunked, gpu, True)
    assert_close(fast[0].cpu(), ref[0], 1e-4, 1e-4, "out")
    for name in ref[2]:
        assert_close(fast[2][name].cpu(), ref[2][name], 1e-4, 1e-4, f"d{name}")
