//! AVX2 building blocks shared by the legacy types' fast paths. Every function here is only
//! called from `#[target_feature(enable = "avx2")]` code after `cpu::has_avx2()` said yes.

use std::arch::x86_64::*;

use super::QK;

/// One 32-element block in four registers.
pub(crate) type Block = [__m256; 4];

#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn load_block(x: &[f32]) -> Block {
    debug_assert!(x.len() >= QK);
    let p = x.as_ptr();
    [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ]
}

#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn abs_ps(v: __m256) -> __m256 {
    _mm256_andnot_ps(_mm256_set1_ps(-0.0), v)
}

#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    _mm_cvtss_f32(m)
}

#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn hmin(v: __m256) -> f32 {
    let m = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_min_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_min_ss(m, _mm_shuffle_ps(m, m, 1));
    _mm_cvtss_f32(m)
}

/// Largest |x| of the block.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn block_amax(b: &Block) -> f32 {
    let m01 = _mm256_max_ps(abs_ps(b[0]), abs_ps(b[1]));
    let m23 = _mm256_max_ps(abs_ps(b[2]), abs_ps(b[3]));
    hmax(_mm256_max_ps(m01, m23))
}

/// Bit j set where element j of the block equals `value` (±0 compare equal).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn eq_mask(b: &Block, value: __m256) -> u32 {
    let mut mask = 0u32;
    for (k, v) in b.iter().enumerate() {
        mask |= (_mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(*v, value)) as u32) << (8 * k);
    }
    mask
}

/// ggml's signed absmax: the first element of largest magnitude, or +0.0 for an all-zero block.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn block_signed_absmax(b: &Block, x: &[f32]) -> f32 {
    let amax = block_amax(b);
    if amax == 0.0 {
        return 0.0;
    }
    let abs = [abs_ps(b[0]), abs_ps(b[1]), abs_ps(b[2]), abs_ps(b[3])];
    x[eq_mask(&abs, _mm256_set1_ps(amax)).trailing_zeros() as usize]
}

/// ggml's `if (v < min) min = v; if (v > max) max = v;` scan: vector min/max give the values; a
/// zero result takes the sign of the block's first zero, which is the one that scan keeps.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn block_min_max(b: &Block, x: &[f32]) -> (f32, f32) {
    let mut min = hmin(_mm256_min_ps(
        _mm256_min_ps(b[0], b[1]),
        _mm256_min_ps(b[2], b[3]),
    ));
    let mut max = hmax(_mm256_max_ps(
        _mm256_max_ps(b[0], b[1]),
        _mm256_max_ps(b[2], b[3]),
    ));
    if min == 0.0 || max == 0.0 {
        let first_zero = x[eq_mask(b, _mm256_setzero_ps()).trailing_zeros() as usize];
        if min == 0.0 {
            min = first_zero;
        }
        if max == 0.0 {
            max = first_zero;
        }
    }
    (min, max)
}

/// Sign-extends the low byte of each lane (C's `(int8_t)` of a converted int).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn low_byte_signed(v: __m256i) -> __m256i {
    _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(v))
}

/// The low byte of each i32 lane of four registers, as 32 bytes in element order.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn pack_low_bytes(q: [__m256i; 4]) -> __m256i {
    let ff = _mm256_set1_epi32(0xFF);
    let ab = _mm256_packus_epi32(_mm256_and_si256(q[0], ff), _mm256_and_si256(q[1], ff));
    let cd = _mm256_packus_epi32(_mm256_and_si256(q[2], ff), _mm256_and_si256(q[3], ff));
    // packs work per 128-bit lane; this restores element order across lanes.
    _mm256_permutevar8x32_epi32(
        _mm256_packus_epi16(ab, cd),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
    )
}

/// qs[j] = lo[j] | (hi[j] << 4) for the two 16-byte halves of a block's levels.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn nibbles_or(levels: __m256i, mask_lo: bool) -> __m128i {
    let mut lo = _mm256_castsi256_si128(levels);
    if mask_lo {
        lo = _mm_and_si128(lo, _mm_set1_epi8(0x0F));
    }
    let hi = _mm256_extracti128_si256::<1>(levels);
    _mm_or_si128(
        lo,
        _mm_and_si128(_mm_slli_epi16::<4>(hi), _mm_set1_epi8(0xF0u8 as i8)),
    )
}

/// Bit j = bit 4 of level j (the Q5 high bits).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn bit4_mask(levels: __m256i) -> u32 {
    _mm256_movemask_epi8(_mm256_slli_epi16::<3>(levels)) as u32
}

/// Eight bytes at `p` widened to i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn widen_u8(v: __m128i) -> __m256i {
    _mm256_cvtepu8_epi32(v)
}

