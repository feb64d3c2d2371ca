"""The learning benchmark's pieces (bevdeform.learning_bench): controls, learning curve, yaw bins, GT BEV features.
The training runs themselves are the benchmark (scripts/bench_learning.py), not tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from bevdeform.learning_bench import (
    _temporal_oracle_forward,
    _temporal_oracle_layer,
    drop_history,
    format_curve,
    gt_bev_features,
    gt_bev_oracle,
    read_curve,
    scramble_extrinsics,
    yaw_bins,
)

CAMS = ("CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT")


def _fake_infos(tmp_path):
    rng = np.random.default_rng(0)
    infos = []
    for frame in range(3):
        cams = {name: {"cam2ego": rng.normal(size=(4, 4)).tolist(), "cam2lidar": rng.normal(size=(4, 4)).tolist(),
                       "intrinsics": np.eye(3).tolist()} for name in CAMS}
        infos.append({"token": f"t{frame}", "prev": f"t{frame - 1}" if frame else "", "next": f"t{frame + 1}",
                      "has_prev": frame > 0, "ego_prev2curr": rng.normal(size=(4, 4)).tolist(), "cams": cams})
    path = tmp_path / "infos.json"
    path.write_text(json.dumps({"metadata": {}, "infos": infos}))
    return path, infos


def test_scramble_extrinsics_gives_each_camera_the_next_ones(tmp_path):
    path, infos = _fake_infos(tmp_path)
    out = json.loads(scramble_extrinsics(path, tmp_path / "scrambled.json").read_text())["infos"]
    for before, after in zip(infos, out):
        for position, name in enumerate(CAMS):
            source = CAMS[(position + 1) % len(CAMS)]
            assert after["cams"][name]["cam2ego"] == before["cams"][source]["cam2ego"]
            assert after["cams"][name]["cam2lidar"] == before["cams"][source]["cam2lidar"]
            assert after["cams"][name]["intrinsics"] == before["cams"][name]["intrinsics"]


def test_drop_history_makes_every_frame_a_scene_start(tmp_path):
    path, infos = _fake_infos(tmp_path)
    out = json.loads(drop_history(path, tmp_path / "no_history.json").read_text())["infos"]
    assert [info["token"] for info in out] == [info["token"] for info in infos]
    for info in out:
        assert info["prev"] == "" and info["next"] == "" and info["has_prev"] is False
        np.testing.assert_array_equal(info["ego_prev2curr"], np.eye(4))


def test_read_curve_and_yaw_bins(tmp_path):
    folder = tmp_path / "csv" / "version_0"
    folder.mkdir(parents=True)
    (folder / "metrics.csv").write_text("epoch,step,train/loss,val/NDS,val/mAP\n0,19,3.0,,\n0,159,,0.1,0.02\n"
                                        "1,319,,0.2,0.05\n")
    curve = read_curve(tmp_path)
    assert curve == [{"step": 159.0, "NDS": 0.1, "mAP": 0.02}, {"step": 319.0, "NDS": 0.2, "mAP": 0.05}]
    assert "319" in format_curve(curve)
    bins = yaw_bins([0.0, 10.0, -29.0, 179.0, -170.0, -90.0, -40.0, 100.0])
    assert (bins["n"], bins["near0"], bins["near180"], bins["neg"], bins["pos"]) == (8, 3, 2, 2, 1)


def test_gt_bev_features_paint_the_footprint_with_the_box_values():
    pcr = (-32.0, -32.0, -3.0, 32.0, 32.0, 5.0)  # 2 m cells on a 32 x 32 grid
    yaw = 0.7
    box = np.array([[5.3, -9.1, 0.4, 2.0, 6.0, 1.6, yaw, 3.0, -1.0]], dtype=np.float32)
    features = gt_bev_features(box, np.array([3]), 32, 32, pcr).reshape(32, 32, -1)  # (H*W, 20) -> (H, W, 20)
    row, col = int((-9.1 + 32) // 2), int((5.3 + 32) // 2)  # row along y, column along x
    centre = features[row, col]
    assert centre[3] == 1 and centre[:10].sum() == 1
    np.testing.assert_allclose(centre[10:12], [math.sin(yaw), math.cos(yaw)], atol=1e-6)
    np.testing.assert_allclose(centre[12:16], [math.log(2.0), math.log(6.0), math.log(1.6), 0.4], atol=1e-6)
    # The centre offset from the cell centre, in cells: (5.3 - 5.0) / 2 and (-9.1 - -9.0) / 2.
    np.testing.assert_allclose(centre[16:18], [0.15, -0.05], atol=1e-5)
    np.testing.assert_allclose(centre[18:20], [0.3, -0.1], atol=1e-6)
    painted = features[..., :10].sum(-1) > 0
    assert 2 <= int(painted.sum()) <= 5  # a 12 m^2 footprint on 4 m^2 cells
    assert int(painted.sum()) == int((features[..., 3] == 1).sum())
    flipped = box.copy()
    flipped[0, 6] = yaw - math.pi
    same = gt_bev_features(box, np.array([3]), 32, 32, pcr, heading="mod_pi")
    torch.testing.assert_close(same, gt_bev_features(flipped, np.array([3]), 32, 32, pcr, heading="mod_pi"),
                               atol=1e-5, rtol=0)
    assert float(gt_bev_features(box, np.array([3]), 32, 32, pcr, heading="none")[:, 10:12].abs().max()) == 0
    with pytest.raises(ValueError, match="heading"):
        gt_bev_features(box, np.array([3]), 32, 32, pcr, heading="half")


def test_temporal_oracle_layer_reads_the_previous_bev_only_where_a_row_has_one():
    torch.manual_seed(0)
    layer = _temporal_oracle_layer(16, 4, 4, 6, 8)
    bev, prev = torch.randn(2, 48, 16), torch.randn(2, 48, 16)  # (B, H*W, C)
    has_prev = torch.tensor([True, False])
    with_prev = _temporal_oracle_forward(layer, bev, prev, has_prev)
    without = _temporal_oracle_forward(layer, bev, None, None)
    # Row 1 (a scene start) ignores prev exactly; row 0 reads it.
    torch.testing.assert_close(with_prev[1], without[1])
    assert float((with_prev[0] - without[0]).abs().max()) > 1e-3
    # The previous BEV moved by one cell changes the output near where it moved (TSA samples around each cell).
    shifted = prev.view(2, 6, 8, 16).roll(1, dims=2).reshape(2, 48, 16)  # (B, H*W, C) -> (B, H, W, C) -> back
    assert float((_temporal_oracle_forward(layer, bev, shifted, has_prev)[0] - with_prev[0]).abs().max()) > 1e-3


def test_gt_bev_oracle_refuses_an_unknown_velocity_source(tmp_path):
    with pytest.raises(ValueError, match="velocity_source must be one of"):
        gt_bev_oracle(tmp_path / "train.json", tmp_path / "val.json", tmp_path, tmp_path, velocity_source="lidar")


def _fake_train(calls, steps_per_epoch=160, config_epochs=12, stop_early_at=None):
    """Stands in for bevdeform.train.train with Lightning's two limits: training ends at max_steps or at the end of
    the last epoch, whichever comes first (train.epochs 12 of 160 steps unless max_epochs is given); it writes the
    last checkpoint as train does."""

    def train(config, overrides, data_root, version, out, max_steps, max_epochs=None, **kwargs):
        calls.append({"max_steps": max_steps, "max_epochs": max_epochs, **kwargs})
        epochs = config_epochs if max_epochs is None else max_epochs
        done = min(max_steps, epochs * steps_per_epoch) if stop_early_at is None else stop_early_at
        (out / "checkpoints").mkdir(parents=True)
        torch.save({"global_step": done}, out / "checkpoints" / "last.ckpt")
        return {"val/NDS": 0.0}

    return train


def test_run_learning_runs_exactly_max_steps_whatever_the_configs_epochs(tmp_path, monkeypatch):
    import bevdeform.train
    from bevdeform.learning_bench import run_learning

    calls = []
    monkeypatch.setattr(bevdeform.train, "train", _fake_train(calls))
    # 2880 steps are 18 epochs of the embedded set: bev_nano's train.epochs (12) must not end the run at 1920
    run = run_learning("learned", "bev_nano", [], tmp_path / "data", tmp_path, max_steps=2880)
    assert run["max_steps"] == 2880 and calls[0]["max_steps"] == 2880
    assert calls[0]["max_epochs"] is not None and calls[0]["max_epochs"] * 160 >= 2880


def test_run_learning_refuses_a_run_that_stopped_short(tmp_path, monkeypatch):
    import bevdeform.train
    from bevdeform.learning_bench import run_learning

    monkeypatch.setattr(bevdeform.train, "train", _fake_train([], stop_early_at=1920))
    with pytest.raises(RuntimeError, match="stopped at step 1920 of max_steps=2880"):
        run_learning("learned", "bev_nano", [], tmp_path / "data", tmp_path, max_steps=2880)
    with pytest.raises(ValueError, match="max_steps=0"):
        run_learning("learned", "bev_nano", [], tmp_path / "data", tmp_path, max_steps=0)


def test_extra_training_scenes_reach_the_data_spec_and_bad_values_are_refused(tmp_path, monkeypatch):
    import bevdeform.train
    from bevdeform.learning_bench import main
    from bevdeform.train import EMBEDDED_SYNTHETIC

    specs = []

    class Written(Exception):
        pass

    def prepare(spec, parent):
        specs.append(spec)
        raise Written

    monkeypatch.setattr(bevdeform.train, "prepare_synthetic_data", prepare)
    with pytest.raises(Written):
        main(steps=0, out_dir=tmp_path, controls=(), extra_train_scenes=160)
    assert specs[0].extra_train_scenes == 160
    assert {**vars(specs[0]), "extra_train_scenes": 0} == vars(EMBEDDED_SYNTHETIC)  # the same held-out scenes
    # The larger set gets its own folder; the embedded set's folder keeps the name it had before the option.
    assert specs[0].folder_name() != EMBEDDED_SYNTHETIC.folder_name() == "synthetic-58dfe0b601"
    with pytest.raises(ValueError, match="extra_train_scenes=160: expected >= 0, and 0 with data_root"):
        main(steps=0, out_dir=tmp_path, controls=(), data_root=tmp_path, extra_train_scenes=160)
    with pytest.raises(ValueError, match="extra_train_scenes=-1"):
        main(steps=0, out_dir=tmp_path, controls=(), extra_train_scenes=-1)
