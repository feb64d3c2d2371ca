"""The prepared GPU check (``scripts/device_check.sh``): every CUDA number of the project in one short run.

GPU machines are lent to some sessions only, for minutes, so the check is ready before a GPU is. One call runs a
fixed list of steps, each in its own process (a CUDA fault in one step cannot take the others down) with its own
time limit, under one overall deadline; a step that fails or runs out of time is recorded and the next one runs, so
one run gives every number it can. Steps, in priority order:

    environment       GPU name, driver, torch / CUDA / nvcc versions
    build_ops         the native ops (CPU + CUDA) built into a machine-local cache; how long the build took
    cuda_tests        ``pytest -m cuda`` on the op test files (equality with the references in fp32/fp16/bf16,
                      gradients, NaN/inf/huge locations, int64 offsets, compile/export, CUDA graph capture)
    bench_msda        ``scripts/bench_msda.py`` on every msda-op.md shape, fp32/fp16/bf16, reference vs native,
                      achieved bytes/s against the copy bandwidth measured in the same run, peak memory
    bench_dcn         ``scripts/bench_dcn.py`` likewise (where the DCN benchmark exists)
    profile_*         ``scripts/profile_latency.py`` for bev_tiny and bev_base: fp32/fp16/bf16 autocast, eager (with
                      the reference-vs-native MSDA comparison), ``--compile`` and ``--cuda-graphs``
    train             a short bev_tiny training run on a synthetic set at full image size (bf16-mixed): seconds
                      per step, peak memory, finite loss

Everything lands under ``out_dir``: ``device_check.json`` (every step: status, seconds, command, parsed numbers),
``device_check.md`` (tables ready for docs/benchmarks.md) and ``device_check.log`` (every step's output). The
device tool brings back at most 8 files, so nothing else is written there.

The nuscenes-devkit is not on the GPU machine. Nothing here needs it on that machine: the training step reads a
synthetic set and its info files written here beforehand (``prepare-data``, which does need the devkit: it
converts the tables), carried to the machine with the working tree; the tests run are the op test files, which
import torch, numpy and hypothesis only. Without the carried data the training step is skipped with that reason.

``dry_run`` (``--dry-run`` / ``DEVICE=cpu``) runs the same steps on the CPU with tiny shapes and a tiny synthetic
set, so the script is exercised by the test suite and cannot rot (tests/test_device_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["Step", "plan_steps", "run_check", "prepare_data", "train_steps", "main"]

REPO = Path(__file__).resolve().parent.parent
DEVICE_DATA = "data/device_check"  # where prepare-data writes the carried synthetic set (relative to the repo)


@dataclass
class Step:
    """One command of the check. ``json_path``: a file the command writes with its numbers (parsed into the
    report); ``markdown``: the command's stdout is a markdown table worth keeping."""

    name: str
    argv: list[str]
    timeout_s: float
    json_path: Path | None = None
    markdown: bool = False
    skip_reason: str | None = None
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class StepResult:
    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float
    returncode: int | None
    command: str
    reason: str | None = None
    numbers: Any = None
    stdout_tail: str = ""


# ----------------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------------
def _op_test_files() -> list[str]:
    tests = REPO / "tests"
    names = sorted(p.name for p in tests.glob("test_*.py")
                   if (p.name.startswith(("test_msda", "test_dcn"))) and not p.name.endswith("_compile.py"))
    return [f"tests/{name}" for name in names]


