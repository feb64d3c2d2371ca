"""Run wiring: what ``scripts/train.py`` and ``scripts/evaluate.py`` do, as library functions.

``train(...)``: config (+ overrides) -> checks of every input -> data (the embedded synthetic set, written on first
use, or nuScenes with info files made on the fly) -> model (``config.build_model``) -> ``BEVFormerModule`` ->
Lightning ``Trainer`` (DDP through Lightning for several devices or nodes) -> fit -> a final validation ->
the metrics table. ``evaluate(...)``: the same data and model path for one checkpoint, or scoring of an existing
results file.

A run folder (``--out``) holds::

    config.yaml             the resolved config (every key), the data paths of the run included
    checkpoints/last.ckpt   written every ``checkpoint_every_n_steps`` optimiser steps and after each validation
    checkpoints/best-*.ckpt the best one by val/NDS
    tensorboard/version_N/  TensorBoard events; csv/version_N/metrics.csv the same numbers as CSV
    results/epochEEE-stepSSSSSSS/  results_nusc.json, metrics.json, metrics_summary.json of each validation

Resuming (``resume=<checkpoint>``) continues exactly where the run stopped: weights, optimiser, scheduler and
loop counters (Lightning's), the position in the epoch's shuffled order (:class:`ResumableDataLoader`: the
order depends only on the seed and the epoch, the consumed batches are skipped), and the random number
generators of torch, numpy and Python of every rank (:class:`ResumeStateCallback`). The photometric augmentation
of a sample depends only on (seed, epoch, sample index) (:class:`EpochSeededDataset`), so it does not matter
which worker loads it or whether the run was interrupted. Checkpoints are written atomically
(:class:`AtomicCheckpointIO`) and read with ``torch.load(weights_only=True)``: everything stored is tensors and
plain data.

Every input is checked before any long work starts (data writing, model building, training); a problem raises
:class:`RunError` with a message that names the argument or file and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import lightning
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from bevdeform.config import (
    Config,
    ConfigError,
    build_model,
    config_to_dict,
    load_config,
    save_config,
)
from bevdeform.data.datamodule import NuScenesDataModule, SeedWorker
from bevdeform.data.dataset import collate

__all__ = [
    "RunError",
    "SyntheticDataSpec",
    "EMBEDDED_SYNTHETIC",
    "EMBEDDED_RUN_OVERRIDES",
    "DataSource",
    "prepare_synthetic_data",
    "resolve_data_source",
    "load_run_config",
    "check_output_dir",
    "read_checkpoint",
    "check_checkpoint_matches",
    "EpochSeededDataset",
    "ResumableDistributedSampler",
    "ResumableDataLoader",
    "RunDataModule",
    "ResumeStateCallback",
    "ValidateAtMaxSteps",
    "AtomicCheckpointIO",
    "build_datamodule",
    "build_module",
    "build_trainer",
    "check_scenes_per_rank",
    "train",
    "evaluate",
]


RUN_DIR_ENV = "BEVDEFORM_RUN_DIR"


class RunError(Exception):
    """A bad input to a run (config, data root, checkpoint, output folder): the message says what and where."""


def _log(message: str) -> None:
    """Print on the first process only (from the launcher's environment, so before the Trainer exists)."""
    if _global_rank() == 0:
        print(f"[bevdeform] {message}", flush=True)


def _global_rank() -> int:
    """This process's global rank as the launcher set it (torchrun and SLURM: RANK / SLURM_PROCID; Lightning's
    subprocess launcher: LOCAL_RANK and NODE_RANK, where any process but local 0 of node 0 counts as nonzero);
    0 for a process nobody launched."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    local, node = os.environ.get("LOCAL_RANK", "0"), os.environ.get("NODE_RANK", "0")
    return 0 if local in ("", "0") and node in ("", "0") else 1


def _local_rank() -> int:
    """This process's rank on its machine: the one that writes data files there (0 writes, the others wait)."""
    for key in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return _global_rank()


# ----------------------------------------------------------------------------------------------------------------
# The embedded synthetic dataset
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SyntheticDataSpec:
    """Arguments of ``write_synthetic_nuscenes`` for a synthetic data folder; the folder name hashes them."""

    num_scenes: int = 8
    num_val_scenes: int = 2
    samples_per_scene: int = 10
    scale: float = 0.2  # 320x180 images
    objects_per_sample: int = 20
    seed: int = 0
    extra_train_scenes: int = 0  # training scenes after the validation ones (write_synthetic_nuscenes)

    def folder_name(self) -> str:
        # generator_format: raise it when write_synthetic_nuscenes changes what the same arguments produce
        # (2: buses have a windscreen, issue 14). extra_train_scenes enters the key only when used, so the folders
        # of the specs before it keep their names.
        fields = dataclasses.asdict(self)
        if not fields["extra_train_scenes"]:
            del fields["extra_train_scenes"]
        key = json.dumps({"generator_format": 2, **fields}, sort_keys=True)
        return f"synthetic-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


# The default data of `scripts/train.py` without --data-root: 80 training + 8 validation scenes of 4 keyframes,
# 320x180 images (~50 s to write on 2 cores). Many short scenes rather than few long ones: what a detector must
# generalise over is object layouts, and 8 scenes of 10 frames hold only 8 of them (bev_nano then reached mAP 0.005
# in 1200 steps; on this set 0.018 in 600, docs/benchmarks.md). `train.py --config bev_tiny` on it finishes in
# < 15 minutes on 2 cores end to end.
EMBEDDED_SYNTHETIC = SyntheticDataSpec(num_scenes=80, num_val_scenes=8, samples_per_scene=4)

# What a run on the embedded synthetic set changes in a shipped config, applied before the user's overrides (and
# printed). The shipped configs describe nuScenes training (800x450 images, 24 epochs of 28k samples on 8 GPUs); the
# synthetic images are 320x180 and there are 80 training samples, so bev_tiny reads them at their own size and
# trains a fixed number of steps sized to the 15-minute budget on 2 CPU cores (docs/benchmarks.md). Two more cuts,
# from a profile of the step (docs/benchmarks.md "Main job"): no dropout (90 steps over 320 samples need no
# regularisation, and the decoder's attention dropout alone materialised 8 x 900 x 900 masks per layer and kept
# nn.MultiheadAttention off its fused path: 6.1 -> 4.1 s/step) and 300 decoder queries instead of 900 (a synthetic
# frame has at most 26 annotated objects; 4.1 -> ~3.1 s/step with both, measured outside Lightning; ~5.3 s/step in
# the run on 2026-12-02's slower VM, hence 90 steps). The published architecture is otherwise kept, the queue
# of 3 frames included.
EMBEDDED_RUN_OVERRIDES: dict[str, tuple[str, ...]] = {
    "bev_tiny": ("data.image_size_hw=[180,320]", "train.max_steps=90", "train.warmup_steps=20",
                 "data.num_workers=1", "train.channels_last=true", "model.encoder.dropout=0.0",
                 "model.decoder.dropout=0.0", "model.decoder.num_queries=300"),
    "bev_small": ("data.image_size_hw=[180,320]",),
    "bev_base": ("data.image_size_hw=[180,320]",),
    # The published checkpoints' official test resize of the synthetic 320x180 images: x0.5, x0.8, x1.0.
    "bevformer_tiny": ("data.image_size_hw=[90,160]", "data.num_workers=1"),
    "bevformer_small": ("data.image_size_hw=[144,256]", "data.num_workers=1"),
    "bevformer_base": ("data.image_size_hw=[180,320]", "data.num_workers=1"),
}


def prepare_synthetic_data(spec: SyntheticDataSpec = EMBEDDED_SYNTHETIC, parent: str | os.PathLike = "data",
                           wait_s: float = 3600.0) -> Path:
    """The synthetic data root for ``spec`` under ``parent``, written and converted to info files on first use.

    The dataset is written into a temporary folder beside the final one and renamed at the end, so a folder with
    the final name is always complete; info files are written atomically by ``create_infos``. On each machine the
    processes other than local rank 0 wait for its files instead of writing them too.
    """
    from bevdeform.data.infos import info_path
    from bevdeform.data.synthetic import TRAIN_SPLIT, VAL_SPLIT, VERSION

    parent = Path(parent)
    root = parent / spec.folder_name()
    infos = [info_path(root, VERSION, split) for split in (TRAIN_SPLIT, VAL_SPLIT)]
    if root.is_dir() and all(p.is_file() for p in infos):
        _log(f"data: synthetic nuScenes at {root} (reused)")
        return root
    if _local_rank() != 0:
        deadline = time.monotonic() + wait_s
        while not (root.is_dir() and all(p.is_file() for p in infos)):
            if time.monotonic() > deadline:
                raise RunError(f"waited {wait_s:.0f} s for rank 0 to write the synthetic data at {root}")
            time.sleep(1.0)
        return root
    start = time.perf_counter()
    if not root.is_dir():
        from bevdeform.data.synthetic import write_synthetic_nuscenes

        _log(f"data: writing synthetic nuScenes ({spec}) to {root}")
        parent.mkdir(parents=True, exist_ok=True)
        tmp = parent / f".{root.name}.tmp-{os.getpid()}"
        write_synthetic_nuscenes(tmp, num_scenes=spec.num_scenes, num_val_scenes=spec.num_val_scenes,
                                 samples_per_scene=spec.samples_per_scene, seed=spec.seed, scale=spec.scale,
                                 objects_per_sample=spec.objects_per_sample, progress=False,
                                 extra_train_scenes=spec.extra_train_scenes)
        try:
            os.rename(tmp, root)
        except OSError:
            if not root.is_dir():  # not a concurrent writer's complete copy: a real failure
                raise
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    if not all(p.is_file() for p in infos):
        from bevdeform.data.infos import create_infos

        create_infos(root, VERSION, progress=False)
    _log(f"data: synthetic nuScenes at {root} (written in {time.perf_counter() - start:.1f} s)")
    return root


# ----------------------------------------------------------------------------------------------------------------
# Data source: which root, version, splits and info files a run reads
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class DataSource:
    """The data of a run: nuScenes tables at ``data_root/version``, info files of its training and evaluation
    splits (paths may still be absent until :meth:`ensure_infos`)."""

    data_root: Path
    version: str
    train_split: str | None
    eval_split: str
    train_info_path: Path | None
    eval_info_path: Path
    synthetic: bool

    def ensure_infos(self, wait_s: float = 3600.0) -> None:
        """Create the info files (local rank 0; the other processes wait) when one is missing."""
        paths = [p for p in (self.train_info_path, self.eval_info_path) if p is not None]
        if all(p.is_file() for p in paths):
            return
        if _local_rank() != 0:
            deadline = time.monotonic() + wait_s
            while not all(p.is_file() for p in paths):
                if time.monotonic() > deadline:
                    raise RunError(f"waited {wait_s:.0f} s for rank 0 to write the info files {paths}")
                time.sleep(1.0)
            return
        from bevdeform.data.infos import create_infos

        missing = [str(p) for p in paths if not p.is_file()]
        _log(f"data: info files {missing} are missing: converting {self.data_root / self.version} (create_infos)")
        out_dirs = {p.parent for p in paths}
        for out_dir in out_dirs:
            try:
                create_infos(self.data_root, self.version, out_dir=out_dir)
            except PermissionError as error:
                raise RunError(
                    f"cannot write info files into {out_dir} ({error}); create them elsewhere with "
                    f"`python data_prep/create_infos.py --data-root {self.data_root} --version {self.version} --out DIR` "
                    f"and pass data.train_info_path=DIR/... data.val_info_path=DIR/..."
                ) from None
        still_missing = [str(p) for p in paths if not p.is_file()]
        if still_missing:
            raise RunError(f"create_infos did not write {still_missing}: the split is not one of "
                           f"{self.data_root / self.version}'s splits")


def _splits_of(table_root: Path, version: str) -> list[str]:
    from bevdeform.data.infos import PREDEFINED_SPLITS

    splits_path = table_root / "splits.json"
    if splits_path.is_file():
        try:
            splits = json.loads(splits_path.read_text())
        except json.JSONDecodeError as error:
            raise RunError(f"{splits_path} is not valid JSON: {error}") from None
        if not isinstance(splits, dict):
            raise RunError(f"{splits_path} must map split names to lists of scene names")
        return list(splits)
    if version not in PREDEFINED_SPLITS:
        raise RunError(f"version {version!r} has no predefined splits (known: {', '.join(PREDEFINED_SPLITS)}) and "
                       f"{splits_path} does not exist")
    return list(PREDEFINED_SPLITS[version])


def _pick_split(splits: Sequence[str], suffix: str, table_root: Path) -> str | None:
    candidates = [s for s in splits if s == suffix or s.endswith("_" + suffix)]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        return None
    raise RunError(f"{table_root} has several {suffix} splits {candidates}; pass the one to use")


def resolve_data_source(data_root: str | os.PathLike | None, version: str | None, eval_split: str | None = None,
                        need_train: bool = True, train_info_path: str | None = None,
                        val_info_path: str | None = None, synthetic_parent: str | os.PathLike = "data",
                        synthetic_spec: SyntheticDataSpec = EMBEDDED_SYNTHETIC) -> DataSource:
    """Check the data arguments and say which files a run reads.

    ``data_root`` None: the embedded synthetic set (written under ``synthetic_parent`` on first use; its
    version is ``v1.0-synthetic``, its splits ``synthetic_train`` / ``synthetic_val``). Otherwise a nuScenes root:
    ``version`` (or the only ``v1.0-*`` folder holding tables) must hold the 13 tables; the training split is the
    one named ``train`` or ``*_train``, the evaluation split ``eval_split`` or the one named ``val`` / ``*_val``.
    Info files default to ``<data_root>/<version>_infos_<split>.json`` (made by :meth:`DataSource.ensure_infos`
    when absent); ``train_info_path`` / ``val_info_path`` point elsewhere.
    """
    from bevdeform.data.infos import NUSCENES_TABLES

    if data_root is None:
        from bevdeform.data.synthetic import TRAIN_SPLIT, VAL_SPLIT, VERSION

        if version is not None and version != VERSION:
            raise RunError(f"--version {version} without --data-root: the embedded synthetic set is {VERSION}; "
                           f"pass --data-root for another dataset")
        if eval_split is not None and eval_split not in (TRAIN_SPLIT, VAL_SPLIT):
            raise RunError(f"--split {eval_split!r}: the embedded synthetic set has splits {TRAIN_SPLIT}, {VAL_SPLIT}")
        root = prepare_synthetic_data(synthetic_spec, synthetic_parent)
        return _data_source(root, VERSION, TRAIN_SPLIT if need_train else None, eval_split or VAL_SPLIT,
                            train_info_path, val_info_path, synthetic=True)

    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise RunError(f"--data-root {root}: no such folder (expected a nuScenes data root holding <version>/ with "
                       f"the tables, samples/, sweeps/, maps/)")
    has_tables = [p.name for p in sorted(root.iterdir()) if p.is_dir() and (p / "sample.json").is_file()]
    if version is None:
        if len(has_tables) != 1:
            raise RunError(f"--data-root {root}: pass --version (version folders with tables there: "
                           f"{has_tables or 'none'}; expected e.g. v1.0-trainval or v1.0-mini)")
        version = has_tables[0]
    table_root = root / version
    if not table_root.is_dir():
        raise RunError(f"--data-root {root} --version {version}: {table_root} does not exist (version folders with "
                       f"nuScenes tables there: {has_tables or 'none'})")
    missing = [f"{t}.json" for t in NUSCENES_TABLES if not (table_root / f"{t}.json").is_file()]
    if missing:
        raise RunError(f"--data-root {root} --version {version}: {table_root} lacks the nuScenes tables "
                       f"{', '.join(missing)} (all of {', '.join(NUSCENES_TABLES)} are needed)")
    splits = _splits_of(table_root, version)
    train_split = _pick_split(splits, "train", table_root) if need_train else None
    if need_train and train_split is None and train_info_path is None:
        raise RunError(f"{table_root}: no training split among {splits} (expected one named train or *_train)")
    if eval_split is None:
        eval_split = _pick_split(splits, "val", table_root)
        if eval_split is None:
            raise RunError(f"{table_root}: no validation split among {splits}; pass --split")
    elif eval_split not in splits:
        close = difflib.get_close_matches(eval_split, splits, n=1)
        raise RunError(f"--split {eval_split!r} is not a split of {table_root}"
                       f"{f'; did you mean {close[0]!r}?' if close else ''} (splits: {', '.join(splits)})")
    return _data_source(root, version, train_split, eval_split, train_info_path, val_info_path, synthetic=False)


def _data_source(root: Path, version: str, train_split: str | None, eval_split: str, train_info_path: str | None,
                 val_info_path: str | None, synthetic: bool) -> DataSource:
    """The DataSource of a checked root: the info files the user named, else ``<root>/<version>_infos_<split>.json``."""
    from bevdeform.data.infos import info_path

    train_path = Path(train_info_path) if train_info_path else (
        info_path(root, version, train_split) if train_split else None)
    eval_path = Path(val_info_path) if val_info_path else info_path(root, version, eval_split)
    return DataSource(root, version, train_split, eval_split, train_path, eval_path, synthetic=synthetic)


# ----------------------------------------------------------------------------------------------------------------
# Config, output folder, checkpoints: checked before anything long
# ----------------------------------------------------------------------------------------------------------------
def load_run_config(config: str, overrides: Sequence[str] = (), embedded_data: bool = False) -> Config:
    """``load_config`` with :class:`RunError` messages; on the embedded data, the config's
    :data:`EMBEDDED_RUN_OVERRIDES` go first (the user's overrides win). The data root of a run is an argument
    (``--data-root``), not a config key: an override of ``data.data_root`` is refused."""
    if any(o.split("=", 1)[0].strip() == "data.data_root" for o in overrides):
        raise RunError("data.data_root=...: pass the data root as --data-root DIR (and --version V); without it the "
                       "run uses the embedded synthetic set")
    try:
        name = Path(config).stem if ("/" in config or config.endswith((".yaml", ".yml"))) else config
        embedded = list(EMBEDDED_RUN_OVERRIDES.get(name, ())) if embedded_data else []
        if embedded:
            _log(f"config: {name} on the embedded synthetic data: {' '.join(embedded)}")
        return load_config(config, [*embedded, *overrides])
    except FileNotFoundError as error:
        raise RunError(f"--config: {error}") from None
    except ConfigError as error:
        raise RunError(f"config: {error}") from None


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create ``path`` if needed and prove it writable with a probe file; RunError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise RunError(f"{what} {path}: the folder is not writable ({error.strerror or error})") from None
    return path


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint loaded with ``torch.load(weights_only=True)``; RunError for a missing or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise RunError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated, or pickled objects weights_only refuses
        raise RunError(f"checkpoint {path} cannot be read with torch.load(weights_only=True): {error}") from None
    if not isinstance(checkpoint, dict):
        raise RunError(f"checkpoint {path} holds a {type(checkpoint).__name__}, expected a dict")
    return checkpoint


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        found = []
        for key in sorted(set(saved) | set(current)):
            found += _differences(saved.get(key), current.get(key), f"{prefix}.{key}" if prefix else key)
        return found
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r}, config {current!r}"]


