"""GGUF I/O against the reference reader/writer from the `gguf` package (llama.cpp's gguf-py)."""

from __future__ import annotations

import hashlib
import struct

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter

import pyqmoe


def _reader_value(field):
    """A ReaderField's value, decoded from its raw parts (gguf-py's contents() lacks nested arrays)."""
    t = field.types[0]
    if t == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    if t == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "surrogateescape")
    return field.parts[field.data[0]].tolist()[0]


def _ours(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    if isinstance(v, list):
        return [_ours(x) for x in v]
    return v


def _make_reference_file(path, *, alignment=None):
    rng = np.random.default_rng(0)
    w = GGUFWriter(str(path), "qwen3moe")
    if alignment:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 1e-6)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 3.25e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo <|im_start|>")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_f32", [0.5, -1.5])
    w.add_array("t.arr_str", ["a", "Ġthe", ""])
    w.add_array("t.arr_bool", [True, False])
    f32 = rng.standard_normal((3, 64), dtype=np.float32)
    w.add_tensor("a.f32", f32)
    w.add_tensor("b.f16", rng.standard_normal((2, 8)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0)
    w.add_tensor("c.q8_0", q8, raw_dtype=Q.Q8_0)
    bf = gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), Q.BF16)
    w.add_tensor("d.bf16", bf, raw_dtype=Q.BF16)
    w.add_tensor("e.odd_f32", rng.standard_normal((5,), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _assert_same_as_reference(pq: pyqmoe.GGUFFile, ref: GGUFReader):
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert [f.key for f in pq.fields] == list(ref_fields)
    for f in pq.fields:
        rf = ref_fields[f.key]
        assert _ours(f.value) == _reader_value(rf), f.key
        want_type = rf.types[0].name if rf.types[0] != GGUFValueType.ARRAY else f"ARRAY[{rf.types[-1].name}]"
        assert f.type == want_type, f.key
    assert [t.name for t in pq.tensors] == [t.name for t in ref.tensors]
    for t, rt in zip(pq.tensors, ref.tensors):
        assert t.type == rt.tensor_type.name
        assert list(t.dims) == [int(x) for x in rt.shape]
        assert t.nbytes == rt.n_bytes
        assert np.array_equal(pq.tensor_bytes(t.name), rt.data.view(np.uint8).reshape(-1)), t.name


@pytest.mark.parametrize("alignment", [None, 64])
def test_reads_what_gguf_writes(tmp_path, alignment):
    p = tmp_path / "ref.gguf"
    _make_reference_file(p, alignment=alignment)
    pq = pyqmoe.GGUFFile(p)
    _assert_same_as_reference(pq, GGUFReader(p))
    assert pq.alignment == (alignment or 32)
    # Typed zero-copy views agree with the data gguf wrote.
    assert pq.tensor("a.f32").shape == (3, 64)
    assert pq.tensor("a.f32").dtype == np.float32
    assert not pq.tensor("a.f32").flags.writeable or isinstance(pq.tensor("a.f32").base, np.memmap)
    assert pq.tensor("b.f16").dtype == np.float16
    np.testing.assert_array_equal(
        pq.dequantize("c.q8_0"), gguf.quants.dequantize(pq.tensor_bytes("c.q8_0").reshape(4, -1), Q.Q8_0)
    )


def test_what_pyqmoe_writes_reads_back_in_gguf_and_bytes_are_identical(tmp_path):
    src = tmp_path / "ref.gguf"
    _make_reference_file(src)
    out = tmp_path / "ours.gguf"
    assert pyqmoe.rewrite(src, out) == [out]
    ref = GGUFReader(out)
    _assert_same_as_reference(pyqmoe.GGUFFile(out), ref)
    _assert_same_as_reference(pyqmoe.GGUFFile(src), ref)
    assert src.read_bytes() == out.read_bytes()


def test_rewriting_the_fixture_gives_identical_bytes(tiny_model, tmp_path):
    out = tmp_path / "again.gguf"
    pyqmoe.rewrite(tiny_model, out)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(tiny_model.read_bytes()).digest()


def test_split_output_round_trips(tiny_model, tmp_path):
    out = tmp_path / "split.gguf"
    paths = pyqmoe.rewrite(tiny_model, out, split_max_tensors=10)
    assert [p.name for p in paths] == [f"split-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    whole = pyqmoe.GGUFFile(tiny_model)
    for p in paths:
        m = pyqmoe.GGUFFile(p)
        assert [t.name for t in m.tensors] == [t.name for t in whole.tensors]
        for t in whole.tensors:
            assert np.array_equal(m.tensor_bytes(t.name), whole.tensor_bytes(t.name))
        assert {k: v for k, v in m.metadata.items() if not k.startswith("split.")} == whole.metadata
    # Each part is a valid GGUF on its own for the reference reader, with llama.cpp's split keys.
    for i, p in enumerate(paths):
        r = GGUFReader(p)
        assert _reader_value(r.fields["split.no"]) == i
        assert _reader_value(r.fields["split.count"]) == 3
        assert _reader_value(r.fields["split.tensors.count"]) == len(whole.tensors)
    # Merging the split back gives the original bytes.
    merged = tmp_path / "merged.gguf"
    pyqmoe.rewrite(paths[1], merged)
    assert merged.read_bytes() == tiny_model.read_bytes()
    # Split by size too.
    paths = pyqmoe.rewrite(tiny_model, tmp_path / "bysize.gguf", split_max_bytes=200_000)
    assert len(paths) >= 2


# ---- bad input ------------------------------------------------------------------------------


def _header_boundaries(path):
    """Byte offsets where each header item (magic, version, counts, every key/value, every tensor
    info) begins, read with the reference reader."""
    r = GGUFReader(path)
    offs = {0, 4, 8, 16, 24}
    for f in r.fields.values():
        offs.add(int(f.offset))
    for t in r.tensors:
        offs.add(int(t.field.offset))
        offs.add(int(t.data_offset))
    return sorted(o for o in offs if o > 0)


def test_truncation_at_every_header_boundary_raises(tiny_model, tmp_path):
    data = tiny_model.read_bytes()
    bad = tmp_path / "cut.gguf"
    cuts = _header_boundaries(tiny_model)
    assert len(cuts) > 50
    for cut in cuts + [c + 1 for c in cuts] + [len(data) - 5]:
        bad.write_bytes(data[:cut])
        with pytest.raises(pyqmoe.GGUFFormatError) as e:
            pyqmoe.GGUFFile(bad)
        assert "cut.gguf" in str(e.value) and "offset" in str(e.value)


def _hdr(n_tensors, n_kv, body=b""):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


@pytest.mark.parametrize(
    "blob, needle",
    [
        (b"GGML" + b"\0" * 20, "not a GGUF file"),
        (b"GGUF" + struct.pack("<IQQ", 1, 0, 0), "unsupported GGUF version 1"),
        (b"GGUF" + struct.pack("<IQQ", 9, 0, 0), "unsupported GGUF version 9"),
        (_hdr(2**63, 0), "n_tensors"),
        (_hdr(0, 2**63), "n_kv"),
        (_hdr(0, 1, struct.pack("<Q", 2**40) + b"k" * 20), "runs past the end"),
        (_hdr(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**62) + b"\0" * 16), "array of"),
        (_hdr(0, 1, struct.pack("<Q", 1) + b"k" + struct.pack("<I", 42) + b"\0" * 16), "unknown value type 42"),
        (
            _hdr(1, 0, struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 32, 77, 0) + b"\0" * 200),
            "unknown tensor type id 77",
        ),
        (
            _hdr(1, 0, struct.pack("<Q", 1) + b"w" + struct.pack("<IQQIQ", 2, 2**33, 2**33, 0, 0) + b"\0" * 200),
            "overflow",
        ),
        (_hdr(1, 0, struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 4, 0, 8) + b"\0" * 200), "not aligned"),
        (
            _hdr(1, 0, struct.pack("<Q", 1) + b"w" + struct.pack("<IQIQ", 1, 4, 0, 4096) + b"\0" * 200),
            "runs past the end",
        ),
        (
            _hdr(
                2,
                0,
                struct.pack("<Q", 1)
                + b"a"
                + struct.pack("<IQIQ", 1, 16, 0, 0)
                + struct.pack("<Q", 1)
                + b"b"
                + struct.pack("<IQIQ", 1, 16, 0, 32)
                + b"\0" * 200,
            ),
            "overlaps",
        ),
    ],
)
def test_hostile_files_raise_clear_errors(tmp_path, blob, needle):
    p = tmp_path / "hostile.gguf"
    p.write_bytes(blob)
    with pytest.raises(pyqmoe.GGUFFormatError) as e:
        pyqmoe.GGUFFile(p)
    msg = str(e.value)
    assert needle in msg and "hostile.gguf" in msg and "offset" in msg, msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        pyqmoe.GGUFFile(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(pyqmoe.GGUFFormatError, match="empty"):
        pyqmoe.GGUFFile(tmp_path / "empty.gguf")
