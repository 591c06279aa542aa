//! Importance matrices as llama.cpp's `llama-imatrix` writes them, in both of its formats:
//!
//! * legacy `.dat`: i32 n_entries; per entry i32 name length, name bytes, i32 ncall, i32 nval,
//!   nval f32 sums; then optionally i32 last_call (chunks) and an i32-length dataset name.
//!   Values are normalised as llama-quantize does: sum / ncall when ncall > 0.
//! * GGUF (`general.type = imatrix`): per weight `NAME.in_sum2` (F32, ne0 × n_mat) and
//!   `NAME.counts` (F32, n_mat), keys `imatrix.datasets`, `imatrix.chunk_count`,
//!   `imatrix.chunk_size`. Values are in_sum2 / count per matrix (expert), 1 where the count is 0.
//!
//! The format is chosen by content (the GGUF magic), not by file name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gguf::{GgufModel, Value, GGUF_MAGIC};
use crate::types::GgmlType;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImatrixFormat {
    Legacy,
    Gguf,
}

/// Normalised importance weights by tensor name (per column; for expert tensors, n_expert slices
/// of the row length one after another).
#[derive(Clone, Debug, PartialEq)]
pub struct Imatrix {
    pub path: PathBuf,
    pub format: ImatrixFormat,
    pub entries: BTreeMap<String, Vec<f32>>,
    pub datasets: Vec<String>,
    /// Chunks the statistics were collected over (0 when the file does not say).
    pub chunk_count: u32,
}

fn bad(path: &Path, offset: usize, field: &str, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        offset: offset as u64,
        field: field.into(),
        msg: msg.into(),
    }
}

