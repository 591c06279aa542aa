//! Tests: against llama.cpp's own kernels (reference vectors in tests/data/llamacpp/vec_dot), the
//! AVX2 kernels against the portable ones, 4-row against 1-row, and everything against an f64
//! Σ dequantize(w)·dequantize(act).
//!
//! Tolerance. The integer sums are exact in every implementation; only the float steps differ:
//! per block d_w·d_a (1 rounding), the int32 sum to f32 (1), the product (1), then an accumulation
//! over at most nb blocks (here in 8 lanes, ggml's AVX2 also in 8 lanes, ggml's generic kernels in
//! one float) plus the lane sum (3). Every partial sum is a sum of a subset of the terms w_i·a_i, so
//! its magnitude is at most mag = Σ|w_i·a_i|, and each implementation's error is within
//! (nb + 6)·u·mag with u = 2⁻²⁴; the dequantized f64 reference is within 2u·mag (w_i is rounded
//! once or twice). So two results may differ by at most 2·(nb + 8)·u·mag, plus a few subnormal
//! ulps for rows of denormals. A wrong level, scale or sign on a single value shifts the result by
//! |w_i·a_i|, typically mag/n, about 100 times more than this bound at n = 2816.

use super::*;
use crate::gguf::GgufFile;
use crate::quant::{self, testdata};

const TYPES: [GgmlType; 8] = [
    GgmlType::IQ4_XS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_XXS,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
    GgmlType::IQ2_S,
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
];

const U: f64 = 1.0 / (1u64 << 24) as f64;

fn tolerance(n_blocks: usize, mag: f64) -> f64 {
    2.0 * (n_blocks + 8) as f64 * U * mag + 8.0 * f32::MIN_POSITIVE as f64
}

/// The Q8_K row's values d·q, exactly (in f64).
fn act_values(act: &[u8]) -> Vec<f64> {
    act.chunks_exact(Q8K_BYTES)
        .flat_map(|b| {
            let d = act_d(b) as f64;
            b[Q8K_QS..Q8K_QS + 256]
                .iter()
                .map(move |&q| d * q as i8 as f64)
        })
        .collect()
}

/// (Σ w_i·a_i, Σ |w_i·a_i|) in f64 from the dequantized weights and the activations' values.
fn reference(ty: GgmlType, w: &[u8], act: &[u8], n: usize) -> (f64, f64) {
    let wd = quant::dequantize("w", w, n, ty).unwrap();
    let av = act_values(act);
    assert_eq!(av.len(), n);
    let (mut exact, mut mag) = (0f64, 0f64);
    for (&wi, &ai) in wd.iter().zip(&av) {
        let p = wi as f64 * ai;
        exact += p;
        mag += p.abs();
    }
    (exact, mag)
}

fn assert_close(got: f32, want: f64, tol: f64, what: &str) {
    assert!(got.is_finite(), "{what}: {got} is not finite");
    assert!(
        (got as f64 - want).abs() <= tol,
        "{what}: {got} vs {want} (diff {:e}, tolerance {tol:e})",
        (got as f64 - want).abs()
    );
}

fn quantize_act(x: &[f32]) -> Vec<u8> {
    let mut a = vec![0u8; x.len() / 256 * Q8K_BYTES];
    super::super::quantize_act_q8_k(x, &mut a);
    a
}

/// Checks one weight row against four activation rows with both kernel sets: each result against
/// the f64 reference, the AVX2 ones against the portable ones, and 4-row against 1-row (bit-exact).
fn check_row(ty: GgmlType, w: &[u8], acts: [&[u8]; 4], n: usize, what: &str) {
    let fast = kernels(ty).unwrap();
    let slow = scalar_kernels(ty).unwrap();
    let nb = n / 256;
    let fast4 = (fast.vec_dot_x4)(w, acts);
    let slow4 = (slow.vec_dot_x4)(w, acts);
    for (j, act) in acts.iter().enumerate() {
        let (exact, mag) = reference(ty, w, act, n);
        let tol = tolerance(nb, mag);
        let (f, s) = ((fast.vec_dot)(w, act), (slow.vec_dot)(w, act));
        assert_close(f, exact, tol, &format!("{ty} {what} act {j}: fast vs f64"));
        assert_close(
            s,
            exact,
            tol,
            &format!("{ty} {what} act {j}: scalar vs f64"),
        );
        assert_close(
            f,
            s as f64,
            tol,
            &format!("{ty} {what} act {j}: fast vs scalar"),
        );
        assert_eq!(
            fast4[j].to_bits(),
            f.to_bits(),
            "{ty} {what} act {j}: fast x4 {} vs {f}",
            fast4[j]
        );
        assert_eq!(
            slow4[j].to_bits(),
            s.to_bits(),
            "{ty} {what} act {j}: scalar x4 {} vs {s}",
            slow4[j]
        );
    }
}

