//! Integer dot kernels for the i-quant weight types against Q8_K activations, as ggml's CPU backend
//! pairs them (`vec_dot_type = Q8_K` for IQ4_XS, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S and
//! IQ1_M; IQ4_NL meets Q8_0 in `mod.rs`).
//!
//! Every type is handled the same way: each 32-value sub-block of a 256-value weight block decodes
//! to 32 signed integer levels and one integer scale per 16 values, so that
//!
//! ```text
//! row · act = FACTOR · Σ_blocks d_w·d_a · Σ_groups ls_g · Σ_{i∈g} q_i·a_i
//! ```
//!
//! with the inner sums exact in int32, as in ggml's `_generic` kernels (`ls` = 2s+1 for IQ2/IQ3/IQ1,
//! s-32 for IQ4_XS; FACTOR = 1/8 for IQ2, 1/4 for IQ3_XXS, 1 for IQ3_S and IQ4_XS). IQ1_S/IQ1_M add
//! a shift of ±1/8 to every level; ggml sums it apart (`sumi + IQ1S_DELTA·sumi1`, for IQ1_S from
//! the Q8_K bsums). The portable kernels (and IQ1_M's AVX2 one) fold it into the levels as 8·g ± 1
//! with FACTOR 1/8, IQ1_S's AVX2 kernel scales the grid part by 8 and adds the bsums terms: both
//! give the integer 8·sumi + sumi1, so the same value as ggml's (exact in f32 at these sizes).
//!
//! Only the float steps differ from ggml: one `d_w·d_a·isum` per block (ggml's AVX2 kernels do the
//! same per 8 lanes), accumulated in a different order, so results agree to float rounding.
//!
//! The AVX2 path (`iquants/avx2.rs`) decodes a sub-block into magnitudes |q| (u8), a sign carrier
//! and the scales, and meets the activations with `_mm256_sign_epi8`, `_mm256_maddubs_epi16` and
//! `_mm256_madd_epi16`, like ggml's AVX2 kernels; the 4-row kernels decode each sub-block once.

use half::f16;

use super::DotKernels;
use crate::quant::iq_tables::{
    IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KSIGNS_IQ2XS,
    KVALUES_IQ4NL,
};
use crate::types::GgmlType;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(test)]
mod tests;

/// Bytes of one Q8_K block: d (f32) | qs[256] (i8) | bsums[16] (i16).
const Q8K_BYTES: usize = 292;
/// Offset of the 256 int8 levels in a Q8_K block.
const Q8K_QS: usize = 4;

/// The kernels for `ty` (one of the eight i-quant types above), else None: the AVX2 ones where the
/// CPU has AVX2, FMA and F16C (and PYQMOE_NO_SIMD is unset), the portable ones otherwise.
pub fn kernels(ty: GgmlType) -> Option<DotKernels> {
    #[cfg(target_arch = "x86_64")]
    if let Some(k) = avx2::kernels(ty) {
        return Some(k);
    }
    scalar_kernels(ty)
}

/// The portable kernels (the reference the AVX2 ones are tested against).
pub fn scalar_kernels(ty: GgmlType) -> Option<DotKernels> {
    use GgmlType as T;
    Some(match ty {
        T::IQ4_XS => scalar::<Iq4Xs>(),
        T::IQ2_XXS => scalar::<Iq2Xxs>(),
        T::IQ2_XS => scalar::<Iq2Xs>(),
        T::IQ2_S => scalar::<Iq2S>(),
        T::IQ3_XXS => scalar::<Iq3Xxs>(),
        T::IQ3_S => scalar::<Iq3S>(),
        T::IQ1_S => scalar::<Iq1S>(),
        T::IQ1_M => scalar::<Iq1M>(),
        _ => return None,
    })
}

fn scalar<B: IqBlock>() -> DotKernels {
    DotKernels {
        act_type: GgmlType::Q8_K,
        quantize_act: super::quantize_act_q8_k,
        vec_dot: vec_dot_scalar::<B>,
        vec_dot_x4: vec_dot_x4_scalar::<B>,
        vec_dot_4rows: None,
        vec_dot_x8: None,
    }
}

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

