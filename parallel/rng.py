"""Reproducible, independent random streams keyed by what they are for.

A stream is a ``torch.Generator`` seeded from a hash of ``(seed, *keys)``, e.g.
``("init", parameter_name, model_rank)`` for a shard's initial values, or
``("dropout", sample_rank, model_rank, step)`` for dropout masks and Bayesian noise. Keys
make draws independent across sample ranks and shards, and the same on every rerun, with
no state to carry between ranks (only ``step`` for per-step streams, which checkpoints hold).
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, *keys) -> int:
    text = repr((int(seed),) + tuple(keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def stream(seed: int, *keys, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, *keys))
    return generator