fn activation_rows(n: usize) -> [Vec<u8>; 4] {
    let mut outliers = testdata::gaussian(31, n);
    for (i, v) in outliers.iter_mut().enumerate().step_by(97) {
        *v = if i % 2 == 0 { 50.0 } else { -50.0 };
    }
    let alternating: Vec<f32> = (0..n)
        .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
        .collect();
    [
        quantize_act(&testdata::heavy_tailed(32, n)),
        quantize_act(&testdata::gaussian(33, n)),
        quantize_act(&outliers),
        quantize_act(&alternating),
    ]
}

#[test]
fn kernels_cover_the_eight_types_and_nothing_else() {
    for ty in TYPES {
        let k = kernels(ty).unwrap_or_else(|| panic!("{ty}"));
        assert_eq!(k.act_type, GgmlType::Q8_K);
        assert_eq!(scalar_kernels(ty).unwrap().act_type, GgmlType::Q8_K);
    }
    for ty in [
        GgmlType::Q8_0,
        GgmlType::IQ4_NL,
        GgmlType::Q4_K,
        GgmlType::F32,
    ] {
        assert!(kernels(ty).is_none(), "{ty}");
    }
}

/// Quantized random and adversarial rows of several lengths.
#[test]
fn quantized_rows_fast_scalar_x4_and_f64_agree() {
    for n in [256, 512, 2816] {
        let acts = activation_rows(n);
        let acts = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
        let imatrix = testdata::importance(7, n);
        let mut rows = testdata::adversarial(n);
        rows.push(("heavy tailed 2", testdata::heavy_tailed(41, n)));
        for ty in TYPES {
            for (name, row) in &rows {
                let w = quant::quantize("w", row, n, ty, Some(&imatrix)).unwrap();
                check_row(ty, &w, acts, n, &format!("n={n} '{name}'"));
            }
        }
    }
}

/// Zero activations give exactly zero; so do all-zero weight rows.
#[test]
fn zeros_give_zero() {
    let n = 512;
    let zero_act = quantize_act(&vec![0f32; n]);
    let act = quantize_act(&testdata::gaussian(3, n));
    let imatrix = testdata::importance(7, n);
    for ty in TYPES {
        let w = quant::quantize("w", &testdata::gaussian(4, n), n, ty, Some(&imatrix)).unwrap();
        let zw = quant::quantize("w", &vec![0f32; n], n, ty, Some(&imatrix)).unwrap();
        for k in [kernels(ty).unwrap(), scalar_kernels(ty).unwrap()] {
            assert_eq!((k.vec_dot)(&w, &zero_act), 0.0, "{ty}");
            assert_eq!((k.vec_dot)(&zw, &act), 0.0, "{ty}");
        }
    }
}

/// Random block bytes (with a sane super-scale) reach every grid index, sign pattern and scale,
/// including combinations no quantizer writes.
#[test]
fn random_blocks_fast_scalar_x4_and_f64_agree() {
    let n = 256 * 6;
    let acts = activation_rows(n);
    let acts = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
    let mut r = testdata::Rng::new(77);
    for ty in TYPES {
        let (_, bytes) = ty.block_geometry();
        for trial in 0..8 {
            let mut w: Vec<u8> = (0..n / 256 * bytes).map(|_| r.next_u64() as u8).collect();
            for blk in w.chunks_exact_mut(bytes) {
                // d = 0.01 · (1 + trial), negative on odd trials
                let d = half::f16::from_f32(
                    0.01 * (1 + trial) as f32 * if trial % 2 == 1 { -1.0 } else { 1.0 },
                );
                let bits = d.to_bits();
                if ty == GgmlType::IQ1_M {
                    for i in 0..4 {
                        let at = 48 + 2 * i;
                        let word = u16::from_le_bytes([blk[at], blk[at + 1]]) & 0x0fff;
                        let word = word | (((bits >> (4 * i)) & 0xf) << 12);
                        blk[at..at + 2].copy_from_slice(&word.to_le_bytes());
                    }
                } else {
                    blk[..2].copy_from_slice(&bits.to_le_bytes());
                }
            }
            check_row(ty, &w, acts, n, &format!("random blocks {trial}"));
        }
    }
}

