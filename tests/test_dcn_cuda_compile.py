"""Compile-only check of the DCNv2 CUDA kernels (ops/dcn_cuda.cu) with nvcc for sm_80, sm_87 and sm_90.

The nvcc command (flags, include paths, the stub for the CPU wheel's missing cuda_cmake_macros.h) is the one of the
MSDA op's check, tests/test_msda_cuda_compile.py, with this op's source. Their numbers are checked against the
PyTorch reference by tests/test_dcn.py's CUDA cases, which run only where a GPU is present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import test_msda_cuda_compile as msda_compile  # tests/ is on sys.path (pytest's rootdir-relative import)

DCN_SOURCE = msda_compile.REPO_ROOT / "ops" / "dcn_cuda.cu"


def test_dcn_cuda_compiles_for_sm80_sm87_sm90(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA kernels of ops/dcn_cuda.cu cannot be compiled here")
    assert DCN_SOURCE.is_file(), f"missing {DCN_SOURCE}"
    output = tmp_path / "dcn_cuda.o"
    command = msda_compile._nvcc_command(nvcc, msda_compile._stub_include_dir(tmp_path), output)
    command[command.index(str(msda_compile.CUDA_SOURCE))] = str(DCN_SOURCE)
    start = time.monotonic()
    result = subprocess.run(command, cwd=msda_compile.REPO_ROOT, capture_output=True, text=True,
                            timeout=msda_compile.NVCC_TIMEOUT_S, env={**os.environ, "LC_ALL": "C"})
    sys.stderr.write(f"nvcc (sm_80, sm_87, sm_90) took {time.monotonic() - start:.1f} s\n")
    if result.returncode != 0:
        pytest.fail(f"nvcc failed with exit code {result.returncode}\ncommand: {' '.join(command)}\n"
                    f"--- stderr ---\n{result.stderr}\n--- stdout ---\n{result.stdout}")
    assert output.is_file() and output.stat().st_size > 0, f"nvcc exited 0 but wrote no object file at {output}"
    own_warnings = [line for line in (result.stderr + result.stdout).splitlines()
                    if ("dcn_cuda.cu" in line or "dcn.h" in line) and "warning" in line]
    assert not own_warnings, "nvcc warned about the DCN sources:\n" + "\n".join(own_warnings)