def check_checkpoint_matches(checkpoint: dict[str, Any], cfg: Config, path: str | os.PathLike) -> None:
    """RunError unless the checkpoint was trained with the same model as ``cfg`` (model section, classes and
    point-cloud range, which shape the decoder); training and data settings may differ."""
    saved = checkpoint.get("bevdeform_config")
    if not isinstance(saved, dict):
        raise RunError(f"checkpoint {path} holds no bevdeform config (key 'bevdeform_config'): it was not written "
                       f"by scripts/train.py")
    current = config_to_dict(cfg)

    def model_part(c: dict) -> dict:
        data = c.get("data", {})
        return {"model": c.get("model"), "data.class_names": data.get("class_names"),
                "data.point_cloud_range_m": data.get("point_cloud_range_m")}

    differences = _differences(model_part(saved), model_part(current), "")
    if differences:
        shown = "; ".join(differences[:6]) + (f"; ... ({len(differences)} in all)" if len(differences) > 6 else "")
        raise RunError(f"checkpoint {path} was trained with config {saved.get('name')!r}, whose model differs from "
                       f"config {cfg.name!r}: {shown}")


# ----------------------------------------------------------------------------------------------------------------
# Exact resumption: data order, augmentation, random number generators
# ----------------------------------------------------------------------------------------------------------------
class EpochSeededDataset(Dataset):
    """Wraps a dataset with a ``reseed(seed)`` method; item ``(epoch, index)`` is ``dataset[index]`` with the
    augmentation generator seeded from ``(seed, epoch, index)``: the jitter of a sample is the same whichever worker
    loads it and whether or not the run was resumed in between."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        self.dataset.reseed(np.random.SeedSequence([self.seed, int(epoch), int(index)]))
        return self.dataset[int(index)]


class ResumableDistributedSampler(DistributedSampler):
    """``DistributedSampler`` (order from ``(seed, epoch)`` only, sharded over ranks) that yields
    ``(epoch, index)`` pairs for :class:`EpochSeededDataset` and can start an epoch after its first
    ``start_index`` samples (a resumed run). A subclass of DistributedSampler, so Lightning keeps it under DDP."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True):
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=False)
        self.start_index = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())  # this rank's share of the (seed, epoch) permutation
        start, self.start_index = self.start_index, 0
        epoch = self.epoch
        return iter([(epoch, index) for index in indices[start:]])


