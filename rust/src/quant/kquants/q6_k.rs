//! Q6_K: 256 weights as 6-bit signed levels (-32..31) in 16 sub-blocks of 16 with int8 scales,
//! y = d*sc*q. For each 128-element half: ql[l] holds the low nibbles of elements l (low) and
//! l+64 (high), ql[l+32] those of l+32 and l+96, qh[l] the top two bits of l, l+32, l+64, l+96.
//! Block: ql[128] | qh[64] | scales[16] (i8) | d (f16) = 210 bytes.

use super::{f16_le, read_f16, round_f16, QK_K};
use crate::quant::util::{make_qx_quants, nearest_int, GROUP_MAX_EPS};
use crate::quant::{cpu, kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 210;

pub struct Q6K;
pub const Q6_K_KERNELS: Kernels = kernels_of::<Q6K>();

/// The sub-block search of both ggml paths: make_qx_quants(nmax 32, rmse_type 1), weighted by
/// the raw importance weights when given (Q6_K does not scale them by sigma).
fn fit_ref(x: &[f32], qw: Option<&[f32]>, scales: &mut [f32; 16], levels: &mut [i8; QK_K]) {
    for j in 0..16 {
        let w = qw.map(|w| &w[16 * j..16 * j + 16]);
        scales[j] = make_qx_quants(
            32,
            &x[16 * j..16 * j + 16],
            &mut levels[16 * j..16 * j + 16],
            1,
            w,
        );
    }
}

/// Block scale and int8 sub-block scales; None when the block is (numerically) all zero.
fn quantize_scales(scales: &[f32; 16]) -> Option<(f32, [i8; 16])> {
    let mut max_scale = 0f32;
    let mut max_abs_scale = 0f32;
    for &s in scales {
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        return None;
    }
    let iscale = -128.0 / max_scale;
    let sc: [i8; 16] = std::array::from_fn(|j| nearest_int(iscale * scales[j]).min(127) as i8);
    Some((1.0 / iscale, sc))
}

fn requantize_ref(x: &[f32], d: f32, sc: &[i8; 16], levels: &mut [i8; QK_K]) {
    for j in 0..16 {
        let dj = d * sc[j] as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / dj).clamp(-32, 31) + 32) as i8;
        }
    }
}

fn pack_block(y: &mut [u8], d: f32, sc: &[i8; 16], levels: &[i8; QK_K]) {
    let (ql, rest) = y.split_at_mut(128);
    let (qh, rest) = rest.split_at_mut(64);
    for h in 0..2 {
        let l = &levels[128 * h..128 * h + 128];
        let ql = &mut ql[64 * h..64 * h + 64];
        let qh = &mut qh[32 * h..32 * h + 32];
        for i in 0..32 {
            let (a, b, c, e) = (
                l[i] as u8,
                l[i + 32] as u8,
                l[i + 64] as u8,
                l[i + 96] as u8,
            );
            ql[i] = (a & 0xF) | ((c & 0xF) << 4);
            ql[i + 32] = (b & 0xF) | ((e & 0xF) << 4);
            qh[i] = (a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6);
        }
    }
    for (o, s) in rest[..16].iter_mut().zip(sc) {
        *o = *s as u8;
    }
    rest[16..18].copy_from_slice(&f16_le(d));
}

