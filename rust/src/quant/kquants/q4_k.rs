//! Q4_K: 256 weights as 4-bit levels in 8 sub-blocks of 32, each with a 6-bit scale and min,
//! y = d*sc*q - dmin*m. Block: d (f16) | dmin (f16) | scales[12] | qs[128] = 144 bytes;
//! byte l of each 32-byte group of qs holds element l (low nibble) and l+32 (high nibble) of a
//! 64-element span.

use super::{f16_le, get_scale_min_k4, pack_scale_min_k4, read_f16, round_f16, sum_squares, QK_K};
use crate::quant::util::{make_qkx2_quants, make_qkx3_quants, make_qp_quants, nearest_int};
use crate::quant::{cpu, kernels_of, BlockQuant, Kernels};
use crate::types::GgmlType;

pub const BLOCK_BYTES: usize = 144;

pub struct Q4K;
pub const Q4_K_KERNELS: Kernels = kernels_of::<Q4K>();

/// Sub-block scales and mins (floats from the searches), and the levels they found.
pub(crate) struct SubFits {
    pub scales: [f32; 8],
    pub mins: [f32; 8],
    pub levels: [u8; QK_K],
}

/// The per-sub-block search of quantize_row_q4_K_ref (and q5_K's, with its own parameters):
/// weights av_x + |x|, make_qkx2_quants.
pub(crate) fn fit_ref(x: &[f32], nmax: i32, rmin: f32, rdelta: f32, nstep: i32) -> SubFits {
    let mut f = SubFits {
        scales: [0.0; 8],
        mins: [0.0; 8],
        levels: [0; QK_K],
    };
    let mut weights = [0f32; 32];
    let mut laux = [0u8; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let av_x = (sum_squares(xs) / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut f.levels[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            rdelta,
            nstep,
            false,
        );
        f.scales[j] = s;
        f.mins[j] = m;
    }
    f
}

/// The per-sub-block search of quantize_row_q4_K_impl: imatrix weights, make_qkx3_quants; also
/// returns the per-sub-block weight sums.
pub(crate) fn fit_imatrix_ref(x: &[f32], qw: &[f32], nmax: i32) -> (SubFits, [f32; 8]) {
    let mut f = SubFits {
        scales: [0.0; 8],
        mins: [0.0; 8],
        levels: [0; QK_K],
    };
    let mut sw = [0f32; 8];
    let sigma2 = 2.0 * sum_squares(&x[..QK_K]) / QK_K as f32;
    let mut weights = [0f32; 32];
    let mut laux = [0u8; 32];
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        for ((w, v), q) in weights.iter_mut().zip(xs).zip(&qw[32 * j..32 * j + 32]) {
            *w = q * (sigma2 + v * v).sqrt();
        }
        let mut sumw = 0f32;
        for w in &weights {
            sumw += w;
        }
        sw[j] = sumw;
        let (s, m) = make_qkx3_quants(
            nmax,
            xs,
            Some(&weights),
            &mut f.levels[32 * j..32 * j + 32],
            &mut laux,
            -0.9,
            0.05,
            36,
            false,
        );
        f.scales[j] = s;
        f.mins[j] = m;
    }
    (f, sw)
}

/// Quantizes the sub-block scales and mins of the no-imatrix path to 6 bits against their
/// maxima: returns (scales[12], d, dmin).
pub(crate) fn scales_from_max(scales: &[f32], mins: &[f32]) -> ([u8; 12], f32, f32) {
    let mut max_scale = 0f32;
    let mut max_min = 0f32;
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // C stores nearest_int into a uint8_t (wrapping) before clamping to 63.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    (
        pack_scale_min_k4(&ls, &lm),
        max_scale / 63.0,
        max_min / 63.0,
    )
}

/// Quantizes the sub-block scales and mins of the imatrix path with make_qp_quants.
pub(crate) fn scales_from_qp(
    scales: &[f32],
    mins: &[f32],
    sw: &[f32],
    clamp63: bool,
) -> ([u8; 12], f32, f32) {
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = make_qp_quants(63, &scales[..8], &mut ls, &sw[..8]);
    let m_block = make_qp_quants(63, &mins[..8], &mut lm, &sw[..8]);
    if clamp63 {
        ls.iter_mut()
            .chain(lm.iter_mut())
            .for_each(|v| *v = (*v).min(63));
    }
    (pack_scale_min_k4(&ls, &lm), d_block, m_block)
}

