//! The 1-bit i-quants IQ1_S and IQ1_M: groups of 8 weights snapped to a point of a 2048-point grid
//! of ternary levels {-1, 0, 1}, shifted by ±1/8 per group, with 3-bit scales per 32 or 16.
//!
//! Shared here: the grid's search state (built once, on first use, by the IQ2 family's builder
//! with ggml's nwant = 3), the level values, and ggml's exhaustive split of a sorted block.

// Index loops mirror ggml's C, so the reference reads side by side with the spec.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use crate::quant::iq2::{iq1_packed_patterns, GridSearch};

pub mod iq1_m;
pub mod iq1_s;

pub use iq1_m::IQ1_M_KERNELS;
pub use iq1_s::IQ1_S_KERNELS;

/// IQ1S_DELTA = IQ1M_DELTA: every group's levels are shifted by ±1/8.
pub(crate) const IQ1_DELTA: f32 = 0.125;
/// Level values with a + shift (ggml's x_p) and a − shift (x_m).
pub(crate) const X_P: [f32; 3] = [-1.0 + IQ1_DELTA, IQ1_DELTA, 1.0 + IQ1_DELTA];
pub(crate) const X_M: [f32; 3] = [-1.0 - IQ1_DELTA, -IQ1_DELTA, 1.0 - IQ1_DELTA];

/// The 2048-point grid's search state (ggml builds identical copies for IQ1_S and IQ1_M).
pub(crate) fn iq1_search() -> &'static GridSearch {
    static S: OnceLock<GridSearch> = OnceLock::new();
    S.get_or_init(|| GridSearch::new(&iq1_packed_patterns(), 3))
}

/// Indices of `xb` in ascending order of value, equal values in index order: ggml calls qsort,
/// which in glibc is a stable merge sort for arrays this small.
pub(crate) fn sorted_order<const N: usize>(xb: &[f32]) -> [usize; N] {
    // Sort (order-preserving integer key of the value, index): keys are distinct, so the result is
    // the stable order. Adding 0.0 turns -0.0 into +0.0, which compare equal in C.
    let mut keys: [u64; N] = std::array::from_fn(|i| {
        let bits = (xb[i] + 0.0).to_bits();
        let key = if bits >> 31 == 1 {
            !bits
        } else {
            bits | 0x8000_0000
        };
        ((key as u64) << 32) | i as u64
    });
    keys.sort_unstable();
    keys.map(|k| (k & 0xffff_ffff) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::iq2::pattern;

    #[test]
    fn grid_maps_back_to_its_index() {
        let s = iq1_search();
        assert_eq!(s.len(), 2048);
        for i in 0..s.len() {
            let levels: Vec<i8> = s.levels(i as u16).iter().map(|&l| l as i8).collect();
            assert_eq!(s.lookup(pattern(&levels)).unwrap(), i as u16);
        }
    }

    #[test]
    fn sort_is_stable() {
        let x = [
            0.5,
            -1.0,
            0.5,
            0.0,
            -0.0,
            -1.0,
            f32::MIN_POSITIVE,
            -1e-40,
            3e38,
            -3e38,
        ];
        assert_eq!(sorted_order::<10>(&x), [9, 1, 5, 7, 3, 4, 6, 0, 2, 8]);
    }
}
