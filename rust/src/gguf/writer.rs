//! Streaming GGUF writer: the header first, then tensor data one tensor at a time, so a model is
//! never held in memory. Output goes to a hidden temp file that is fsynced and renamed only when
//! every tensor is written; an error or a drop before `finish` removes it, so no half-written file
//! ever appears under the output name.

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::value::Value;
use super::{
    align_up, DEFAULT_ALIGNMENT, GGUF_MAGIC, KEY_ALIGNMENT, KEY_SPLIT_COUNT, KEY_SPLIT_NO,
    KEY_SPLIT_TENSORS_COUNT,
};
use crate::error::{Error, Result};
use crate::types::GgmlType;

/// What the writer needs to know about a tensor before its data arrives.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    /// ggml order: dims[0] is the row length.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

impl TensorSpec {
    pub fn nbytes(&self) -> Result<u64> {
        self.ty.nbytes(&self.dims).ok_or_else(|| {
            Error::tensor(
                &self.name,
                format!(
                    "dims {:?} are not whole {} blocks",
                    self.dims,
                    self.ty.name()
                ),
            )
        })
    }
}

fn temp_path_for(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn sync_dir(path: &Path) {
    // Persist the rename itself; best effort (not every filesystem allows opening a directory).
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
}

/// Writes one GGUF file. Call `write_tensor` once per tensor, in the order given, then `finish`.
pub struct GgufWriter {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
    specs: Vec<TensorSpec>,
    sizes: Vec<u64>,
    next: usize,
    alignment: u64,
    pos: u64,
}

impl GgufWriter {
    /// Creates the temp file and writes the header (GGUF v3).
    pub fn create(
        path: impl AsRef<Path>,
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
    ) -> Result<GgufWriter> {
        let path = path.as_ref().to_path_buf();
        let alignment = match metadata.iter().find(|(k, _)| k == KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some((_, Value::U32(a))) if *a > 0 && a.is_power_of_two() => *a as u64,
            Some((_, v)) => {
                return Err(Error::Invalid(format!(
                    "{KEY_ALIGNMENT} must be a UINT32 power of two, got {v:?}"
                )))
            }
        };
        let mut seen = std::collections::HashSet::new();
        for (k, _) in metadata {
            if !seen.insert(k.as_str()) {
                return Err(Error::Invalid(format!("metadata key '{k}' given twice")));
            }
        }
        let mut names = std::collections::HashSet::new();
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in &tensors {
            if !names.insert(t.name.as_str()) {
                return Err(Error::tensor(&t.name, "tensor name given twice"));
            }
            if t.dims.len() > super::MAX_DIMS {
                return Err(Error::tensor(
                    &t.name,
                    format!("{} dimensions (at most {})", t.dims.len(), super::MAX_DIMS),
                ));
            }
            sizes.push(t.nbytes()?);
        }

        let mut header = Vec::with_capacity(1 << 16);
        header.extend_from_slice(&GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            Value::string(k).encode(&mut header);
            header.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            v.encode(&mut header);
        }
        let mut offset = 0u64;
        for (t, &n) in tensors.iter().zip(&sizes) {
            Value::string(&t.name).encode(&mut header);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ty.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset = align_up(offset + n, alignment).expect("tensor sizes overflow u64");
        }
        let padded = align_up(header.len() as u64, alignment).unwrap() as usize;
        header.resize(padded, 0);

        let tmp = temp_path_for(&path);
        let file = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut w = GgufWriter {
            path,
            tmp,
            out: Some(BufWriter::with_capacity(8 << 20, file)),
            specs: tensors,
            sizes,
            next: 0,
            alignment,
            pos: 0,
        };
        w.write_all(&header)?;
        Ok(w)
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let out = self.out.as_mut().expect("writer used after finish");
        out.write_all(bytes).map_err(|e| Error::io(&self.tmp, e))?;
        self.pos += bytes.len() as u64;
        Ok(())
    }

    /// The next tensor to be written, if any.
    pub fn next_tensor(&self) -> Option<&TensorSpec> {
        self.specs.get(self.next)
    }

    /// Appends the data of the next tensor (exactly its byte size) and pads it to the alignment.
    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        let Some(spec) = self.specs.get(self.next) else {
            return Err(Error::Invalid(format!(
                "{}: more tensors written than declared",
                self.path.display()
            )));
        };
        if data.len() as u64 != self.sizes[self.next] {
            return Err(Error::tensor(
                &spec.name,
                format!(
                    "{} bytes given, {} {} data needs {}",
                    data.len(),
                    spec.ty.name(),
                    format_dims(&spec.dims),
                    self.sizes[self.next]
                ),
            ));
        }
        self.write_all(data)?;
        let pad = align_up(self.pos, self.alignment).unwrap() - self.pos;
        self.write_all(&vec![0u8; pad as usize])?;
        self.next += 1;
        Ok(())
    }

    /// Flushes and fsyncs the temp file; the rename is left to `commit` (so split outputs can
    /// appear together).
    fn sync(&mut self) -> Result<()> {
        if self.next != self.specs.len() {
            return Err(Error::Invalid(format!(
                "{}: only {} of {} tensors were written",
                self.path.display(),
                self.next,
                self.specs.len()
            )));
        }
        let out = self.out.as_mut().expect("writer used after finish");
        out.flush().map_err(|e| Error::io(&self.tmp, e))?;
        out.get_ref()
            .sync_all()
            .map_err(|e| Error::io(&self.tmp, e))?;
        Ok(())
    }

    fn commit(&mut self) -> Result<PathBuf> {
        self.out = None;
        fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))?;
        sync_dir(&self.path);
        Ok(self.path.clone())
    }

    /// Checks every tensor was written, fsyncs, and renames the temp file to the output name.
    pub fn finish(mut self) -> Result<PathBuf> {
        self.sync()?;
        self.commit()
    }
}

