"""LightningDataModule for the multi-camera nuScenes dataset."""

from __future__ import annotations

import os
from collections.abc import Sequence

import lightning
import numpy as np
import torch
from torch.utils.data import DataLoader, SequentialSampler

from bevdeform.data.dataset import DEFAULT_POINT_CLOUD_RANGE_M, NuScenesCameraDataset, collate
from bevdeform.data.infos import CLASS_NAMES
from bevdeform.data.samplers import SceneOrderedDistributedSampler


class SeedWorker:
    """``worker_init_fn`` that seeds numpy (global and the dataset's jitter generator) per worker and per rank.

    ``torch.initial_seed()`` in a worker is the loader's base seed (drawn from the loader's seeded generator anew
    every epoch) plus the worker id, so the seeds differ per worker and per epoch and repeat across runs; the rank
    is mixed in so DDP ranks do not jitter alike.

    OpenCV's thread count is deliberately left alone: ``cv2.setNumThreads`` in a forked worker, after the parent
    process has used OpenCV's thread pool, waits forever for pool threads that do not exist in the child (seen with
    opencv-python-headless 4.11). Only resizing is multi-threaded in OpenCV; JPEG decoding, the main cost, is not.
    """

    def __init__(self, rank: int = 0):
        self.rank = int(rank)

    def __call__(self, worker_id: int) -> None:
        seed_sequence = np.random.SeedSequence([torch.initial_seed() % 2**63, self.rank, worker_id])
        np.random.seed(seed_sequence.generate_state(1)[0])
        worker_info = torch.utils.data.get_worker_info()
        dataset = worker_info.dataset if worker_info is not None else None
        if hasattr(dataset, "reseed"):
            dataset.reseed(seed_sequence)


