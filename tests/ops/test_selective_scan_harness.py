"""The CUDA kernels, executed on the CPU harness (``cil.ops.selective_scan.harness``): the very source nvcc compiles,
each block's threads as real threads, against the sequential reference on outputs, final states and every gradient,
through the CUDA path's own autograd function. The tolerances are the GPU tests' (test_selective_scan_cuda.py).

The default suite runs a handful of shapes; ``make test-slow`` runs every variant at every length and state size, with
each storage dtype meeting every variant, length and state size (the storage dtypes cycle over the grid: the full
product would triple its minutes), several channel tiles per group, and the seeded bugs each check must catch
(sanitizers included).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from cil.ops.selective_scan import selective_scan_reference
from tests.helpers import ROOT, VARIANTS, assert_bitwise_equal, assert_close, make_inputs, run

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CPU harness needs g++")
TOLERANCE = {torch.float32: (1e-4, 1e-4, 1e-4), torch.float16: (1e-2, 1e-2, 3e-2), torch.bfloat16: (2e-2, 2e-2, 6e-2)}
STORED = ("u", "delta", "B", "C", "z")  # in the storage dtype; A, D, delta_bias stay float32, as in Mamba


@pytest.fixture(autouse=True)
def harness_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CIL_HARNESS_DIR", str(tmp_path_factory.getbasetemp() / "scan_harness"))


def as_dtype(inputs, dtype, keep_dtype=True):
    out = {}
    for k, v in inputs.items():
        if v is None:
            out[k] = None
        elif k in STORED:
            t = v.detach().to(dtype)
            out[k] = (t if keep_dtype else t.float()).requires_grad_()
        else:
            out[k] = v.detach().float().requires_grad_()
    return out


def largest_tiles(root=None):
    """The harness's kernels with the backward's tiles as large as the group allows (up to 64 channels): the
    launcher's own policy goes above 16 channels only while 2,048 blocks remain, never at shapes this small."""
    from cil.ops.selective_scan.harness import load

    return load(root=root).with_min_blocks(1)


def harness_run(inputs, softplus, dtype, kernels=None):
    from cil.ops.selective_scan.harness import selective_scan_harness

    kernels = kernels or largest_tiles()

    def scan(**kwargs):
        return selective_scan_harness(**kwargs, kernels=kernels)

    return run(scan, as_dtype(inputs, dtype), softplus)


def compare(inputs, softplus, dtype, kernels=None):
    ref = run(selective_scan_reference, as_dtype(inputs, dtype, keep_dtype=False), softplus)
    fast = harness_run(inputs, softplus, dtype, kernels)
    rtol, atol, grad_tol = TOLERANCE[dtype]
    assert fast[0].dtype == dtype
    assert_close(fast[0], ref[0], rtol, atol, "out")
    assert_close(fast[1], ref[1], rtol, atol, "last state")
    assert set(fast[2]) == set(ref[2])
    for name in ref[2]:
        assert_close(fast[2][name], ref[2][name], grad_tol, grad_tol, f"d{name}")


DEFAULT_CASES = [  # (variant, dstate, length, dtype): partial warps, a chunk boundary, every storage dtype
    ("everything, varying B/C, 2 groups", 4, 65, torch.float32),
    ("fixed B, 3-D varying C, z only", 33, 7, torch.float16),
    ("4 groups, D and bias, no softplus", 16, 1, torch.bfloat16),
]


