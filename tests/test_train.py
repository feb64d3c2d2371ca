"""The training and evaluation pipeline: LightningModule, run wiring, scripts, resumption, and proof of learning.

Fast tests check the pieces (schedule, parameter groups, resumable sampler and loader, atomic checkpoints) and every
bad input of the scripts. The slow ones train for real on the synthetic set, on CPU:
- two processes (DDP over gloo) train a few steps, checkpoint and resume;
- a run stopped mid-epoch and resumed follows the uninterrupted run's loss curve step for step;
- bev_nano learns to detect on held-out synthetic scenes (NDS and mAP above thresholds an untrained model cannot
  reach), and the learnt model scored with the cameras' extrinsics scrambled falls far below them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch

from bevdeform.config import config_to_dict, load_config
from bevdeform.lit import WarmupCosineFactor, optimizer_param_groups
from bevdeform.train import (
    AtomicCheckpointIO,
    EpochSeededDataset,
    ResumableDataLoader,
    ResumableDistributedSampler,
    EMBEDDED_SYNTHETIC,
    SyntheticDataSpec,
    prepare_synthetic_data,
    train,
)

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

# A small synthetic set for the runs that only need the pipeline to work (DDP, resumption): 3 + 2 scenes of 4
# keyframes at 160x90; and a model small enough for a step well under a second on 2 cores.
SMALL_DATA = SyntheticDataSpec(num_scenes=3, num_val_scenes=2, samples_per_scene=4, scale=0.1, objects_per_sample=12)
FAST_MODEL = (
    "data.image_size_hw=[64,112]", "model.encoder.num_layers=1", "model.decoder.num_layers=2",
    "model.decoder.num_queries=40", "model.encoder.bev_h=16", "model.encoder.bev_w=16", "data.num_workers=0",
    "data.queue_length=2", "train.warmup_steps=3", "model.max_detections=40",
)


def run_script(script: str, *args: str, cwd: Path | None = None, timeout: float = 600.0,
               env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("BEVDEFORM_RUN_DIR", None)
    env.update(env_extra or {})
    return subprocess.run([PYTHON, str(REPO / "scripts" / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(autouse=True)
def _clean_run_dir_env():
    # train() exports the run folder for the processes Lightning launches; one test's must not leak into the next.
    yield
    os.environ.pop("BEVDEFORM_RUN_DIR", None)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    parent = tmp_path_factory.mktemp("synthetic")
    return prepare_synthetic_data(SMALL_DATA, parent)


def read_metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv")):
        with open(path) as stream:
            rows.extend(csv.DictReader(stream))
    return rows


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """train/loss per optimiser step (Lightning logs step s for the batch that made global step s + 1)."""
    return {int(row["step"]): float(row["train/loss"]) for row in read_metrics_csv(run_dir)
            if row.get("train/loss")}


# ----------------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------------
def test_warmup_cosine_factor_follows_mmcv():
    factor = WarmupCosineFactor(total_steps=1000, warmup_steps=500, warmup_ratio=1 / 3, min_lr_ratio=1e-3)
    assert factor(0) == pytest.approx(1 / 3)
    # Warm-up multiplies the cosine value at the same step (mmcv's CosineAnnealing + linear warm-up).
    cosine_250 = 1e-3 + (1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * 0.25))
    assert factor(250) == pytest.approx(cosine_250 * (1 - 0.5 * (2 / 3)))
    assert factor(500) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert factor(1000) == pytest.approx(1e-3)
    assert factor(5000) == pytest.approx(1e-3)
    values = [factor(s) for s in range(500, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineFactor(0, 10, 0.3, 0.0)


def test_param_groups_give_the_backbone_its_own_lr_and_skip_frozen():
    model = torch.nn.Module()
    model.backbone = torch.nn.Linear(3, 3)
    model.head = torch.nn.Linear(3, 2)
    model.frozen = torch.nn.Linear(2, 2)
    model.frozen.requires_grad_(False)
    groups = optimizer_param_groups(model, lr=2e-4, weight_decay=0.01, backbone_lr_mult=0.1)
    by_name = {g["name"]: g for g in groups}
    assert by_name["backbone"]["lr"] == pytest.approx(2e-5)
    assert by_name["others"]["lr"] == pytest.approx(2e-4)
    assert {id(p) for p in by_name["backbone"]["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in by_name["others"]["params"]} == {id(p) for p in model.head.parameters()}


def test_resumable_sampler_order_depends_on_seed_and_epoch_and_skips():
    full = ResumableDistributedSampler(10, seed=3)
    full.set_epoch(2)
    order = list(full)
    assert sorted(index for _, index in order) == list(range(10))
    assert all(epoch == 2 for epoch, _ in order)
    again = ResumableDistributedSampler(10, seed=3)
    again.set_epoch(2)
    again.start_index = 4
    assert list(again) == order[4:]
    assert list(again) == order  # the skip applies to one epoch only
    other_epoch = ResumableDistributedSampler(10, seed=3)
    other_epoch.set_epoch(3)
    assert list(other_epoch) != order
    shards = [list(ResumableDistributedSampler(10, num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert sorted(i for shard in shards for _, i in shard) == list(range(10))


class _Reseedable(torch.utils.data.Dataset):
    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __len__(self):
        return 6

    def reseed(self, seed):
        self.rng = np.random.default_rng(seed)

    def __getitem__(self, index):
        return torch.tensor([index, self.rng.integers(1 << 30)])


def test_resumable_loader_resumes_mid_epoch_with_the_same_batches_and_jitter():
    def loader():
        sampler = ResumableDistributedSampler(6, seed=1)
        return ResumableDataLoader(EpochSeededDataset(_Reseedable(), seed=1), sampler, batch_size=2, seed=1)

    reference = loader()
    reference.sampler.set_epoch(1)
    batches = [b.tolist() for b in reference]
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "consumed_batches": 1})
    assert [b.tolist() for b in resumed] == batches[1:]
    state = resumed.state_dict()
    assert state["epoch"] == 1


class _Opaque:
    """Not a tensor nor plain data: torch.load(weights_only=True) refuses it."""


def test_atomic_checkpoint_io_replaces_whole_files_and_loads_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "step": 1}, path)
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    io.save_checkpoint({"object": _Opaque()}, tmp_path / "objects.ckpt")
    with pytest.raises(Exception, match="[Ww]eights only|weights_only"):
        io.load_checkpoint(tmp_path / "objects.ckpt")
    with pytest.raises(Exception):
        io.save_checkpoint({"fails": lambda: None}, path)  # a lambda cannot be pickled
    assert io.load_checkpoint(path)["step"] == 1  # the failed save left the previous file whole
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # and no temporary file behind


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear message and a non-zero exit, before anything long
# ----------------------------------------------------------------------------------------------------------------
def _main(script: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_script_{script}", REPO / "scripts" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_info_path_overrides_apply_to_the_embedded_synthetic_set(small_data, tmp_path):
    """data.train_info_path / data.val_info_path point a run on the embedded data (no --data-root) at other info
    files, e.g. a control's copy with scrambled extrinsics: they must not be replaced by the set's own files."""
    from bevdeform.data.infos import info_path
    from bevdeform.data.synthetic import TRAIN_SPLIT, VAL_SPLIT, VERSION
    from bevdeform.train import resolve_data_source

    common = dict(synthetic_parent=small_data.parent, synthetic_spec=SMALL_DATA)
    default = resolve_data_source(None, None, **common)
    assert default.data_root == small_data
    assert default.train_info_path == info_path(small_data, VERSION, TRAIN_SPLIT)
    assert default.eval_info_path == info_path(small_data, VERSION, VAL_SPLIT)
    train_copy, val_copy = tmp_path / "train.json", tmp_path / "val.json"
    chosen = resolve_data_source(None, None, train_info_path=str(train_copy), val_info_path=str(val_copy), **common)
    assert (chosen.train_info_path, chosen.eval_info_path) == (train_copy, val_copy)
    evaluation_only = resolve_data_source(None, None, need_train=False, val_info_path=str(val_copy), **common)
    assert (evaluation_only.train_info_path, evaluation_only.eval_info_path) == (None, val_copy)


def test_unknown_config_name_lists_the_available_ones_and_exits_non_zero(tmp_path):
    result = run_script("train.py", "--config", "bev_tinny", "--out", str(tmp_path / "run"), cwd=tmp_path,
                        timeout=120)
    assert result.returncode == 2, result.stderr
    assert "unknown config name 'bev_tinny'" in result.stderr
    assert "did you mean 'bev_tiny'" in result.stderr and "bev_nano" in result.stderr
    assert not (tmp_path / "data").exists()  # nothing written before the check


def test_override_typo_suggests_the_closest_key(tmp_path, capsys):
    code = _main("train")(["--config", "bev_nano", "train.lerning_rate=1e-3", "data.num_wrkers=2",
                           "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "lerning_rate" in err and "valid keys" in err
    code = _main("train")(["--config", "bev_nano", "data.num_wrkers=2", "--out", str(tmp_path / "run")])
    assert code == 2 and "did you mean 'num_workers'" in capsys.readouterr().err


def test_data_root_without_nuscenes_tables(tmp_path, capsys):
    root = tmp_path / "nuscenes"
    (root / "v1.0-mini").mkdir(parents=True)
    (root / "v1.0-mini" / "sample.json").write_text("[]")
    code = _main("train")(["--config", "bev_nano", "--data-root", str(root), "--version", "v1.0-mini",
                           "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "lacks the nuScenes tables" in err and "scene.json" in err
    code = _main("train")(["--config", "bev_nano", "--data-root", str(tmp_path / "nowhere"),
                           "--out", str(tmp_path / "run")])
    assert code == 2 and "no such folder" in capsys.readouterr().err
    code = _main("evaluate")(["--config", "bev_nano", "--data-root", str(root), "--version", "v1.0-trainval",
                              "--results", __file__])
    err = capsys.readouterr().err
    assert code == 2 and "v1.0-trainval" in err and "v1.0-mini" in err


def test_checkpoint_of_another_config_is_refused(tmp_path, capsys):
    nano = load_config("bev_nano")
    checkpoint = tmp_path / "nano.ckpt"
    torch.save({"bevdeform_config": config_to_dict(nano), "state_dict": {}}, checkpoint)
    code = _main("train")(["--config", "bev_tiny", "--resume", str(checkpoint), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "trained with config 'bev_nano'" in err and "model.backbone.depth: checkpoint 18, config 50" in err
    code = _main("evaluate")(["--config", "bev_tiny", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and "trained with config 'bev_nano'" in err
    code = _main("evaluate")(["--config", "bev_nano", "--checkpoint", str(tmp_path / "missing.ckpt")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    (tmp_path / "garbage.ckpt").write_bytes(b"not a checkpoint")
    code = _main("train")(["--config", "bev_nano", "--resume", str(tmp_path / "garbage.ckpt")])
    assert code == 2 and "weights_only=True" in capsys.readouterr().err


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = _main("train")(["--config", "bev_nano", "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and "not writable" in err
    assert not (tmp_path / "data").exists()


# ----------------------------------------------------------------------------------------------------------------
# Scoring results files
# ----------------------------------------------------------------------------------------------------------------
def test_evaluate_scores_results_files_gt_as_predictions_and_all_empty(small_data, tmp_path, capsys):
    from bevdeform.data.infos import CLASS_NAMES, load_infos
    from bevdeform.evaluation import boxes_to_results, write_results_json

    _, infos = load_infos(small_data / "v1.0-synthetic_infos_synthetic_val.json")

    perfect, empty = {}, {}
    for info in infos:
        # The boxes the devkit keeps as GT (with lidar or radar points); the others would count as false positives.
        keep = info["valid_flag"]
        labels = [CLASS_NAMES.index(n) for n, k in zip(info["gt_names"], keep) if k]
        perfect[info["token"]] = boxes_to_results(
            info["token"], info["gt_boxes"][keep], info["gt_velocity"][keep], np.ones(len(labels)), labels,
            info["ego2global"], attribute_names=[a for a, k in zip(info["gt_attributes"], keep) if k])
        empty[info["token"]] = []
    evaluate = _main("evaluate")
    data_root = str(small_data)
    write_results_json(perfect, tmp_path / "perfect" / "results.json")
    code = evaluate(["--config", "bev_nano", "--data-root", data_root, "--results",
                     str(tmp_path / "perfect" / "results.json")])
    out = capsys.readouterr().out
    assert code == 0
    metrics = json.loads((tmp_path / "perfect" / "metrics.json").read_text())
    # Classes without GT in the split score AP 0 (the devkit averages all 10); the others are perfect.
    present = {name for info in infos for name, k in zip(info["gt_names"], info["valid_flag"]) if k}
    for name in CLASS_NAMES:
        assert metrics[f"AP/{name}"] == pytest.approx(1.0 if name in present else 0.0, abs=1e-6), name
    assert metrics["mATE"] < 1e-6
    assert "NDS" in out and "mATE" in out and "pedestrian" in out
    write_results_json(empty, tmp_path / "empty" / "results.json")
    assert evaluate(["--config", "bev_nano", "--data-root", data_root, "--results",
                     str(tmp_path / "empty" / "results.json")]) == 0
    metrics = json.loads((tmp_path / "empty" / "metrics.json").read_text())
    assert metrics["NDS"] == 0 and metrics["mAP"] == 0


# ----------------------------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------------------------
class SimulatedKill(RuntimeError):
    pass


class StopAfterStep(lightning.Callback):
    """Kills the run (raises, with no checkpoint of its own) once ``global_step`` reaches ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            raise SimulatedKill(f"test: killed at step {self.step}")