class ResumableDataLoader(DataLoader):
    """The training loader: a ``DataLoader`` over :class:`EpochSeededDataset` with a
    :class:`ResumableDistributedSampler`, stateful in Lightning's sense (``state_dict`` / ``load_state_dict``):
    the checkpoint stores the epoch and how many batches of it were consumed (:class:`ResumeStateCallback` counts
    them), and a resumed run skips those. Its own generator, reseeded per epoch, draws the worker seeds, so
    iterating never touches torch's global generator."""

    def __init__(self, dataset: Dataset, sampler: ResumableDistributedSampler, batch_size: int, seed: int,
                 **kwargs: Any):
        self._generator = torch.Generator()
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=self._generator, **kwargs)
        self.seed = int(seed)
        self.consumed_batches = 0
        self._resuming = False

    def __iter__(self):
        if self._resuming:
            self._resuming = False
        else:
            self.consumed_batches = 0
        self._generator.manual_seed(self.seed * 100_003 + int(self.sampler.epoch))
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "consumed_batches": int(self.consumed_batches)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        consumed = int(state["consumed_batches"])
        if 0 < consumed < len(self):
            self.sampler.start_index = consumed * int(self.batch_size)
            self.consumed_batches = consumed
            self._resuming = True


class RunDataModule(NuScenesDataModule):
    """``NuScenesDataModule`` (same arguments) whose training loader is a :class:`ResumableDataLoader`."""

    def train_dataloader(self) -> ResumableDataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = ResumableDistributedSampler(len(self.train_dataset), num_replicas=world_size, rank=rank,
                                              seed=self.seed)
        return ResumableDataLoader(
            EpochSeededDataset(self.train_dataset, self.seed), sampler, batch_size=self.train_batch_size,
            seed=self.seed, num_workers=self.num_workers, collate_fn=collate, pin_memory=self.pin_memory,
            drop_last=self.drop_last_train, persistent_workers=self.persistent_workers,
            worker_init_fn=SeedWorker(rank))