@pytest.mark.parametrize(
    "variant, n, length, dtype", DEFAULT_CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}" for c in DEFAULT_CASES]
)
def test_harness_equals_reference(variant, n, length, dtype):
    form, groups, z, D, bias, softplus = VARIANTS[variant]
    inputs = make_inputs(2, 8, length, n, form, groups, z, D, bias, positive_delta=not softplus)
    kernels = largest_tiles()
    assert kernels.backward_tile_for(8 // groups, 16) == 8 // groups == kernels.forward_tile_for(8 // groups, 16)
    compare(inputs, softplus, dtype)  # one tile per group: the dB / dC sums run over the whole group


def test_a_group_of_odd_size_runs_one_channel_per_block():
    from cil.ops.selective_scan.harness import load

    assert load().forward_tile_for(3, 6) == 1 == load().backward_tile_for(3, 6)
    compare(make_inputs(2, 6, 9, 4, "varying", 2, True, True, True), True, torch.float32, load())


def test_the_tile_policy_of_the_launcher():
    """Tiles of 16 channels where the group allows (never fewer, whatever the grid), up to 64 while 2,048 blocks
    remain; the forward's at most 8 (its states are registers)."""
    from cil.ops.selective_scan.harness import load

    kernels = load()
    assert kernels.backward_tile_for(640, 8 * 640) == 16  # CIFAR-100 incremental: 320 blocks
    assert kernels.backward_tile_for(1024, 64 * 4096) == 64  # CUB base: 4,096 blocks
    assert kernels.backward_tile_for(1024, 64 * 1024) == 32  # 2,048 blocks at 32, 1,024 at 64
    assert kernels.backward_tile_for(24, 10**6) == 8 and kernels.backward_tile_for(7, 10**6) == 1
    assert kernels.forward_tile_for(4096, 64 * 4096) == 8 and kernels.forward_tile_for(6, 12) == 2


LENGTHS, STATES, DTYPES = [0, 1, 7, 64, 65, 257], [1, 4, 16, 256], [torch.float32, torch.float16, torch.bfloat16]
# every variant x length x state size; the storage dtype cycles so that each one meets every (variant, length) and
# every (variant, state size) pair
GRID = [
    (variant, n, length, DTYPES[(v + k + s) % 3])
    for v, variant in enumerate(sorted(VARIANTS))
    for k, length in enumerate(LENGTHS)
    for s, n in enumerate(STATES)
]


@pytest.mark.slow
@pytest.mark.parametrize("variant, n, length, dtype", GRID, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in GRID])
def test_harness_grid(variant, n, length, dtype):
    form, groups, z, D, bias, softplus = VARIANTS[variant]
    dim = 4 if (length, n) == (257, 256) else 8  # 256 threads x 257 steps: the slowest case, kept to one tile pair
    inputs = make_inputs(2, dim, length, n, form, groups, z, D, bias, positive_delta=not softplus)
    if length == 0:  # nothing to scan, batch x dim > 0: an empty output, a zero state, zero parameter gradients
        fast = harness_run(inputs, softplus, dtype)
        assert fast[0].shape == (2, dim, 0) and not fast[1].any()
        assert all(not g.any() for g in fast[2].values())
        return
    compare(inputs, softplus, dtype)


@pytest.mark.slow
def test_several_channel_tiles_per_group_at_the_real_state_size():
    """Mamba-FSCIL's real shapes have 16-64 channel tiles per group and 256 states: here 64 channels in one group
    (4 tiles of 16: at least 4 blocks) at dstate 256, across a chunk boundary."""
    from cil.ops.selective_scan.harness import load

    kernels = load().with_min_blocks(4)
    assert kernels.backward_tile_for(64, 64) == 16
    inputs = make_inputs(1, 64, 66, 256, "varying", 1, True, True, True)
    compare(inputs, True, torch.float32, kernels)


def test_two_runs_are_bitwise_identical_and_empty_sequences_work():
    inputs = make_inputs(2, 8, 70, 8, "varying", 2, True, True, True)
    first, second = harness_run(inputs, True, torch.float32), harness_run(inputs, True, torch.float32)
    assert_bitwise_equal(first, second)
    empty = harness_run(make_inputs(2, 4, 0, 4, "varying", 2, True, True, True), True, torch.float32)
    assert empty[0].shape == (2, 4, 0) and not empty[1].any()


# ---- each check bites: a copy of the sources with a seeded bug ------------------------------------------------
KERNELS = "csrc/selective_scan_kernels.cuh"