/// 32 levels of a 4-bit block: low nibbles are elements 0..16, high nibbles 16..32, as 4×8 i32.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn unpack_nibbles(qs: &[u8]) -> [__m256i; 4] {
    let raw = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    let m = _mm_set1_epi8(0x0F);
    let lo = _mm_and_si128(raw, m);
    let hi = _mm_and_si128(_mm_srli_epi16::<4>(raw), m);
    [
        widen_u8(lo),
        widen_u8(_mm_srli_si128::<8>(lo)),
        widen_u8(hi),
        widen_u8(_mm_srli_si128::<8>(hi)),
    ]
}

/// The 32 five-bit levels of a Q5 block (nibbles in `qs`, bit j of `qh` = bit 4 of level j),
/// widened to 4×8 i32. The high bits are spread one per byte with a shuffle and a bit test.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn unpack_q5_levels(qs: &[u8], qh: u32) -> [__m256i; 4] {
    debug_assert!(qs.len() >= 16);
    let raw = _mm_loadu_si128(qs.as_ptr() as *const __m128i);
    let m = _mm_set1_epi8(0x0F);
    let nibbles = _mm256_set_m128i(
        _mm_and_si128(_mm_srli_epi16::<4>(raw), m),
        _mm_and_si128(raw, m),
    );
    // Byte j takes byte j/8 of qh (shuffles stay inside each 128-bit lane, so lane 1 uses 2 and 3).
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(qh as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3,
            3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    let levels = _mm256_or_si256(nibbles, _mm256_and_si256(set, _mm256_set1_epi8(0x10)));
    let (lo, hi) = (
        _mm256_castsi256_si128(levels),
        _mm256_extracti128_si256::<1>(levels),
    );
    [
        widen_u8(lo),
        widen_u8(_mm_srli_si128::<8>(lo)),
        widen_u8(hi),
        widen_u8(_mm_srli_si128::<8>(hi)),
    ]
}

/// Stores 32 floats.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn store_block(y: &mut [f32], v: [__m256; 4]) {
    debug_assert!(y.len() >= QK);
    let p = y.as_mut_ptr();
    for (k, r) in v.iter().enumerate() {
        _mm256_storeu_ps(p.add(8 * k), *r);
    }
}

/// ggml's `nearest_int` on eight lanes: the 1.5·2^23 trick, bit for bit the scalar one.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nearest_int8(v: __m256) -> __m256i {
    let t = _mm256_castps_si256(_mm256_add_ps(v, _mm256_set1_ps(12_582_912.0)));
    _mm256_sub_epi32(
        _mm256_and_si256(t, _mm256_set1_epi32(0x007f_ffff)),
        _mm256_set1_epi32(0x0040_0000),
    )
}

/// `util::make_qx_quants(nmax, x, l, 1, Some(qw))` for one 32-element block, bit-identical: the
/// 19 candidate scales (the first guess and the 18 of the search) run side by side, one per lane,
/// and each lane accumulates its sums in ggml's element order, so only the scheduling changes.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn make_qx_quants_32(
    nmax: i32,
    x: &[f32],
    qw: &[f32; QK],
    l: &mut [i8; QK],
) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in &x[..QK] {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < crate::quant::util::GROUP_MAX_EPS {
        *l = [0; QK];
        return 0.0;
    }
    let nmaxf = nmax as f32;
    // Lane 0: the first guess -nmax/max; lanes 1..19: is = -9..-1, 1..9 as in ggml's search.
    let mut iscales = [-nmaxf / max; 24];
    for (k, is) in (-9i32..=9).filter(|&is| is != 0).enumerate() {
        iscales[k + 1] = -(nmaxf + 0.1f32 * is as f32) / max;
    }
    let isv: [__m256; 3] = std::array::from_fn(|g| _mm256_loadu_ps(iscales.as_ptr().add(8 * g)));
    let (lo, hi) = (_mm256_set1_epi32(-nmax), _mm256_set1_epi32(nmax - 1));
    let mut sumlx = [_mm256_setzero_ps(); 3];
    let mut suml2 = [_mm256_setzero_ps(); 3];
    for i in 0..QK {
        let (xv, wv) = (_mm256_set1_ps(x[i]), _mm256_set1_ps(qw[i]));
        let wx = _mm256_mul_ps(wv, xv);
        for g in 0..3 {
            let q = _mm256_min_epi32(
                _mm256_max_epi32(nearest_int8(_mm256_mul_ps(isv[g], xv)), lo),
                hi,
            );
            let qf = _mm256_cvtepi32_ps(q);
            // ggml: sumlx += w*x[i]*l; suml2 += w*l*l (left to right, no fusing).
            sumlx[g] = _mm256_add_ps(sumlx[g], _mm256_mul_ps(wx, qf));
            suml2[g] = _mm256_add_ps(suml2[g], _mm256_mul_ps(_mm256_mul_ps(wv, qf), qf));
        }
    }
    let (mut slx, mut sl2) = ([0f32; 24], [0f32; 24]);
    for g in 0..3 {
        _mm256_storeu_ps(slx.as_mut_ptr().add(8 * g), sumlx[g]);
        _mm256_storeu_ps(sl2.as_mut_ptr().add(8 * g), suml2[g]);
    }
    let mut scale = if sl2[0] != 0.0 { slx[0] / sl2[0] } else { 0.0 };
    let mut best = scale * slx[0];
    let mut winner = 0;
    for k in 1..19 {
        if sl2[k] > 0.0 && slx[k] * slx[k] > best * sl2[k] {
            scale = slx[k] / sl2[k];
            best = scale * slx[k];
            winner = k;
        }
    }
    let iscale = iscales[winner];
    for (q, &v) in l.iter_mut().zip(&x[..QK]) {
        *q = (nmax + crate::quant::util::nearest_int(iscale * v).clamp(-nmax, nmax - 1)) as i8;
    }
    scale
}

