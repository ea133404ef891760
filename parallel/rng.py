"""Reproducible, independent random streams keyed by what they are for.

A stream is a ``torch.Generator`` seeded from a hash of ``(seed, *keys)``, e.g.
``(..., sample_rank, shard, step)`` for Bayesian noise. Keys make draws independent across
sample ranks and shards, and the same on every rerun, with no state to carry between ranks
(only ``step`` for per-step streams, which checkpoints hold).

Dropout (masks, or drawn positions: ``parallel.dropout``) draws from torch's default generators,
seeded per rank by :func:`seed_dropout` from ``(seed, "dropout", data rank, sample rank, model
rank)``: a layer that takes no generator argument compiles into the surrounding graph
(``launch.runtime.compile`` keeps aten's random kernels there, so compiled and eager runs draw
the same masks), and ``torch.utils.checkpoint`` replays it by restoring those generators.
Nothing else in a training step draws from them; checkpoints save their state.

Initial weights use :func:`uniform_at`: a value per global element, keyed by
``("init", parameter_name)``, a pure function of the key and the position, so every mesh
starts from the serial model. :func:`normal_at` gives standard normal values the same way, for
the Bayesian layers' weight noise.
"""

from __future__ import annotations

import hashlib
import math

import torch


def stream_seed(seed: int, *keys) -> int:
    text = repr((int(seed),) + tuple(keys)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & (2**63 - 1)


def stream(seed: int, *keys, device: str | torch.device = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(stream_seed(seed, *keys))
    return generator


_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """An integer hash of int64 tensors holding 32-bit values (good avalanche, cheap, on any device)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32  # products wrap in two's complement; the low 32 bits are exact
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def seed_dropout(seed: int, data_rank: int, sample_rank: int, model_rank: int) -> int:
    """Seed torch's default generators (CPU and every accelerator) for this rank's dropout masks.

    Shards of one replica then draw independent masks (one seed everywhere would give every
    tile the same mask), so do replicas (data and sample ranks: different samples should
    not share a mask pattern), and reruns draw the same ones. Returns the seed used.
    """
    value = stream_seed(seed, "dropout", data_rank, sample_rank, model_rank)
    torch.manual_seed(value)
    return value


def uniform_at(seed: int, *keys, index: tuple[torch.Tensor, ...], global_shape: tuple[int, ...],
               device: str | torch.device = "cpu") -> torch.Tensor:
    """``U[0, 1)`` float64 values of the elements ``index`` (per-dimension global indices) of a
    tensor of ``global_shape``, each a function of ``(seed, keys, global position)`` alone.

    Why: a parameter shard initialised from a stream keyed by its rank would differ from the
    serial model's values; with counter-based values every element gets the same number on
    every mesh, so training from scratch on any layout starts from the same model, and no
    rank ever draws (or holds) more than its own shard.
    """
    return _uniform(stream_seed(seed, *keys), flat_index(index, global_shape, device))


def normal_at(seed: int, *keys, index: tuple[torch.Tensor, ...], global_shape: tuple[int, ...],
              device: str | torch.device = "cpu") -> torch.Tensor:
    """Standard normal float32 values of the elements ``index`` of a tensor of ``global_shape``,
    each a function of ``(seed, keys, global position)`` alone, like :func:`uniform_at`.

    Why: a Bayesian layer's weight noise must not depend on the mesh. Drawn from a generator
    per rank, a shard's noise would differ from the serial model's and change with the layout;
    addressed by element, each rank draws exactly its block of the serial noise, so a Bayesian
    model on any mesh equals the serial one for the same draw (and no rank draws more).
    """
    key = torch.tensor(stream_seed(seed, *keys), dtype=torch.int64, device=device)
    return normal_from_key(key, flat_index(index, global_shape, device))


def normal_from_key(key: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Standard normal float32 values at the int64 positions ``flat`` of the stream ``key`` (an
    int64 tensor, so that a compiled graph takes a new key as an input instead of recompiling).

    The inverse of the normal CDF, ``sqrt(2) erfinv(x)`` (as JAX draws normals), at a uniform
    ``x`` on the 2^23 odd multiples of 2^-23 in (-1, 1) (exact in float32, symmetric, never +-1),
    taken from one 64-bit hash of (key, position) (SplitMix64's finalizer). Why these: a Bayesian
    step draws a billion weights and on a GPU the draw is bound by arithmetic, and one 64-bit
    hash and an ``erfinv`` are the cheapest there (``benchmarks/SAMPLING.md`` compares them with
    32-bit hashes and Box-Muller). The lattice bounds ``|value| <= 5.3`` (the tail beyond has
    probability 1e-7) and resolves quantiles 2^-23 apart, finer than the bf16 weights the values
    perturb. float32, as GPU random number libraries compute normals.
    """
    bits = hash64(key, flat)
    odd = 2 * _shift_right(bits, 41) + 1  # 23 random bits as an odd integer below 2^24
    return math.sqrt(2) * torch.erfinv((odd - 2**23).to(torch.float32) / 2**23)


def _signed(value: int) -> int:
    """A 64-bit constant as the int64 with the same bits."""
    return value - 2**64 if value >= 2**63 else value


# SplitMix64's constants (Steele, Lea & Flood 2014): the golden-ratio increment and the finalizer's
_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x >> bits`` as unsigned 64-bit (torch shifts int64 arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def hash64(key: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """64 random bits (an int64) per position ``flat`` of the stream ``key``."""
    # the int64 key xor-ed in first: a compiled GPU kernel may index positions as int32, and the
    # product's constant needs 64 bits
    return _mix64((flat ^ key) * _GOLDEN)


def unit_interval(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``U(0, 1)`` in ``dtype`` from 32 random bits; never 0 (float32 may round the largest to 1)."""
    return (bits.to(dtype) + 0.5) / 2**32


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer: every output bit depends on every input bit (int64 products wrap)."""
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def mix_keys(key: torch.Tensor, other: int) -> torch.Tensor:
    """A 63-bit key from an int64 tensor key and an integer, hashed (not merely combined) so
    that streams of related keys are independent."""
    low = _hash32((key & _MASK32) ^ (other & _MASK32))
    high = _hash32(((key >> 32) & _MASK32) ^ ((other >> 32) & _MASK32) ^ low)
    return ((high & 0x7FFFFFFF) << 32) | low


def flat_index(index: tuple[torch.Tensor, ...], global_shape: tuple[int, ...],
               device: str | torch.device) -> torch.Tensor:
    """Row-major position in ``global_shape`` of every element of the block ``index`` selects."""
    if len(index) != len(global_shape):
        raise ValueError(f"index has {len(index)} dimensions, global_shape {tuple(global_shape)} has "
                         f"{len(global_shape)}; expected one index tensor per dimension")
    flat = torch.zeros((), dtype=torch.int64, device=device)
    stride = 1
    for dim in reversed(range(len(global_shape))):
        shape = [1] * len(global_shape)
        shape[dim] = -1
        flat = flat + index[dim].to(device=device, dtype=torch.int64).reshape(shape) * stride
        stride *= global_shape[dim]
    return flat


def _uniform(key: int, flat: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``U(0, 1)`` of a 64-bit key and int64 positions (both 32-bit halves of each are hashed in),
    in ``dtype``; never 0 (float32 may round the largest values to 1)."""
    high = _hash32(_hash32(flat >> 32) ^ (key >> 32))
    return unit_interval(_hash32(_hash32((flat & _MASK32) ^ (key & _MASK32)) ^ high), dtype)
