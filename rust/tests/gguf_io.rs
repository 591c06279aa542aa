//! GGUF reader/writer: round trips, splits, atomic output, and hostile or truncated input.

use std::path::{Path, PathBuf};

use pyqmoe_core::gguf::writer::split_part_path;
use pyqmoe_core::gguf::{
    parse_header, GgufFile, GgufModel, GgufWriter, SplitLimits, SplitWriter, TensorSpec, Value,
    ValueType,
};
use pyqmoe_core::{Error, GgmlType};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("pyqmoe-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn every_value_type() -> Vec<(String, Value)> {
    vec![
        ("general.architecture".into(), Value::string("qwen3moe")),
        ("t.u8".into(), Value::U8(200)),
        ("t.i8".into(), Value::I8(-100)),
        ("t.u16".into(), Value::U16(60000)),
        ("t.i16".into(), Value::I16(-30000)),
        ("t.u32".into(), Value::U32(4_000_000_000)),
        ("t.i32".into(), Value::I32(-2_000_000_000)),
        ("t.f32".into(), Value::F32(1.5e-6)),
        ("t.bool".into(), Value::Bool(true)),
        ("t.string".into(), Value::string("héllo <|im_start|>")),
        ("t.raw_string".into(), Value::String(vec![0xff, 0xfe, b'a'])),
        ("t.u64".into(), Value::U64(u64::MAX)),
        ("t.i64".into(), Value::I64(i64::MIN)),
        ("t.f64".into(), Value::F64(-2.5e300)),
        (
            "t.arr_i32".into(),
            Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(-2)]),
        ),
        (
            "t.arr_str".into(),
            Value::Array(
                ValueType::String,
                vec![Value::string("a"), Value::string("")],
            ),
        ),
        ("t.arr_empty".into(), Value::Array(ValueType::F32, vec![])),
        (
            "t.nested".into(),
            Value::Array(
                ValueType::Array,
                vec![
                    Value::Array(ValueType::U8, vec![Value::U8(1), Value::U8(2)]),
                    Value::Array(ValueType::U8, vec![]),
                ],
            ),
        ),
    ]
}

fn specs() -> Vec<TensorSpec> {
    vec![
        TensorSpec {
            name: "token_embd.weight".into(),
            dims: vec![64, 10],
            ty: GgmlType::F32,
        },
        TensorSpec {
            name: "blk.0.attn_norm.weight".into(),
            dims: vec![64],
            ty: GgmlType::F32,
        },
        TensorSpec {
            name: "blk.0.ffn_gate_exps.weight".into(),
            dims: vec![64, 3, 4],
            ty: GgmlType::Q8_0,
        },
        TensorSpec {
            name: "blk.0.odd".into(),
            dims: vec![7],
            ty: GgmlType::F16,
        },
    ]
}

fn data_for(s: &TensorSpec, seed: u8) -> Vec<u8> {
    (0..s.nbytes().unwrap())
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_model(
    path: &Path,
    meta: &[(String, Value)],
    specs: &[TensorSpec],
    limits: SplitLimits,
) -> Vec<PathBuf> {
    let mut w = SplitWriter::create(path, meta, specs.to_vec(), limits).unwrap();
    for (i, s) in specs.iter().enumerate() {
        w.write_tensor(&data_for(s, i as u8)).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn round_trip_every_value_type_and_tensor_bytes() {
    let d = tmpdir("roundtrip");
    let path = d.join("m.gguf");
    let meta = every_value_type();
    write_model(&path, &meta, &specs(), SplitLimits::default());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.header.version, 3);
    assert_eq!(f.header.metadata, meta);
    assert_eq!(f.header.data_offset % 32, 0);
    for (i, s) in specs().iter().enumerate() {
        let t = f.tensor(&s.name).unwrap();
        assert_eq!((&t.dims, t.ty), (&s.dims, s.ty));
        assert_eq!(t.offset % 32, 0);
        assert_eq!(f.tensor_data(t), &data_for(s, i as u8)[..]);
    }
    // Reading and rewriting gives identical bytes.
    let again = d.join("again.gguf");
    let specs2: Vec<TensorSpec> = f
        .tensors()
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    let mut w = GgufWriter::create(&again, &f.header.metadata, specs2).unwrap();
    for t in f.tensors() {
        w.write_tensor(f.tensor_data(t)).unwrap();
    }
    w.finish().unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&again).unwrap()
    );
}

