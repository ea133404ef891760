"""Reanalysis data: preprocessing into a zarr store, its schema, statistics and the per-rank tile reader."""
