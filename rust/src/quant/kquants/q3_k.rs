//! Q3_K: 256 weights as 3-bit signed levels (-4..3) in 16 sub-blocks of 16 with 6-bit signed
//! scales, y = d*(sc-32)*q. The low two bits of each level are packed as Q2_K's, the high bit
//! in hmask (bit h of hmask[m] for element 32h+m). The 16 six-bit scales take 12 bytes: low
//! nibbles in bytes 0..8 (j < 8 low, j >= 8 high nibble of byte j-8), top two bits in bytes 8..12.
//! Block: hmask[32] | qs[64] | scales[12] | d (f16) = 110 bytes.

use super::{f16_le, pack_2bit, read_f16, round_f16, sum_squares, QK_K};
use crate::quant::util::{make_q3_quants, make_qx_quants, nearest_int};
use crate::quant::{cpu, kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 110;

pub struct Q3K;
pub const Q3_K_KERNELS: Kernels = kernels_of::<Q3K>();

/// Packs 16 six-bit values (0..64) into Q3_K's 12 scale bytes.
pub fn pack_scales(l: &[u8; 16]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..16 {
        if j < 8 {
            s[j] = l[j] & 0xF;
        } else {
            s[j - 8] |= (l[j] & 0xF) << 4;
        }
        s[j % 4 + 8] |= (l[j] >> 4) << (2 * (j / 4));
    }
    s
}

/// The signed scale of sub-block `j` (value - 32), as ggml's quantizer re-reads it.
#[inline(always)]
pub fn scale_at(s: &[u8], j: usize) -> i32 {
    let lo = if j < 8 { s[j] & 0xF } else { s[j - 8] >> 4 };
    (lo | (((s[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)) as i32 - 32
}

/// The search of quantize_row_q3_K_ref: make_q3_quants per sub-block. Levels are offset by +4.
fn fit_ref(x: &[f32], scales: &mut [f32; 16], levels: &mut [i8; QK_K]) {
    for j in 0..16 {
        scales[j] = make_q3_quants(
            4,
            &x[16 * j..16 * j + 16],
            &mut levels[16 * j..16 * j + 16],
            true,
        );
    }
}

/// No-imatrix scale quantization against the scale of largest magnitude (signed).
fn scales_from_max(scales: &[f32; 16]) -> ([u8; 12], f32) {
    let mut max_scale = 0f32;
    let mut amax = 0f32;
    for &s in scales {
        if s.abs() > amax {
            amax = s.abs();
            max_scale = s;
        }
    }
    if max_scale == 0.0 {
        return ([0; 12], 0.0);
    }
    let iscale = -32.0 / max_scale;
    let mut l = [0u8; 16];
    for j in 0..16 {
        // C stores nearest_int into an int8_t before clamping.
        let q = nearest_int(iscale * scales[j]) as i8 as i32;
        l[j] = (q.clamp(-32, 31) + 32) as u8;
    }
    (pack_scales(&l), 1.0 / iscale)
}

/// The imatrix path's sub-block search: weights qw*sqrt(2σ² + x²), make_qx_quants; the scales
/// are then themselves fitted by make_qx_quants weighted by the sub-block weight sums.
fn fit_imatrix_ref(x: &[f32], qw: &[f32], levels: &mut [i8; QK_K]) -> ([u8; 12], f32) {
    let sigma2 = 2.0 * sum_squares(&x[..QK_K]) / QK_K as f32;
    let mut scales = [0f32; 16];
    let mut sw = [0f32; 16];
    let mut weight = [0f32; 16];
    for j in 0..16 {
        let xs = &x[16 * j..16 * j + 16];
        for ((w, v), q) in weight.iter_mut().zip(xs).zip(&qw[16 * j..16 * j + 16]) {
            *w = q * (sigma2 + v * v).sqrt();
        }
        let mut sumw = 0f32;
        for w in &weight {
            sumw += w;
        }
        sw[j] = sumw;
        scales[j] = make_qx_quants(4, xs, &mut levels[16 * j..16 * j + 16], 1, Some(&weight));
    }
    scales_from_fit(&scales, &sw)
}

pub(crate) fn scales_from_fit(scales: &[f32; 16], sw: &[f32; 16]) -> ([u8; 12], f32) {
    let mut ls = [0i8; 16];
    let d_block = make_qx_quants(32, scales, &mut ls, 1, Some(sw));
    let l: [u8; 16] = std::array::from_fn(|j| ls[j] as u8);
    (pack_scales(&l), d_block)
}

fn requantize_ref(x: &[f32], s: &[u8; 12], d: f32, levels: &mut [i8; QK_K]) {
    for j in 0..16 {
        let dj = d * scale_at(s, j) as f32;
        if dj == 0.0 {
            continue;
        }
        for i in 16 * j..16 * j + 16 {
            levels[i] = (nearest_int(x[i] / dj).clamp(-4, 3) + 4) as i8;
        }
    }
}

fn pack_block(y: &mut [u8], scales: &[u8; 12], d: f32, levels: &[i8; QK_K]) {
    let (hmask, rest) = y.split_at_mut(32);
    hmask.fill(0);
    let mut low = [0u8; QK_K];
    for (j, (&l, lo)) in levels.iter().zip(low.iter_mut()).enumerate() {
        let l = l as u8;
        if l > 3 {
            hmask[j % 32] |= 1 << (j / 32);
        }
        *lo = l & 3;
    }
    pack_2bit(&low, &mut rest[..64]);
    rest[64..76].copy_from_slice(scales);
    rest[76..78].copy_from_slice(&f16_le(d));
}

impl BlockQuant for Q3K {
    const TYPE: GgmlType = GgmlType::Q3_K;

    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        for (b, (x, y)) in src
            .chunks_exact(QK_K)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
            .enumerate()
        {
            let mut levels = [0i8; QK_K];
            let (scales, d) = match imatrix {
                None => {
                    let mut fs = [0f32; 16];
                    fit_ref(x, &mut fs, &mut levels);
                    scales_from_max(&fs)
                }
                Some(w) => fit_imatrix_ref(x, &w[QK_K * b..QK_K * (b + 1)], &mut levels),
            };
            requantize_ref(x, &scales, round_f16(d), &mut levels);
            pack_block(y, &scales, d, &levels);
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
            let hm = &x[..32];
            let s = &x[96..108];
            let d_all = read_f16(&x[108..110]);
            for h in 0..2 {
                let q = &x[32 + 32 * h..64 + 32 * h];
                for sh in 0..4 {
                    let m = 1u8 << (4 * h + sh);
                    for half in 0..2 {
                        let dl = d_all * scale_at(s, 8 * h + 2 * sh + half) as f32;
                        let out = &mut y[128 * h + 32 * sh + 16 * half..][..16];
                        for l in 0..16 {
                            let k = 16 * half + l;
                            let lo = ((q[k] >> (2 * sh)) & 3) as i32;
                            let v = lo - if hm[k] & m != 0 { 0 } else { 4 };
                            out[l] = dl * v as f32;
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
        let nb = src.len() / QK_K;
        let mut b = 0;
        while b < nb {
            let x = &src[QK_K * b..QK_K * (b + 1)];
            let y = &mut dst[BLOCK_BYTES * b..BLOCK_BYTES * (b + 1)];
            match imatrix {
                None if b + 1 < nb => {
                    let (l, fs) = lanes::fit_q3k_pair(&src[QK_K * b..QK_K * (b + 2)]);
                    for k in 0..2 {
                        let x = &src[QK_K * (b + k)..QK_K * (b + k + 1)];
                        let y = &mut dst[BLOCK_BYTES * (b + k)..BLOCK_BYTES * (b + k + 1)];
                        let fs: &[f32; 16] = fs[16 * k..16 * k + 16].try_into().unwrap();
                        let (scales, d) = scales_from_max(fs);
                        finish_block(x, y, &l[2 * k..2 * k + 2], scales, d);
                    }
                    b += 2;
                    continue;
                }
                None => {
                    let f = lanes::fit_q3k(x, None);
                    let (scales, d) = scales_from_max(&f.scales);
                    finish_block(x, y, &f.levels, scales, d);
                }
                Some(w) => {
                    let f = lanes::fit_q3k(x, Some(&w[QK_K * b..QK_K * (b + 1)]));
                    let mut ls = [0i8; 16];
                    let d = lanes::qx_quants_weighted(32, &f.scales, &mut ls, &f.sw);
                    let scales = pack_scales(&ls.map(|v| v as u8));
                    finish_block(x, y, &f.levels, scales, d);
                }
            }
            b += 1;
        }
    }

    /// Final levels against the stored scales, then packing.
    #[target_feature(enable = "avx2")]
    unsafe fn finish_block(
        x: &[f32],
        y: &mut [u8],
        fit: &[[__m256; 16]],
        scales: [u8; 12],
        d: f32,
    ) {
        let d16 = round_f16(d);
        let dm: [(f32, f32); 16] =
            std::array::from_fn(|j| (d16 * scale_at(&scales, j) as f32, 0.0));
        let mut levels = [0u8; QK_K];
        lanes::levels_16(x, fit, &dm, -4, 3, &mut levels);
        let (hmask, rest) = y.split_at_mut(32);
        lanes::pack_q3(&levels, hmask, &mut rest[..64]);
        rest[64..76].copy_from_slice(&scales);
        rest[76..78].copy_from_slice(&f16_le(d));
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        let three = _mm256_set1_epi32(3);
        let four = _mm256_set1_epi32(4);
        let zero = _mm256_setzero_si256();
        for (x, y) in src
            .chunks_exact(BLOCK_BYTES)
            .zip(dst.chunks_exact_mut(QK_K))
        {
            let s = &x[96..108];
            let d_all = read_f16(&x[108..110]);
            for h in 0..2 {
                let q = x.as_ptr().add(32 + 32 * h);
                for sh in 0..4 {
                    let shift = _mm_cvtsi32_si128(2 * sh as i32);
                    let m = _mm256_set1_epi32(1 << (4 * h + sh));
                    for half in 0..2 {
                        let dl = _mm256_set1_ps(d_all * scale_at(s, 8 * h + 2 * sh + half) as f32);
                        let out = y.as_mut_ptr().add(128 * h + 32 * sh + 16 * half);
                        for g in 0..2 {
                            let k = 16 * half + 8 * g;
                            let b =
                                _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(k) as *const __m128i));
                            let hb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                x.as_ptr().add(k) as *const __m128i
                            ));
                            let lo = _mm256_and_si256(_mm256_srl_epi32(b, shift), three);
                            // Subtract 4 where the high bit is clear.
                            let clear = _mm256_cmpeq_epi32(_mm256_and_si256(hb, m), zero);
                            let v = _mm256_sub_epi32(lo, _mm256_and_si256(clear, four));
                            _mm256_storeu_ps(
                                out.add(8 * g),
                                _mm256_mul_ps(dl, _mm256_cvtepi32_ps(v)),
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
        <super::Q3K as super::BlockQuant>::quantize_row_ref(src, dst, imatrix)
    }
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        <super::Q3K as super::BlockQuant>::dequantize_row_ref(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::kquants::test_support::{fast_matches_reference, rmse_within};

    #[test]
    fn fast_matches_ref() {
        fast_matches_reference(&Q3_K_KERNELS, true);
    }

    #[test]
    fn round_trip_error() {
        rmse_within(&Q3_K_KERNELS, 0.27);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn lane_qx_quants_equals_scalar() {
        if !cpu::has_avx2() {
            return;
        }
        use crate::quant::testdata::{gaussian, importance};
        for seed in 0..200u64 {
            let mut x = gaussian(seed, 16);
            if seed % 3 == 0 {
                x.iter_mut().for_each(|v| *v = v.abs()); // scales are mostly one sign
            }
            if seed % 7 == 0 {
                x[(seed % 16) as usize] = 0.0;
            }
            let mut w = importance(seed + 1000, 16);
            if seed % 5 == 0 {
                w[3] = 0.0;
            }
            let (mut a, mut b) = ([0i8; 16], [0i8; 16]);
            let sa = make_qx_quants(32, &x, &mut a, 1, Some(&w));
            // SAFETY: AVX2 is present (checked above).
            let sb =
                unsafe { crate::quant::kquants::lanes::qx_quants_weighted(32, &x, &mut b, &w) };
            assert_eq!((sa.to_bits(), a), (sb.to_bits(), b), "seed {seed}");
        }
    }

    #[test]
    fn scale_packing_round_trips() {
        let l: [u8; 16] = std::array::from_fn(|j| ((j * 37 + 5) % 64) as u8);
        let s = pack_scales(&l);
        for j in 0..16 {
            assert_eq!(scale_at(&s, j), l[j] as i32 - 32);
        }
    }
}