#[test]
fn custom_alignment_is_honoured() {
    let d = tmpdir("align");
    let path = d.join("m.gguf");
    let meta = vec![("general.alignment".to_string(), Value::U32(64))];
    write_model(&path, &meta, &specs(), SplitLimits::default());
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.header.alignment, 64);
    assert!(f.tensors().iter().all(|t| t.offset % 64 == 0));
    assert_eq!(f.header.data_offset % 64, 0);
}

#[test]
fn split_output_opens_as_one_model() {
    let d = tmpdir("split");
    let path = d.join("m.gguf");
    let meta = every_value_type();
    let paths = write_model(
        &path,
        &meta,
        &specs(),
        SplitLimits {
            max_bytes: None,
            max_tensors: Some(3),
        },
    );
    assert_eq!(
        paths,
        vec![split_part_path(&path, 0, 2), split_part_path(&path, 1, 2)]
    );
    assert!(paths[1]
        .to_string_lossy()
        .ends_with("m-00002-of-00002.gguf"));
    for p in [&paths[0], &paths[1]] {
        let m = GgufModel::open(p).unwrap();
        assert!(m.is_split());
        assert_eq!(m.tensors.len(), 4);
        assert_eq!(
            m.get("general.architecture"),
            Some(&Value::string("qwen3moe"))
        );
        for (i, s) in specs().iter().enumerate() {
            assert_eq!(m.tensor_data(&s.name).unwrap(), &data_for(s, i as u8)[..]);
        }
    }
    let second = GgufFile::open(&paths[1]).unwrap();
    let keys: Vec<&str> = second
        .header
        .metadata
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    assert_eq!(keys, ["split.no", "split.count", "split.tensors.count"]);
    // Split by size: every part except the last holds at most max_bytes of data.
    let paths = write_model(
        &d.join("s.gguf"),
        &meta,
        &specs(),
        SplitLimits {
            max_bytes: Some(2600),
            max_tensors: None,
        },
    );
    assert!(paths.len() >= 2);
    assert_eq!(GgufModel::open(&paths[0]).unwrap().tensors.len(), 4);
    // A missing part is an error naming the file.
    std::fs::remove_file(paths.last().unwrap()).unwrap();
    let e = GgufModel::open(&paths[0]).err().unwrap().to_string();
    assert!(
        e.contains(&paths.last().unwrap().display().to_string()),
        "{e}"
    );
}

#[test]
fn unfinished_or_failed_writes_leave_no_file() {
    let d = tmpdir("atomic");
    let path = d.join("m.gguf");
    {
        let mut w = GgufWriter::create(&path, &[], specs()).unwrap();
        w.write_tensor(&data_for(&specs()[0], 0)).unwrap();
        // Wrong size for the second tensor is refused, naming it.
        let e = w.write_tensor(&[0u8; 3]).unwrap_err().to_string();
        assert!(e.contains("blk.0.attn_norm.weight"), "{e}");
        // Finishing early is refused too, and the temp file is removed.
        assert!(w.finish().is_err());
    }
    assert!(
        std::fs::read_dir(&d).unwrap().next().is_none(),
        "temp files left behind"
    );
    {
        let _w = GgufWriter::create(&path, &[], specs()).unwrap();
        // Dropped mid-way (an error or Ctrl-C unwinding): nothing is left.
    }
    assert!(std::fs::read_dir(&d).unwrap().next().is_none());
    assert!(GgufWriter::create(d.join("no/such/dir/m.gguf"), &[], specs()).is_err());
}

// ---- hostile input -------------------------------------------------------------------------