#[inline]
fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes(b[i..i + 2].try_into().unwrap())
}

#[inline]
fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().unwrap())
}

/// The f32 scale d of a Q8_K block.
#[inline]
fn act_d(a: &[u8]) -> f32 {
    f32::from_le_bytes([a[0], a[1], a[2], a[3]])
}

/// How one i-quant block decodes to integers (the layouts of `crate::quant::{iq1,iq2,iq3,iq4}`).
trait IqBlock {
    const BYTES: usize;
    /// The constant factor ggml applies to the whole sum (exact: a power of two).
    const FACTOR: f32;
    /// The block's super-scale d.
    fn d(b: &[u8]) -> f32;
    /// Sub-block `ib` (values 32·ib..32·ib+32) as signed levels; returns the integer scales of its
    /// first and second 16 values.
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2];
}

/// Level j of an 8-value grid row with sign bit j of `signs` applied.
#[inline]
fn signed_grid8(grid: u64, signs: u8, out: &mut [i8]) {
    for (j, o) in out[..8].iter_mut().enumerate() {
        let v = (grid >> (8 * j)) as u8 as i8;
        *o = if signs & (1 << j) != 0 { -v } else { v };
    }
}

/// Same for a 4-value grid row (IQ3) and sign bits `shift..shift+4`.
#[inline]
fn signed_grid4(grid: u32, signs: u8, shift: usize, out: &mut [i8]) {
    for (j, o) in out[..4].iter_mut().enumerate() {
        let v = (grid >> (8 * j)) as u8 as i8;
        *o = if signs & (1 << (shift + j)) != 0 {
            -v
        } else {
            v
        };
    }
}

/// IQ2_XS / IQ2_S: two 4-bit scales per sub-block, 2s+1 each.
#[inline]
fn two_nibble_scales(s: u8) -> [i32; 2] {
    [2 * (s & 0xf) as i32 + 1, 2 * (s >> 4) as i32 + 1]
}

/// IQ4_XS: d | scales_h (u16) | scales_l[4] | qs[128]; level = kvalues_iq4nl[nibble], scale
/// = 6-bit s - 32.
struct Iq4Xs;
impl IqBlock for Iq4Xs {
    const BYTES: usize = 136;
    const FACTOR: f32 = 1.0;
    fn d(b: &[u8]) -> f32 {
        f16_at(b, 0)
    }
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2] {
        let qs = &b[8 + 16 * ib..8 + 16 * ib + 16];
        for j in 0..16 {
            q[j] = KVALUES_IQ4NL[(qs[j] & 0xf) as usize];
            q[j + 16] = KVALUES_IQ4NL[(qs[j] >> 4) as usize];
        }
        let ls = iq4xs_scale(b, ib);
        [ls, ls]
    }
}

#[inline]
fn iq4xs_scale(b: &[u8], ib: usize) -> i32 {
    let lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xf;
    let hi = (u16_at(b, 2) >> (2 * ib)) & 3;
    (lo as i32 | (hi as i32) << 4) - 32
}

/// IQ2_XXS: d | per sub-block 4 grid bytes + u32 (4×7 sign bits, 4-bit scale on top).
struct Iq2Xxs;
impl IqBlock for Iq2Xxs {
    const BYTES: usize = 66;
    const FACTOR: f32 = 0.125;
    fn d(b: &[u8]) -> f32 {
        f16_at(b, 0)
    }
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2] {
        let at = 2 + 8 * ib;
        let aux = u32_at(b, at + 4);
        for l in 0..4 {
            let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
            signed_grid8(IQ2XXS_GRID[b[at + l] as usize], signs, &mut q[8 * l..]);
        }
        let ls = 2 * (aux >> 28) as i32 + 1;
        [ls, ls]
    }
}

