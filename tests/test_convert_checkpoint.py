"""scripts/convert_bevformer_checkpoint.py on state dicts with every official key name and shape (built from the
official module structure by tests/official_bevformer_oracle.py), saved as mmcv checkpoints are."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import official_bevformer_oracle as oracle  # noqa: E402

from bevdeform.compat import bevformer_v1 as v1  # noqa: E402
from bevdeform.export import load_detector  # noqa: E402
from bevdeform.models.bevformer import load_model_weights  # noqa: E402

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "convert_bevformer_checkpoint.py"


class MetaObject:
    """Stands for the Python objects an mmcv checkpoint's meta may hold (weights_only refuses them)."""


def _script():
    spec = importlib.util.spec_from_file_location("convert_bevformer_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def official_state():
    return oracle.randomize_(oracle.OfficialBEVFormer("tiny"), seed=7).state_dict()


def test_convert_writes_a_checkpoint_every_loader_accepts(official_state, tmp_path, capsys):
    source = tmp_path / "bevformer_tiny_epoch_24.pth"
    torch.save({"meta": {"epoch": 24, "iter": 84408, "mmcv_version": "1.4.0", "config": "model = dict(...)"},
                "state_dict": official_state}, source)
    out = tmp_path / "bevformer_tiny.pth"
    assert _script().main(["--checkpoint", str(source), "--variant", "tiny", "--out", str(out)]) == 0
    assert "bevformer_tiny" in capsys.readouterr().out
    saved = torch.load(out, weights_only=True)
    assert saved["converted_from"]["official_commit"] == v1.OFFICIAL_COMMIT
    model = v1.build_model("tiny")
    load_model_weights(model, out)  # strict: every key and shape
    expected = v1.convert_state_dict(official_state, "tiny")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    # the --checkpoint path of export.py / visualize.py / profile_latency.py, with the shipped config
    cfg, detector = load_detector("bevformer_tiny", out)
    assert cfg.model.frame == "lidar" and not detector.training
    torch.testing.assert_close(detector.state_dict()["encoder.bev_queries.weight"],
                               official_state["pts_bbox_head.bev_embedding.weight"], rtol=0, atol=0)
    assert not list(tmp_path.glob(".*.tmp-*"))  # the temporary file was renamed


def test_meta_objects_need_trust_checkpoint(official_state, tmp_path, capsys):
    source = tmp_path / "with_objects.pth"
    torch.save({"meta": {"env_info": MetaObject()}, "state_dict": official_state}, source)
    out = tmp_path / "converted.pth"
    script = _script()
    assert script.main(["--checkpoint", str(source), "--variant", "tiny", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert "weights_only=True" in message and "--trust-checkpoint" in message
    assert not out.exists()
    assert script.main(["--checkpoint", str(source), "--variant", "tiny", "--out", str(out),
                        "--trust-checkpoint"]) == 0
    load_model_weights(v1.build_model("tiny"), out)


def test_missing_and_extra_keys_are_listed_together(official_state, tmp_path, capsys):
    broken = dict(official_state)
    missing = "pts_bbox_head.transformer.decoder.layers.3.attentions.1.sampling_offsets.weight"
    extra = "pts_bbox_head.transformer.decoder.layers.3.attentions.2.sampling_offsets.weight"
    broken[extra] = broken.pop(missing)
    source = tmp_path / "broken.pth"
    torch.save({"meta": {}, "state_dict": broken}, source)
    out = tmp_path / "converted.pth"
    assert _script().main(["--checkpoint", str(source), "--variant", "tiny", "--out", str(out)]) == 2
    message = capsys.readouterr().err
    assert extra in message  # the official key without a counterpart
    assert "decoder.layers.3.cross_attn.sampling_offsets.weight" in message  # the bevdeform parameter left empty
    assert not out.exists()
    with pytest.raises(SystemExit):
        _script().main(["--checkpoint", str(source), "--variant", "huge", "--out", str(out)])
