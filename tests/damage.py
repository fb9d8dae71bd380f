"""Damage that ``torch.load`` does not notice: one byte of a tensor's data flipped inside a
torch file (its zip stores tensors uncompressed, and the reader checks no CRC)."""

from __future__ import annotations

import struct
import zipfile


def alter_a_tensor_byte(path) -> None:
    """Flips one byte in the middle of the largest tensor record of the torch file ``path``."""
    with zipfile.ZipFile(path) as archive:
        records = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size]
        record = max(records, key=lambda info: info.file_size)
    with open(path, "r+b") as f:
        f.seek(record.header_offset)
        header = f.read(30)  # the local file header: name and extra field lengths at 26
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        at = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