def _rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / Python generator states as tensors and plain lists."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "python": {"version": int(version), "state": list(python_state), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class ResumeStateCallback(lightning.Callback):
    """Exact resumption: stores every rank's random number generator states and the training loader's position
    in checkpoints; restores the generators right before the first training step after a resume (in an
    uninterrupted run nothing draws from them between the save and that step either)."""

    def __init__(self):
        self._pending_rng: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "bevdeform.ResumeStateCallback"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableDataLoader):
            loader.consumed_batches = batch_idx + 1

    def state_dict(self) -> dict[str, Any]:
        own = _rng_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(per_rank, own)
        else:
            per_rank = [own]
        return {"rng_per_rank": per_rank}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_rank = state_dict.get("rng_per_rank") or []
        rank = torch.distributed.get_rank() if torch.distributed.is_available() \
            and torch.distributed.is_initialized() else 0
        if per_rank:
            # A resume on another number of ranks reuses rank 0's states where its own are missing.
            self._pending_rng = per_rank[rank] if rank < len(per_rank) else per_rank[0]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None


class ValidateAtMaxSteps(lightning.Callback):
    """Ends training through ``trainer.should_stop`` at ``max_steps``, which makes Lightning validate (and the
    checkpoint callbacks save last / best) at that step even when it falls in the middle of an epoch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True


class LearningEvidence(lightning.Callback):
    """What a user reads at the end of a run to see that training did something, whatever the metrics say.

    ``probe``: the loss of the model on a fixed set of validation samples (no augmentation, eval mode, no gradient),
    measured at the start of ``fit`` (the untrained or resumed weights: the baseline) and at its end, on rank 0.
    ``train_losses``: the training loss of every optimiser step (rank 0's batches).
    """

    def __init__(self, num_probe_samples: int = 4, resumed: bool = False):
        self.num_probe_samples = int(num_probe_samples)
        self.resumed = bool(resumed)
        self.probe_start: float | None = None
        self.probe_end: float | None = None
        self.probe_tokens: list[str] = []
        self.train_losses: list[float] = []

    def _probe_batches(self, trainer) -> list[dict[str, Any]]:
        dataset = trainer.datamodule.val_dataset
        count = min(self.num_probe_samples, len(dataset))
        # spread over the split (several scenes), always the same samples
        indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
        return [collate([dataset[i]]) for i in indices]

    @torch.no_grad()
    def probe_loss(self, trainer, pl_module) -> float:
        model = pl_module.model
        was_training = model.training
        model.eval()
        try:
            losses = []
            for batch in self._probe_batches(trainer):
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                with trainer.precision_plugin.forward_context():
                    losses.append(float(model.forward_train(batch)["loss"].float()))
                self.probe_tokens.append(batch["sample_token"][0])
        finally:
            model.train(was_training)
        return float(np.mean(losses))

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and trainer.datamodule is not None:
            trainer.datamodule.setup("validate")
            self.probe_start = self.probe_loss(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.train_losses.append(float(loss.detach().float()))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.probe_start is not None:
            self.probe_tokens = []
            self.probe_end = self.probe_loss(trainer, pl_module)

    def summary_lines(self) -> list[str]:
        lines = []
        if self.probe_start is not None and self.probe_end is not None:
            change = 100.0 * (self.probe_end - self.probe_start) / max(abs(self.probe_start), 1e-12)
            lines.append(f"loss on {len(self.probe_tokens)} fixed validation samples (no augmentation): "
                         f"{self.probe_start:.3f} at the start "
                         f"({'the resumed weights' if self.resumed else 'untrained baseline'}) -> {self.probe_end:.3f} at the "
                         f"end ({change:+.0f}%)")
        if len(self.train_losses) >= 2:
            k = max(1, min(10, len(self.train_losses) // 4))
            first, last = np.mean(self.train_losses[:k]), np.mean(self.train_losses[-k:])
            lines.append(f"training loss (rank 0, augmented batches): mean of the first {k} steps {first:.3f}, of "
                         f"the last {k} steps {last:.3f}")
        return lines


def render_validation_picture(results_path: Path, data_root: Path, val_info_path: Path, out_path: Path,
                              class_names: Sequence[str], range_m: float) -> Path | None:
    """A bird's-eye view of one validation sample: ground truth (filled) vs the run's predictions (outlines),
    read from the validation's results JSON (the last frame of the first scene, so it had a temporal history).
    Predictions shown: score >= 0.3, or the as many best as there are ground-truth boxes when fewer pass 0.3
    (an early model's scores are low; the title says the threshold). Returns the PNG path (None without results)."""
    import cv2

    from bevdeform.data.infos import load_infos
    from bevdeform.visualize import boxes_from_results, render_sample

    if results_path is None or not Path(results_path).is_file():
        return None
    results = json.loads(Path(results_path).read_text())["results"]
    _, infos = load_infos(val_info_path)
    scene = [info for info in infos if info["scene_token"] == infos[0]["scene_token"]]
    info = max(scene, key=lambda i: i["frame_idx"])
    pred = boxes_from_results(results.get(info["token"], []), np.asarray(info["ego2global"]), class_names)
    num_gt = len(info["gt_names"])
    scores = np.sort(pred.scores)[::-1] if pred.scores is not None else np.zeros(0)
    threshold = 0.3
    if len(scores) and (scores >= 0.3).sum() < num_gt:
        threshold = float(scores[min(num_gt, len(scores)) - 1])
    pictures = render_sample(info, data_root, pred, class_names, score_threshold=threshold, range_m=range_m)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    bev = pictures["bev"]
    cv2.putText(bev, f"predictions shown: score >= {threshold:.3f}", (8, 38), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (220, 220, 220), 1, cv2.LINE_AA)
    cv2.imwrite(str(out_path), bev)
    return out_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO``: ``torch.save`` into a temporary file in the checkpoint's folder, fsync,
    ``os.replace`` (a run killed while saving leaves the previous checkpoint intact); loads with
    ``weights_only=True`` whatever the caller asks."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint file not found: {path}")
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


# ----------------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------------
def build_datamodule(cfg: Config, source: DataSource, seed: int, pin_memory: bool = False):
    """The run's data module (:func:`RunDataModule`) from the config's data section and the resolved files."""
    d = cfg.data
    return RunDataModule(
        data_root=source.data_root, train_info_path=source.train_info_path, val_info_path=source.eval_info_path,
        image_size_hw=d.image_size_hw, pad_multiple=d.pad_multiple, queue_length=d.queue_length,
        val_queue_length=d.val_queue_length,
        train_batch_size=d.train_batch_size, val_batch_size=d.val_batch_size, num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0, pin_memory=pin_memory, seed=seed, class_names=d.class_names,
        point_cloud_range_m=d.point_cloud_range_m, photometric_aug=d.photometric_aug,
        bevformer_v1_inputs=d.bevformer_v1_inputs, image_pipeline=d.image_pipeline)


def load_checkpoint_weights(model: torch.nn.Module, checkpoint: dict[str, Any], what: str) -> None:
    """The weights of a checkpoint read by :func:`read_checkpoint` into ``model``: a Lightning checkpoint (keys
    ``model.*`` under ``state_dict``), a converted one (``state_dict`` without prefix) or a bare state dict.
    Mismatched keys are a RunError starting with ``what`` (the argument that named the file)."""
    from bevdeform.models.bevformer import load_model_weights

    state = checkpoint.get("state_dict", checkpoint)
    prefix = "model." if any(str(k).startswith("model.") for k in state) else ""
    try:
        load_model_weights(model, state, key_prefix=prefix)
    except ValueError as error:
        raise RunError(f"{what}: {error}") from None


def apply_memory_format(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """``train.channels_last``: the backbone's and the neck's parameters in channels-last memory format (their
    convolutions then produce channels-last activations from ordinary inputs). The values are unchanged; state
    dicts load either way."""
    if channels_last:
        for part in (getattr(model, "backbone", None), getattr(model, "neck", None)):
            if part is not None:
                part.to(memory_format=torch.channels_last)
    return model


def build_module(cfg: Config, model: torch.nn.Module, source: DataSource | None, results_dir: Path | None,
                 per_epoch_results: bool = True):
    """``BEVFormerModule`` with the config's optimisation and the evaluation target of ``source``."""
    from bevdeform.lit import BEVFormerModule, EvaluationTarget

    t = cfg.train
    evaluation = None
    if source is not None and results_dir is not None:
        evaluation = EvaluationTarget(str(source.data_root), source.version, source.eval_split, str(results_dir),
                                      per_epoch_subfolders=per_epoch_results)
    return BEVFormerModule(
        model, lr=t.lr, weight_decay=t.weight_decay, backbone_lr_mult=t.backbone_lr_mult,
        warmup_steps=t.warmup_steps, warmup_ratio=t.warmup_ratio, min_lr_ratio=t.min_lr_ratio,
        class_names=cfg.data.class_names, evaluation=evaluation, run_config=config_to_dict(cfg),
        attribute_rule=cfg.model.attribute_rule)


def build_trainer(cfg: Config, run_dir: Path, devices: int | str = "auto", num_nodes: int = 1,
                  strategy: str = "auto", accelerator: str = "auto", checkpoint_every_n_steps: int = 200,
                  log_every_n_steps: int = 10, callbacks: Sequence[Any] = (), enable_progress_bar: bool = True,
                  training: bool = True, val_every_n_epochs: int = 1):
    """The Lightning Trainer of a run: loggers, checkpoints (last + best by val/NDS), clipping, precision.
    Validation runs every ``val_every_n_epochs`` epochs and at the last step."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.train
    all_callbacks: list[Any] = []
    loggers: list[Any] = []
    if training:
        checkpoint_dir = run_dir / "checkpoints"
        all_callbacks += [
            ResumeStateCallback(),
            ValidateAtMaxSteps(),
            # last.ckpt every checkpoint_every_n_steps optimiser steps ...
            ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0,
                            every_n_train_steps=checkpoint_every_n_steps, enable_version_counter=False),
            # ... and after every validation, beside the best one by val/NDS.
            ModelCheckpoint(dirpath=checkpoint_dir, filename="best-epoch{epoch:03d}-step{step:07d}",
                            monitor="val/NDS", mode="max", save_top_k=1, save_last=True,
                            auto_insert_metric_name=False, enable_version_counter=False),
        ]
        loggers = [TensorBoardLogger(run_dir, name="tensorboard"), CSVLogger(run_dir, name="csv")]
    all_callbacks += list(callbacks)
    return lightning.Trainer(
        accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy, precision=t.precision,
        max_epochs=t.epochs, max_steps=t.max_steps if t.max_steps is not None else -1,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.grad_clip_norm, gradient_clip_algorithm="norm",
        logger=loggers if loggers else False, callbacks=all_callbacks, plugins=[AtomicCheckpointIO()],
        default_root_dir=run_dir, num_sanity_val_steps=0, log_every_n_steps=log_every_n_steps,
        check_val_every_n_epoch=val_every_n_epochs,
        enable_progress_bar=enable_progress_bar, enable_checkpointing=training, enable_model_summary=training,
        use_distributed_sampler=True)


# ----------------------------------------------------------------------------------------------------------------
# The runs
# ----------------------------------------------------------------------------------------------------------------
def _cli_overrides(max_epochs: int | None, max_steps: int | None, batch_size: int | None,
                   precision: str | None) -> list[str]:
    overrides = []
    if max_epochs is not None:
        overrides.append(f"train.epochs={max_epochs}")
    if max_steps is not None:
        overrides.append(f"train.max_steps={max_steps}")
    if batch_size is not None:
        overrides.append(f"data.train_batch_size={batch_size}")
    if precision is not None:
        overrides.append(f"train.precision={precision}")
    return overrides


def _explicit(overrides: Sequence[str], key: str) -> str | None:
    for override in reversed(overrides):
        if override.split("=", 1)[0].strip() == key:
            value = override.split("=", 1)[1].strip()
            return None if value in ("", "null", "None", "~") else value
    return None


def _default_run_dir(cfg: Config) -> Path:
    inherited = os.environ.get(RUN_DIR_ENV)
    if _global_rank() != 0 and inherited:
        return Path(inherited)  # a process Lightning launched for DDP joins its parent's run folder
    if _global_rank() != 0 or os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1"):
        raise RunError("--out is required when the processes are started by an external launcher (torchrun, SLURM): "
                       "they must share one run folder")
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


class _RunDirForChildren:
    """Exports the run folder to the processes Lightning's DDP launcher starts (they re-run the script and would
    otherwise name their own), for the duration of a fit / validate call."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.previous: str | None = None

    def __enter__(self) -> None:
        self.previous = os.environ.get(RUN_DIR_ENV)
        os.environ[RUN_DIR_ENV] = str(self.run_dir)

    def __exit__(self, *exc: Any) -> None:
        if self.previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = self.previous


def check_scenes_per_rank(datamodule, world_size: int) -> None:
    """RunError when the evaluation split has fewer scenes than processes: evaluation gives each process whole
    scenes, and a process without any would skip validation while the others wait for it."""
    datamodule.setup("validate")
    scenes = len(set(datamodule.val_dataset.scene_ids()))
    if scenes < world_size:
        raise RunError(f"the evaluation split ({datamodule.val_info_path}) has {scenes} scene(s), fewer than the "
                       f"{world_size} processes: each process evaluates whole scenes; use at most {scenes} devices")


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    from bevdeform.evaluation import format_metrics_table

    if _global_rank() == 0:
        print(f"\n{title}\n{format_metrics_table(metrics)}\n", flush=True)


def train(config: str, overrides: Sequence[str] = (), data_root: str | None = None, version: str | None = None,
          out: str | os.PathLike | None = None, max_epochs: int | None = None, max_steps: int | None = None,
          batch_size: int | None = None, devices: int | str = "auto", num_nodes: int = 1, strategy: str = "auto",
          precision: str | None = None, resume: str | os.PathLike | None = None, accelerator: str = "auto",
          checkpoint_every_n_steps: int = 200, log_every_n_steps: int = 10, callbacks: Sequence[Any] = (),
          synthetic_parent: str | os.PathLike = "data", enable_progress_bar: bool = True,
          val_every_n_epochs: int = 1, init_weights: str | os.PathLike | None = None) -> dict[str, float] | None:
    """Train ``config`` (a name in configs/ or a path) and return the final validation metrics (flat dict).

    See ``scripts/train.py`` for the arguments; ``callbacks`` are added to the Trainer's (tests stop runs with
    them), ``synthetic_parent`` is where the embedded synthetic data folder lives. ``init_weights``: start from the
    weights of a checkpoint of the same model (a converted BEVFormer checkpoint, a bevdeform run's checkpoint):
    fine-tuning, with a fresh optimiser and schedule (``resume`` continues a run instead; the two exclude each
    other). Raises :class:`RunError` for bad input, before anything long starts.
    """
    start = time.perf_counter()
    all_overrides = [*overrides, *_cli_overrides(max_epochs, max_steps, batch_size, precision)]
    cfg = load_run_config(config, all_overrides, embedded_data=data_root is None)
    initial_state = None
    if init_weights is not None:
        if resume is not None:
            raise RunError("--init-weights starts a new run from a model's weights and --resume continues a run: "
                           "pass one of them")
        initial_state = read_checkpoint(init_weights)
    if resume is not None:
        resume = Path(resume)
        checkpoint = read_checkpoint(resume)
        check_checkpoint_matches(checkpoint, cfg, resume)
        del checkpoint
        if out is None and resume.parent.name == "checkpoints":
            out = resume.parent.parent  # continue in the run folder the checkpoint came from
    run_dir = check_output_dir(Path(out) if out is not None else _default_run_dir(cfg))
    source = resolve_data_source(
        data_root, version, need_train=True, train_info_path=_explicit(overrides, "data.train_info_path"),
        val_info_path=_explicit(overrides, "data.val_info_path"), synthetic_parent=synthetic_parent)
    source.ensure_infos()
    # The resolved config records the data the run actually read.
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, data_root=str(source.data_root), train_info_path=str(source.train_info_path),
        val_info_path=str(source.eval_info_path)))
    if _global_rank() == 0:
        save_config(cfg, run_dir / "config.yaml")
    _log(f"run folder: {run_dir} (config {cfg.name}, data {source.data_root} {source.version}: train "
         f"{source.train_split}, validation {source.eval_split})")

    lightning.seed_everything(cfg.train.seed, workers=True)
    model = build_model(cfg)
    if initial_state is not None:
        load_checkpoint_weights(model, initial_state, f"--init-weights {init_weights}")
        del initial_state
        _log(f"initial weights: {init_weights}")
    model = apply_memory_format(model, cfg.train.channels_last)
    module = build_module(cfg, model, source, run_dir / "results")
    datamodule = build_datamodule(cfg, source, seed=cfg.train.seed, pin_memory=torch.cuda.is_available())
    evidence = LearningEvidence(resumed=resume is not None)
    trainer = build_trainer(cfg, run_dir, devices=devices, num_nodes=num_nodes, strategy=strategy,
                            accelerator=accelerator, checkpoint_every_n_steps=checkpoint_every_n_steps,
                            log_every_n_steps=log_every_n_steps, callbacks=[*callbacks, evidence],
                            enable_progress_bar=enable_progress_bar, val_every_n_epochs=val_every_n_epochs)
    check_scenes_per_rank(datamodule, trainer.world_size)
    with _RunDirForChildren(run_dir):
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume is not None else None,
                    weights_only=True)
        # last.ckpt holds the final step whatever the checkpoint callbacks did at it (a best-by-NDS callback that saw
        # no improvement, or one restored from a resumed checkpoint, may leave it at an earlier step). The whole
        # training state (optimiser, loops, callbacks) so that --resume continues from it: weights_only=False,
        # said explicitly (Lightning logs a warning-like line otherwise).
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        if module.last_metrics_step != trainer.global_step:
            # Training ended in an epoch without validation: score the final state.
            trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = module.last_metrics
    if metrics is not None:
        _print_metrics(metrics, f"{cfg.name}: validation on {source.eval_split} after {trainer.global_step} steps "
                                f"({time.perf_counter() - start:.0f} s; run folder {run_dir})")
    if _global_rank() == 0:
        _print_run_summary(cfg, run_dir, source, module, evidence, trainer.global_step, time.perf_counter() - start)
    return metrics