/// IQ2_XS: d | qs[32] u16 (9-bit grid index, 7 sign bits) | scales[8] (two nibbles).
struct Iq2Xs;
impl IqBlock for Iq2Xs {
    const BYTES: usize = 74;
    const FACTOR: f32 = 0.125;
    fn d(b: &[u8]) -> f32 {
        f16_at(b, 0)
    }
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2] {
        for l in 0..4 {
            let v = u16_at(b, 2 + 8 * ib + 2 * l);
            let signs = KSIGNS_IQ2XS[(v >> 9) as usize];
            signed_grid8(IQ2XS_GRID[(v & 511) as usize], signs, &mut q[8 * l..]);
        }
        two_nibble_scales(b[66 + ib])
    }
}

/// IQ2_S: d | qs[32] (index low bytes) | signs[32] | qh[8] (2 high bits per index) | scales[8].
struct Iq2S;
impl IqBlock for Iq2S {
    const BYTES: usize = 82;
    const FACTOR: f32 = 0.125;
    fn d(b: &[u8]) -> f32 {
        f16_at(b, 0)
    }
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2] {
        let qh = b[66 + ib] as usize;
        for l in 0..4 {
            let index = b[2 + 4 * ib + l] as usize | ((qh << (8 - 2 * l)) & 0x300);
            signed_grid8(IQ2S_GRID[index], b[34 + 4 * ib + l], &mut q[8 * l..]);
        }
        two_nibble_scales(b[74 + ib])
    }
}

/// IQ3_XXS: d | qs[64] (grid bytes, 4 values each) | 8 × u32 (4×7 sign bits, 4-bit scale on top).
struct Iq3Xxs;
impl IqBlock for Iq3Xxs {
    const BYTES: usize = 98;
    const FACTOR: f32 = 0.25;
    fn d(b: &[u8]) -> f32 {
        f16_at(b, 0)
    }
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2] {
        let aux = u32_at(b, 66 + 4 * ib);
        for l in 0..4 {
            let signs = KSIGNS_IQ2XS[((aux >> (7 * l)) & 127) as usize];
            for h in 0..2 {
                let grid = IQ3XXS_GRID[b[2 + 8 * ib + 2 * l + h] as usize];
                signed_grid4(grid, signs, 4 * h, &mut q[8 * l + 4 * h..]);
            }
        }
        let ls = 2 * (aux >> 28) as i32 + 1;
        [ls, ls]
    }
}

/// IQ3_S: d | qs[64] (index low bytes) | qh[8] (9th bits) | signs[32] | scales[4] (nibbles).
struct Iq3S;
impl IqBlock for Iq3S {
    const BYTES: usize = 110;
    const FACTOR: f32 = 1.0;
    fn d(b: &[u8]) -> f32 {
        f16_at(b, 0)
    }
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2] {
        let qh = b[66 + ib] as usize;
        for k in 0..8 {
            let index = b[2 + 8 * ib + k] as usize | (((qh >> k) & 1) << 8);
            let signs = b[74 + 4 * ib + k / 2];
            signed_grid4(IQ3S_GRID[index], signs, 4 * (k % 2), &mut q[4 * k..]);
        }
        let ls = 2 * ((b[106 + ib / 2] >> (4 * (ib % 2))) & 0xf) as i32 + 1;
        [ls, ls]
    }
}

/// 8·g + δ for an IQ1 grid row of levels g ∈ {-1, 0, 1} and δ = ±1 (the ±1/8 shift, times 8).
#[inline]
fn iq1_levels(grid: u64, delta: i8, out: &mut [i8]) {
    for (j, o) in out[..8].iter_mut().enumerate() {
        *o = 8 * ((grid >> (8 * j)) as u8 as i8) + delta;
    }
}

/// IQ1_S: d | qs[32] (index low bytes) | qh[8] u16 (4×3 index bits, 3-bit scale, delta sign).
struct Iq1S;
impl IqBlock for Iq1S {
    const BYTES: usize = 50;
    const FACTOR: f32 = 0.125;
    fn d(b: &[u8]) -> f32 {
        f16_at(b, 0)
    }
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2] {
        let qh = u16_at(b, 34 + 2 * ib) as usize;
        let delta = if qh & 0x8000 != 0 { -1 } else { 1 };
        for l in 0..4 {
            let index = b[2 + 4 * ib + l] as usize | (((qh >> (3 * l)) & 7) << 8);
            iq1_levels(IQ1S_GRID[index], delta, &mut q[8 * l..]);
        }
        let ls = 2 * ((qh >> 12) & 7) as i32 + 1;
        [ls, ls]
    }
}

