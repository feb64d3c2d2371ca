"""Process set-up that the command-line scripts do before torch loads.

OpenMP's default wait policy lets idle threads spin on the cores for a while after each parallel region. On a
dedicated machine that shaves a little latency; on a machine where anything else runs (a data-loader worker, an
editor, another job: the usual case on a laptop or a shared 2-core VM) the spinning threads take the cores from the
work they wait for, and 2 threads ran ~20x slower than 1 here (docs/benchmarks.md). ``OMP_WAIT_POLICY=PASSIVE``
makes them sleep instead. The OpenMP runtime reads the variable once, when torch loads it, so the scripts call
:func:`use_passive_openmp_wait` as their first statement. A value the user set is kept (``OMP_WAIT_POLICY=ACTIVE``
gets the spinning back).
"""

from __future__ import annotations

import os
import sys

__all__ = ["use_passive_openmp_wait"]


def use_passive_openmp_wait() -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it; returns the policy in force.

    Must run before ``import torch`` (the return value says ``'unchanged: torch already loaded'`` otherwise, since
    the OpenMP runtime has read the variable by then). Processes started later (data-loader workers, DDP ranks)
    inherit it.
    """
    if os.environ.get("OMP_WAIT_POLICY"):
        return os.environ["OMP_WAIT_POLICY"]
    if "torch" in sys.modules:
        return "unchanged: torch already loaded"
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return "PASSIVE"