@pytest.mark.slow
def test_killed_run_resumes_onto_the_uninterrupted_loss_curve(small_data, tmp_path):
    """3 training scenes x 4 samples at batch 2: 6 steps per epoch; 15 steps cross two epoch ends. The killed run
    checkpoints every 4 steps and dies after step 10 (mid-epoch 1), so the resume replays steps 9 and 10."""
    common = dict(overrides=[*FAST_MODEL, "data.train_batch_size=2", "train.max_steps=15"],
                  data_root=str(small_data), version="v1.0-synthetic", log_every_n_steps=1,
                  enable_progress_bar=False, accelerator="cpu", devices=1)
    full = train("bev_nano", out=tmp_path / "full", checkpoint_every_n_steps=100, **common)
    with pytest.raises(SimulatedKill):
        train("bev_nano", out=tmp_path / "killed", checkpoint_every_n_steps=4, callbacks=[StopAfterStep(10)], **common)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    resumed = train("bev_nano", resume=last, checkpoint_every_n_steps=4, **common)

    reference, interrupted = losses_by_step(tmp_path / "full"), losses_by_step(tmp_path / "killed")
    assert sorted(reference) == list(range(15))
    assert sorted(interrupted) == list(range(15))  # the replayed steps 8, 9 were logged twice: the later wins
    for step in range(15):
        assert interrupted[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-6), step
    final = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 15
    for key in ("lr_schedulers", "optimizer_states", "callbacks", "bevdeform_config"):
        assert key in final
    assert resumed["NDS"] == pytest.approx(full["NDS"], abs=1e-6)
    assert resumed["mAP"] == pytest.approx(full["mAP"], abs=1e-6)
    # The resolved config, the loggers' files and the results of each validation are in the run folder.
    assert load_config(tmp_path / "killed" / "config.yaml").data.train_batch_size == 2
    assert list((tmp_path / "killed" / "tensorboard").glob("version_*/events.out.tfevents.*"))
    assert list((tmp_path / "killed" / "results").glob("epoch*/results_nusc.json"))
    assert list((tmp_path / "killed" / "checkpoints").glob("best-*.ckpt"))


