"""The launch limits a GPU enforces, checked for the CUDA scan at every shipped Mamba-FSCIL config without a GPU.

The scan shapes are not typed here: each config's model is built and run on one image at the config's resolution,
and the calls its projectors make to the selective scan are recorded; the batch sizes are the config's (base,
incremental, evaluation). The launch shapes are the launcher's own (``threads_for`` / ``*_tile_for``, through the CPU
harness, which compiles the same header). Registers, static shared memory and spills come from ptxas
(``nvcc --resource-usage``) on the very kernel source, for sm_80 and sm_90, instantiated for the three storage
types (``__half`` / ``__nv_bfloat16`` stand in for ATen's ``c10::Half`` / ``c10::BFloat16``: same 16-bit storage,
converted to float before any arithmetic).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

from tests.helpers import CONFIGS, ROOT

KERNELS = ROOT / "cil" / "ops" / "selective_scan" / "csrc" / "selective_scan_kernels.cuh"
MAX_THREADS, MAX_GRID_X, MAX_STATIC_SMEM = 1024, 2**31 - 1, 48 * 1024
REGISTERS_PER_SM, MAX_REGISTERS_PER_THREAD, REGISTER_ALLOCATION_UNIT = 65536, 255, 256  # sm_80 and sm_90
# static + dynamic shared memory a block may opt in to (CUDA programming guide, compute capabilities 8.0 and 9.0)
MAX_SHARED_OPTIN = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}


def scan_shapes(config) -> set[tuple[int, int, int, int, int]]:
    """(batch, dim, L, dstate, groups) of every scan the config's model runs, at each of its batch sizes."""
    import cil.layers.ssm as ssm
    from cil.config import load_config
    from cil.module import create_strategy

    cfg = load_config(config, ["backbone.pretrained=false"])
    strategy = create_strategy(cfg).eval()
    seen = []
    original = ssm.selective_scan

    def recording(u, delta, A, B, C, *args, **kwargs):
        groups = 1 if B.dim() == 2 else (B.shape[1] if B.dim() == 4 else 1)
        seen.append((u.shape[1], u.shape[2], A.shape[1], groups))
        return original(u, delta, A, B, C, *args, **kwargs)

    size = cfg.backbone.image_size or 32
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(ssm, "selective_scan", recording)
        strategy(torch.randn(1, 3, size, size))
    assert seen, f"{config.name}: no selective scan ran"
    batches = {cfg.stream.batch_size, cfg.stream.eval_batch_size, cfg.strategy.inc_batch_size} - {None}
    return {(batch, *shape) for batch in batches for shape in seen}


MAMBA_CONFIGS = sorted((CONFIGS / "mamba_fscil").glob("*.yaml"))


@pytest.mark.parametrize("config", MAMBA_CONFIGS, ids=[c.stem for c in MAMBA_CONFIGS])
def test_every_shipped_scan_launches_within_cuda_limits(config):
    from cil.ops.selective_scan.harness import MAX_DSTATE, load

    kernels = load()
    for batch, dim, length, dstate, groups in scan_shapes(config):
        shape = f"{config.stem}: batch {batch}, dim {dim}, L {length}, dstate {dstate}, groups {groups}"
        assert dstate <= MAX_DSTATE, shape
        threads = kernels.threads_for(dstate)
        assert 32 <= threads <= MAX_THREADS and threads % 32 == 0, shape  # whole warps: the shuffles need them
        forward_tile = kernels.forward_tile_for(dim // groups, batch * dim)
        backward_tile = kernels.backward_tile_for(dim // groups, batch * dim)
        for tile in (forward_tile, backward_tile):
            assert (dim // groups) % tile == 0, shape  # a tile never spans two groups
        forward_grid, backward_grid = batch * dim // forward_tile, batch * dim // backward_tile
        assert 0 < forward_grid <= MAX_GRID_X and 0 < backward_grid <= MAX_GRID_X, shape
        # the kernels index in int64 from int fields: each field itself must fit an int
        assert max(batch, dim, length, dstate, groups) < 2**31, shape


def ptxas_report(arch: str, tmp_path) -> dict[str, dict[str, int]]:
    """Per kernel (mangled name): registers, static shared bytes, stack frame and spill bytes, from ptxas."""
    source = tmp_path / "instantiate.cu"
    source.write_text(
        "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
        f'#include "{KERNELS}"\n'
        "namespace cil_scan {\n"
        + "".join(
            f"template __global__ void forward_kernel<{t}>(Params, Inputs<{t}>, int, {t}*, float*, float*);\n"
            f"template __global__ void backward_kernel<{t}>(Params, Inputs<{t}>, const float*, const float*, "
            "const float*, int, float*, float*, float*, float*, float*, float*, float*, float*, float*);\n"
            for t in ("float", "__half", "__nv_bfloat16")
        )
        + "}\n"
    )
    done = subprocess.run(
        ["nvcc", f"-arch={arch}", "-O3", "-c", "--resource-usage", str(source), "-o", str(tmp_path / f"{arch}.o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report, name = {}, None
    for line in (done.stdout + done.stderr).splitlines():
        if m := re.search(r"Function properties for (\S+)", line):
            name = m.group(1)
            report[name] = {}
        elif name and (
            m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        ):
            report[name].update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            report[name]["registers"] = int(m[1])
            smem = re.search(r"(\d+) bytes smem", line)
            report[name]["smem"] = int(smem[1]) if smem else 0
    return report


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_registers_and_shared_memory_fit_every_launch(arch, tmp_path):
    from cil.ops.selective_scan.harness import MAX_DSTATE, load

    report = ptxas_report(arch, tmp_path)
    assert len(report) == 6, sorted(report)  # forward and backward for float, half, bfloat16
    widest = load().threads_for(MAX_DSTATE)  # the largest block any launch uses
    for kernel, usage in report.items():
        assert usage["registers"] <= MAX_REGISTERS_PER_THREAD, (kernel, usage)
        # registers are allocated per warp in units of 256: else a block of dstate 256 cannot launch
        per_warp = -(-usage["registers"] * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
        assert per_warp * (widest // 32) <= REGISTERS_PER_SM, (kernel, usage)
        assert 0 < usage["smem"] <= MAX_STATIC_SMEM, (kernel, usage)
        if "backward" in kernel:  # plus B / C staged in dynamic shared memory, both varying at dstate 256
            total = usage["smem"] + load().backward_shared_bytes(True, True, widest)
            assert total <= MAX_SHARED_OPTIN[arch], (kernel, usage, total)
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (kernel, usage)
        # no local memory: the backward's 64-step history is indexed by constants only (fully unrolled chunk loops)
        assert usage["stack"] == 0, (kernel, usage)
    print({k.split("_kernel")[0][-8:] + k.split("I")[1][:8]: v for k, v in report.items()})
