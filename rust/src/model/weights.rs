//! The model's tensors, looked up by llama.cpp's names and shape-checked once at load time.
//!
//! Matrices stay memory-mapped in whatever type the file holds; a `WeightRef` remembers where, and
//! `Model::mat` turns it into a `Mat` view. Small vectors (norm weights) are converted to f32 here.

use crate::error::{Error, Result};
use crate::gguf::GgufModel;
use crate::quant;
use crate::types::GgmlType;

use super::config::Config;
use super::matmul::Mat;

/// Where one tensor's bytes live: (file index, byte range in that file's map), plus its geometry.
#[derive(Clone, Debug)]
pub struct WeightRef {
    pub name: String,
    pub ty: GgmlType,
    /// ggml order: dims[0] is the row length, dims[1] the rows, dims[2] the matrices (experts).
    pub dims: [usize; 3],
    file: usize,
    start: usize,
    len: usize,
}

impl WeightRef {
    pub fn n_cols(&self) -> usize {
        self.dims[0]
    }
    pub fn n_rows(&self) -> usize {
        self.dims[1]
    }
    pub fn n_mats(&self) -> usize {
        self.dims[2]
    }
    pub fn bytes<'a>(&self, gguf: &'a GgufModel) -> &'a [u8] {
        &gguf.files[self.file].bytes()[self.start..self.start + self.len]
    }
    /// The whole tensor as one matrix (2-D tensors).
    pub fn mat<'a>(&'a self, gguf: &'a GgufModel) -> Mat<'a> {
        Mat {
            name: &self.name,
            data: self.bytes(gguf),
            ty: self.ty,
            n_cols: self.dims[0],
            n_rows: self.dims[1] * self.dims[2],
        }
    }
    /// Matrix `index` of a 3-D tensor (one expert).
    pub fn expert<'a>(&'a self, gguf: &'a GgufModel, index: usize) -> Mat<'a> {
        let per = self.len / self.dims[2];
        Mat {
            name: &self.name,
            data: &self.bytes(gguf)[index * per..(index + 1) * per],
            ty: self.ty,
            n_cols: self.dims[0],
            n_rows: self.dims[1],
        }
    }
}

/// Feed-forward block of one layer.
pub enum Ffn {
    Moe {
        /// Router, [n_embd, n_expert].
        gate_inp: WeightRef,
        /// [n_embd, n_ff_expert, n_expert].
        gate_exps: WeightRef,
        up_exps: WeightRef,
        /// [n_ff_expert, n_embd, n_expert].
        down_exps: WeightRef,
    },
    Dense {
        gate: WeightRef,
        up: WeightRef,
        down: WeightRef,
    },
}

pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub attn_q: WeightRef,
    pub attn_k: WeightRef,
    pub attn_v: WeightRef,
    pub attn_output: WeightRef,
    pub attn_q_norm: Vec<f32>,
    pub attn_k_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn,
}

pub struct Weights {
    pub token_embd: WeightRef,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// `output.weight`, or the embedding matrix when the model ties them.
    pub output: WeightRef,
}

struct Loader<'a> {
    gguf: &'a GgufModel,
}

impl Loader<'_> {
    fn path(&self) -> String {
        self.gguf.files[0].path.display().to_string()
    }

    fn find(&self, name: &str, expected: &[usize]) -> Result<WeightRef> {
        let &(file, ref t) = self
            .gguf
            .tensors
            .iter()
            .find(|(_, t)| t.name == name)
            .ok_or_else(|| {
                Error::Invalid(format!("{}: tensor '{name}' is missing", self.path()))
            })?;
        let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
        let mut padded = dims.clone();
        padded.resize(3, 1);
        let mut want = expected.to_vec();
        want.resize(3, 1);
        if dims.len() > 3 || padded != want {
            return Err(Error::tensor(
                name,
                format!("has dims {dims:?} (ggml order), expected {expected:?}"),
            ));
        }
        if quant::kernels(t.ty).is_none() {
            return Err(Error::UnknownType(format!(
                "tensor '{name}' is {}, which pyqmoe cannot compute with yet",
                t.ty.name()
            )));
        }
        let f = &self.gguf.files[file];
        let start = f.tensor_file_offset(t) as usize;
        Ok(WeightRef {
            name: name.to_string(),
            ty: t.ty,
            dims: [padded[0], padded[1], padded[2]],
            file,
            start,
            len: t.nbytes as usize,
        })
    }

    /// A 1-D tensor converted to f32 (norm weights).
    fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let w = self.find(name, &[len])?;
        quant::dequantize(name, w.bytes(self.gguf), len, w.ty)
    }
}

impl Weights {
    /// Finds and checks every tensor the forward pass needs; errors name the tensor.
    pub fn load(gguf: &GgufModel, cfg: &mut Config) -> Result<Weights> {
        let ld = Loader { gguf };
        let e = cfg.n_embd;
        let token_embd_info = gguf.tensor("token_embd.weight").ok_or_else(|| {
            Error::Invalid(format!(
                "{}: tensor 'token_embd.weight' is missing",
                ld.path()
            ))
        })?;
        cfg.n_vocab = token_embd_info.dims.get(1).copied().unwrap_or(0) as usize;
        let token_embd = ld.find("token_embd.weight", &[e, cfg.n_vocab])?;
        let (q_out, kv_k, kv_v) = (
            cfg.n_head * cfg.head_dim_k,
            cfg.n_head_kv * cfg.head_dim_k,
            cfg.n_head_kv * cfg.head_dim_v,
        );
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let n = |s: &str| format!("blk.{i}.{s}.weight");
            let ffn = if cfg.is_moe() {
                let (ff, ne) = (cfg.n_ff_expert, cfg.n_expert);
                Ffn::Moe {
                    gate_inp: ld.find(&n("ffn_gate_inp"), &[e, ne])?,
                    gate_exps: ld.find(&n("ffn_gate_exps"), &[e, ff, ne])?,
                    up_exps: ld.find(&n("ffn_up_exps"), &[e, ff, ne])?,
                    down_exps: ld.find(&n("ffn_down_exps"), &[ff, e, ne])?,
                }
            } else {
                let ff = cfg.n_ff;
                Ffn::Dense {
                    gate: ld.find(&n("ffn_gate"), &[e, ff])?,
                    up: ld.find(&n("ffn_up"), &[e, ff])?,
                    down: ld.find(&n("ffn_down"), &[ff, e])?,
                }
            };
            layers.push(Layer {
                attn_norm: ld.vector(&n("attn_norm"), e)?,
                attn_q: ld.find(&n("attn_q"), &[e, q_out])?,
                attn_k: ld.find(&n("attn_k"), &[e, kv_k])?,
                attn_v: ld.find(&n("attn_v"), &[e, kv_v])?,
                attn_output: ld.find(&n("attn_output"), &[cfg.n_head * cfg.head_dim_v, e])?,
                attn_q_norm: ld.vector(&n("attn_q_norm"), cfg.head_dim_k)?,
                attn_k_norm: ld.vector(&n("attn_k_norm"), cfg.head_dim_k)?,
                ffn_norm: ld.vector(&n("ffn_norm"), e)?,
                ffn,
            });
        }
        let output = if gguf.tensor("output.weight").is_some() {
            ld.find("output.weight", &[e, cfg.n_vocab])?
        } else {
            token_embd.clone() // tied embeddings
        };
        Ok(Weights {
            token_embd,
            layers,
            output_norm: ld.vector("output_norm.weight", e)?,
            output,
        })
    }
}
