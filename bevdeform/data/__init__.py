"""Datasets, info files and the synthetic nuScenes writer."""
