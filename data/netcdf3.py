"""Detect truncated netCDF3 (classic, 64-bit offset, CDF-5) files from their header.

Why: the netCDF-C library opens a truncated classic file without complaint and returns
zeros for the missing bytes, so a half-copied download would silently become zeros in
the store. (HDF5-based netCDF4 files need no such check: HDF5 refuses to open them.)
The header records where every variable starts; together with the dimension lengths
and the record count it gives the size the file must have.
"""

from __future__ import annotations

import struct
from pathlib import Path

_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 4, 6: 8, 7: 1, 8: 2, 9: 4, 10: 8, 11: 8}  # nc_type -> bytes
_STREAMING = 0xFFFFFFFF


def is_netcdf3(path: str | Path) -> bool:
    with open(path, "rb") as file:
        magic = file.read(4)
    return magic[:3] == b"CDF" and magic[3:] in (b"\x01", b"\x02", b"\x05")


def required_size(path: str | Path) -> int | None:
    """Bytes a complete netCDF3 file with this header holds; None for a streaming file.

    Raises ValueError when the header itself is cut short or malformed.
    """
    with open(path, "rb") as file:
        header = _Header(file.read(1 << 20), path)
    return header.required_size()


class _Header:
    """A reader over the header bytes, following the netCDF classic format specification."""

    def __init__(self, data: bytes, path: str | Path):
        self.data, self.path, self.position = data, path, 4
        self.version = data[3]
        self.count_format = ">Q" if self.version == 5 else ">I"  # NON_NEG, nelems, dimid, vsize
        self.offset_format = ">I" if self.version == 1 else ">Q"  # begin

    def _unpack(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if self.position + size > len(self.data):
            raise ValueError(f"{self.path}: netCDF3 header ends early at byte {len(self.data)}; the file is truncated")
        (value,) = struct.unpack_from(fmt, self.data, self.position)
        self.position += size
        return value

    def _count(self) -> int:
        return self._unpack(self.count_format)

    def _skip(self, n_bytes: int) -> None:
        self.position += n_bytes + (-n_bytes % 4)  # values are padded to 4-byte boundaries

    def _list_length(self) -> int:
        self._unpack(">I")  # tag (NC_DIMENSION, NC_ATTRIBUTE, NC_VARIABLE) or ZERO for an absent list
        return self._count()

    def _skip_attributes(self) -> None:
        for _ in range(self._list_length()):
            self._skip(self._count())  # name
            nc_type = self._unpack(">I")
            self._skip(self._count() * _TYPE_SIZES.get(nc_type, 1))

    def required_size(self) -> int | None:
        n_records = self._count()
        dimensions = []
        for _ in range(self._list_length()):
            self._skip(self._count())
            dimensions.append(self._count())
        self._skip_attributes()
        ends, record_parts = [], []  # record_parts: (begin, bytes per record)
        for _ in range(self._list_length()):
            self._skip(self._count())
            dimension_ids = [self._count() for _ in range(self._count())]
            self._skip_attributes()
            nc_type = self._unpack(">I")
            self._count()  # vsize: may overflow for large variables, so the size is recomputed below
            begin = self._unpack(self.offset_format)
            shape = [dimensions[i] for i in dimension_ids]
            item_size = _TYPE_SIZES.get(nc_type)
            if item_size is None:
                raise ValueError(f"{self.path}: netCDF3 header names unknown data type {nc_type}")
            is_record = bool(shape) and shape[0] == 0
            n_items = 1
            for length in shape[1:] if is_record else shape:
                n_items *= length
            if is_record:
                record_parts.append((begin, n_items * item_size))
            else:
                ends.append(begin + n_items * item_size)
        if record_parts and n_records:
            if n_records == _STREAMING:
                return None
            first = min(begin for begin, _ in record_parts)
            # one record variable is stored unpadded; several are padded to 4 bytes each
            record_size = record_parts[0][1] if len(record_parts) == 1 else sum(
                size + (-size % 4) for _, size in record_parts)
            last_end = max(begin - first + size for begin, size in record_parts)
            ends.append(first + (n_records - 1) * record_size + last_end)
        return max(ends, default=self.position)
