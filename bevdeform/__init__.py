"""bevdeform: BEV multi-camera 3D perception with a fast multi-scale deformable attention op."""

__version__ = "0.1.0"