impl BlockQuant for Q6K {
    const TYPE: GgmlType = GgmlType::Q6_K;

    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        for (b, (x, y)) in src
            .chunks_exact(QK_K)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
            .enumerate()
        {
            let mut levels = [0i8; QK_K];
            let mut scales = [0f32; 16];
            fit_ref(
                x,
                imatrix.map(|w| &w[QK_K * b..QK_K * (b + 1)]),
                &mut scales,
                &mut levels,
            );
            match quantize_scales(&scales) {
                None => y.fill(0),
                Some((d, sc)) => {
                    requantize_ref(x, round_f16(d), &sc, &mut levels);
                    pack_block(y, d, &sc, &levels);
                }
            }
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
            let d = read_f16(&x[208..210]);
            for h in 0..2 {
                let ql = &x[64 * h..64 * h + 64];
                let qh = &x[128 + 32 * h..160 + 32 * h];
                let sc = &x[192 + 8 * h..200 + 8 * h];
                let out = &mut y[128 * h..128 * h + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    out[l] = d * sc[is] as i8 as f32 * q1 as f32;
                    out[l + 32] = d * sc[is + 2] as i8 as f32 * q2 as f32;
                    out[l + 64] = d * sc[is + 4] as i8 as f32 * q3 as f32;
                    out[l + 96] = d * sc[is + 6] as i8 as f32 * q4 as f32;
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
            let f = lanes::fit_q6k(x, imatrix.map(|w| &w[QK_K * b..QK_K * (b + 1)]));
            let Some((d, sc)) = quantize_scales(&f.scales) else {
                y.fill(0);
                continue;
            };
            let d16 = round_f16(d);
            let dm: [(f32, f32); 16] = std::array::from_fn(|j| (d16 * sc[j] as f32, 0.0));
            let mut levels = [0u8; QK_K];
            lanes::levels_16(x, &f.levels, &dm, -32, 31, &mut levels);
            let (ql, rest) = y.split_at_mut(128);
            let (qh, rest) = rest.split_at_mut(64);
            lanes::pack_q6(&levels, ql, qh);
            for (o, s) in rest[..16].iter_mut().zip(&sc) {
                *o = *s as u8;
            }
            rest[16..18].copy_from_slice(&f16_le(d));
        }
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        let low = _mm256_set1_epi32(0xF);
        let three = _mm256_set1_epi32(3);
        let off = _mm256_set1_epi32(32);
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let d = read_f16(&x[208..210]);
            for h in 0..2 {
                let ql = x.as_ptr().add(64 * h);
                let qh = x.as_ptr().add(128 + 32 * h);
                let sc = &x[192 + 8 * h..200 + 8 * h];
                let out = y.as_mut_ptr().add(128 * h);
                for g in 0..4 {
                    let is = g / 2;
                    let l = 8 * g;
                    let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(ql.add(l) as *const __m128i));
                    let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(ql.add(l + 32) as *const __m128i));
                    let hb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(qh.add(l) as *const __m128i));
                    let h0 = _mm256_slli_epi32(_mm256_and_si256(hb, three), 4);
                    let h2 =
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 2), three), 4);
                    let h4 =
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 4), three), 4);
                    let h6 =
                        _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 6), three), 4);
                    let q1 = _mm256_sub_epi32(_mm256_or_si256(_mm256_and_si256(a, low), h0), off);
                    let q2 = _mm256_sub_epi32(_mm256_or_si256(_mm256_and_si256(b, low), h2), off);
                    let q3 = _mm256_sub_epi32(_mm256_or_si256(_mm256_srli_epi32(a, 4), h4), off);
                    let q4 = _mm256_sub_epi32(_mm256_or_si256(_mm256_srli_epi32(b, 4), h6), off);
                    // (d * sc) * q, as the reference evaluates it.
                    let ds = |k: usize| d * sc[is + 2 * k] as i8 as f32;
                    let (d0, d1, d2, d3) = (ds(0), ds(1), ds(2), ds(3));
                    _mm256_storeu_ps(
                        out.add(l),
                        _mm256_mul_ps(_mm256_set1_ps(d0), _mm256_cvtepi32_ps(q1)),
                    );
                    _mm256_storeu_ps(
                        out.add(l + 32),
                        _mm256_mul_ps(_mm256_set1_ps(d1), _mm256_cvtepi32_ps(q2)),
                    );
                    _mm256_storeu_ps(
                        out.add(l + 64),
                        _mm256_mul_ps(_mm256_set1_ps(d2), _mm256_cvtepi32_ps(q3)),
                    );
                    _mm256_storeu_ps(
                        out.add(l + 96),
                        _mm256_mul_ps(_mm256_set1_ps(d3), _mm256_cvtepi32_ps(q4)),
                    );
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod avx2 {
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        <super::Q6K as super::BlockQuant>::quantize_row_ref(src, dst, imatrix)
    }
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        <super::Q6K as super::BlockQuant>::dequantize_row_ref(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::kquants::test_support::{fast_matches_reference, rmse_within};

    #[test]
    fn fast_matches_ref() {
        fast_matches_reference(&Q6_K_KERNELS, true);
    }

    #[test]
    fn round_trip_error() {
        rmse_within(&Q6_K_KERNELS, 0.035);
    }
}
