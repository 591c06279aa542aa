//! The 2-bit i-quants IQ2_XXS, IQ2_XS and IQ2_S: groups of 8 magnitudes snapped to a point of a
//! 256/512/1024-point grid of levels {8, 25, 43}, with sign bits and 4-bit scales per 16 or 32.
//!
//! Shared here: each grid's search state (built once, on first use), ggml's small numeric helpers,
//! and the packing of level patterns. The grid points come from `iq_tables.rs` (from gguf-py).

// Index loops mirror ggml's C, so the reference reads side by side with the spec.
#![allow(clippy::needless_range_loop)]

use std::sync::OnceLock;

use half::f16;

use crate::quant::iq_tables::{IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID};

pub(crate) mod grid;
pub mod iq2_s;
pub mod iq2_xs;
pub mod iq2_xxs;
pub(crate) mod trials;

pub use iq2_s::IQ2_S_KERNELS;
pub use iq2_xs::IQ2_XS_KERNELS;
pub use iq2_xxs::IQ2_XXS_KERNELS;

pub(crate) use grid::{GridSearch, OffGrid};

/// Level values of the IQ2 grids as the neighbour search sees them: ggml's odd coordinates 2l+1.
pub(crate) const IQ2_SEARCH_VALUES: [f32; 3] = [1.0, 3.0, 5.0];

/// ggml's nearest_int: adding 1.5·2^23 makes the FPU round half to even; the mantissa then holds
/// the integer (garbage, but the same garbage as ggml's, far outside ±2^22).
#[inline(always)]
pub(crate) fn nearest_int(v: f32) -> i32 {
    ((v + 12582912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

#[inline(always)]
pub(crate) fn f16_bits(v: f32) -> u16 {
    f16::from_f32(v).to_bits()
}

#[inline(always)]
pub(crate) fn f16_value(lo: u8, hi: u8) -> f32 {
    f16::from_bits(u16::from_le_bytes([lo, hi])).to_f32()
}

/// ggml's MAX macro: `a > b ? a : b` (keeps `b` when comparing with NaN, unlike f32::max).
#[inline(always)]
pub(crate) fn c_max(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// Packs 8 levels (0..=2) into ggml's 16-bit pattern: level k in bits 2k..2k+1.
#[inline(always)]
pub(crate) fn pattern(levels: &[i8]) -> u16 {
    levels
        .iter()
        .enumerate()
        .fold(0u16, |u, (k, &l)| u | ((l as u16) << (2 * k)))
}

/// ggml's kgrid for a dequantization grid: each point as its packed pattern of levels.
fn packed_patterns(grid: &[u64], level_of_byte: impl Fn(u8) -> u16) -> Vec<u16> {
    grid.iter()
        .map(|&p| {
            (0..8).fold(0u16, |u, k| {
                u | (level_of_byte((p >> (8 * k)) as u8) << (2 * k))
            })
        })
        .collect()
}

fn iq2_level(b: u8) -> u16 {
    match b {
        0x08 => 0,
        0x19 => 1,
        0x2b => 2,
        _ => unreachable!("IQ2 grid byte {b:#x}"),
    }
}

/// IQ2_XXS's 256-point grid; nwant = 2 as in ggml's iq2xs_init_impl.
pub(crate) fn iq2xxs_search() -> &'static GridSearch {
    static S: OnceLock<GridSearch> = OnceLock::new();
    S.get_or_init(|| GridSearch::new(&packed_patterns(&IQ2XXS_GRID, iq2_level), 2))
}

/// IQ2_XS's 512-point grid; nwant = 2.
pub(crate) fn iq2xs_search() -> &'static GridSearch {
    static S: OnceLock<GridSearch> = OnceLock::new();
    S.get_or_init(|| GridSearch::new(&packed_patterns(&IQ2XS_GRID, iq2_level), 2))
}

/// IQ2_S's 1024-point grid; nwant = 1.
pub(crate) fn iq2s_search() -> &'static GridSearch {
    static S: OnceLock<GridSearch> = OnceLock::new();
    S.get_or_init(|| GridSearch::new(&packed_patterns(&IQ2S_GRID, iq2_level), 1))
}

/// The IQ1 grid (2048 points of levels {-1, 0, 1}), shared by IQ1_S and IQ1_M; nwant = 3.
pub(crate) fn iq1_packed_patterns() -> Vec<u16> {
    packed_patterns(&IQ1S_GRID, |b| match b as i8 {
        -1 => 0,
        0 => 1,
        1 => 2,
        _ => unreachable!("IQ1 grid byte {b:#x}"),
    })
}

/// Sign handling shared by IQ2_XXS and IQ2_XS: magnitudes into `xval`, sign bits as returned
/// (7 bits); an odd number of negatives flips the least important element (its sign is implied).
pub(crate) fn even_signs(xb: &[f32], weight: &[f32], xval: &mut [f32]) -> u8 {
    let mut nflip = 0;
    let mut s = 0u8;
    for i in 0..8 {
        if xb[i] >= 0.0 {
            xval[i] = xb[i];
        } else {
            xval[i] = -xb[i];
            nflip += 1;
            s |= 1 << i;
        }
    }
    if nflip % 2 == 1 {
        let mut imin = 0;
        let mut min = weight[0] * xb[0] * xb[0];
        for i in 1..8 {
            let ax = weight[i] * xb[i] * xb[i];
            if ax < min {
                min = ax;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        s ^= 1 << imin;
    }
    s & 127
}

/// AVX2 helpers for the i-quant dequantizers.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2_util {
    use std::arch::x86_64::*;

    /// The 8 unsigned bytes of a grid entry as f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn grid_row(g: u64) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(g as i64)))
    }

    /// The 8 signed bytes of a grid entry as f32.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn grid_row_signed(g: u64) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(g as i64)))
    }

    /// Negates lane j where bit j of `signs` is set (exact, like multiplying by -1).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn apply_signs(v: __m256, signs: u8) -> __m256 {
        let bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
        let set = _mm256_cmpeq_epi32(
            _mm256_and_si256(_mm256_set1_epi32(signs as i32), bits),
            bits,
        );
        let flip = _mm256_and_si256(set, _mm256_set1_epi32(i32::MIN));
        _mm256_xor_ps(v, _mm256_castsi256_ps(flip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!(
            [0.5, 1.5, 2.5, -0.5, -1.5, 2.4999].map(nearest_int),
            [0, 2, 2, 0, -2, 2]
        );
    }

    #[test]
    fn grids_map_back_to_their_index() {
        for s in [iq2xxs_search(), iq2xs_search(), iq2s_search()] {
            for i in 0..s.len() {
                let levels: Vec<i8> = s.levels(i as u16).iter().map(|&l| l as i8).collect();
                assert_eq!(s.lookup(pattern(&levels)).unwrap(), i as u16);
            }
        }
    }
}
