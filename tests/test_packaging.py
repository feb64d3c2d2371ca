"""Packaging: `pip install .` never pulls another torch, and a built wheel carries the op's sources and the configs,
so the native op compiles and a config name resolves from an installed wheel (not only from a checkout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pip(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "pip", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"pip {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_install_resolves_without_touching_torch(tmp_path):
    """With torch installed, installing the package plans to install the package alone."""
    report = tmp_path / "report.json"
    pip("install", "--dry-run", "--report", str(report), "-q", ".")
    planned = [item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]]
    assert "torch" not in planned, planned
    assert not any(name.startswith("nvidia-") for name in planned), planned


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "--no-deps", "-q", "-w", str(out), ".")
    (path,) = out.glob("bevdeform-*.whl")
    return path


def test_wheel_carries_native_sources_and_configs(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for source in ("msda.h", "msda_cpu.cpp", "msda_cuda.cu", "msda_registration.cpp"):
        assert f"bevdeform/_ops/{source}" in names
    for config in ("bev_nano", "bev_tiny", "bev_small", "bev_base"):
        assert f"bevdeform/_configs/{config}.yaml" in names
    for module in ("msda.py", "geometry.py", "models/bevformer.py", "data/dataset.py", "compat/bevformer_v1.py"):
        assert f"bevdeform/{module}" in names


def test_installed_wheel_builds_the_op_and_finds_configs(wheel, tmp_path):
    """Install the wheel into a bare folder and use it from a directory that is not the checkout."""
    target = tmp_path / "site"
    pip("install", "--no-deps", "-q", "--target", str(target), str(wheel))
    code = (
        "import bevdeform, torch\n"
        "from bevdeform import msda, config\n"
        f"assert bevdeform.__file__.startswith({str(target)!r}), bevdeform.__file__\n"
        "assert msda.native_available('cpu', torch.float32), msda._native_problem\n"
        "assert str(msda.ops_source_dir()).startswith(" + repr(str(target)) + ")\n"
        "assert 'bev_tiny' in config.available_configs()\n"
        "print('ok')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target), BEVDEFORM_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("BEVDEFORM_MSDA_IMPL", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