class NuScenesDataModule(lightning.LightningDataModule):
    """Train and validation loaders of ``NuScenesCameraDataset``.

    Args:
        data_root: directory the info files' paths are relative to.
        train_info_path, val_info_path: info files (docs/data-format.md); either may be None when unused.
        image_size_hw: (height, width) pixels every camera image is resized to.
        pad_multiple: images are padded right/bottom to a multiple of this many pixels (the backbone's largest
            stride).
        queue_length: frames per training sample (history + current).
        val_queue_length: frames per validation sample; 1 by default because evaluation streams the frames of each
            scene in order and the model carries its BEV from one batch to the next.
        train_batch_size, val_batch_size: samples per batch (per process under DDP). With val_batch_size > 1 a
            batch holds consecutive frames of a scene; a streaming model has to process them one after the other.
        num_workers: DataLoader worker processes (0 loads in the main process).
        persistent_workers: keep workers alive between epochs (only with num_workers > 0).
        pin_memory: page-locked batches for faster host-to-GPU copies.
        seed: seeds the shuffling order and, through ``SeedWorker``, the photometric jitter.
        class_names, point_cloud_range_m: GT filtering, as in ``NuScenesCameraDataset``.
        photometric_aug: jitter the training images (never the validation ones).
        drop_last_train: drop the last incomplete training batch.
        bevformer_v1_inputs, image_pipeline: the compatibility inputs of BEVFormer's published checkpoints, as in
            ``NuScenesCameraDataset`` (both loaders).

    Validation goes through ``SceneOrderedDistributedSampler`` when ``trainer.world_size > 1`` (whole scenes per
    rank, in time order, no sample duplicated, so ranks may see different numbers of samples), else in dataset
    order. Training shuffles with a generator seeded by ``seed``; under DDP Lightning replaces that sampler with its
    own DistributedSampler (seeded by ``seed_everything``).
    """

    def __init__(self, data_root: str | os.PathLike, train_info_path: str | os.PathLike | None,
                 val_info_path: str | os.PathLike | None, image_size_hw: tuple[int, int], pad_multiple: int = 32,
                 queue_length: int = 3,
                 val_queue_length: int = 1, train_batch_size: int = 1, val_batch_size: int = 1, num_workers: int = 4,
                 persistent_workers: bool = True, pin_memory: bool = True, seed: int = 0,
                 class_names: Sequence[str] = CLASS_NAMES,
                 point_cloud_range_m: Sequence[float] = DEFAULT_POINT_CLOUD_RANGE_M, photometric_aug: bool = True,
                 drop_last_train: bool = False, bevformer_v1_inputs: bool = False,
                 image_pipeline: str = "bevdeform"):
        super().__init__()
        if train_batch_size < 1 or val_batch_size < 1:
            raise ValueError(f"batch sizes must be >= 1, got train {train_batch_size}, val {val_batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.data_root = data_root
        self.train_info_path = train_info_path
        self.val_info_path = val_info_path
        self.image_size_hw = tuple(image_size_hw)
        self.pad_multiple = pad_multiple
        self.queue_length = queue_length
        self.val_queue_length = val_queue_length
        self.train_batch_size = train_batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pin_memory = pin_memory
        self.seed = seed
        self.class_names = tuple(class_names)
        self.point_cloud_range_m = tuple(point_cloud_range_m)
        self.photometric_aug = photometric_aug
        self.drop_last_train = drop_last_train
        self.bevformer_v1_inputs = bool(bevformer_v1_inputs)
        self.image_pipeline = str(image_pipeline)
        self.train_dataset: NuScenesCameraDataset | None = None
        self.val_dataset: NuScenesCameraDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_dataset is None:
            if self.train_info_path is None:
                raise ValueError("NuScenesDataModule: training needs train_info_path")
            self.train_dataset = NuScenesCameraDataset(
                self.train_info_path, self.data_root, self.image_size_hw, queue_length=self.queue_length,
                pad_multiple=self.pad_multiple,
                class_names=self.class_names, point_cloud_range_m=self.point_cloud_range_m,
                photometric_aug=self.photometric_aug, seed=self.seed,
                bevformer_v1_inputs=self.bevformer_v1_inputs, image_pipeline=self.image_pipeline)
        if stage in (None, "fit", "validate", "test", "predict") and self.val_dataset is None:
            if self.val_info_path is None:
                if stage in ("validate", "test", "predict"):
                    raise ValueError(f"NuScenesDataModule: stage {stage!r} needs val_info_path")
                return
            self.val_dataset = NuScenesCameraDataset(
                self.val_info_path, self.data_root, self.image_size_hw, queue_length=self.val_queue_length,
                pad_multiple=self.pad_multiple,
                class_names=self.class_names, point_cloud_range_m=self.point_cloud_range_m,
                photometric_aug=False, seed=self.seed,
                bevformer_v1_inputs=self.bevformer_v1_inputs, image_pipeline=self.image_pipeline)

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            self.setup("fit")
        rank, _ = self._rank_and_world_size()
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return DataLoader(
            self.train_dataset, batch_size=self.train_batch_size, shuffle=True, generator=generator,
            num_workers=self.num_workers, collate_fn=collate, pin_memory=self.pin_memory,
            drop_last=self.drop_last_train, persistent_workers=self.persistent_workers,
            worker_init_fn=SeedWorker(rank))

    def val_dataloader(self) -> DataLoader:
        if self.val_dataset is None:
            self.setup("validate")
        rank, world_size = self._rank_and_world_size()
        if world_size > 1:
            sampler = SceneOrderedDistributedSampler(self.val_dataset.scene_ids(), num_replicas=world_size,
                                                     rank=rank)
        else:
            sampler = SequentialSampler(self.val_dataset)
        generator = torch.Generator()
        generator.manual_seed(self.seed)
        return DataLoader(
            self.val_dataset, batch_size=self.val_batch_size, sampler=sampler, num_workers=self.num_workers,
            collate_fn=collate, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            generator=generator, worker_init_fn=SeedWorker(rank))

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