def _print_run_summary(cfg: Config, run_dir: Path, source: DataSource, module, evidence: LearningEvidence,
                       steps: int, seconds: float) -> None:
    """The closing lines of a training run: the loss against the untrained baseline, where the run's files are,
    and a BEV picture of one validation sample (predictions vs ground truth)."""
    picture = None
    try:
        picture = render_validation_picture(
            module.last_results_path, source.data_root, source.eval_info_path,
            run_dir / "pictures" / "val_sample_bev.png", cfg.data.class_names,
            range_m=max(abs(v) for v in cfg.data.point_cloud_range_m[:2]) + 5.0)
    except Exception as error:  # a picture must never cost the run's results
        _log(f"the validation picture could not be drawn: {type(error).__name__}: {error}")
    lines = [f"{cfg.name}: {steps} optimiser steps in {seconds / 60:.1f} min", *evidence.summary_lines()]
    if module.last_metrics is not None:
        m = module.last_metrics
        lines.append(f"validation ({source.eval_split}, nuScenes devkit): NDS {m['NDS']:.4f}, mAP {m['mAP']:.4f} "
                     "(table above)")
    lines += [f"run folder: {run_dir}",
              "  config.yaml, checkpoints/last.ckpt (+ best by val/NDS), tensorboard/ and csv/ (loss curves),"
              " results/ (results_nusc.json and metrics of every validation)"]
    if picture is not None:
        lines.append(f"BEV picture of one validation sample (predictions vs ground truth): {picture}")
    print("\n[bevdeform] " + "\n[bevdeform] ".join(lines) + "\n", flush=True)


