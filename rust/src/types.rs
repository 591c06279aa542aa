//! ggml tensor types: ids as stored in GGUF, block geometry, names.

use crate::error::{Error, Result};

/// Elements per super-block of the k-quants and most i-quants.
pub const QK_K: usize = 256;

#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum GgmlType {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q4_1 = 3,
    Q5_0 = 6,
    Q5_1 = 7,
    Q8_0 = 8,
    Q8_1 = 9,
    Q2_K = 10,
    Q3_K = 11,
    Q4_K = 12,
    Q5_K = 13,
    Q6_K = 14,
    Q8_K = 15,
    IQ2_XXS = 16,
    IQ2_XS = 17,
    IQ3_XXS = 18,
    IQ1_S = 19,
    IQ4_NL = 20,
    IQ3_S = 21,
    IQ2_S = 22,
    IQ4_XS = 23,
    I8 = 24,
    I16 = 25,
    I32 = 26,
    I64 = 27,
    F64 = 28,
    IQ1_M = 29,
    BF16 = 30,
    TQ1_0 = 34,
    TQ2_0 = 35,
    MXFP4 = 39,
}

use GgmlType::*;

/// Every type id that may appear in a GGUF file pyqmoe reads.
pub const ALL_TYPES: &[GgmlType] = &[
    F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K, IQ2_XXS,
    IQ2_XS, IQ3_XXS, IQ1_S, IQ4_NL, IQ3_S, IQ2_S, IQ4_XS, I8, I16, I32, I64, F64, IQ1_M, BF16,
    TQ1_0, TQ2_0, MXFP4,
];

impl GgmlType {
    pub fn from_id(id: u32) -> Option<GgmlType> {
        ALL_TYPES.iter().copied().find(|t| *t as u32 == id)
    }

    pub fn id(self) -> u32 {
        self as u32
    }

    /// Case-insensitive lookup of a type name as llama.cpp spells it ("q4_k", "IQ2_XXS", "bf16").
    pub fn from_name(name: &str) -> Result<GgmlType> {
        let upper = name.trim().to_ascii_uppercase();
        ALL_TYPES
            .iter()
            .copied()
            .find(|t| t.name() == upper)
            .ok_or_else(|| {
                let known: Vec<&str> = ALL_TYPES.iter().map(|t| t.name()).collect();
                Error::UnknownType(format!(
                    "unknown tensor type '{name}' (known: {})",
                    known.join(", ")
                ))
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2_K => "Q2_K",
            Q3_K => "Q3_K",
            Q4_K => "Q4_K",
            Q5_K => "Q5_K",
            Q6_K => "Q6_K",
            Q8_K => "Q8_K",
            IQ2_XXS => "IQ2_XXS",
            IQ2_XS => "IQ2_XS",
            IQ3_XXS => "IQ3_XXS",
            IQ1_S => "IQ1_S",
            IQ4_NL => "IQ4_NL",
            IQ3_S => "IQ3_S",
            IQ2_S => "IQ2_S",
            IQ4_XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1_M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
        }
    }

    /// (elements per block, bytes per block), as ggml's type traits.
    pub fn block_geometry(self) -> (usize, usize) {
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 18),
            Q4_1 => (32, 20),
            Q5_0 => (32, 22),
            Q5_1 => (32, 24),
            Q8_0 => (32, 34),
            Q8_1 => (32, 36), // ggml: ggml_half2 ds + 32 x i8 (gguf-py lists 40)
            Q2_K => (QK_K, 84),
            Q3_K => (QK_K, 110),
            Q4_K => (QK_K, 144),
            Q5_K => (QK_K, 176),
            Q6_K => (QK_K, 210),
            Q8_K => (QK_K, 292),
            IQ2_XXS => (QK_K, 66),
            IQ2_XS => (QK_K, 74),
            IQ3_XXS => (QK_K, 98),
            IQ1_S => (QK_K, 50),
            IQ4_NL => (32, 18),
            IQ3_S => (QK_K, 110),
            IQ2_S => (QK_K, 82),
            IQ4_XS => (QK_K, 136),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1_M => (QK_K, 56),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 54),
            TQ2_0 => (QK_K, 66),
            MXFP4 => (32, 17),
        }
    }

    pub fn block_size(self) -> usize {
        self.block_geometry().0
    }

    pub fn type_size(self) -> usize {
        self.block_geometry().1
    }

    /// Bytes of one row of `n_per_row` elements, or an error if the row is not whole blocks.
    pub fn row_size(self, n_per_row: usize) -> Result<usize> {
        let (bs, ts) = self.block_geometry();
        if !n_per_row.is_multiple_of(bs) {
            return Err(Error::Invalid(format!(
                "row length {n_per_row} is not a multiple of the {} block size {bs}",
                self.name()
            )));
        }
        Ok(n_per_row / bs * ts)
    }

    /// Bytes of a tensor with these dims (ggml order: dims[0] is the row length), checked for overflow.
    pub fn nbytes(self, dims: &[u64]) -> Option<u64> {
        let (bs, ts) = self.block_geometry();
        let ne0 = *dims.first().unwrap_or(&1);
        if !ne0.is_multiple_of(bs as u64) {
            return None;
        }
        let mut n = (ne0 / bs as u64).checked_mul(ts as u64)?;
        for &d in dims.iter().skip(1) {
            n = n.checked_mul(d)?;
        }
        Some(n)
    }

    pub fn is_float(self) -> bool {
        matches!(self, F32 | F16 | BF16 | F64)
    }

    /// Bits per weight of the storage format.
    pub fn bits_per_weight(self) -> f64 {
        let (bs, ts) = self.block_geometry();
        ts as f64 * 8.0 / bs as f64
    }
}

impl std::fmt::Display for GgmlType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_round_trip() {
        for &t in ALL_TYPES {
            assert_eq!(GgmlType::from_id(t.id()), Some(t));
            assert_eq!(GgmlType::from_name(&t.name().to_lowercase()).unwrap(), t);
        }
        assert!(GgmlType::from_id(4).is_none());
        assert!(GgmlType::from_name("q4_k_xl").is_err());
    }

    #[test]
    fn nbytes_detects_overflow_and_partial_blocks() {
        assert_eq!(Q8_0.nbytes(&[64, 3]), Some(2 * 34 * 3));
        assert_eq!(Q8_0.nbytes(&[33]), None);
        assert_eq!(F32.nbytes(&[u64::MAX / 2, 4]), None);
    }
}
