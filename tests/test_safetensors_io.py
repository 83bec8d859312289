"""Safetensors headers and byte ranges: the one header parser, framing, metadata, the writer."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from rompatch.errors import CheckpointError
from rompatch.safetensors_io import (
    SafetensorsWriter,
    frame_header,
    parse_header,
    read_header,
    read_metadata,
    read_range,
    tensor_bytes,
    to_tensor,
)


def test_read_header_and_range_match_safetensors(tmp_path):
    t = {"b": torch.arange(6, dtype=torch.float16).reshape(2, 3), "a": torch.ones(4, dtype=torch.bfloat16)}
    save_file(t, tmp_path / "x.safetensors", metadata={"k": "v"})
    entries, meta = read_header(tmp_path / "x.safetensors")
    assert meta == {"k": "v"} and [e.offset for e in entries] == sorted(e.offset for e in entries)
    for e in entries:
        assert torch.equal(to_tensor(read_range(tmp_path / "x.safetensors", e.offset, e.nbytes), e), t[e.key])
    assert read_metadata(tmp_path / "x.safetensors") == {"k": "v"}


def test_parse_header_and_frame_header_round_trip():
    raw = json.dumps({"__metadata__": {"a": "b"}}).encode()
    framed = frame_header(raw)
    assert len(framed) % 8 == 0 and struct.unpack("<Q", framed[:8])[0] == len(framed) - 8
    header, start = parse_header(framed + b"data")
    assert header == {"__metadata__": {"a": "b"}} and start == len(framed)


@pytest.mark.parametrize(
    "data, why",
    [
        (b"\x01\x00", "shorter than 8 bytes"),
        (struct.pack("<Q", 1000) + b"{}", "exceeds the file"),
        (frame_header(b"[1, 2]"), "not a JSON object"),
    ],
)
def test_not_a_header(tmp_path, data, why):
    with pytest.raises(ValueError, match=why):
        parse_header(data)
    (tmp_path / "f").write_bytes(data)
    assert read_metadata(tmp_path / "f") is None
    with pytest.raises(CheckpointError, match=why):
        read_header(tmp_path / "f")


def test_writer_writes_in_any_order_and_safetensors_reads_it(tmp_path):
    a, b = torch.randn(3, 2), torch.randn(5)
    w = SafetensorsWriter(tmp_path / "u.st", [("a", "F32", (3, 2)), ("b", "F32", (5,))], {"format": "x"})
    w.write("b", tensor_bytes(b))
    w.write("a", tensor_bytes(a))
    assert w.close() == (tmp_path / "u.st").stat().st_size
    back = load_file(tmp_path / "u.st")
    assert torch.equal(back["a"], a) and torch.equal(back["b"], b)
    assert read_metadata(tmp_path / "u.st") == {"format": "x"}


# ---------------------------------------------------------- a strict header reader (issue 17)

_T = '"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


@pytest.mark.parametrize(
    "header, why",
    [
        ('{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,1e999]}}', "holds a number out of range"),
        ('{"t":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8.0]}}', "data_offsets must be two integers"),
        ('{"t":{"dtype":"F32","shape":[2],"data_offsets":[true,9]}}', "data_offsets must be two integers"),
        ('{"t":{"dtype":"F32","shape":[2],"data_offsets":[-8,0]}}', "data_offsets must be two integers"),
        ('{"t":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}', "unknown dtype 'Q7'"),
        ('{"t":{"dtype":7,"shape":[2],"data_offsets":[0,8]}}', "unknown dtype 7"),
        ('{"t":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', "shape must be a list of integers"),
        ('{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', "holds NaN or Infinity"),
        ('{"t":5}', "tensor 't' must be an object"),
        (
            '{"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}',
            "overlap",
        ),
        ('{"__metadata__":{"k":5},' + _T + "}", "__metadata__ must map strings to strings"),
        ('{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', "unpaired surrogate"),
        ('{"__metadata__":' + "[" * 3000 + "]" * 3000 + "," + _T + "}", "nested deeper than 64 levels"),
        ('{"a":' + "1" * 50 + "," + _T + "}", "more than 20 digits"),
    ],
)
def test_bad_headers_are_one_line_checkpoint_errors(tmp_path, header, why):
    """Each of these gave a traceback (OverflowError, RecursionError) or was accepted."""
    data = frame_header(header.encode()) + bytes(16)
    (tmp_path / "f").write_bytes(data)
    with pytest.raises(CheckpointError, match=why) as ei:
        read_header(tmp_path / "f")
    assert "\n" not in str(ei.value) and "not a valid safetensors file" in str(ei.value)
    assert read_metadata(tmp_path / "f") is None


def test_header_size_limit(tmp_path):
    from rompatch.safetensors_io import HEADER_MAX

    with open(tmp_path / "f", "wb") as f:
        f.write(struct.pack("<Q", HEADER_MAX + 1) + b"{")
        f.truncate(HEADER_MAX + 64)  # sparse: the length fits in the file, not in the limit
    with pytest.raises(CheckpointError, match=r"header length \d+ is more than the 100,000,000 bytes"):
        read_header(tmp_path / "f")
    assert read_metadata(tmp_path / "f") is None


def test_headers_are_utf8(tmp_path):
    (tmp_path / "f").write_bytes(frame_header('{"é":1}'.encode("utf-16")))
    with pytest.raises(CheckpointError, match="not UTF-8"):
        read_header(tmp_path / "f")
