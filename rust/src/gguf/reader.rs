//! Validating GGUF reader over a memory map. Every count, length and offset is checked against the
//! file size before anything is allocated or touched, so truncated or hostile files give an error
//! naming the field and byte offset, never a panic or an out-of-bounds read.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::value::{Value, ValueType};
use super::{align_up, DEFAULT_ALIGNMENT, GGUF_MAGIC, KEY_ALIGNMENT, MAX_ARRAY_DEPTH, MAX_DIMS};
use crate::error::{Error, Result};
use crate::types::GgmlType;

/// One tensor's description. `dims` are in ggml order (dims[0] is the row length); `offset` is
/// relative to the start of the data section.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    pub offset: u64,
    pub nbytes: u64,
}

impl TensorInfo {
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
    /// Elements per row (ggml's ne[0]).
    pub fn n_per_row(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }
    /// Shape in numpy order (outermost first).
    pub fn shape(&self) -> Vec<u64> {
        self.dims.iter().rev().copied().collect()
    }
}

/// Everything before the tensor data.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset of the data section.
    pub data_offset: u64,
}

impl Header {
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::Format {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            field: field.to_string(),
            msg: msg.into(),
        }
    }

    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: u64, field: &str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(self.err(
                field,
                format!(
                    "needs {n} bytes but only {} remain (file truncated?)",
                    self.remaining()
                ),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N]> {
        Ok(self
            .take(N as u64, field)?
            .try_into()
            .expect("length checked"))
    }

    fn u32(&mut self, field: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    fn string(&mut self, field: &str) -> Result<&'a [u8]> {
        let start = self.pos;
        let len = self.u64(field)?;
        if len > self.remaining() {
            self.pos = start;
            return Err(self.err(
                field,
                format!(
                    "string length {len} runs past the end of the file ({} bytes left)",
                    self.remaining() - 8
                ),
            ));
        }
        self.take(len, field)
    }

    fn utf8(&mut self, field: &str) -> Result<String> {
        let start = self.pos;
        let b = self.string(field)?;
        String::from_utf8(b.to_vec()).map_err(|_| {
            self.pos = start;
            self.err(field, "is not valid UTF-8")
        })
    }

    fn value(&mut self, ty: ValueType, field: &str, depth: usize) -> Result<Value> {
        Ok(match ty {
            ValueType::U8 => Value::U8(self.array::<1>(field)?[0]),
            ValueType::I8 => Value::I8(self.array::<1>(field)?[0] as i8),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(field)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(field)?)),
            ValueType::U32 => Value::U32(self.u32(field)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(field)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(field)?)),
            ValueType::Bool => {
                let b = self.array::<1>(field)?[0];
                if b > 1 {
                    self.pos -= 1;
                    return Err(self.err(field, format!("bool value {b} is neither 0 nor 1")));
                }
                Value::Bool(b == 1)
            }
            ValueType::String => Value::String(self.string(field)?.to_vec()),
            ValueType::U64 => Value::U64(self.u64(field)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(field)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(field)?)),
            ValueType::Array => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.err(
                        field,
                        format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
                    ));
                }
                let at = self.pos;
                let id = self.u32(field)?;
                let elem = ValueType::from_id(id).ok_or_else(|| {
                    self.pos = at;
                    self.err(field, format!("unknown array element type {id}"))
                })?;
                let at = self.pos;
                let n = self.u64(field)?;
                // Each element takes at least min_size bytes: refuse counts the file cannot hold.
                if n.checked_mul(elem.min_size())
                    .is_none_or(|b| b > self.remaining())
                {
                    self.pos = at;
                    return Err(self.err(
                        field,
                        format!(
                            "array of {n} {} elements runs past the end of the file",
                            elem.name()
                        ),
                    ));
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem, field, depth + 1)?);
                }
                Value::Array(elem, items)
            }
        })
    }
}

