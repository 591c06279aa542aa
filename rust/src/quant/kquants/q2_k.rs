//! Q2_K: 256 weights as 2-bit levels in 16 sub-blocks of 16, each with a 4-bit scale and 4-bit
//! min (scales[j] = scale | min << 4), y = d*sc*q - dmin*m.
//! Block: scales[16] | qs[64] | d (f16) | dmin (f16) = 84 bytes.

use super::{f16_le, pack_2bit, read_f16, round_f16, sum_squares, QK_K};
use crate::quant::util::{make_qkx2_quants, make_qkx3_quants, make_qp_quants, nearest_int};
use crate::quant::{cpu, kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 84;

pub struct Q2K;
pub const Q2_K_KERNELS: Kernels = kernels_of::<Q2K>();

/// Sub-block scales, mins and levels from the searches, plus the imatrix path's weight sums.
struct Fits16 {
    pub scales: [f32; 16],
    pub mins: [f32; 16],
    pub levels: [u8; QK_K],
    pub sw: [f32; 16],
}

fn fit_ref(x: &[f32]) -> Fits16 {
    let mut f = Fits16 {
        scales: [0.0; 16],
        mins: [0.0; 16],
        levels: [0; QK_K],
        sw: [0.0; 16],
    };
    let mut weights = [0f32; 16];
    let mut laux = [0u8; 16];
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let l = &mut f.levels[16 * j..16 * j + 16];
        (f.scales[j], f.mins[j]) =
            make_qkx2_quants(3, xs, &weights, l, &mut laux, -0.5, 0.1, 15, true);
    }
    f
}

fn fit_imatrix_ref(x: &[f32], qw: &[f32]) -> Fits16 {
    let mut f = Fits16 {
        scales: [0.0; 16],
        mins: [0.0; 16],
        levels: [0; QK_K],
        sw: [0.0; 16],
    };
    let sigma2 = sum_squares(&x[..QK_K]) / QK_K as f32;
    let mut weights = [0f32; 16];
    let mut laux = [0u8; 16];
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for ((w, v), q) in weights.iter_mut().zip(xs).zip(&qw[16 * j..16 * j + 16]) {
            *w = q * (sigma2 + v * v).sqrt();
        }
        for w in &weights {
            f.sw[j] += w;
        }
        let l = &mut f.levels[16 * j..16 * j + 16];
        (f.scales[j], f.mins[j]) =
            make_qkx3_quants(3, xs, Some(&weights), l, &mut laux, -0.9, 0.05, 36, false);
    }
    f
}

/// No-imatrix scale quantization: 4 bits against the largest scale and min. Returns
/// (scales[16], d, dmin) with d/dmin before f16 rounding.
fn scales_from_max(scales: &[f32; 16], mins: &[f32; 16]) -> ([u8; 16], f32, f32) {
    let q4scale = 15f32;
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..16 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let mut sc = [0u8; 16];
    let mut d = 0f32;
    let mut dmin = 0f32;
    if max_scale > 0.0 {
        let iscale = q4scale / max_scale;
        for j in 0..16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        d = max_scale / q4scale;
    }
    if max_min > 0.0 {
        let iscale = q4scale / max_min;
        for j in 0..16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        dmin = max_min / q4scale;
    }
    (sc, d, dmin)
}

fn scales_from_qp(scales: &[f32; 16], mins: &[f32; 16], sw: &[f32; 16]) -> ([u8; 16], f32, f32) {
    let mut ls = [0u8; 16];
    let mut lm = [0u8; 16];
    let dm = make_qp_quants(15, scales, &mut ls, sw);
    let mm = make_qp_quants(15, mins, &mut lm, sw);
    let mut sc = [0u8; 16];
    for j in 0..16 {
        sc[j] = ls[j] | (lm[j] << 4);
    }
    (sc, dm, mm)
}

fn requantize_ref(x: &[f32], sc: &[u8; 16], d: f32, dmin: f32, levels: &mut [u8; QK_K]) {
    for j in 0..16 {
        let dj = d * (sc[j] & 0xF) as f32;
        if dj == 0.0 {
            continue;
        }
        let m = dmin * (sc[j] >> 4) as f32;
        for i in 16 * j..16 * j + 16 {
            levels[i] = nearest_int((x[i] + m) / dj).clamp(0, 3) as u8;
        }
    }
}

fn pack_block(y: &mut [u8], sc: &[u8; 16], d: f32, dmin: f32, levels: &[u8; QK_K]) {
    y[..16].copy_from_slice(sc);
    pack_2bit(levels, &mut y[16..80]);
    y[80..82].copy_from_slice(&f16_le(d));
    y[82..84].copy_from_slice(&f16_le(dmin));
}