/// A bounds-checked little-endian cursor over the legacy format.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8]> {
        if self.buf.len() - self.pos < n {
            return Err(bad(
                self.path,
                self.pos,
                field,
                format!("file ends after {} bytes; {n} more needed", self.buf.len()),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn i32(&mut self, field: &str) -> Result<i32> {
        Ok(i32::from_le_bytes(self.take(4, field)?.try_into().unwrap()))
    }

    fn len(&mut self, field: &str, min: i32) -> Result<usize> {
        let at = self.pos;
        let n = self.i32(field)?;
        if n < min {
            return Err(bad(
                self.path,
                at,
                field,
                format!("is {n}, must be at least {min}"),
            ));
        }
        Ok(n as usize)
    }
}

impl Imatrix {
    /// Reads either format, chosen by content.
    pub fn load(path: impl AsRef<Path>) -> Result<Imatrix> {
        let path = path.as_ref();
        let mut head = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
            if n < 4 {
                return Err(bad(
                    path,
                    n,
                    "header",
                    "too short to be an importance matrix",
                ));
            }
        }
        if head == GGUF_MAGIC {
            Self::from_gguf(&GgufModel::open(path)?)
        } else {
            let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
            Self::parse_legacy(&bytes, path)
        }
    }

    /// Parses the legacy `.dat` format.
    pub fn parse_legacy(buf: &[u8], path: &Path) -> Result<Imatrix> {
        let mut c = Cursor { buf, pos: 0, path };
        let n_entries = c.len("n_entries", 1)?;
        let mut entries = BTreeMap::new();
        for i in 0..n_entries {
            let field = format!("entry {i}");
            let name_len = c.len(&format!("{field} name length"), 0)?;
            let name =
                String::from_utf8_lossy(c.take(name_len, &format!("{field} name"))?).into_owned();
            let field = format!("entry {i} ('{name}')");
            let ncall = c.i32(&format!("{field} ncall"))?;
            let nval = c.len(&format!("{field} nval"), 1)?;
            let raw = c.take(nval * 4, &format!("{field} values"))?;
            let values: Vec<f32> = raw
                .chunks_exact(4)
                .map(|b| {
                    let v = f32::from_le_bytes(b.try_into().unwrap());
                    if ncall > 0 {
                        v / ncall as f32
                    } else {
                        v
                    }
                })
                .collect();
            entries.insert(name, values);
        }
        let (mut chunk_count, mut datasets) = (0, vec![]);
        if c.pos < buf.len() {
            let last_call = c.i32("last_call")?;
            chunk_count = last_call.max(0) as u32;
            let n = c.len("dataset name length", 0)?;
            datasets.push(String::from_utf8_lossy(c.take(n, "dataset name")?).into_owned());
        }
        Ok(Imatrix {
            path: path.to_path_buf(),
            format: ImatrixFormat::Legacy,
            entries,
            datasets,
            chunk_count,
        })
    }

    /// Reads the GGUF format from an opened file.
    pub fn from_gguf(model: &GgufModel) -> Result<Imatrix> {
        let path = model.files[0].path.clone();
        for key in [
            "imatrix.datasets",
            "imatrix.chunk_count",
            "imatrix.chunk_size",
        ] {
            if model.get(key).is_none() {
                return Err(bad(
                    &path,
                    0,
                    key,
                    "missing: not an importance matrix written by llama-imatrix",
                ));
            }
        }
        let datasets = match model.get("imatrix.datasets") {
            Some(Value::Array(_, items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
            _ => vec![],
        };
        let chunk_count = model
            .get("imatrix.chunk_count")
            .and_then(Value::as_u64)
            .unwrap_or(0) as u32;
        let mut pairs: BTreeMap<&str, (Option<&str>, Option<&str>)> = BTreeMap::new();
        for (_, t) in &model.tensors {
            if let Some(base) = t.name.strip_suffix(".in_sum2") {
                pairs.entry(base).or_default().0 = Some(&t.name);
            } else if let Some(base) = t.name.strip_suffix(".counts") {
                pairs.entry(base).or_default().1 = Some(&t.name);
            }
        }
        if pairs.is_empty() {
            return Err(bad(
                &path,
                0,
                "tensors",
                "no NAME.in_sum2 / NAME.counts tensors",
            ));
        }
        let f32s = |name: &str| -> Result<Vec<f32>> {
            let t = model.tensor(name).unwrap();
            if t.ty != GgmlType::F32 {
                return Err(bad(&path, 0, name, format!("is {}, expected F32", t.ty)));
            }
            Ok(model
                .tensor_data(name)
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect())
        };
        let mut entries = BTreeMap::new();
        for (base, (sums, counts)) in pairs {
            let (Some(sums), Some(counts)) = (sums, counts) else {
                return Err(bad(
                    &path,
                    0,
                    base,
                    "has only one of NAME.in_sum2 and NAME.counts",
                ));
            };
            let ne0 = model.tensor(sums).unwrap().dims[0] as usize;
            let s = f32s(sums)?;
            let n = f32s(counts)?;
            if ne0 == 0 || s.len() != ne0 * n.len() {
                return Err(bad(
                    &path,
                    0,
                    base,
                    format!(
                        "{} sums do not match {} counts of rows of {ne0}",
                        s.len(),
                        n.len()
                    ),
                ));
            }
            let mut v = Vec::with_capacity(s.len());
            for (row, &count) in s.chunks_exact(ne0).zip(&n) {
                if count > 0.0 {
                    v.extend(row.iter().map(|x| x / count));
                } else {
                    // This matrix (expert) never saw input during calibration.
                    v.extend(std::iter::repeat_n(1.0f32, ne0));
                }
            }
            entries.insert(base.to_string(), v);
        }
        Ok(Imatrix {
            path,
            format: ImatrixFormat::Gguf,
            entries,
            datasets,
            chunk_count,
        })
    }

    /// llama-quantize's --include-weights / --exclude-weights: keep (drop) entries whose name
    /// contains any of the given strings.
    pub fn filter(&mut self, include: &[String], exclude: &[String]) -> Result<()> {
        if !include.is_empty() && !exclude.is_empty() {
            return Err(Error::Invalid(
                "--include-weights and --exclude-weights cannot be used together".into(),
            ));
        }
        if !exclude.is_empty() {
            self.entries
                .retain(|k, _| !exclude.iter().any(|x| k.contains(x.as_str())));
        }
        if !include.is_empty() {
            self.entries
                .retain(|k, _| include.iter().any(|x| k.contains(x.as_str())));
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.entries.get(name).map(Vec::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_bytes(entries: &[(&str, i32, &[f32])], tail: Option<(i32, &str)>) -> Vec<u8> {
        let mut b = vec![];
        b.extend((entries.len() as i32).to_le_bytes());
        for (name, ncall, vals) in entries {
            b.extend((name.len() as i32).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend(ncall.to_le_bytes());
            b.extend((vals.len() as i32).to_le_bytes());
            for v in *vals {
                b.extend(v.to_le_bytes());
            }
        }
        if let Some((last, ds)) = tail {
            b.extend(last.to_le_bytes());
            b.extend((ds.len() as i32).to_le_bytes());
            b.extend(ds.as_bytes());
        }
        b
    }

    #[test]
    fn legacy_values_are_divided_by_ncall() {
        let b = legacy_bytes(
            &[("blk.0.attn_q.weight", 4, &[4.0, 8.0]), ("x", 0, &[3.0])],
            Some((10, "wiki.txt")),
        );
        let m = Imatrix::parse_legacy(&b, Path::new("m.dat")).unwrap();
        assert_eq!(m.get("blk.0.attn_q.weight"), Some(&[1.0f32, 2.0][..]));
        assert_eq!(m.get("x"), Some(&[3.0f32][..]));
        assert_eq!(
            (m.chunk_count, m.datasets.clone()),
            (10, vec!["wiki.txt".to_string()])
        );
    }

    #[test]
    fn truncated_legacy_file_names_the_entry_and_offset() {
        let b = legacy_bytes(&[("blk.0.attn_q.weight", 1, &[1.0, 2.0])], None);
        let e = Imatrix::parse_legacy(&b[..b.len() - 2], Path::new("m.dat"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blk.0.attn_q.weight") && e.contains("values"),
            "{e}"
        );
        let e = Imatrix::parse_legacy(&0i32.to_le_bytes(), Path::new("m.dat"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("n_entries"), "{e}");
    }

    #[test]
    fn include_and_exclude_filter_by_substring() {
        let b = legacy_bytes(
            &[
                ("blk.0.attn_q.weight", 1, &[1.0]),
                ("blk.0.ffn_up.weight", 1, &[1.0]),
            ],
            None,
        );
        let mut m = Imatrix::parse_legacy(&b, Path::new("m.dat")).unwrap();
        m.filter(&[], &["attn".into()]).unwrap();
        assert_eq!(
            m.entries.keys().collect::<Vec<_>>(),
            ["blk.0.ffn_up.weight"]
        );
        assert!(m.filter(&["a".into()], &["b".into()]).is_err());
    }
}