def plan_steps(work: Path, dry_run: bool, data_root: Path | None) -> list[Step]:
    """The steps of one check, in priority order (see the module docstring)."""
    py = sys.executable
    steps: list[Step] = []
    env_code = (
        "import json, platform, subprocess, shutil, torch; "
        "info = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda, "
        "'cuda_available': torch.cuda.is_available(), "
        "'device_name': torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(), "
        "'cpu_count': __import__('os').cpu_count()}; "
        "run = lambda a: subprocess.run(a, capture_output=True, text=True).stdout.strip() if shutil.which(a[0]) else None; "
        "info['nvidia_smi'] = run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total,clocks.max.sm', "
        "'--format=csv,noheader']); "
        "nv = run(['nvcc', '--version']); info['nvcc'] = nv.splitlines()[-1] if nv else None; "
        "print(json.dumps(info, indent=1)); "
        f"json.dump(info, open({str(work / 'environment.json')!r}, 'w'))")
    steps.append(Step("environment", [py, "-c", env_code], 60, json_path=work / "environment.json"))
    steps.append(Step("build_ops", [py, "-m", "bevdeform.msda", "-v"], 240 if not dry_run else 600))

    test_files = _op_test_files()
    steps.append(Step("cuda_tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                                     f"--junitxml={work / 'cuda_tests.xml'}", *test_files],
                      150, json_path=work / "cuda_tests.xml"))

    device = "cpu" if dry_run else "cuda"
    dtypes = ["float32"] if dry_run else ["float32", "float16", "bfloat16"]
    msda_args = ["--shapes", "cpu", "--only", "tiny SCA", "--repeats", "1", "--warmup", "1", "--threads", "1"] \
        if dry_run else []
    steps.append(Step("bench_msda", [py, "scripts/bench_msda.py", "--device", device, "--dtype", *dtypes, *msda_args,
                                     "--json", str(work / "bench_msda.json")],
                      120, json_path=work / "bench_msda.json", markdown=True))
    bench_dcn = REPO / "scripts" / "bench_dcn.py"
    dcn_args = ["--shapes", "cpu", "--repeats", "1", "--warmup", "1", "--threads", "1"] if dry_run else []
    steps.append(Step("bench_dcn", [py, str(bench_dcn.relative_to(REPO)), "--device", device, "--dtype", *dtypes,
                                    *dcn_args, "--json", str(work / "bench_dcn.json")],
                      120, json_path=work / "bench_dcn.json", markdown=True,
                      skip_reason=None if bench_dcn.is_file() else "scripts/bench_dcn.py does not exist yet"))

    def profile(config: str, precision: str, mode: str, extra: Sequence[str] = ()) -> Step:
        name = f"profile_{config}_{precision}_{mode}"
        argv = [py, "scripts/profile_latency.py", "--config", config, "--device", device, "--precision", precision,
                "--json", str(work / f"{name}.json"), *extra]
        if mode == "compile":
            argv.append("--compile")
        elif mode == "cuda-graphs":
            argv += ["--compile", "--cuda-graphs"]
        elif mode == "eager-compare":
            argv.append("--compare-msda")
        if dry_run:
            argv += ["--iters", "2", "--warmup", "1", "--threads", "1", "--image-size", "64x112",
                     "model.decoder.num_queries=50"]
        else:
            argv += ["--iters", "30", "--warmup", "5"]
        limit = 120 if mode in ("compile", "cuda-graphs") else 60
        return Step(name, argv, limit if not dry_run else 120, json_path=work / f"{name}.json", markdown=True)

    if dry_run:
        steps.append(profile("bev_nano", "fp32", "eager-compare"))
    else:
        for config in ("bev_tiny", "bev_base"):
            for precision in ("fp32", "fp16", "bf16"):
                steps.append(profile(config, precision, "eager-compare" if precision != "fp16" else "eager"))

    train_argv = [py, "-m", "bevdeform.device_check", "train-steps", "--json", str(work / "train.json")]
    if dry_run:
        train_argv += ["--config", "bev_nano", "--device", "cpu", "--steps", "3", "--precision", "32-true",
                       "data.image_size_hw=[64,112]", "model.decoder.num_queries=50"]
    else:
        train_argv += ["--config", "bev_tiny", "--device", "cuda", "--steps", "30", "--precision", "bf16-mixed",
                       "data.image_size_hw=[900,1600]", "data.num_workers=8"]
    have_data = data_root is not None and (data_root / "v1.0-synthetic").is_dir()
    if dry_run and not have_data:
        # The CPU dry run writes its own tiny set first (the devkit is there wherever the test suite runs).
        data_root = work / "data"
        steps.append(Step("prepare_data", [py, "-m", "bevdeform.device_check", "prepare-data", "--out",
                                           str(data_root), "--scale", "0.1", "--scenes", "1", "--val-scenes", "1",
                                           "--samples-per-scene", "3"], 120))
        have_data = True
    train_argv += ["--data-root", str(data_root)]
    steps.append(Step("train", train_argv, 240 if not dry_run else 180, json_path=work / "train.json",
                      skip_reason=None if have_data else
                      f"no synthetic set at {data_root} (write it here with `python -m bevdeform.device_check "
                      f"prepare-data` and carry {DEVICE_DATA})"))
    if not dry_run:
        for config in ("bev_tiny", "bev_base"):
            for mode in ("compile", "cuda-graphs"):
                for precision in ("fp16", "bf16", "fp32"):
                    steps.append(profile(config, precision, mode))
    return steps


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------
def _parse_numbers(step: Step) -> Any:
    if step.json_path is None or not step.json_path.is_file():
        return None
    if step.json_path.suffix == ".xml":  # junit: the test counts
        import xml.etree.ElementTree as ElementTree

        root = ElementTree.parse(step.json_path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        keys = ("tests", "failures", "errors", "skipped")
        counts = {k: int(suite.get(k, 0)) for k in keys} if suite is not None else {}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in root.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        return {**counts, "failed_tests": failed}
    try:
        return json.loads(step.json_path.read_text())
    except json.JSONDecodeError as error:
        return {"unreadable": str(error)}


def _run_step(step: Step, deadline: float, log) -> StepResult:
    command = " ".join(step.argv)
    if step.skip_reason is not None:
        log.write(f"\n===== {step.name}: skipped ({step.skip_reason})\n")
        return StepResult(step.name, "skipped", 0.0, None, command, step.skip_reason)
    left = deadline - time.monotonic()
    if left < 10:
        reason = "out of time: the check's overall deadline passed before this step"
        log.write(f"\n===== {step.name}: skipped ({reason})\n")
        return StepResult(step.name, "skipped", 0.0, None, command, reason)
    timeout = min(step.timeout_s, left)
    log.write(f"\n===== {step.name} (limit {timeout:.0f} s): {command}\n")
    log.flush()
    start = time.monotonic()
    env = {**os.environ, **step.env}
    try:
        proc = subprocess.run(step.argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        seconds = time.monotonic() - start
        output = proc.stdout + ("\n" + proc.stderr if proc.stderr else "")
        returncode = proc.returncode
        # pytest's 5 = no test selected (no CUDA test on a CPU-only dry run): a skip, not a failure
        if step.name == "cuda_tests" and returncode == 5:
            status, reason = "skipped", "no CUDA test selected on this machine"
        else:
            status, reason = ("ok", None) if returncode == 0 else ("failed", f"exit code {returncode}")
    except subprocess.TimeoutExpired as expired:
        seconds = time.monotonic() - start
        output = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else \
            (expired.stdout or "")
        returncode, status, reason = None, "timeout", f"ran past its {timeout:.0f} s limit"
    log.write(output)
    log.write(f"\n----- {step.name}: {status} in {seconds:.1f} s{f' ({reason})' if reason else ''}\n")
    log.flush()
    result = StepResult(step.name, status, seconds, returncode, command, reason, _parse_numbers(step),
                        stdout_tail=output[-1500:])
    if step.markdown and status == "ok":
        result.numbers = {"parsed": result.numbers, "markdown": _markdown_of(proc.stdout)}
    return result


def _markdown_of(stdout: str) -> str:
    """The markdown lines (headings, '#' comments and table rows) of a step's stdout."""
    return "\n".join(line for line in stdout.splitlines() if line.startswith(("|", "#")))


def _summary_markdown(results: list[StepResult], header: str) -> str:
    lines = [header, "", "| step | status | seconds | note |", "|---|---|---:|---|"]
    for r in results:
        note = r.reason or ""
        if r.name == "cuda_tests" and isinstance(r.numbers, dict) and "tests" in r.numbers:
            n = r.numbers
            note = (f"{n['tests']} tests, {n['failures']} failures, {n['errors']} errors, {n['skipped']} skipped"
                    + (f"; failed: {', '.join(n['failed_tests'][:8])}" if n["failed_tests"] else ""))
        if r.name == "build_ops" and r.status == "ok":
            note = f"native ops built in {r.seconds:.0f} s"
        if r.name == "train" and isinstance(r.numbers, dict) and "seconds_per_step" in r.numbers:
            n = r.numbers
            note = (f"{n['steps']} steps, {n['seconds_per_step']:.3f} s/step (median after warm-up), peak "
                    f"{n['peak_memory_mib']:.0f} MiB, loss {n['loss_first']:.3f} -> {n['loss_last']:.3f}, "
                    f"finite {n['all_finite']}")
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {note} |")
    for r in results:
        if isinstance(r.numbers, dict) and r.numbers.get("markdown"):
            lines += ["", f"### {r.name}", "", r.numbers["markdown"]]
    return "\n".join(lines) + "\n"


def run_check(out_dir: Path, dry_run: bool = False, deadline_s: float = 450.0,
              data_root: Path | None = None, only: Sequence[str] = ()) -> list[StepResult]:
    """Run every step (or those whose name starts with one of ``only``) and write the three report files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(os.environ.get("BEVDEFORM_DEVICE_CHECK_WORK", "/tmp/bevdeform-device-check")) / \
        time.strftime("%Y%m%d-%H%M%S")
    work.mkdir(parents=True, exist_ok=True)
    if data_root is None:
        data_root = REPO / DEVICE_DATA
    steps = plan_steps(work, dry_run, data_root)
    if only:
        steps = [s for s in steps if s.name.startswith(tuple(only))]
    deadline = time.monotonic() + deadline_s
    results = []
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    with open(out_dir / "device_check.log", "w", encoding="utf-8") as log:
        for step in steps:
            result = _run_step(step, deadline, log)
            results.append(result)
            print(f"[device_check] {result.name:<40} {result.status:<8} {result.seconds:6.1f} s"
                  f"{'  ' + result.reason if result.reason else ''}", flush=True)
    env = next((r.numbers for r in results if r.name == "environment" and isinstance(r.numbers, dict)), {})
    header = (f"## Device check {started}: {env.get('device_name', '?')} (driver/memory: {env.get('nvidia_smi')}), "
              f"torch {env.get('torch')}, CUDA {env.get('cuda')}, {env.get('nvcc')}"
              f"{' — DRY RUN on the CPU, tiny shapes' if dry_run else ''}")
    (out_dir / "device_check.md").write_text(_summary_markdown(results, header), encoding="utf-8")
    (out_dir / "device_check.json").write_text(json.dumps(
        {"started": started, "dry_run": dry_run, "environment": env,
         "steps": [dataclasses.asdict(r) for r in results]}, indent=1, default=str), encoding="utf-8")
    shutil.rmtree(work, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------------------------------
# Data for the training step (written where the devkit is, carried to the GPU machine)
# ----------------------------------------------------------------------------------------------------------------
def prepare_data(out: Path, scale: float = 1.0, num_scenes: int = 2, num_val_scenes: int = 1,
                 samples_per_scene: int = 4, keep_lidar: bool = False) -> Path:
    """A small synthetic nuScenes set with its info files (needs the devkit). The lidar files, which the camera
    training never reads, are dropped by default to keep what travels small (~17 MB at full size)."""
    from bevdeform.data.infos import create_infos
    from bevdeform.data.synthetic import VERSION, write_synthetic_nuscenes

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    root = write_synthetic_nuscenes(out, num_scenes=num_scenes, num_val_scenes=num_val_scenes,
                                    samples_per_scene=samples_per_scene, scale=scale, progress=False)
    create_infos(root, VERSION, progress=False)
    if not keep_lidar:
        shutil.rmtree(root / "samples" / "LIDAR_TOP", ignore_errors=True)
    return root


# ----------------------------------------------------------------------------------------------------------------
# The training step: a short Lightning run, timed per optimiser step
# ----------------------------------------------------------------------------------------------------------------
def train_steps(config: str, data_root: Path, steps: int, precision: str, device: str,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train ``steps`` optimiser steps of ``config`` on the synthetic set at ``data_root`` with Lightning (no
    validation, no devkit); returns seconds per step (median after 3 warm-up steps), peak memory and the losses."""
    import lightning
    import numpy as np
    import torch

    from bevdeform.data.infos import info_path
    from bevdeform.data.synthetic import TRAIN_SPLIT, VAL_SPLIT, VERSION
    from bevdeform.train import DataSource, build_datamodule, build_model, build_module, load_run_config

    source = DataSource(Path(data_root), VERSION, TRAIN_SPLIT, VAL_SPLIT, info_path(data_root, VERSION, TRAIN_SPLIT),
                        info_path(data_root, VERSION, VAL_SPLIT), synthetic=True)
    cfg = load_run_config(config, ["data.num_workers=1", f"train.max_steps={steps}", "train.warmup_steps=5",
                                   *overrides])
    lightning.seed_everything(0)
    model = build_model(cfg)
    module = build_module(cfg, model, None, None)
    datamodule = build_datamodule(cfg, source, seed=0, pin_memory=device == "cuda")
    times: list[float] = []
    losses: list[float] = []

    class Timer(lightning.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            losses.append(float(loss.detach().float().cpu()))

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer = lightning.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=precision, max_steps=steps,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=cfg.train.grad_clip_norm,
        callbacks=[Timer()])
    trainer.fit(module, datamodule=datamodule)
    timed = times[3:] if len(times) > 4 else times
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"config": cfg.name, "device": device, "precision": precision, "steps": len(times),
            "image_size_hw": list(cfg.data.image_size_hw), "queue_length": cfg.data.queue_length,
            "seconds_per_step": float(np.median(timed)), "seconds_per_step_all": times,
            "peak_memory_mib": peak, "loss_first": losses[0], "loss_last": losses[-1],
            "all_finite": bool(all(np.isfinite(losses))), "losses": losses}


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bevdeform.device_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the check")
    run.add_argument("--out", default=os.environ.get("OUT") or "device_check_out")
    run.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    run.add_argument("--deadline-s", type=float, default=None, help="overall time budget (default 450 s; dry run 600)")
    run.add_argument("--data-root", default=None, help=f"synthetic set for the training step (default {DEVICE_DATA})")
    run.add_argument("--only", nargs="*", default=(), help="run only steps whose name starts with these")
    prep = sub.add_parser("prepare-data", help="write the synthetic set the training step reads (needs the devkit)")
    prep.add_argument("--out", default=str(REPO / DEVICE_DATA))
    prep.add_argument("--scale", type=float, default=1.0, help="image scale (1.0 = 1600x900)")
    prep.add_argument("--scenes", type=int, default=2)
    prep.add_argument("--val-scenes", type=int, default=1)
    prep.add_argument("--samples-per-scene", type=int, default=4)
    train = sub.add_parser("train-steps", help="time a short training run (one step of the check)")
    train.add_argument("--config", required=True)
    train.add_argument("--data-root", required=True)
    train.add_argument("--steps", type=int, default=30)
    train.add_argument("--precision", default="bf16-mixed")
    train.add_argument("--device", default="cuda")
    train.add_argument("--json", default=None)
    train.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    if args.command == "prepare-data":
        root = prepare_data(Path(args.out), scale=args.scale, num_scenes=args.scenes, num_val_scenes=args.val_scenes,
                            samples_per_scene=args.samples_per_scene)
        print(f"synthetic set for the device check at {root}")
        return 0
    if args.command == "train-steps":
        numbers = train_steps(args.config, Path(args.data_root), args.steps, args.precision, args.device,
                              args.overrides)
        text = json.dumps(numbers, indent=1)
        print(text)
        if args.json:
            Path(args.json).write_text(text)
        return 0 if numbers["all_finite"] else 1
    dry_run = args.dry_run or os.environ.get("DEVICE", "").lower() == "cpu"
    deadline = args.deadline_s if args.deadline_s is not None else (600.0 if dry_run else 450.0)
    results = run_check(Path(args.out), dry_run=dry_run, deadline_s=deadline,
                        data_root=Path(args.data_root) if args.data_root else None, only=args.only)
    failed = [r.name for r in results if r.status in ("failed", "timeout")]
    print(f"[device_check] report in {Path(args.out).resolve()}: device_check.md, device_check.json, "
          f"device_check.log; {len(failed)} step(s) failed or timed out{': ' + ', '.join(failed) if failed else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