/// Parses and validates the header of a GGUF image `buf` (a whole file, or at least its header
/// when `file_len` gives the real size). Tensor extents are checked against `file_len`.
pub fn parse_header(buf: &[u8], path: &Path, file_len: u64) -> Result<Header> {
    let mut c = Cursor { buf, pos: 0, path };
    let magic = c.array::<4>("magic")?;
    if magic != GGUF_MAGIC {
        c.pos = 0;
        return Err(c.err(
            "magic",
            format!("expected \"GGUF\", found {magic:02x?}: not a GGUF file"),
        ));
    }
    let version = c.u32("version")?;
    if version != 2 && version != 3 {
        c.pos = 4;
        return Err(c.err(
            "version",
            format!("unsupported GGUF version {version} (pyqmoe reads 2 and 3)"),
        ));
    }
    let n_tensors = c.u64("n_tensors")?;
    let n_kv = c.u64("n_kv")?;
    // A key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info at least 8+4+4+8.
    if n_kv.checked_mul(13).is_none_or(|b| b > c.remaining()) {
        c.pos = 16;
        return Err(c.err(
            "n_kv",
            format!("{n_kv} key/value pairs cannot fit in the file"),
        ));
    }
    if n_tensors.checked_mul(24).is_none_or(|b| b > c.remaining()) {
        c.pos = 8;
        return Err(c.err(
            "n_tensors",
            format!("{n_tensors} tensors cannot fit in the file"),
        ));
    }

    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut keys = HashSet::new();
    for i in 0..n_kv {
        let at = c.pos;
        let key = c.utf8(&format!("key of metadata entry {i}"))?;
        if !keys.insert(key.clone()) {
            c.pos = at;
            return Err(c.err(&format!("metadata key '{key}'"), "duplicate key"));
        }
        let at = c.pos;
        let id = c.u32(&format!("type of '{key}'"))?;
        let ty = ValueType::from_id(id).ok_or_else(|| {
            c.pos = at;
            c.err(
                &format!("type of '{key}'"),
                format!("unknown value type {id}"),
            )
        })?;
        let value = c.value(ty, &format!("value of '{key}'"), 0)?;
        metadata.push((key, value));
    }

    let alignment = match metadata.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => *a as u64,
        Some((_, v)) => {
            return Err(c.err(
                KEY_ALIGNMENT,
                format!("must be a UINT32 power of two, found {v:?}"),
            ));
        }
    };

    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut names = HashSet::new();
    for i in 0..n_tensors {
        let name = c.utf8(&format!("name of tensor {i}"))?;
        let field = format!("tensor '{name}'");
        if !names.insert(name.clone()) {
            return Err(c.err(&field, "duplicate tensor name"));
        }
        let at = c.pos;
        let n_dims = c.u32(&field)?;
        if n_dims as usize > MAX_DIMS {
            c.pos = at;
            return Err(c.err(&field, format!("{n_dims} dimensions (at most {MAX_DIMS})")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&field)?);
        }
        if dims
            .iter()
            .try_fold(1u64, |p, &d| p.checked_mul(d))
            .is_none_or(|n| n > i64::MAX as u64)
        {
            c.pos = at;
            return Err(c.err(
                &field,
                format!("dimensions {dims:?} overflow the element count"),
            ));
        }
        let at = c.pos;
        let id = c.u32(&field)?;
        let ty = GgmlType::from_id(id).ok_or_else(|| {
            c.pos = at;
            c.err(&field, format!("unknown tensor type id {id}"))
        })?;
        let nbytes = ty.nbytes(&dims).ok_or_else(|| {
            c.pos = at;
            c.err(
                &field,
                format!(
                    "dims {dims:?} are not whole {} blocks of {}",
                    ty.name(),
                    ty.block_size()
                ),
            )
        })?;
        let offset = c.u64(&field)?;
        tensors.push(TensorInfo {
            name,
            dims,
            ty,
            offset,
            nbytes,
        });
    }

    let header_end = c.pos as u64;
    let data_offset =
        align_up(header_end, alignment).ok_or_else(|| c.err("data section", "offset overflows"))?;
    let data_len = file_len.saturating_sub(data_offset);
    if data_offset > file_len && !tensors.is_empty() {
        return Err(c.err(
            "data section",
            format!("starts at {data_offset}, past the end of the file ({file_len} bytes)"),
        ));
    }

    // Offsets: aligned, inside the data section, not overlapping one another.
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| tensors[i].offset);
    let mut prev_end = 0u64;
    let mut prev_name = "";
    for &i in &order {
        let t = &tensors[i];
        let fail = |msg: String| Error::Format {
            path: path.to_path_buf(),
            offset: data_offset.saturating_add(t.offset),
            field: format!("tensor '{}'", t.name),
            msg,
        };
        if t.offset % alignment != 0 {
            return Err(fail(format!(
                "data offset {} is not aligned to {alignment}",
                t.offset
            )));
        }
        let end = t
            .offset
            .checked_add(t.nbytes)
            .ok_or_else(|| fail("data extent overflows".into()))?;
        if end > data_len {
            return Err(fail(format!(
                "data [{}, {end}) runs past the end of the data section ({data_len} bytes; file truncated?)",
                t.offset
            )));
        }
        if t.offset < prev_end {
            return Err(fail(format!("data overlaps tensor '{prev_name}'")));
        }
        prev_end = end;
        prev_name = &t.name;
    }

    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
    })
}

/// A GGUF file opened read-only through a memory map.
pub struct GgufFile {
    pub path: PathBuf,
    pub header: Header,
    mmap: Mmap,
}

impl GgufFile {
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len == 0 {
            return Err(Error::Format {
                path,
                offset: 0,
                field: "magic".into(),
                msg: "file is empty".into(),
            });
        }
        // SAFETY: the map is read-only; a file truncated by another process under us is the
        // documented hazard of every mmap-based reader (llama.cpp's included).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let header = parse_header(&mmap, &path, len)?;
        Ok(GgufFile { path, header, mmap })
    }

    pub fn len(&self) -> u64 {
        self.mmap.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.mmap.is_empty()
    }

    pub fn tensors(&self) -> &[TensorInfo] {
        &self.header.tensors
    }

    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor's bytes, straight from the map (extents were validated at open).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.header.data_offset + t.offset) as usize;
        &self.mmap[start..start + t.nbytes as usize]
    }

    /// Absolute file offset of a tensor's data.
    pub fn tensor_file_offset(&self, t: &TensorInfo) -> u64 {
        self.header.data_offset + t.offset
    }

    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }
}
