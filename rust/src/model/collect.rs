//! Importance-matrix collection, as llama.cpp's `llama-imatrix` does it: for every matrix multiply
//! with a `blk.*` weight, the per-column sums of the inputs and of their squares plus the number
//! of input rows (tokens); for expert tensors one such set per expert, over the tokens routed to it.
//! Writers for both of llama-imatrix's output formats (legacy `.dat` and GGUF) live here too.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::{GgufWriter, TensorSpec, Value, ValueType};
use crate::types::GgmlType;

/// llama-imatrix ignores dense multiplies over fewer rows than this (imatrix.cpp's `ne[1] < 16`).
pub const MIN_DENSE_ROWS: usize = 16;

/// Accumulated statistics of one weight tensor (n_mat matrices of rows `n_cols` wide).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Σ x per column, [n_mat][n_cols] (GGUF `NAME.in_sum`).
    pub sums: Vec<f32>,
    /// Σ x² per column, [n_mat][n_cols] (GGUF `NAME.in_sum2`).
    pub sums2: Vec<f32>,
    /// Rows (tokens) seen per matrix.
    pub counts: Vec<i64>,
}

impl Stats {
    fn new(n_cols: usize, n_mat: usize) -> Stats {
        Stats {
            sums: vec![0.0; n_cols * n_mat],
            sums2: vec![0.0; n_cols * n_mat],
            counts: vec![0; n_mat],
        }
    }

    fn add_rows(&mut self, mat: usize, x: &[f32], n_cols: usize) {
        let base = mat * n_cols;
        let (s, s2) = (
            &mut self.sums[base..base + n_cols],
            &mut self.sums2[base..base + n_cols],
        );
        for row in x.chunks_exact(n_cols) {
            for ((a, b), &v) in s.iter_mut().zip(s2.iter_mut()).zip(row) {
                *a += v;
                *b += v * v;
            }
        }
        self.counts[mat] += (x.len() / n_cols) as i64;
    }
}

/// The accumulator the forward pass feeds when one is passed to `Model::eval_collect`.
#[derive(Clone, Debug, Default)]
pub struct ImatrixCollector {
    pub stats: BTreeMap<String, Stats>,
}

impl ImatrixCollector {
    pub fn new() -> ImatrixCollector {
        ImatrixCollector::default()
    }

    /// Input rows `x` ([rows][n_cols]) of a dense multiply with weight `name`.
    pub fn dense(&mut self, name: &str, x: &[f32], n_cols: usize) {
        if !name.starts_with("blk.") || x.len() / n_cols < MIN_DENSE_ROWS {
            return;
        }
        self.stats
            .entry(name.to_string())
            .or_insert_with(|| Stats::new(n_cols, 1))
            .add_rows(0, x, n_cols);
    }

    /// Input rows routed to expert `ex` (of `n_expert`) of the 3-D weight `name`.
    pub fn expert(&mut self, name: &str, n_expert: usize, ex: usize, x: &[f32], n_cols: usize) {
        self.stats
            .entry(name.to_string())
            .or_insert_with(|| Stats::new(n_cols, n_expert))
            .add_rows(ex, x, n_cols);
    }

    /// llama-imatrix's `m_last_chunk`: the largest count in whole chunks.
    pub fn chunk_count(&self, chunk_size: usize) -> u32 {
        self.stats
            .values()
            .flat_map(|s| s.counts.iter())
            .map(|&c| (c / chunk_size.max(1) as i64) as u32)
            .max()
            .unwrap_or(0)
    }

    /// Writes llama-imatrix's legacy format (save_imatrix_legacy): entries with no data at all are
    /// left out; values are Σx²/count·ncall, 1·ncall for an expert that saw nothing.
    pub fn save_legacy(&self, path: &Path, chunk_size: usize, dataset: &str) -> Result<()> {
        let chunk_size = chunk_size.max(1) as i64;
        let stored: Vec<(&String, &Stats)> = self
            .stats
            .iter()
            .filter(|(_, s)| s.counts.iter().any(|&c| c != 0))
            .collect();
        let mut b = Vec::new();
        b.extend((stored.len() as i32).to_le_bytes());
        for (name, s) in stored {
            b.extend((name.len() as i32).to_le_bytes());
            b.extend(name.as_bytes());
            let max = s.counts.iter().copied().max().unwrap_or(0);
            // ceiling division as llama.cpp does, so a short run is not stored as 0 calls
            let ncall = ((max + chunk_size - 1) / chunk_size) as i32;
            b.extend(ncall.to_le_bytes());
            b.extend((s.sums2.len() as i32).to_le_bytes());
            let per = s.sums2.len() / s.counts.len();
            for (i, &v) in s.sums2.iter().enumerate() {
                let count = s.counts[i / per] as f32;
                let (v, count) = if count == 0.0 { (1.0, 1.0) } else { (v, count) };
                b.extend((v / count * ncall as f32).to_le_bytes());
            }
        }
        b.extend((self.chunk_count(chunk_size as usize) as i32).to_le_bytes());
        b.extend((dataset.len() as i32).to_le_bytes());
        b.extend(dataset.as_bytes());
        write_atomically(path, &b)
    }