/// Fitted scale/min, determinant and weighted error of make_qkx3_quants' search passes
/// `first..first+8` (one per lane), all seeing the block offset `min`.
struct Passes {
    det: [f32; 8],
    mad: [f32; 8],
    scale: [f32; 8],
    min: [f32; 8],
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn qkx3_passes(
    nmax: i32,
    x: &[f32],
    w: &[f32; QK],
    max: f32,
    min: f32,
    sums: (f32, f32),
    first: usize,
) -> Passes {
    let nmaxf = nmax as f32;
    let iscales: [f32; 8] =
        std::array::from_fn(|k| (-0.9f32 + 0.05f32 * (first + k) as f32 + nmaxf) / (max - min));
    let isv = _mm256_loadu_ps(iscales.as_ptr());
    let zero = _mm256_setzero_ps();
    let nmaxv = _mm256_set1_ps(nmaxf);
    // ggml's guarded level: 0 unless v > 0, then nearest_int(min(v, nmax)).
    let level = |xm: __m256| {
        let v = _mm256_mul_ps(isv, xm);
        let q = nearest_int8(_mm256_min_ps(v, nmaxv));
        _mm256_cvtepi32_ps(_mm256_and_si256(
            q,
            _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(v, zero)),
        ))
    };
    let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
    for i in 0..QK {
        let (xv, wv, xm) = (
            _mm256_set1_ps(x[i]),
            _mm256_set1_ps(w[i]),
            _mm256_set1_ps(x[i] - min),
        );
        let qf = level(xm);
        // ggml: sum_l += w*l; sum_l2 += w*l*l; sum_xl += w*l*x[i] (left to right, no fusing).
        let wq = _mm256_mul_ps(wv, qf);
        sum_l = _mm256_add_ps(sum_l, wq);
        sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wq, qf));
        sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wq, xv));
    }
    let (swv, sxv) = (_mm256_set1_ps(sums.0), _mm256_set1_ps(sums.1));
    let det = _mm256_sub_ps(_mm256_mul_ps(swv, sum_l2), _mm256_mul_ps(sum_l, sum_l));
    let s = _mm256_div_ps(
        _mm256_sub_ps(_mm256_mul_ps(swv, sum_xl), _mm256_mul_ps(sxv, sum_l)),
        det,
    );
    let m = _mm256_div_ps(
        _mm256_sub_ps(_mm256_mul_ps(sum_l2, sxv), _mm256_mul_ps(sum_l, sum_xl)),
        det,
    );
    // ggml: a positive min is replaced by 0 and the scale refitted without it.
    let positive = _mm256_cmp_ps::<_CMP_GT_OQ>(m, zero);
    let this_min = _mm256_andnot_ps(positive, m);
    let this_scale = _mm256_blendv_ps(s, _mm256_div_ps(sum_xl, sum_l2), positive);
    let mut mad = zero;
    for i in 0..QK {
        let (xv, wv, xm) = (
            _mm256_set1_ps(x[i]),
            _mm256_set1_ps(w[i]),
            _mm256_set1_ps(x[i] - min),
        );
        let qf = level(xm);
        let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(this_scale, qf), this_min), xv);
        mad = _mm256_add_ps(mad, _mm256_mul_ps(wv, _mm256_mul_ps(diff, diff)));
    }
    let unpack = |v: __m256| {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), v);
        out
    };
    Passes {
        det: unpack(det),
        mad: unpack(mad),
        scale: unpack(this_scale),
        min: unpack(this_min),
    }
}

