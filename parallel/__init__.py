"""Jigsaw domain x tensor parallelism: process mesh, collectives, sharded layers, RNG streams."""