/// Final levels given the stored scales: nearest_int((x + dm)/d) clamped to [0, nmax]; a
/// sub-block whose scale is 0 keeps the search's levels.
pub(crate) fn requantize_ref(
    x: &[f32],
    scales: &[u8],
    d: f32,
    dmin: f32,
    nmax: i32,
    levels: &mut [u8; QK_K],
) {
    for j in 0..8 {
        let (sc, m) = get_scale_min_k4(j, scales);
        let d = d * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = nearest_int((x[i] + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

fn pack_block(y: &mut [u8], scales: &[u8; 12], d: f32, dmin: f32, levels: &[u8; QK_K]) {
    y[0..2].copy_from_slice(&f16_le(d));
    y[2..4].copy_from_slice(&f16_le(dmin));
    y[4..16].copy_from_slice(scales);
    for (h, q) in y[16..].chunks_exact_mut(32).enumerate() {
        let l = &levels[64 * h..64 * h + 64];
        for i in 0..32 {
            q[i] = l[i] | (l[i + 32] << 4);
        }
    }
}

/// Stores the block, then requantizes against the f16-rounded d/dmin and packs the levels.
fn finish_block(
    x: &[f32],
    y: &mut [u8],
    scales: [u8; 12],
    d: f32,
    dmin: f32,
    mut levels: [u8; QK_K],
) {
    requantize_ref(x, &scales, round_f16(d), round_f16(dmin), 15, &mut levels);
    pack_block(y, &scales, d, dmin, &levels);
}

impl BlockQuant for Q4K {
    const TYPE: GgmlType = GgmlType::Q4_K;

    fn quantize_row_ref(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        for (b, (x, y)) in src
            .chunks_exact(QK_K)
            .zip(dst.chunks_exact_mut(BLOCK_BYTES))
            .enumerate()
        {
            match imatrix {
                None => {
                    let f = fit_ref(x, 15, -1.0, 0.1, 20);
                    let (scales, d, dmin) = scales_from_max(&f.scales, &f.mins);
                    finish_block(x, y, scales, d, dmin, f.levels);
                }
                Some(w) => {
                    let (f, sw) = fit_imatrix_ref(x, &w[QK_K * b..QK_K * (b + 1)], 15);
                    let (scales, d, dmin) = scales_from_qp(&f.scales, &f.mins, &sw, false);
                    finish_block(x, y, scales, d, dmin, f.levels);
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
            let d = read_f16(&x[0..2]);
            let min = read_f16(&x[2..4]);
            let scales = &x[4..16];
            for h in 0..4 {
                let q = &x[16 + 32 * h..48 + 32 * h];
                let (sc1, m1) = get_scale_min_k4(2 * h, scales);
                let (sc2, m2) = get_scale_min_k4(2 * h + 1, scales);
                let (d1, m1) = (d * sc1 as f32, min * m1 as f32);
                let (d2, m2) = (d * sc2 as f32, min * m2 as f32);
                let out = &mut y[64 * h..64 * h + 64];
                for l in 0..32 {
                    out[l] = d1 * (q[l] & 0xF) as f32 - m1;
                    out[l + 32] = d2 * (q[l] >> 4) as f32 - m2;
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
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    use super::*;
    use crate::quant::kquants::lanes;

    /// What differs between Q4_K and Q5_K in the AVX2 row driver.
    pub(crate) struct K45 {
        pub nmax: i32,
        /// make_qkx2_quants' (rmin, rdelta, nstep) on the no-imatrix path.
        pub search: (f32, f32, i32),
        /// Q5_K's _impl clamps the qp levels to 63 (a no-op kept for fidelity).
        pub clamp63: bool,
        pub block_bytes: usize,
        /// Packs the levels into the block's quant bytes (after d, dmin and scales).
        pub pack: unsafe fn(&[u8; QK_K], &mut [u8]),
    }

    /// Q4_K/Q5_K rows: super-blocks are fitted two at a time, then finished one by one.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn quantize_row_k45(
        src: &[f32],
        dst: &mut [u8],
        imatrix: Option<&[f32]>,
        t: &K45,
    ) {
        let nb = src.len() / QK_K;
        let (rmin, rdelta, nstep) = if imatrix.is_some() {
            (-0.9, 0.05, 36)
        } else {
            t.search
        };
        let mut b = 0;
        while b < nb {
            let n = if b + 1 < nb { 2 } else { 1 };
            let xs = &src[QK_K * b..QK_K * (b + n)];
            let qw = imatrix.map(|w| &w[QK_K * b..QK_K * (b + n)]);
            let ys = &mut dst[t.block_bytes * b..t.block_bytes * (b + n)];
            if n == 2 {
                let f = lanes::fit_q45k::<2>(xs, qw, t.nmax, rmin, rdelta, nstep);
                for k in 0..2 {
                    finish_k45(
                        &xs[QK_K * k..],
                        &mut ys[t.block_bytes * k..],
                        &f.levels[k..k + 1],
                        &f,
                        k,
                        imatrix.is_some(),
                        t,
                    );
                }
            } else {
                let f = lanes::fit_q45k::<1>(xs, qw, t.nmax, rmin, rdelta, nstep);
                finish_k45(xs, ys, &f.levels, &f, 0, imatrix.is_some(), t);
            }
            b += n;
        }
    }

    /// Scales, final levels and packing of block `k` of a fit.
    #[target_feature(enable = "avx2")]
    unsafe fn finish_k45<const G: usize>(
        x: &[f32],
        y: &mut [u8],
        fit: &[[std::arch::x86_64::__m256; 32]],
        f: &lanes::LaneFits<32, G>,
        k: usize,
        weighted: bool,
        t: &K45,
    ) {
        let (sc, mn, sw) = (
            &f.scales[8 * k..8 * k + 8],
            &f.mins[8 * k..8 * k + 8],
            &f.sw[8 * k..8 * k + 8],
        );
        let (scales, d, dmin) = if weighted {
            scales_from_qp(sc, mn, sw, t.clamp63)
        } else {
            scales_from_max(sc, mn)
        };
        let mut levels = [0u8; QK_K];
        lanes::levels_k4(
            x,
            fit,
            &scales,
            round_f16(d),
            round_f16(dmin),
            t.nmax,
            &mut levels,
        );
        y[0..2].copy_from_slice(&f16_le(d));
        y[2..4].copy_from_slice(&f16_le(dmin));
        y[4..16].copy_from_slice(&scales);
        (t.pack)(&levels, &mut y[16..t.block_bytes]);
    }

    #[target_feature(enable = "avx2")]
    unsafe fn pack(levels: &[u8; QK_K], qs: &mut [u8]) {
        lanes::pack_q4(levels, qs)
    }

    const Q4: K45 = K45 {
        nmax: 15,
        search: (-1.0, 0.1, 20),
        clamp63: false,
        block_bytes: BLOCK_BYTES,
        pack,
    };

    #[target_feature(enable = "avx2")]
    pub unsafe fn quantize_row(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
        quantize_row_k45(src, dst, imatrix, &Q4)
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
                let q = x.as_ptr().add(16 + 32 * h);
                let (sc1, m1) = get_scale_min_k4(2 * h, scales);
                let (sc2, m2) = get_scale_min_k4(2 * h + 1, scales);
                let d1 = _mm256_set1_ps(d * sc1 as f32);
                let m1 = _mm256_set1_ps(min * m1 as f32);
                let d2 = _mm256_set1_ps(d * sc2 as f32);
                let m2 = _mm256_set1_ps(min * m2 as f32);
                let out = y.as_mut_ptr().add(64 * h);
                for g in 0..4 {
                    let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(q.add(8 * g) as *const __m128i));
                    let lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, mask));
                    let hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
                    // Separate mul and sub, as the reference (no FMA).
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
        <super::Q4K as super::BlockQuant>::quantize_row_ref(src, dst, imatrix)
    }
    pub unsafe fn dequantize_row(src: &[u8], dst: &mut [f32]) {
        <super::Q4K as super::BlockQuant>::dequantize_row_ref(src, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::kquants::test_support::{fast_matches_reference, rmse_within};

    #[test]
    fn fast_matches_ref() {
        fast_matches_reference(&Q4_K_KERNELS, true);
    }

    #[test]
    fn round_trip_error() {
        // 4-bit with fitted min: about 1/8 of the std at gaussian weights.
        rmse_within(&Q4_K_KERNELS, 0.14);
    }

    #[test]
    fn scale_min_packing_round_trips() {
        let ls = [0u8, 63, 17, 42, 1, 33, 62, 5];
        let lm = [63u8, 0, 21, 7, 60, 2, 31, 48];
        let s = pack_scale_min_k4(&ls, &lm);
        for j in 0..8 {
            assert_eq!(get_scale_min_k4(j, &s), (ls[j], lm[j]));
        }
    }
}