/// A small valid file image and the offset where its data section ends.
fn valid_image() -> (Vec<u8>, usize) {
    let d = tmpdir("image");
    let path = d.join("m.gguf");
    write_model(&path, &every_value_type(), &specs(), SplitLimits::default());
    let bytes = std::fs::read(&path).unwrap();
    let f = GgufFile::open(&path).unwrap();
    let end = f
        .tensors()
        .iter()
        .map(|t| f.header.data_offset + t.offset + t.nbytes)
        .max()
        .unwrap();
    (bytes, end as usize)
}

fn parse(bytes: &[u8]) -> Result<(), Error> {
    parse_header(bytes, Path::new("hostile.gguf"), bytes.len() as u64).map(|_| ())
}

fn expect_err(bytes: &[u8], needle: &str) {
    match parse(bytes) {
        Ok(()) => panic!("accepted a bad file (expected error containing '{needle}')"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("hostile.gguf") && msg.contains(needle),
                "message '{msg}' lacks '{needle}'"
            );
        }
    }
}

#[test]
fn truncation_at_every_byte_is_an_error() {
    let (bytes, end) = valid_image();
    for cut in 0..end {
        assert!(
            parse(&bytes[..cut]).is_err(),
            "accepted a file truncated to {cut} bytes"
        );
    }
    assert!(parse(&bytes).is_ok());
}

fn header_with(n_tensors: u64, n_kv: u64, body: &[u8]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&n_tensors.to_le_bytes());
    b.extend_from_slice(&n_kv.to_le_bytes());
    b.extend_from_slice(body);
    b
}

fn kv(key: &str, v: &Value) -> Vec<u8> {
    let mut b = vec![];
    Value::string(key).encode(&mut b);
    b.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
    v.encode(&mut b);
    b
}

fn tensor_info(name: &str, dims: &[u64], ty: u32, offset: u64) -> Vec<u8> {
    let mut b = vec![];
    Value::string(name).encode(&mut b);
    b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend_from_slice(&d.to_le_bytes());
    }
    b.extend_from_slice(&ty.to_le_bytes());
    b.extend_from_slice(&offset.to_le_bytes());
    b
}

/// Header + padding + `data_len` zero bytes of data.
fn with_data(mut header: Vec<u8>, data_len: usize) -> Vec<u8> {
    header.resize(header.len().div_ceil(32) * 32, 0);
    header.extend(std::iter::repeat_n(0u8, data_len));
    header
}

#[test]
fn hostile_headers_are_refused_with_clear_messages() {
    let mut b = header_with(0, 0, &[]);
    b[0] = b'X';
    expect_err(&b, "not a GGUF file");
    let mut b = header_with(0, 0, &[]);
    b[4] = 1;
    expect_err(&b, "unsupported GGUF version 1");
    b[4] = 4;
    expect_err(&b, "version");
    expect_err(&header_with(1 << 63, 0, &[]), "n_tensors");
    expect_err(&header_with(0, 1 << 63, &[]), "n_kv");
    expect_err(&header_with(u64::MAX, u64::MAX, &[]), "cannot fit");

    // String length past EOF.
    let mut body = vec![];
    body.extend_from_slice(&(1u64 << 40).to_le_bytes());
    body.extend_from_slice(&[0u8; 16]);
    expect_err(&header_with(0, 1, &body), "runs past the end");

    // Array count past EOF, and an unknown element type.
    let mut body = kv("a", &Value::Array(ValueType::U32, vec![]));
    let n = body.len();
    body[n - 8..].copy_from_slice(&(1u64 << 62).to_le_bytes());
    body.extend_from_slice(&[0u8; 16]);
    expect_err(&header_with(0, 1, &body), "array of");
    let mut body = kv("a", &Value::Array(ValueType::U32, vec![]));
    let n = body.len();
    body[n - 12..n - 8].copy_from_slice(&77u32.to_le_bytes());
    expect_err(&header_with(0, 1, &body), "unknown array element type 77");

    // Unknown value type, bad bool, duplicate key, bad alignment.
    let mut body = kv("a", &Value::U8(1));
    let n = body.len();
    body[n - 5..n - 1].copy_from_slice(&13u32.to_le_bytes());
    expect_err(&header_with(0, 1, &body), "unknown value type 13");
    let mut body = kv("a", &Value::U8(2));
    body[9..13].copy_from_slice(&(ValueType::Bool as u32).to_le_bytes());
    expect_err(&header_with(0, 1, &body), "bool value 2");
    let mut body = kv("k", &Value::U8(1));
    body.extend(kv("k", &Value::U8(2)));
    expect_err(&header_with(0, 2, &body), "duplicate key");
    expect_err(
        &header_with(0, 1, &kv("general.alignment", &Value::U32(48))),
        "power of two",
    );
    expect_err(
        &header_with(0, 1, &kv("general.alignment", &Value::U64(32))),
        "power of two",
    );

    // Deeply nested arrays.
    let mut v = Value::Array(ValueType::U8, vec![]);
    for _ in 0..20 {
        v = Value::Array(ValueType::Array, vec![v]);
    }
    expect_err(&header_with(0, 1, &kv("deep", &v)), "nested deeper");
}

