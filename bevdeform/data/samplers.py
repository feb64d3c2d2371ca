"""Samplers that keep a scene's frames together, in time order, on one process.

A temporal model carries its BEV from one frame to the next. Cutting a scene between ranks (what a plain
DistributedSampler does) starts the second half cold and scores lower than single-GPU evaluation, one of
BEVFormer's known bugs; so evaluation gives each rank whole scenes.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

from torch.utils.data import DistributedSampler


class SceneOrderedDistributedSampler(DistributedSampler):
    """Assigns whole scenes to ranks; each rank yields its scenes' samples in temporal order.

    Args:
        scene_ids_per_sample: the scene id (token or name) of every dataset index. Samples of one scene are yielded
            in increasing dataset index, which is their temporal order for an info file (ordered by scene, then time).
        num_replicas: number of ranks (the world size), >= 1.
        rank: this process's rank, in [0, num_replicas).

    Assignment (deterministic, the same on every rank): scenes sorted by sample count, largest first (ties by first
    appearance in the dataset), each given to the rank with the fewest samples so far (ties to the lowest rank); a
    greedy balance whose imbalance is at most one scene's length. A rank yields its scenes in order of first
    appearance in the dataset.

    Nothing is padded or dropped, so across ranks every sample is yielded exactly once and evaluation never counts a
    sample twice. Ranks may therefore yield different numbers of samples (``len(sampler)`` is this rank's count); a
    rank may even get none when there are fewer scenes than ranks. Collective calls per batch would hang on
    unequal lengths; Lightning's validation loop makes none (metrics are gathered once at the end).

    It subclasses ``DistributedSampler`` only so that Lightning, which replaces any other sampler with its own
    distributed one under DDP, leaves it in place; ``shuffle`` and ``set_epoch`` have no effect.
    """

    def __init__(self, scene_ids_per_sample: Sequence[Hashable], num_replicas: int, rank: int):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        # DistributedSampler's constructor only reads len(dataset) and validates the rank; its bookkeeping
        # (num_samples, total_size) is replaced below.
        super().__init__(scene_ids_per_sample, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        indices_per_scene: dict[Hashable, list[int]] = {}
        for index, scene_id in enumerate(scene_ids_per_sample):
            indices_per_scene.setdefault(scene_id, []).append(index)
        self.scene_order = list(indices_per_scene)  # first appearance in the dataset
        self.indices_per_scene = indices_per_scene
        self.scenes_per_rank = assign_scenes_to_ranks(
            [len(indices_per_scene[scene]) for scene in self.scene_order], num_replicas)
        self.rank_indices = [index for scene_position in self.scenes_per_rank[rank]
                             for index in indices_per_scene[self.scene_order[scene_position]]]
        self.num_samples = len(self.rank_indices)
        self.total_size = len(scene_ids_per_sample)

    def scene_ids_of_rank(self, rank: int) -> list[Hashable]:
        """The scene ids given to ``rank``, in the order that rank yields them."""
        return [self.scene_order[position] for position in self.scenes_per_rank[rank]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.rank_indices)

    def __len__(self) -> int:
        return self.num_samples


def assign_scenes_to_ranks(scene_lengths: Sequence[int], num_replicas: int) -> list[list[int]]:
    """Greedy longest-first balance of scenes over ranks.

    Args:
        scene_lengths: number of samples of each scene, by scene position.
        num_replicas: number of ranks.

    Returns:
        for each rank, the positions of its scenes in increasing order.
    """
    loads = [0] * num_replicas
    assigned: list[list[int]] = [[] for _ in range(num_replicas)]
    # sorted() is stable: equal lengths keep their first-appearance order.
    for position in sorted(range(len(scene_lengths)), key=lambda p: -scene_lengths[p]):
        target_rank = min(range(num_replicas), key=lambda r: (loads[r], r))
        loads[target_rank] += scene_lengths[position]
        assigned[target_rank].append(position)
    return [sorted(positions) for positions in assigned]