/// `vec_dot` of a batch gives the same bits as 4 separate calls, also when rows repeat.
#[test]
fn x4_equals_four_single_calls() {
    let n = 2816;
    let imatrix = testdata::importance(7, n);
    let acts = activation_rows(n);
    for ty in TYPES {
        let w = quant::quantize("w", &testdata::heavy_tailed(5, n), n, ty, Some(&imatrix)).unwrap();
        for k in [kernels(ty).unwrap(), scalar_kernels(ty).unwrap()] {
            let batch = [&acts[2][..], &acts[0][..], &acts[2][..], &acts[1][..]];
            let four = (k.vec_dot_x4)(&w, batch);
            for (j, a) in batch.iter().enumerate() {
                assert_eq!(
                    four[j].to_bits(),
                    (k.vec_dot)(&w, a).to_bits(),
                    "{ty} row {j}"
                );
            }
        }
    }
}

/// The 8-row prompt kernel gives the same bits as 8 separate calls (rows repeating too).
#[test]
fn x8_equals_eight_single_calls() {
    let n = 2816;
    let imatrix = testdata::importance(7, n);
    let acts = activation_rows(n);
    for ty in TYPES {
        let w = quant::quantize("w", &testdata::heavy_tailed(6, n), n, ty, Some(&imatrix)).unwrap();
        let k = kernels(ty).unwrap();
        let Some(x8) = k.vec_dot_x8 else {
            assert!(
                !crate::quant::cpu::features().avx2,
                "{ty}: AVX2 kernels have an x8"
            );
            continue;
        };
        let batch: [&[u8]; 8] = std::array::from_fn(|j| &acts[(3 * j + 1) % acts.len()][..]);
        let eight = x8(&w, batch);
        for (j, a) in batch.iter().enumerate() {
            assert_eq!(
                eight[j].to_bits(),
                (k.vec_dot)(&w, a).to_bits(),
                "{ty} row {j}"
            );
        }
    }
}

