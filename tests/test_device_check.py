"""scripts/device_check.sh, the prepared GPU check, run end to end on the CPU (--dry-run): every step runs (or is
skipped with its reason), the three report files are written, and the numbers parsed from each step's JSON are the
ones the step measured. On a GPU machine the same script runs the full-size steps (bevdeform/device_check.py)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_device_check_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "BEVDEFORM_DEVICE_CHECK_WORK": str(tmp_path / "work"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log", "device_check.md"]
    report = json.loads((out / "device_check.json").read_text())
    assert report["dry_run"] is True
    steps = {s["name"]: s for s in report["steps"]}
    for name in ("environment", "build_ops", "cuda_tests", "bench_msda", "profile_bev_nano_fp32_eager-compare",
                 "prepare_data", "train"):
        assert steps[name]["status"] in ("ok", "skipped"), (name, steps[name])
    for name in ("environment", "build_ops", "bench_msda", "profile_bev_nano_fp32_eager-compare", "train"):
        assert steps[name]["status"] == "ok", (name, steps[name]["reason"], steps[name]["stdout_tail"])
    assert report["environment"]["torch"]
    bench = steps["bench_msda"]["numbers"]["parsed"]["rows"]
    assert bench and all(row["max_rel_diff"] < 1e-5 and row["native_fwd_ms"] > 0 for row in bench)
    profile = steps["profile_bev_nano_fp32_eager-compare"]["numbers"]["parsed"]
    assert set(profile["runs"]) == {"reference", "native"}
    train = steps["train"]["numbers"]
    assert train["steps"] == 3 and train["all_finite"] and train["seconds_per_step"] > 0
    summary = (out / "device_check.md").read_text()
    assert "DRY RUN" in summary and "| train | ok |" in summary and "### bench_msda" in summary


def test_a_failing_step_does_not_stop_the_check(tmp_path, monkeypatch):
    """A step that fails and one that runs past its limit are recorded; the steps after them still run."""
    import sys

    from bevdeform import device_check

    steps = [device_check.Step("fails", [sys.executable, "-c", "raise SystemExit(3)"], 30),
             device_check.Step("hangs", [sys.executable, "-c", "import time; time.sleep(30)"], 1),
             device_check.Step("works", [sys.executable, "-c", "print('| a | b |')"], 30, markdown=True)]
    monkeypatch.setattr(device_check, "plan_steps", lambda work, dry_run, data_root: steps)
    monkeypatch.setenv("BEVDEFORM_DEVICE_CHECK_WORK", str(tmp_path / "work"))
    results = device_check.run_check(tmp_path / "out", dry_run=True, deadline_s=60)
    assert [(r.name, r.status) for r in results] == [("fails", "failed"), ("hangs", "timeout"), ("works", "ok")]
    assert results[0].returncode == 3
    assert results[2].numbers["markdown"] == "| a | b |"
    report = json.loads((tmp_path / "out" / "device_check.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["failed", "timeout", "ok"]