impl Drop for GgufWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            self.out = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn format_dims(dims: &[u64]) -> String {
    format!("{dims:?}")
}

/// When to start a new split file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplitLimits {
    /// Start a new file before a tensor that would take this one past this many data bytes.
    pub max_bytes: Option<u64>,
    /// At most this many tensors per file.
    pub max_tensors: Option<usize>,
}

impl SplitLimits {
    pub fn is_none(&self) -> bool {
        self.max_bytes.is_none() && self.max_tensors.is_none()
    }
}

/// `model.gguf` → `model-00001-of-00003.gguf`, as llama.cpp's gguf-split names parts.
pub fn split_part_path(path: &Path, index: usize, count: usize) -> PathBuf {
    let s = path.to_string_lossy();
    let stem = s.strip_suffix(".gguf").unwrap_or(&s);
    PathBuf::from(format!("{stem}-{:05}-of-{count:05}.gguf", index + 1))
}

/// Writes a model as one file or as llama.cpp-style splits. The first part carries all metadata
/// plus `split.no`/`split.count`/`split.tensors.count`; later parts carry only the split keys.
/// No part is renamed into place until every part is complete.
pub struct SplitWriter {
    parts: Vec<GgufWriter>,
    current: usize,
}

impl SplitWriter {
    pub fn create(
        path: impl AsRef<Path>,
        metadata: &[(String, Value)],
        tensors: Vec<TensorSpec>,
        limits: SplitLimits,
    ) -> Result<SplitWriter> {
        let path = path.as_ref();
        let base: Vec<(String, Value)> = metadata
            .iter()
            .filter(|(k, _)| !k.starts_with("split."))
            .cloned()
            .collect();
        let groups = plan_splits(&tensors, limits)?;
        if groups.len() <= 1 && limits.is_none() {
            let w = GgufWriter::create(path, &base, tensors)?;
            return Ok(SplitWriter {
                parts: vec![w],
                current: 0,
            });
        }
        let count = groups.len();
        let total = tensors.len();
        if count > u16::MAX as usize {
            return Err(Error::Invalid(format!(
                "{count} split files exceed the 65535 that split.count can hold"
            )));
        }
        let mut parts = Vec::with_capacity(count);
        let mut specs = tensors.into_iter();
        for (i, n) in groups.into_iter().enumerate() {
            let split_keys = [
                (KEY_SPLIT_NO.to_string(), Value::U16(i as u16)),
                (KEY_SPLIT_COUNT.to_string(), Value::U16(count as u16)),
                (
                    KEY_SPLIT_TENSORS_COUNT.to_string(),
                    Value::I32(total as i32),
                ),
            ];
            let mut meta: Vec<(String, Value)> = if i == 0 { base.clone() } else { vec![] };
            if i != 0 {
                // Later parts keep the alignment so their data offsets mean the same thing.
                meta.extend(base.iter().filter(|(k, _)| k == KEY_ALIGNMENT).cloned());
            }
            meta.extend(split_keys);
            let part_specs: Vec<TensorSpec> = specs.by_ref().take(n).collect();
            parts.push(GgufWriter::create(
                split_part_path(path, i, count),
                &meta,
                part_specs,
            )?);
        }
        Ok(SplitWriter { parts, current: 0 })
    }

    /// Output paths, in order.
    pub fn paths(&self) -> Vec<PathBuf> {
        self.parts.iter().map(|p| p.path.clone()).collect()
    }

    pub fn write_tensor(&mut self, data: &[u8]) -> Result<()> {
        while self.current < self.parts.len() && self.parts[self.current].next_tensor().is_none() {
            self.current += 1;
        }
        match self.parts.get_mut(self.current) {
            Some(p) => p.write_tensor(data),
            None => Err(Error::Invalid("more tensors written than declared".into())),
        }
    }

    pub fn finish(mut self) -> Result<Vec<PathBuf>> {
        for p in &mut self.parts {
            p.sync()?;
        }
        let mut out = vec![];
        for p in &mut self.parts {
            out.push(p.commit()?);
        }
        Ok(out)
    }
}

/// Tensors per split file under `limits` (one group when there are no limits).
pub fn plan_splits(tensors: &[TensorSpec], limits: SplitLimits) -> Result<Vec<usize>> {
    if limits.max_tensors == Some(0) {
        return Err(Error::Invalid(
            "--split-max-tensors must be at least 1".into(),
        ));
    }
    if limits.max_bytes == Some(0) {
        return Err(Error::Invalid(
            "--split-max-size must be more than 0".into(),
        ));
    }
    let mut groups = vec![];
    let (mut n, mut bytes) = (0usize, 0u64);
    for t in tensors {
        let size = t.nbytes()?;
        let over_bytes = limits.max_bytes.is_some_and(|m| bytes + size > m);
        let over_count = limits.max_tensors.is_some_and(|m| n >= m);
        if n > 0 && (over_bytes || over_count) {
            groups.push(n);
            n = 0;
            bytes = 0;
        }
        n += 1;
        bytes += size;
    }
    if n > 0 || groups.is_empty() {
        groups.push(n);
    }
    Ok(groups)
}
