"""Compatibility with other codebases' published models. Kept free of heavy imports: import the submodule you need.

- ``bevdeform.compat.bevformer_v1``: BEVFormer's released checkpoints (build_model, convert_state_dict,
  official_frame); imports torch.
- ``bevdeform.compat.can_bus``: the official 18-number CAN-bus input (numpy only).
- ``bevdeform.compat.image_pipeline``, ``bevdeform.compat.frames``: the official test image pipeline and the
  lidar/ego/global box frames.
"""
