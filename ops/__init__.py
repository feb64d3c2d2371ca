"""Native sources of the multi-scale deformable attention op (shipped as package data, compiled on first use)."""