    /// Writes llama-imatrix's GGUF format (save_imatrix): per weight `NAME.in_sum2` [n_cols, n_mat],
    /// `NAME.counts` [1, n_mat] and `NAME.in_sum` [n_cols, n_mat], all F32, names sorted.
    pub fn save_gguf(&self, path: &Path, chunk_size: usize, datasets: &[String]) -> Result<()> {
        let metadata = vec![
            ("general.type".to_string(), Value::string("imatrix")),
            (
                "imatrix.datasets".to_string(),
                Value::Array(
                    ValueType::String,
                    datasets.iter().map(|d| Value::string(d)).collect(),
                ),
            ),
            (
                "imatrix.chunk_count".to_string(),
                Value::U32(self.chunk_count(chunk_size)),
            ),
            (
                "imatrix.chunk_size".to_string(),
                Value::U32(chunk_size as u32),
            ),
        ];
        let mut specs = Vec::new();
        let mut data: Vec<Vec<f32>> = Vec::new();
        for (name, s) in &self.stats {
            let n_mat = s.counts.len() as u64;
            let n_cols = s.sums2.len() as u64 / n_mat;
            let spec = |suffix: &str, dims: Vec<u64>| TensorSpec {
                name: format!("{name}.{suffix}"),
                dims,
                ty: GgmlType::F32,
            };
            specs.push(spec("in_sum2", vec![n_cols, n_mat]));
            data.push(s.sums2.clone());
            specs.push(spec("counts", vec![1, n_mat]));
            data.push(s.counts.iter().map(|&c| c as f32).collect());
            specs.push(spec("in_sum", vec![n_cols, n_mat]));
            data.push(s.sums.clone());
        }
        let mut w = GgufWriter::create(path, &metadata, specs)?;
        for d in data {
            let bytes: Vec<u8> = d.iter().flat_map(|v| v.to_le_bytes()).collect();
            w.write_tensor(&bytes)?;
        }
        w.finish()?;
        Ok(())
    }
}

/// Temp file beside `path`, fsynced, then renamed over it: never a half-written output.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.partial-{}", std::process::id()));
    let res = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        // Persist the rename itself; best effort (not every filesystem allows opening a directory).
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::imatrix::Imatrix;

    #[test]
    fn dense_skips_small_batches_and_non_block_weights() {
        let mut c = ImatrixCollector::new();
        c.dense("blk.0.attn_q.weight", &[1.0; 2 * 15], 2);
        c.dense("output.weight", &[1.0; 2 * 16], 2);
        assert!(c.stats.is_empty());
        c.dense("blk.0.attn_q.weight", &[2.0; 2 * 16], 2);
        let s = &c.stats["blk.0.attn_q.weight"];
        assert_eq!(
            (s.sums2.clone(), s.counts.clone()),
            (vec![64.0; 2], vec![16])
        );
    }

    #[test]
    fn both_formats_read_back_as_means() {
        let mut c = ImatrixCollector::new();
        c.dense("blk.0.attn_q.weight", &[2.0; 2 * 16], 2);
        c.expert("blk.0.ffn_up_exps.weight", 3, 1, &[3.0, 1.0], 2);
        let dir = std::env::temp_dir().join(format!("pyqmoe-collect-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (file, legacy) in [("m.dat", true), ("m.gguf", false)] {
            let p = dir.join(file);
            if legacy {
                c.save_legacy(&p, 16, "corpus.txt").unwrap();
            } else {
                c.save_gguf(&p, 16, &["corpus.txt".into()]).unwrap();
            }
            let m = Imatrix::load(&p).unwrap();
            assert_eq!(m.get("blk.0.attn_q.weight"), Some(&[4.0f32, 4.0][..]));
            // experts that saw nothing read back as 1
            assert_eq!(
                m.get("blk.0.ffn_up_exps.weight"),
                Some(&[1.0f32, 1.0, 9.0, 1.0, 1.0, 1.0][..])
            );
            assert_eq!(
                (m.chunk_count, m.datasets.clone()),
                (1, vec!["corpus.txt".into()])
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