def seeded_copy(tmp_path, old: str, new: str):
    """The harness sources copied, with ``old`` replaced by ``new`` in the kernels (which must contain it once)."""
    source = ROOT / "cil" / "ops" / "selective_scan"
    root = tmp_path / "seeded"
    shutil.copytree(source / "harness", root / "harness", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    (root / "csrc").mkdir()
    text = (source / KERNELS).read_text()
    assert text.count(old) == 1, old
    (root / KERNELS).write_text(text.replace(old, new))
    return root


SYNC_AFTER_STAGING = """      s_u[k][i] = to_float(in.u[at]);
    }
    __syncthreads();"""  # the forward's barrier between staging a stage's dt and u and reading them


@pytest.mark.slow
def test_a_divergent_barrier_or_shuffle_is_an_error(tmp_path, monkeypatch):
    from cil.ops.selective_scan.harness import HarnessError

    monkeypatch.setenv("CIL_HARNESS_TIMEOUT_S", "2")
    inputs = make_inputs(1, 2, 5, 4, "varying", 1, False, False, False)  # 4 states: 4 active threads of 32
    divergent_sync = seeded_copy(
        tmp_path / "sync",
        SYNC_AFTER_STAGING,
        SYNC_AFTER_STAGING.replace("__syncthreads();", "if (active) __syncthreads();"),
    )
    # the 4 active lanes wait at one barrier and the 28 others at the next one: whichever times out first names it
    divergence = r"(__syncthreads|__shfl_down_sync): only (4|28) of 32 threads arrived"
    with pytest.raises(HarnessError, match=divergence):
        harness_run(inputs, False, torch.float32, kernels=largest_tiles(divergent_sync))
    divergent_shuffle = seeded_copy(
        tmp_path / "shfl", "        part = warp_sum(part);", "        if (active) part = warp_sum(part);"
    )
    with pytest.raises(HarnessError, match=divergence):
        harness_run(inputs, False, torch.float32, kernels=largest_tiles(divergent_shuffle))


SANITIZED_CASE = textwrap.dedent(
    """
    import sys
    import torch
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from cil.ops.selective_scan import selective_scan_reference
    from cil.ops.selective_scan.harness import load, selective_scan_harness
    from tests.helpers import assert_close, make_inputs, run
    root = sys.argv[2] if len(sys.argv) > 2 else None
    kernels = load(sys.argv[1], None if root is None else Path(root)).with_min_blocks(1)  # 2-channel tiles
    inputs = make_inputs(1, 4, 70, 33, "varying", 2, True, True, True)
    fresh = lambda: {{k: (v.detach().requires_grad_() if v is not None else None) for k, v in inputs.items()}}
    ref = run(selective_scan_reference, fresh(), True)
    fast = run(lambda **kw: selective_scan_harness(**kw, kernels=kernels), fresh(), True)
    for name in ref[2]:
        assert_close(fast[2][name], ref[2][name], 1e-4, 1e-4, name)
    assert_close(fast[0], ref[0], 1e-4, 1e-4, "out")
    print("clean")
    """
)


def sanitized(tmp_path, variant: str, root=None) -> subprocess.CompletedProcess:
    from cil.ops.selective_scan.harness import sanitizer_environment

    script = tmp_path / f"case_{variant}.py"
    script.write_text(SANITIZED_CASE.format(root=str(ROOT)))
    command = [sys.executable, str(script), variant, *([str(root)] if root else [])]
    return subprocess.run(command, env=sanitizer_environment(variant), capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["asan", "tsan"])
def test_the_kernels_are_clean_under_sanitizers(tmp_path, variant):
    """AddressSanitizer + UndefinedBehaviorSanitizer (bounds of global, shared and local memory, signed overflow),
    ThreadSanitizer (a race between two threads of a block): forward and backward across a chunk boundary, with a
    partial warp of inactive lanes."""
    done = sanitized(tmp_path, variant)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-3000:]


@pytest.mark.slow
def test_the_sanitizers_catch_a_seeded_off_by_one_and_a_missing_barrier(tmp_path):
    # an off-by-one past the end of a shared array (the backward's s_u has kChunk entries, and the case's first chunk
    # is full): UndefinedBehaviorSanitizer's bounds check names the index and the array type (AddressSanitizer would
    # report the overflow if it got there first)
    off_by_one = seeded_copy(tmp_path / "bounds", "      s_u[j] = uv;", "      s_u[j + 1] = uv;")
    done = sanitized(tmp_path, "asan", off_by_one)
    report = done.stderr
    caught = (
        "index 64 out of bounds for type 'float [64]'" in report or "AddressSanitizer: global-buffer-overflow" in report
    )
    assert done.returncode != 0 and caught and "selective_scan_kernels.cuh" in report, report[-3000:]
    # the barrier between staging the chunk in shared memory and reading it removed: ThreadSanitizer sees the race
    missing = seeded_copy(tmp_path / "race", SYNC_AFTER_STAGING, SYNC_AFTER_STAGING.replace("__syncthreads();", ""))
    done = sanitized(tmp_path, "tsan", missing)
    assert done.returncode != 0 and "ThreadSanitizer: data race" in done.stderr, done.stderr[-3000:]


def test_the_last_state_is_written_and_its_gradient_read_only_when_asked():
    """Without ``return_last_state`` the launcher allocates no (batch, dim, dstate) state, the kernel writes none and
    the backward gets no dlast (not a tensor of zeros), and the gradients still equal the reference's."""
    from cil.ops.selective_scan.harness import selective_scan_harness

    kernels, calls = largest_tiles(), []

    class Spy:
        def fwd(self, *args):
            out, y, last = kernels.fwd(*args)
            calls.append(("fwd", last.shape))
            return out, y, last

        def bwd(self, *args):
            calls.append(("bwd", args[-1].shape))
            return kernels.bwd(*args)

    inputs = make_inputs(2, 8, 66, 4, "varying", 2, True, True, True)
    fresh = as_dtype(inputs, torch.float32)
    out = selective_scan_harness(**fresh, delta_softplus=True, kernels=Spy())
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    grads = torch.autograd.grad((out * weights).sum(), list(fresh.values()))
    assert calls == [("fwd", (0,)), ("bwd", (0,))]
    ref_inputs = as_dtype(inputs, torch.float32)
    ref = selective_scan_reference(**ref_inputs, delta_softplus=True)
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(ref_inputs.values()))
    assert_close(out, ref, 1e-4, 1e-4, "out")
    for name, g, r in zip(fresh, grads, ref_grads):
        assert_close(g, r, 1e-4, 1e-4, name)