#[test]
fn hostile_tensor_infos_are_refused() {
    // Unknown type id.
    expect_err(
        &with_data(header_with(1, 0, &tensor_info("w", &[32], 99, 0)), 1024),
        "unknown tensor type id 99",
    );
    // Removed type ids (Q4_2 = 4) are unknown too.
    expect_err(
        &with_data(header_with(1, 0, &tensor_info("w", &[32], 4, 0)), 1024),
        "unknown tensor type id 4",
    );
    // Dims whose product overflows.
    expect_err(
        &with_data(
            header_with(1, 0, &tensor_info("w", &[1 << 32, 1 << 32], 0, 0)),
            64,
        ),
        "overflow",
    );
    expect_err(
        &with_data(
            header_with(1, 0, &tensor_info("w", &[2, 2, 2, 2, 2], 0, 0)),
            64,
        ),
        "dimensions",
    );
    // Row not a whole number of blocks.
    expect_err(
        &with_data(header_with(1, 0, &tensor_info("w", &[33], 8, 0)), 64),
        "blocks",
    );
    // Misaligned, out of bounds, overlapping.
    expect_err(
        &with_data(header_with(1, 0, &tensor_info("w", &[4], 0, 8)), 64),
        "not aligned",
    );
    expect_err(
        &with_data(header_with(1, 0, &tensor_info("w", &[64], 0, 0)), 100),
        "runs past the end",
    );
    expect_err(
        &with_data(
            header_with(1, 0, &tensor_info("w", &[4], 0, u64::MAX - 31)),
            64,
        ),
        "runs past the end",
    );
    let mut body = tensor_info("a", &[16], 0, 0);
    body.extend(tensor_info("b", &[16], 0, 32));
    expect_err(
        &with_data(header_with(2, 0, &body), 128),
        "overlaps tensor 'a'",
    );
    let mut body = tensor_info("a", &[4], 0, 0);
    body.extend(tensor_info("a", &[4], 0, 32));
    expect_err(
        &with_data(header_with(2, 0, &body), 128),
        "duplicate tensor name",
    );
    // Non-UTF-8 tensor name.
    let mut body = tensor_info("ab", &[4], 0, 0);
    body[8] = 0xff;
    expect_err(&with_data(header_with(1, 0, &body), 64), "UTF-8");
    // And a good one parses.
    assert!(parse(&with_data(
        header_with(1, 0, &tensor_info("w", &[4], 0, 0)),
        64
    ))
    .is_ok());
}

#[test]
fn errors_carry_file_field_and_offset() {
    let (mut bytes, _) = valid_image();
    // The first value (a string) starts at 24 + 8 + len("general.architecture") + 4 = 56.
    bytes[56..64].copy_from_slice(&(1u64 << 50).to_le_bytes());
    match parse(&bytes).unwrap_err() {
        Error::Format { offset, field, .. } => {
            assert_eq!(offset, 56);
            assert_eq!(field, "value of 'general.architecture'");
        }
        other => panic!("unexpected error {other:?}"),
    }
}