// ---- against llama.cpp ------------------------------------------------------------------------

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Reference vectors written by llama.cpp's own kernels: `w` (the weight type, n_rows × n_cols),
/// `x` (f32 activations, n_tok × n_cols), `act` (ggml's Q8_K quantization of x, n_tok rows),
/// `dot` and `dot_generic` (n_tok × n_rows: ggml's AVX2 and portable vec_dot of w row r with act
/// row t at t·n_rows + r).
#[test]
fn matches_llama_cpp() {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/llamacpp/vec_dot");
    for ty in TYPES {
        let path = dir.join(format!("{}.gguf", ty.name().to_ascii_lowercase()));
        let f = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let t = |name: &str| {
            f.tensor(name)
                .unwrap_or_else(|| panic!("{ty}: no tensor {name}"))
        };
        let (tw, tx, tact) = (t("w"), t("x"), t("act"));
        assert_eq!(tw.ty, ty);
        // `act` holds raw Q8_K blocks, typed Q8_K or as I8 bytes (vec_dot.act_type says Q8_K)
        assert!(
            matches!(tact.ty, GgmlType::Q8_K | GgmlType::I8),
            "{ty}: act is {}",
            tact.ty
        );
        let (n, n_rows, n_tok) = (
            tw.dims[0] as usize,
            tw.dims[1] as usize,
            tx.dims[1] as usize,
        );
        assert_eq!(tx.dims[0] as usize, n);
        let w = f.tensor_data(tw);
        let x = f32s(f.tensor_data(tx));
        let act = f.tensor_data(tact);
        let dot = f32s(f.tensor_data(t("dot")));
        let dot_generic = f32s(f.tensor_data(t("dot_generic")));
        assert_eq!(dot.len(), n_rows * n_tok);
        let (wrow, arow) = (w.len() / n_rows, act.len() / n_tok);
        assert_eq!(arow, n / 256 * Q8K_BYTES);

        // (a) our Q8_K quantization of x is ggml's, byte for byte
        assert_eq!(
            quantize_act(&x),
            act,
            "{ty}: Q8_K activations differ from ggml's"
        );

        // (b) both kernel sets, 1-row and 4-row, against ggml's results
        let fast = kernels(ty).unwrap();
        let slow = scalar_kernels(ty).unwrap();
        let mut checked = 0;
        for r in 0..n_rows {
            let wr = &w[r * wrow..(r + 1) * wrow];
            for t0 in (0..n_tok).step_by(4) {
                let rows: [&[u8]; 4] =
                    std::array::from_fn(|j| &act[((t0 + j) % n_tok) * arow..][..arow]);
                let (f4, s4) = ((fast.vec_dot_x4)(wr, rows), (slow.vec_dot_x4)(wr, rows));
                for j in 0..4.min(n_tok - t0) {
                    let tt = t0 + j;
                    let (want, generic) = (dot[tt * n_rows + r], dot_generic[tt * n_rows + r]);
                    let (_, mag) = reference(ty, wr, rows[j], n);
                    let tol = tolerance(n / 256, mag);
                    let what = format!("{ty} row {r} tok {tt}");
                    assert_close(
                        generic,
                        want as f64,
                        tol,
                        &format!("{what}: ggml generic vs ggml AVX2"),
                    );
                    assert_close(
                        (fast.vec_dot)(wr, rows[j]),
                        want as f64,
                        tol,
                        &format!("{what}: fast"),
                    );
                    assert_close(
                        (slow.vec_dot)(wr, rows[j]),
                        want as f64,
                        tol,
                        &format!("{what}: scalar"),
                    );
                    assert_close(f4[j], want as f64, tol, &format!("{what}: fast x4"));
                    assert_close(s4[j], want as f64, tol, &format!("{what}: scalar x4"));
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, n_rows * n_tok);
    }
}

/// Timing, not a check: `cargo test --release --lib iquants::tests::speed -- --ignored --nocapture`
/// (REPS=n to change the repetitions).
/// ns per 256-value block and activation row, for the 1-, 4- and 8-row kernels, on 256 rows of
/// 4096 random-byte blocks (weights L2-resident, as in a matmul tile).
#[test]
#[ignore]
fn speed() {
    let (n, rows) = (4096, 256);
    let acts = activation_rows(n);
    let batch = [&acts[0][..], &acts[1][..], &acts[2][..], &acts[3][..]];
    let mut r = testdata::Rng::new(1);
    for ty in TYPES {
        let k = kernels(ty).unwrap();
        let (_, bytes) = ty.block_geometry();
        let rb = n / 256 * bytes;
        let mut w: Vec<u8> = (0..rows * rb).map(|_| r.next_u64() as u8).collect();
        for blk in w.chunks_exact_mut(bytes) {
            if ty == GgmlType::IQ1_M {
                for i in 0..4 {
                    let at = 48 + 2 * i;
                    let word = u16::from_le_bytes([blk[at], blk[at + 1]]) & 0x0fff;
                    let word = word | (((0x2000 >> (4 * i)) & 0xf) << 12);
                    blk[at..at + 2].copy_from_slice(&word.to_le_bytes());
                }
            } else {
                blk[..2].copy_from_slice(&[0, 0x20]);
            }
        }
        let reps = std::env::var("REPS").map_or(200, |v| v.parse().unwrap());
        let (mut best1, mut best4, mut best8, mut sink) = (f64::MAX, f64::MAX, f64::MAX, 0f32);
        let batch8: [&[u8]; 8] = std::array::from_fn(|j| batch[j % 4]);
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                for wr in w.chunks_exact(rb) {
                    sink += (k.vec_dot)(wr, batch[0]);
                }
            }
            best1 = best1.min(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            for _ in 0..reps / 4 {
                for wr in w.chunks_exact(rb) {
                    sink += (k.vec_dot_x4)(wr, batch)[3];
                }
            }
            best4 = best4.min(t.elapsed().as_secs_f64());
            if let Some(x8) = k.vec_dot_x8 {
                let t = std::time::Instant::now();
                for _ in 0..reps / 8 {
                    for wr in w.chunks_exact(rb) {
                        sink += x8(wr, batch8)[7];
                    }
                }
                best8 = best8.min(t.elapsed().as_secs_f64());
            }
        }
        let per = |s: f64| s * 1e9 / (reps * rows * n / 256) as f64;
        eprintln!(
            "{:8} vec_dot {:6.2}, vec_dot_x4 {:6.2}, vec_dot_x8 {:6.2} ns/block/row (sink {sink})",
            ty.name(),
            per(best1),
            per(best4),
            per(best8)
        );
    }
}
