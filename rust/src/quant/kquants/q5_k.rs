//! Q5_K: as Q4_K with 5-bit levels: the low nibbles in qs as Q4_K, the fifth bits in qh (bit 2h
//! of qh[l] for element l of 64-span h, bit 2h+1 for element l+32).
//! Block: d (f16) | dmin (f16) | scales[12] | qh[32] | qs[128] = 176 bytes.

use super::q4_k::{fit_imatrix_ref, fit_ref, requantize_ref, scales_from_max, scales_from_qp};
use super::{f16_le, get_scale_min_k4, read_f16, round_f16, QK_K};
use crate::quant::{cpu, kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 176;

pub struct Q5K;
pub const Q5_K_KERNELS: Kernels = kernels_of::<Q5K>();

fn pack_block(y: &mut [u8], scales: &[u8; 12], d: f32, dmin: f32, levels: &[u8; QK_K]) {
    y[0..2].copy_from_slice(&f16_le(d));
    y[2..4].copy_from_slice(&f16_le(dmin));
    y[4..16].copy_from_slice(scales);
    let (qh, ql) = y[16..].split_at_mut(32);
    qh.fill(0);
    for h in 0..4 {
        let l = &levels[64 * h..64 * h + 64];
        let q = &mut ql[32 * h..32 * h + 32];
        for i in 0..32 {
            let (l1, l2) = (l[i], l[i + 32]);
            qh[i] |= ((l1 >> 4) << (2 * h)) | ((l2 >> 4) << (2 * h + 1));
            q[i] = (l1 & 0xF) | ((l2 & 0xF) << 4);
        }
    }
}

impl BlockQuant for Q5K {
    const TYPE: GgmlType = GgmlType::Q5_K;

    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        for (b, (x, y)) in src
            .chunks_exact(QK_K)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
            .enumerate()
        {
            let (f, (scales, d, dmin)) = match imatrix {
                None => {
                    let f = fit_ref(x, 31, -0.5, 0.1, 15);
                    let s = scales_from_max(&f.scales, &f.mins);
                    (f, s)
                }
                Some(w) => {
                    let (f, sw) = fit_imatrix_ref(x, &w[QK_K * b..QK_K * (b + 1)], 31);
                    let s = scales_from_qp(&f.scales, &f.mins, &sw, true);
                    (f, s)
                }
            };
            let mut levels = f.levels;
            requantize_ref(x, &scales, round_f16(d), round_f16(dmin), 31, &mut levels);
            pack_block(y, &scales, d, dmin, &levels);
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
            let d = read_f16(&x[0..2]);
            let min = read_f16(&x[2..4]);
            let scales = &x[4..16];
            let qh = &x[16..48];
            for h in 0..4 {
                let ql = &x[48 + 32 * h..80 + 32 * h];
                let (sc1, m1) = get_scale_min_k4(2 * h, scales);
                let (sc2, m2) = get_scale_min_k4(2 * h + 1, scales);
                let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                let (u1, u2) = (1u8 << (2 * h), 2u8 << (2 * h));
                let out = &mut y[64 * h..64 * h + 64];
                for l in 0..32 {
                    let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                    let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                    out[l] = d1 * ((ql[l] & 0xF) + h1) as f32 - m1;
                    out[l + 32] = d2 * ((ql[l] >> 4) + h2) as f32 - m2;
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
    use crate::quant::kquants::q4_k::avx2::{quantize_row_k45, K45};

    #[target_feature(enable = "avx2")]
    unsafe fn pack(levels: &[u8; QK_K], q: &mut [u8]) {
        let (qh, qs) = q.split_at_mut(32);
        lanes::pack_q5(levels, qh, qs)
    }

    const Q5: K45 = K45 {
        nmax: 31,
        search: (-0.5, 0.1, 15),
        clamp63: true,
        block_bytes: BLOCK_BYTES,
        pack,
    };

    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row_k45(src, dst, imatrix, &Q5)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = read_f16(&x[0..2]);
            let min = read_f16(&x[2..4]);
            let scales = &x[4..16];
            let mask = _mm256_set1_epi32(0xF);
            for h in 0..4 {
                let ql = x.as_ptr().add(48 + 32 * h);
                let qh = x.as_ptr().add(16);
                let (sc1, m1) = get_scale_min_k4(2 * h, scales);
                let (sc2, m2) = get_scale_min_k4(2 * h + 1, scales);
                let d1 = _mm256_set1_ps(d * sc1 as f32);
                let m1 = _mm256_set1_ps(min * m1 as f32);
                let d2 = _mm256_set1_ps(d * sc2 as f32);
                let m2 = _mm256_set1_ps(min * m2 as f32);
                let out = y.as_mut_ptr().add(64 * h);
                let bit16 = _mm256_set1_epi32(16);
                for g in 0..4 {
                    let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(ql.add(8 * g) as *const __m128i));
                    let hb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qh.add(8 * g) as *const __m128i));
                    // Fifth bits of element l (bit 2h) and l+32 (bit 2h+1), moved to value 16.
                    let h1 = _mm256_and_si256(
                        _mm256_slli_epi32(_mm256_srl_epi32(hb, _mm_cvtsi32_si128(2 * h as i32)), 4),
                        bit16,
                    );
                    let h2 = _mm256_and_si256(
                        _mm256_slli_epi32(
                            _mm256_srl_epi32(hb, _mm_cvtsi32_si128(2 * h as i32 + 1)),
                            4,
                        ),
                        bit16,
                    );
                    let lo = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_and_si256(b, mask), h1));
                    let hi = _mm256_cvtepi32_ps(_mm256_or_si256(_mm256_srli_epi32(b, 4), h2));
                    _mm256_storeu_ps(out.add(8 * g), _mm256_sub_ps(_mm256_mul_ps(d1, lo), m1));
                    _mm256_storeu_ps(
                        out.add(32 + 8 * g),
                        _mm256_sub_ps(_mm256_mul_ps(d2, hi), m2),
                    );
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        <super::Q5K as super::BlockQuant>::quantize_row_ref(src, dst, imatrix)
    }
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        <super::Q5K as super::BlockQuant>::dequantize_row_ref(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::kquants::test_support::{fast_matches_reference, rmse_within};

    #[test]
    fn fast_matches_ref() {
        fast_matches_reference(&Q5_K_KERNELS, true);
    }

    #[test]
    fn round_trip_error() {
        rmse_within(&Q5_K_KERNELS, 0.07);
    }
}