/// IQ1_M: qs[32] | qh[16] (3 index bits + delta sign per 8 values) | scales (4 u16: 3-bit scales
/// per 16 values, the f16 super-scale in their top nibbles).
struct Iq1M;
impl IqBlock for Iq1M {
    const BYTES: usize = 56;
    const FACTOR: f32 = 0.125;
    fn d(b: &[u8]) -> f32 {
        let sc = [0, 1, 2, 3].map(|i| u16_at(b, 48 + 2 * i));
        let bits =
            (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000);
        f16::from_bits(bits).to_f32()
    }
    fn decode(b: &[u8], ib: usize, q: &mut [i8; 32]) -> [i32; 2] {
        for l in 0..4 {
            let h = b[32 + 2 * ib + l / 2] as usize;
            let h = if l % 2 == 0 { h } else { h >> 4 };
            let index = b[4 * ib + l] as usize | ((h & 7) << 8);
            let delta = if h & 8 != 0 { -1 } else { 1 };
            iq1_levels(IQ1S_GRID[index], delta, &mut q[8 * l..]);
        }
        let sc = u16_at(b, 48 + 2 * (ib / 2)) >> (6 * (ib % 2));
        [2 * (sc & 7) as i32 + 1, 2 * ((sc >> 3) & 7) as i32 + 1]
    }
}

/// A weight block decoded once: 256 levels and 16 group scales.
struct Decoded {
    d: f32,
    q: [i8; 256],
    ls: [i32; 16],
}

fn decode_block<B: IqBlock>(b: &[u8]) -> Decoded {
    let mut dec = Decoded {
        d: B::d(b),
        q: [0; 256],
        ls: [0; 16],
    };
    let mut q = [0i8; 32];
    for ib in 0..8 {
        let ls = B::decode(b, ib, &mut q);
        dec.q[32 * ib..32 * ib + 32].copy_from_slice(&q);
        dec.ls[2 * ib..2 * ib + 2].copy_from_slice(&ls);
    }
    dec
}

/// Σ_g ls_g · Σ_{i∈g} q_i·a_i over one block (exact: |result| < 256·127·128·32 < 2³¹).
#[inline]
fn block_isum(dec: &Decoded, a: &[u8]) -> i32 {
    let qa = &a[Q8K_QS..Q8K_QS + 256];
    let mut isum = 0i32;
    for g in 0..16 {
        let s: i32 = dec.q[16 * g..16 * g + 16]
            .iter()
            .zip(&qa[16 * g..16 * g + 16])
            .map(|(&w, &x)| w as i32 * x as i8 as i32)
            .sum();
        isum += dec.ls[g] * s;
    }
    isum
}

fn vec_dot_scalar<B: IqBlock>(w: &[u8], a: &[u8]) -> f32 {
    let mut sum = 0f32;
    for (wb, ab) in w.chunks_exact(B::BYTES).zip(a.chunks_exact(Q8K_BYTES)) {
        let dec = decode_block::<B>(wb);
        sum += dec.d * act_d(ab) * block_isum(&dec, ab) as f32;
    }
    sum * B::FACTOR
}

/// Four activation rows; each weight block is decoded once. Same float steps as `vec_dot_scalar`.
fn vec_dot_x4_scalar<B: IqBlock>(w: &[u8], a: [&[u8]; 4]) -> [f32; 4] {
    let mut sum = [0f32; 4];
    for (i, wb) in w.chunks_exact(B::BYTES).enumerate() {
        let dec = decode_block::<B>(wb);
        for (s, row) in sum.iter_mut().zip(a) {
            let ab = &row[i * Q8K_BYTES..(i + 1) * Q8K_BYTES];
            *s += dec.d * act_d(ab) * block_isum(&dec, ab) as f32;
        }
    }
    sum.map(|s| s * B::FACTOR)
}