@pytest.mark.slow
def test_two_process_ddp_trains_checkpoints_resumes_and_evaluates(small_data, tmp_path):
    data = ["--data-root", str(small_data), "--version", "v1.0-synthetic"]
    common = ["--config", "bev_nano", *FAST_MODEL, "data.train_batch_size=1", *data, "--devices", "2",
              "--strategy", "ddp", "--accelerator", "cpu", "--log-every-n-steps", "1", "--out", str(tmp_path / "run")]
    first = run_script("train.py", *common, "--max-steps", "4", cwd=tmp_path, timeout=400,
                       env_extra={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4
    second = run_script("train.py", *common, "--max-steps", "8", "--resume", str(last), cwd=tmp_path, timeout=400,
                        env_extra={"OMP_NUM_THREADS": "1"})
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 8
    assert len(checkpoint["callbacks"]["bevdeform.ResumeStateCallback"]["rng_per_rank"]) == 2
    assert "NDS" in second.stdout and "mAP" in second.stdout
    # 12 training samples over 2 ranks at batch 1: 6 steps per epoch; the resumed run went on from step 4.
    steps = sorted(losses_by_step(tmp_path / "run"))
    assert steps == list(range(8))
    # Evaluation over two processes, each scene whole on one rank: every validation sample gets a result.
    evaluated = run_script("evaluate.py", "--config", "bev_nano", *FAST_MODEL, *data, "--checkpoint", str(last),
                           "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
                           "--out", str(tmp_path / "eval"), cwd=tmp_path, timeout=300,
                           env_extra={"OMP_NUM_THREADS": "1"})
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results_nusc.json").read_text())["results"]
    assert len(results) == SMALL_DATA.num_val_scenes * SMALL_DATA.samples_per_scene
    assert all(len(boxes) <= 500 for boxes in results.values())
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()).keys() >= {"NDS", "mAP", "mATE"}


# ----------------------------------------------------------------------------------------------------------------
# Proof that the pipeline learns
# ----------------------------------------------------------------------------------------------------------------
# The embedded default synthetic set (many short scenes: object layouts, not frames, are what the model must
# generalise over).
LEARN_DATA = EMBEDDED_SYNTHETIC
# bev_nano (with its auxiliary BEV heatmap loss) and what makes it learn on 2 CPU cores in minutes: 176x96 images
# (16:9, padded to 192x96), no history frame (queue 1: every step's compute goes to the frame with gradients; the
# temporal path is tested elsewhere), a learning rate of 1e-3 for the short schedule, validation only at the end.
LEARN_OVERRIDES = ("data.image_size_hw=[96,176]", "data.queue_length=1", "train.lr=1e-3", "data.num_workers=1",
                   "model.decoder.query_init=heatmap",
                   "train.epochs=1000")
LEARN_STEPS = 480
# Thresholds from measurement (docs/benchmarks.md, "Test suite"), 2 CPU cores, torch 2.13. The same test is not the
# same number on every CPU (float rounding differs): with BEVFormer's learned queries, 480 steps scored mAP 0.0121 /
# NDS 0.0739 and 0.0000 / 0.0000 scrambled on a 2-core AMD EPYC VM, but 0.0102 / 0.0539 and 0.0000 / 0.0151
# scrambled on a 2-vCPU Intel Xeon VM (2026-12-02), where the scrambled NDS broke the 3x margin. With the two-stage
# queries (model.decoder.query_init=heatmap, which learns faster in the learning benchmark) the Intel VM scores
# mAP 0.0069 / NDS 0.0743 and 0.0000 / 0.0000 scrambled (261 s of training), the AMD EPYC VM mAP 0.0079 /
# NDS 0.0670 and 0.0000 / 0.0000 (245 s, 2026-12-02, session 7). The thresholds sit at least 3x below
# those learned values and 3x above the control (issue 14); an untrained model scores mAP < 0.0005 / NDS ~0.01.
NDS_THRESHOLD = 0.02
MAP_THRESHOLD = 0.0022


@pytest.mark.slow
@pytest.mark.learning
def test_bev_nano_learns_to_detect_and_needs_the_camera_geometry(tmp_path_factory):
    """The proof of learning in CI: LEARN_STEPS steps of bev_nano (LEARN_OVERRIDES) on the embedded synthetic
    training scenes, scored by the devkit on its held-out scenes, must reach NDS_THRESHOLD and MAP_THRESHOLD; the same
    checkpoint scored with every camera's cam2ego (and cam2lidar) swapped for its neighbour's in the validation
    infos must stay below a third of both: what was learnt goes through the camera geometry, not around it. (The
    control that trains with scrambled extrinsics costs a second training run; it is in the learning benchmark,
    `scripts/bench_learning.py --controls`.) The numbers repeat on one machine (seeded, deterministic CPU kernels)."""
    from bevdeform.learning_bench import scramble_extrinsics
    from bevdeform.train import evaluate

    parent = tmp_path_factory.mktemp("learn")
    root = prepare_synthetic_data(LEARN_DATA, parent)
    common = dict(data_root=str(root), version="v1.0-synthetic", enable_progress_bar=False, accelerator="cpu",
                  devices=1)
    start = time.perf_counter()
    learned = train("bev_nano", overrides=list(LEARN_OVERRIDES), out=parent / "run", max_steps=LEARN_STEPS,
                    checkpoint_every_n_steps=100_000, log_every_n_steps=20, val_every_n_epochs=1000, **common)
    learned_s = time.perf_counter() - start
    scrambled_val = scramble_extrinsics(root / "v1.0-synthetic_infos_synthetic_val.json", parent / "val.json")
    scrambled = evaluate("bev_nano", checkpoint=parent / "run" / "checkpoints" / "last.ckpt",
                         overrides=[*LEARN_OVERRIDES, f"data.val_info_path={scrambled_val}"],
                         out=parent / "scrambled", **common)
    print(f"learned ({learned_s:.0f} s): NDS {learned['NDS']:.4f} mAP {learned['mAP']:.4f}; scored with scrambled "
          f"extrinsics: NDS {scrambled['NDS']:.4f} mAP {scrambled['mAP']:.4f}")
    assert learned["NDS"] >= NDS_THRESHOLD and learned["mAP"] >= MAP_THRESHOLD, learned
    assert scrambled["NDS"] < NDS_THRESHOLD / 3 and scrambled["mAP"] < MAP_THRESHOLD / 3, scrambled


def test_run_ends_with_loss_against_untrained_baseline_files_and_a_bev_picture(small_data, tmp_path, capsys):
    """The closing lines of a run: the probe loss at the start equals the untrained model's loss on those
    validation samples computed here independently, training lowers it, and the BEV picture is written."""
    import re

    import cv2

    from bevdeform.config import build_model
    from bevdeform.data.dataset import NuScenesCameraDataset, collate
    from bevdeform.data.infos import info_path

    overrides = [*FAST_MODEL, "data.train_batch_size=2", "train.max_steps=12", "train.lr=2e-3"]
    train("bev_nano", overrides=overrides, data_root=str(small_data), version="v1.0-synthetic",
          out=tmp_path / "run", enable_progress_bar=False, accelerator="cpu", devices=1)
    printed = capsys.readouterr().out
    match = re.search(r"loss on (\d+) fixed validation samples \(no augmentation\): ([\d.]+) at the start "
                      r"\(untrained baseline\) -> ([\d.]+) at the end", printed)
    assert match, printed[-3000:]
    count, start, end = int(match.group(1)), float(match.group(2)), float(match.group(3))
    assert count == 4 and end < start
    assert "training loss (rank 0, augmented batches)" in printed
    picture = tmp_path / "run" / "pictures" / "val_sample_bev.png"
    assert f"BEV picture of one validation sample (predictions vs ground truth): {picture}" in printed
    image = cv2.imread(str(picture))
    assert image is not None and image.shape[0] == image.shape[1] and image.std() > 0
    assert f"run folder: {tmp_path / 'run'}" in printed

    # The baseline, independently: the same seed builds the same untrained weights; the same 4 samples.
    cfg = load_config("bev_nano", overrides)
    lightning.seed_everything(cfg.train.seed)
    model = build_model(cfg).eval()
    dataset = NuScenesCameraDataset(info_path(small_data, "v1.0-synthetic", "synthetic_val"), small_data,
                                    cfg.data.image_size_hw, queue_length=1, class_names=cfg.data.class_names,
                                    point_cloud_range_m=cfg.data.point_cloud_range_m, pad_multiple=cfg.data.pad_multiple)
    indices = np.linspace(0, len(dataset) - 1, 4).round().astype(int)
    with torch.no_grad():
        losses = [float(model.forward_train(collate([dataset[int(i)]]))["loss"]) for i in indices]
    assert start == pytest.approx(np.mean(losses), rel=1e-3)


def test_channels_last_changes_the_memory_format_not_the_numbers():
    """train.channels_last: backbone and neck weights (and so their activations) channels-last; the features and
    their gradients equal the contiguous model's."""
    from bevdeform.config import build_model
    from bevdeform.train import apply_memory_format

    cfg = load_config("bev_nano", list(FAST_MODEL))
    torch.manual_seed(0)
    plain = build_model(cfg).train()
    fast = build_model(cfg).train()
    fast.load_state_dict(plain.state_dict())
    apply_memory_format(fast, True)
    conv = next(m for m in fast.backbone.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    images = torch.randn(1, cfg.model.num_cameras, 3, 64, 128)
    out_plain, out_fast = plain.extract_features(images), fast.extract_features(images)
    assert not out_fast[0].is_contiguous()  # (B, N, C, H, W) view of channels-last maps
    def rel(a, b):  # float32 convolutions in another memory layout sum in another order: compare by norms
        return float((a - b).norm() / a.norm().clamp_min(1e-12))

    for a, b in zip(out_plain, out_fast):
        assert rel(a, b) < 1e-5
    # Gradients of both against a float64 copy. float32 kernels differ by CPU and thread count (measured 2026-12-02
    # on a 2-vCPU AVX-512 Intel Xeon: ~5e-6 relative at 2 threads in either layout; at 1 thread up to 6e-3 on most
    # parameters with channels-last, and 2.5e-2 on the stem conv's weight in either layout, its batch-normalised
    # gradient being a sum of cancelling terms), so the bound is 5e-2: a wrong gradient is off by O(1).
    reference = build_model(cfg).train()
    reference.load_state_dict(plain.state_dict())
    reference.double()
    out_ref = reference.extract_features(images.double())
    for outputs in (out_plain, out_fast, out_ref):
        sum(f.square().mean() for f in outputs).backward()
    for (name, p), q, r in zip(plain.backbone.named_parameters(), fast.backbone.parameters(),
                               reference.backbone.parameters()):
        if r.grad is not None:
            assert rel(r.grad, p.grad.double()) < 5e-2, name
            assert rel(r.grad, q.grad.double()) < 5e-2, name
