"""Shared pytest set-up.

The ``cuda`` marker: every test that runs on a CUDA device (a test parametrised with ``device="cuda"``, or whose name
says cuda) is marked ``cuda``, so ``pytest -m cuda`` selects the GPU subset that ``scripts/device_check.sh`` runs on a
lent GPU machine, and ``-m "not cuda"`` leaves it out. On a machine without CUDA those tests are not collected with
a cuda parameter (``DEVICES`` holds only "cpu") or skip with the reason.
"""

from __future__ import annotations

from bevdeform.runtime import use_passive_openmp_wait

# Before anything imports torch: the suite's training runs share the 2 cores with their data-loader workers and with
# subprocesses, where OpenMP's default spin-wait made steps several times slower (bevdeform/runtime.py).
use_passive_openmp_wait()

import pytest  # noqa: E402


def _runs_on_cuda(item: pytest.Item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(isinstance(v, str) and v.startswith("cuda") for v in callspec.params.values()):
        return True
    # The nvcc compile checks (tests/test_*cuda_compile.py) run on any machine with nvcc: not GPU tests.
    return "cuda" in item.name.lower() and not item.path.name.endswith("_compile.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _runs_on_cuda(item):
            item.add_marker(pytest.mark.cuda)