/// `util::make_qkx3_quants(nmax, x, Some(w), l, _, -0.9, 0.05, 36, false)` for one 32-element
/// block, bit-identical. ggml's 37 search passes depend on each other only through `min`, which
/// changes when a pass wins; so the next eight passes run at once, one per lane (each lane summing
/// in ggml's element order), and the search resumes right after the first winner among them.
/// Returns (scale, -min).
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn make_qkx3_quants_32(
    nmax: i32,
    x: &[f32],
    w: &[f32; QK],
    l: &mut [u8; QK],
) -> (f32, f32) {
    const NSTEP: usize = 36;
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..QK {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        *l = [0; QK];
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let iscale0 = nmaxf / (max - min);
    let mut scale = 1.0 / iscale0;
    let mut best_mad = 0f32;
    for i in 0..QK {
        let q = crate::quant::util::nearest_int(iscale0 * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_mad += w[i] * (diff * diff);
    }
    let mut first = 0;
    while first <= NSTEP {
        // Lanes past the last pass (NSTEP) compute harmless extra passes that are never looked at.
        let p = qkx3_passes(nmax, x, w, max, min, (sum_w, sum_x), first);
        let live = (NSTEP + 1 - first).min(8);
        let Some(k) = (0..live).find(|&k| p.det[k] > 0.0 && p.mad[k] < best_mad) else {
            first += live;
            continue;
        };
        // The winner's levels, with the iscale and min that pass saw.
        let iscale = (-0.9f32 + 0.05f32 * (first + k) as f32 + nmaxf) / (max - min);
        for i in 0..QK {
            let v = iscale * (x[i] - min);
            l[i] = if v > 0.0 {
                crate::quant::util::nearest_int(if v < nmaxf { v } else { nmaxf }) as u8
            } else {
                0
            };
        }
        best_mad = p.mad[k];
        scale = p.scale[k];
        min = p.min[k];
        first += k + 1;
    }
    (scale, -min)
}

/// llama.cpp's legacy imatrix weights qw[j] * sqrt(sigma2 + x[j]^2) on eight lanes at a time
/// (vector sqrt is correctly rounded, like sqrtf).
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn imatrix_weights(x: &[f32], qw: &[f32], sigma2: f32) -> [f32; QK] {
    debug_assert!(x.len() >= QK && qw.len() >= QK);
    let s = _mm256_set1_ps(sigma2);
    let mut w = [0f32; QK];
    for k in 0..QK / 8 {
        let xv = _mm256_loadu_ps(x.as_ptr().add(8 * k));
        let qv = _mm256_loadu_ps(qw.as_ptr().add(8 * k));
        let r = _mm256_mul_ps(qv, _mm256_sqrt_ps(_mm256_add_ps(s, _mm256_mul_ps(xv, xv))));
        _mm256_storeu_ps(w.as_mut_ptr().add(8 * k), r);
    }
    w
}

/// Q4_0/Q5_0 levels of one block (`nmax` = 15 or 31): d = signed absmax / -(nmax+1)/2, then
/// MIN(nmax, (int8_t)(x*id + (nmax+1)/2 + 0.5)) with mul and add kept separate, as in ggml.
/// Returns d and the 32 levels packed to bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn symmetric_levels(x: &[f32], nmax: i32) -> (f32, __m256i) {
    let b = load_block(x);
    let max = block_signed_absmax(&b, x);
    let half_range = ((nmax + 1) / 2) as f32;
    let d = max / -half_range;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (idv, offset, top) = (
        _mm256_set1_ps(id),
        _mm256_set1_ps(half_range + 0.5),
        _mm256_set1_epi32(nmax),
    );
    let q = b.map(|v| {
        let t = _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v, idv), offset));
        _mm256_min_epi32(low_byte_signed(t), top)
    });
    (d, pack_low_bytes(q))
}

/// Q4_1/Q5_1 levels of one block (`nmax` = 15 or 31): d = (max - min) / nmax, then
/// (x - min)*id + 0.5 truncated, clamped as ggml's Q4_1 does (`MIN(15, (int8_t)...)`) when `clamp`.
/// Returns d, min and the 32 levels packed to bytes.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn asymmetric_levels(x: &[f32], nmax: i32, clamp: bool) -> (f32, f32, __m256i) {
    let b = load_block(x);
    let (min, max) = block_min_max(&b, x);
    let d = (max - min) / nmax as f32;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let (minv, idv, half, top) = (
        _mm256_set1_ps(min),
        _mm256_set1_ps(id),
        _mm256_set1_ps(0.5),
        _mm256_set1_epi32(nmax),
    );
    let q = b.map(|v| {
        let t = _mm256_cvttps_epi32(_mm256_add_ps(
            _mm256_mul_ps(_mm256_sub_ps(v, minv), idv),
            half,
        ));
        if clamp {
            _mm256_min_epi32(low_byte_signed(t), top)
        } else {
            t
        }
    });
    (d, min, pack_low_bytes(q))
}