impl BlockQuant for Q2K {
    const TYPE: GgmlType = GgmlType::Q2_K;

    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        for (b, (x, y)) in src
            .chunks_exact(QK_K)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
            .enumerate()
        {
            let (f, (sc, d, dmin)) = match imatrix {
                None => {
                    let f = fit_ref(x);
                    let s = scales_from_max(&f.scales, &f.mins);
                    (f, s)
                }
                Some(w) => {
                    let f = fit_imatrix_ref(x, &w[QK_K * b..QK_K * (b + 1)]);
                    let s = scales_from_qp(&f.scales, &f.mins, &f.sw);
                    (f, s)
                }
            };
            let mut levels = f.levels;
            requantize_ref(x, &sc, round_f16(d), round_f16(dmin), &mut levels);
            pack_block(y, &sc, d, dmin, &levels);
        }
    }

    fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        if cpu::has_avx2() {
            // SAFETY: AVX2 is present (checked at run time).
            unsafe { avx2::quantize_row(src, dst, imatrix) }
        } else {
            Self::quantize_row_ref(src, dst, imatrix)
        }
    }

    fn dequantize_row_ref(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = read_f16(&x[80..82]);
            let min = read_f16(&x[82..84]);
            for h in 0..2 {
                let q = &x[16 + 32 * h..48 + 32 * h];
                for s in 0..4 {
                    for half in 0..2 {
                        let sc = x[8 * h + 2 * s + half];
                        let (dl, ml) = (d * (sc & 0xF) as f32, min * (sc >> 4) as f32);
                        let out = &mut y[128 * h + 32 * s + 16 * half..][..16];
                        for l in 0..16 {
                            out[l] = dl * ((q[16 * half + l] >> (2 * s)) & 3) as f32 - ml;
                        }
                    }
                }
            }
        }
    }

    fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        if cpu::has_avx2() {
            // SAFETY: AVX2 is present (checked at run time).
            unsafe { avx2::dequantize_row(src, dst) }
        } else {
            Self::dequantize_row_ref(src, dst)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::quant::kquants::lanes;

    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        for (b, (x, y)) in src
            .chunks_exact(QK_K)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
            .enumerate()
        {
            let qw = imatrix.map(|w| &w[QK_K * b..QK_K * (b + 1)]);
            let f = lanes::fit_q2k(x, qw);
            let (sc, d, dmin) = match qw {
                None => scales_from_max(&f.scales, &f.mins),
                Some(_) => scales_from_qp(&f.scales, &f.mins, &f.sw),
            };
            let (d16, m16) = (round_f16(d), round_f16(dmin));
            let dm: [(f32, f32); 16] =
                std::array::from_fn(|j| (d16 * (sc[j] & 0xF) as f32, m16 * (sc[j] >> 4) as f32));
            let mut levels = [0u8; QK_K];
            lanes::levels_16(x, &f.levels, &dm, 0, 3, &mut levels);
            y[..16].copy_from_slice(&sc);
            lanes::pack_q2(&levels, &mut y[16..80]);
            y[80..82].copy_from_slice(&f16_le(d));
            y[82..84].copy_from_slice(&f16_le(dmin));
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        let three = _mm256_set1_epi32(3);
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = read_f16(&x[80..82]);
            let min = read_f16(&x[82..84]);
            for h in 0..2 {
                let q = x.as_ptr().add(16 + 32 * h);
                for s in 0..4 {
                    let shift = _mm_cvtsi32_si128(2 * s as i32);
                    for half in 0..2 {
                        let sc = x[8 * h + 2 * s + half];
                        let dl = _mm256_set1_ps(d * (sc & 0xF) as f32);
                        let ml = _mm256_set1_ps(min * (sc >> 4) as f32);
                        let out = y.as_mut_ptr().add(128 * h + 32 * s + 16 * half);
                        for g in 0..2 {
                            let p = q.add(16 * half + 8 * g) as *const __m128i;
                            let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p));
                            let v = _mm256_cvtepi32_ps(_mm256_and_si256(
                                _mm256_srl_epi32(b, shift),
                                three,
                            ));
                            _mm256_storeu_ps(
                                out.add(8 * g),
                                _mm256_sub_ps(_mm256_mul_ps(dl, v), ml),
                            );
                        }
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        <super::Q2K as super::BlockQuant>::quantize_row_ref(src, dst, imatrix)
    }
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        <super::Q2K as super::BlockQuant>::dequantize_row_ref(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::kquants::test_support::{fast_matches_reference, rmse_within};

    #[test]
    fn fast_matches_ref() {
        fast_matches_reference(&Q2_K_KERNELS, true);
    }

    #[test]
    fn round_trip_error() {
        rmse_within(&Q2_K_KERNELS, 0.45);
    }
}
