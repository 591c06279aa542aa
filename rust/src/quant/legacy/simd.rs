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
    [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))]
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
    let mut min = hmin(_mm256_min_ps(_mm256_min_ps(b[0], b[1]), _mm256_min_ps(b[2], b[3])));
    let mut max = hmax(_mm256_max_ps(_mm256_max_ps(b[0], b[1]), _mm256_max_ps(b[2], b[3])));
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
    _mm256_permutevar8x32_epi32(_mm256_packus_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
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
    _mm_or_si128(lo, _mm_and_si128(_mm_slli_epi16::<4>(hi), _mm_set1_epi8(0xF0u8 as i8)))
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
    [widen_u8(lo), widen_u8(_mm_srli_si128::<8>(lo)), widen_u8(hi), widen_u8(_mm_srli_si128::<8>(hi))]
}

/// Adds bit j of `qh` as bit 4 of level j.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn add_high_bits(levels: &mut [__m256i; 4], qh: u32) {
    let shifts = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let one = _mm256_set1_epi32(1);
    for (k, l) in levels.iter_mut().enumerate() {
        let bits = _mm256_srlv_epi32(_mm256_set1_epi32((qh >> (8 * k)) as i32), shifts);
        *l = _mm256_or_si256(*l, _mm256_slli_epi32::<4>(_mm256_and_si256(bits, one)));
    }
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
