//! Deterministic test and benchmark inputs (no `rand` dependency: a splitmix64 generator suffices),
//! and the shared "fast path equals reference" check every quant module's tests call.

use super::Kernels;

/// splitmix64: tiny, deterministic, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = (self.uniform() as f64).max(1e-12);
        let u2 = self.uniform() as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }
}

/// Gaussian values with std 0.02, like trained weight matrices.
pub fn gaussian(seed: u64, n: usize) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| 0.02 * r.normal()).collect()
}

/// Heavy-tailed rows (Student-t-like, a few large outliers), shaped like LLM expert weights.
pub fn heavy_tailed(seed: u64, n: usize) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n)
        .map(|_| {
            let z = r.normal();
            let chi = (r.normal().powi(2) + r.normal().powi(2) + r.normal().powi(2)) / 3.0;
            0.02 * z / chi.sqrt().max(0.05)
        })
        .collect()
}

/// Positive importance weights like an imatrix (sum of squared activations): log-normal.
pub fn importance(seed: u64, n: usize) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (1.5 * r.normal()).exp()).collect()
}

/// Named adversarial rows of length `n` (a multiple of 256): zeros, constants, f16 extremes,
/// denormals, one huge outlier per 32-block, alternating signs, a lone non-zero.
pub fn adversarial(n: usize) -> Vec<(&'static str, Vec<f32>)> {
    let mut cases: Vec<(&'static str, Vec<f32>)> = vec![
        ("zeros", vec![0.0; n]),
        ("constant", vec![0.375; n]),
        ("negative constant", vec![-1.25; n]),
        (
            "f16 max",
            (0..n)
                .map(|i| if i % 2 == 0 { 65504.0 } else { -65504.0 })
                .collect(),
        ),
        (
            "denormals",
            (0..n).map(|i| (i % 7) as f32 * 1e-40 - 3e-40).collect(),
        ),
        (
            "tiny",
            (0..n).map(|i| (i % 13) as f32 * 1e-8 - 6e-8).collect(),
        ),
        (
            "alternating",
            (0..n)
                .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
                .collect(),
        ),
        (
            "lone value",
            (0..n)
                .map(|i| if i == n / 3 { -2.5 } else { 0.0 })
                .collect(),
        ),
    ];
    let mut outlier = gaussian(11, n);
    for (b, chunk) in outlier.chunks_mut(32).enumerate() {
        chunk[b % 32] = if b % 2 == 0 { 1000.0 } else { -1000.0 };
    }
    cases.push(("outlier per block", outlier));
    cases.push(("gaussian", gaussian(12, n)));
    cases.push(("heavy tailed", heavy_tailed(13, n)));
    cases
}

/// Asserts a type's fast paths give exactly the reference bytes and values on random and
/// adversarial rows, with and without an importance matrix (when `with_imatrix`).
pub fn assert_fast_matches_ref(k: &Kernels, n_per_row: usize, with_imatrix: bool) {
    let row_bytes = k.ty.row_size(n_per_row).unwrap();
    let weights = importance(99, n_per_row);
    let mut imatrices: Vec<Option<&[f32]>> = vec![];
    if !k.requires_imatrix {
        imatrices.push(None);
    }
    if with_imatrix || k.requires_imatrix {
        imatrices.push(Some(&weights));
    }
    for (name, row) in adversarial(n_per_row) {
        for w in &imatrices {
            let mut a = vec![0u8; row_bytes];
            let mut b = vec![0u8; row_bytes];
            (k.quantize_row_ref)(&row, &mut a, *w);
            (k.quantize_row)(&row, &mut b, *w);
            assert_eq!(
                a,
                b,
                "{} quantize fast != ref on '{name}' (imatrix: {})",
                k.ty,
                w.is_some()
            );
            let mut x = vec![0f32; n_per_row];
            let mut y = vec![0f32; n_per_row];
            (k.dequantize_row_ref)(&a, &mut x);
            (k.dequantize_row)(&a, &mut y);
            let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
            assert!(same, "{} dequantize fast != ref on '{name}'", k.ty);
        }
    }
    // Random bytes exercise dequantization of every bit pattern, including ones no quantizer makes.
    let mut r = Rng::new(5);
    let junk: Vec<u8> = (0..row_bytes * 4).map(|_| r.next_u64() as u8).collect();
    for blk in junk.chunks(row_bytes) {
        let mut x = vec![0f32; n_per_row];
        let mut y = vec![0f32; n_per_row];
        (k.dequantize_row_ref)(blk, &mut x);
        (k.dequantize_row)(blk, &mut y);
        let same = x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{} dequantize fast != ref on random bytes", k.ty);
    }
}

/// Root-mean-square error of a round trip, optionally importance-weighted.
pub fn round_trip_rmse(k: &Kernels, src: &[f32], n_per_row: usize, imatrix: Option<&[f32]>) -> f64 {
    let row_bytes = k.ty.row_size(n_per_row).unwrap();
    let (mut num, mut den) = (0f64, 0f64);
    for row in src.chunks(n_per_row) {
        let mut q = vec![0u8; row_bytes];
        let mut y = vec![0f32; n_per_row];
        (k.quantize_row)(row, &mut q, imatrix);
        (k.dequantize_row)(&q, &mut y);
        for (j, (a, b)) in row.iter().zip(&y).enumerate() {
            let w = imatrix.map_or(1.0, |w| w[j] as f64);
            num += w * ((a - b) as f64).powi(2);
            den += w;
        }
    }
    (num / den).sqrt()
}