def evaluate(config: str, checkpoint: str | os.PathLike | None = None, overrides: Sequence[str] = (),
             data_root: str | None = None, version: str | None = None, split: str | None = None,
             out: str | os.PathLike | None = None, results: str | os.PathLike | None = None,
             devices: int | str = "auto", num_nodes: int = 1, strategy: str = "auto", accelerator: str = "auto",
             precision: str | None = None, synthetic_parent: str | os.PathLike = "data",
             enable_progress_bar: bool = True) -> dict[str, float] | None:
    """Evaluate a checkpoint on a split (or score an existing ``results`` file); returns the flat metrics.

    The streaming detector runs over each scene in order (scenes whole on one rank under DDP), the results JSON
    (global frame, at most 500 boxes per sample) and ``metrics.json`` are written into ``out`` (default: beside the
    checkpoint, ``<run>/eval/<checkpoint stem>-<split>/``; for ``results``, the results file's folder), the table
    is printed. A split without annotations (v1.0-test) gets the results file only (returns None).
    """
    from bevdeform.evaluation import evaluate_results

    cfg = load_run_config(config, [*overrides, *_cli_overrides(None, None, None, precision)],
                          embedded_data=data_root is None)
    if results is None and checkpoint is None:
        raise RunError("pass --checkpoint CKPT (a model to evaluate) or --results FILE (a results JSON to score)")
    if results is not None:
        results = Path(results)
        if not results.is_file():
            raise RunError(f"--results {results}: no such file")
    saved = None
    if checkpoint is not None and results is None:
        checkpoint = Path(checkpoint)
        saved = read_checkpoint(checkpoint)
        if "bevdeform_config" in saved:
            check_checkpoint_matches(saved, cfg, checkpoint)
    source = resolve_data_source(data_root, version, eval_split=split, need_train=False,
                                 val_info_path=_explicit(overrides, "data.val_info_path"),
                                 synthetic_parent=synthetic_parent)
    if out is None:
        if results is not None:
            out = results.parent
        elif checkpoint.parent.name == "checkpoints":
            out = checkpoint.parent.parent / "eval" / f"{checkpoint.stem}-{source.eval_split}"
        else:
            out = checkpoint.parent / f"eval-{checkpoint.stem}-{source.eval_split}"
    out_dir = check_output_dir(out)

    if results is not None:
        _log(f"scoring {results} on {source.data_root} {source.version} {source.eval_split}")
        try:
            metrics = evaluate_results(results, source.data_root, source.version, source.eval_split, out_dir)
        except (ValueError, FileNotFoundError) as error:
            raise RunError(f"--results {results}: {error}") from None
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        _print_metrics(metrics, f"{results} on {source.eval_split} (metrics in {out_dir / 'metrics.json'})")
        return metrics

    source.ensure_infos()
    from bevdeform.data.infos import load_infos
    model = build_model(cfg)
    load_checkpoint_weights(model, saved, f"--checkpoint {checkpoint}")
    del saved
    model = apply_memory_format(model, cfg.train.channels_last)
    _, infos = load_infos(source.eval_info_path)
    scored = any(len(info["gt_names"]) for info in infos)
    module = build_module(cfg, model, source, out_dir, per_epoch_results=False)
    if not scored:
        module.evaluation.score = False
    datamodule = build_datamodule(cfg, source, seed=cfg.train.seed, pin_memory=torch.cuda.is_available())
    trainer = build_trainer(cfg, out_dir, devices=devices, num_nodes=num_nodes, strategy=strategy,
                            accelerator=accelerator, training=False, enable_progress_bar=enable_progress_bar)
    check_scenes_per_rank(datamodule, trainer.world_size)
    lightning.seed_everything(cfg.train.seed)
    with _RunDirForChildren(out_dir):
        trainer.validate(module, datamodule=datamodule, verbose=False)
    if not scored:
        _log(f"split {source.eval_split} has no annotations: results written to {module.last_results_path}, "
             f"not scored")
        return None
    metrics = module.last_metrics
    _print_metrics(metrics, f"{checkpoint} on {source.data_root} {source.version} {source.eval_split} "
                            f"(results and metrics in {out_dir})")
    return metrics
