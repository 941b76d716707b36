"""cil installs as one package: the built wheel, installed into a fresh environment outside the repository, holds
only ``cil`` (strategies, streams and configs inside it) and runs a packaged config by name from another folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_wheel_installs_one_package_that_runs_a_packaged_config(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("cil-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"cil", next(n.split("/")[0] for n in names if ".dist-info/" in n)}
    assert "cil/configs/simplecil/digits.yaml" in names and "cil/configs/base/digits.yaml" in names
    assert "cil/strategies/mos.py" in names and "cil/streams/vision.py" in names
    assert "cil/ops/selective_scan/csrc/selective_scan_cuda.cu" in names
    assert "cil/ops/selective_scan/csrc/selective_scan_kernels.cuh" in names
    assert {"cil/ops/selective_scan/harness/cuda_on_cpu.h", "cil/ops/selective_scan/harness/scan_harness.cpp"} <= set(
        names
    )
    assert "cil/backbones/clip_configs/cil-tiny-clip.json" in names and "cil/layers/lda.py" in names

    # a fresh environment: the project's dependencies (torch, Lightning, ...) through a path entry to this
    # environment's site-packages, whose .pth files (the editable install of cil) are not processed
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    python = env_dir / "bin" / "python"
    fresh_site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    with open(os.path.join(fresh_site, "project_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", fresh_site, str(wheel)], check=True
    )

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    environ = {**os.environ, "CIL_QUIET": "1", "PYTHONPATH": ""}
    probe = subprocess.run(
        [python, "-c", "import importlib.util, json, cil; print(json.dumps([cil.__file__, "
         "importlib.util.find_spec('strategies') is None, importlib.util.find_spec('streams') is None]))"],
        cwd=elsewhere, capture_output=True, text=True, env=environ,
    )  # fmt: skip
    cil_file, no_strategies, no_streams = json.loads(probe.stdout)
    assert cil_file.startswith(fresh_site) and no_strategies and no_streams

    listed = subprocess.run(
        [python, "-m", "cil.cli", "list"], cwd=elsewhere, capture_output=True, text=True, env=environ
    )
    assert "  simplecil/digits" in listed.stdout and "  mos/cifar100_b0inc5_in1k" in listed.stdout

    run = subprocess.run(
        [python, "-m", "cil.cli", "run", "simplecil/digits", "run.output_dir=out", "backbone.image_size=16",
         "trainer.enable_progress_bar=false"],
        cwd=elsewhere, capture_output=True, text=True, env=environ,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    (summary,) = (elsewhere / "out").glob("*/*/summary.json")
    assert json.loads(summary.read_text())["complete"]
