//! Picking the next token from logits: repeat penalty, then top-k, top-p, min-p on the
//! probabilities, then temperature and a seeded draw (llama.cpp's default order). Temperature 0
//! (or below) is greedy.

#[derive(Clone, Debug)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches top_p (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one (0 = none).
    pub min_p: f32,
    /// llama.cpp's repeat penalty: positive logits of recent tokens are divided by it, negative
    /// ones multiplied (1 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the repeat penalty looks at.
    pub repeat_last_n: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
        }
    }
}

/// A sampler with its own random stream (splitmix64), so a seed reproduces a generation.
pub struct Sampler {
    pub params: SamplingParams,
    rng_state: u64,
}

impl Sampler {
    pub fn new(params: SamplingParams, seed: u64) -> Sampler {
        Sampler {
            params,
            rng_state: seed,
        }
    }

    fn next_f64(&mut self) -> f64 {
        self.rng_state = self.rng_state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng_state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next token given one row of logits and the tokens so far (for the repeat penalty).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let p = self.params.clone();
        let mut logits = logits.to_vec();
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let recent = &history[history.len().saturating_sub(p.repeat_last_n)..];
            let mut seen = std::collections::HashSet::new();
            for &t in recent {
                let Some(l) = logits.get_mut(t as usize) else {
                    continue;
                };
                if seen.insert(t) {
                    *l = if *l > 0.0 {
                        *l / p.repeat_penalty
                    } else {
                        *l * p.repeat_penalty
                    };
                }
            }
        }
        if p.temperature <= 0.0 {
            return argmax(&logits) as u32;
        }
        // Candidates, most likely first.
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, l))
            .collect();
        let k = if p.top_k == 0 {
            cand.len()
        } else {
            p.top_k.min(cand.len())
        };
        if k < cand.len() {
            cand.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            cand.truncate(k);
        }
        cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let probs = softmax(&cand.iter().map(|c| c.1).collect::<Vec<_>>());
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut cum = 0f64;
            for (i, &pr) in probs.iter().enumerate() {
                cum += pr as f64;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = keep.min(probs.iter().take_while(|&&pr| pr >= floor).count().max(1));
        }
        cand.truncate(keep.max(1));
        let probs = softmax(&cand.iter().map(|c| c.1 / p.temperature).collect::<Vec<_>>());
        let r = self.next_f64();
        let mut cum = 0f64;
        for (c, &pr) in cand.iter().zip(&probs) {
            cum += pr as f64;
            if r < cum {
                return c.0;
            }
        }
        cand.last().unwrap().0
    }
}

pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

fn softmax(x: &[f32]) -> Vec<f32> {
    let mut v = x.to_vec();
    super::ops::softmax_in_place(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_picks_argmax_and_penalty_changes_it() {
        let mut s = Sampler::new(SamplingParams::default(), 1);
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[]), 1);
        s.params.repeat_penalty = 2.0;
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1]), 2); // 3/2 < 2
    }

    #[test]
    fn top_k_one_is_greedy_and_seed_reproduces() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(params, 7);
        for _ in 0..10 {
            assert_eq!(s.sample(&[1.0, 1.5, 0.2], &[]), 1);
        }
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(params.clone(), seed);
            (0..50)
                .map(|_| s.sample(&[0.0, 0.0, 0.0, 0.0], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let d = draw(3);
        assert!(
            (0..4).all(|t| d.contains(&t)),
            "uniform draws should hit every token: {d:?}"
        );
    }

    #[test]
    fn min_p_and_top_p_cut_the_tail() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            ..Default::default()
        };
        let mut s = Sampler::new(params, 11);
        // token 1 has probability ~e^-3 relative to token 0: min_p removes it.
        for _ in 0..20 {
            assert_eq!(s.sample(&[3.0, 0.0], &[]), 0);
        }
        s.params.min_p = 0.0;
        s.params.top_p = 0.5;
        for _ in 0..20 {
            assert_eq!(s.sample(&[3.0, 0.0], &[]), 0);
        }
    }
}

/// Negative log-likelihood (natural log, in f64) of `targets[i]` under logits row i of
/// `[targets.len()][n_vocab]` (perplexity: exp of the mean).
pub fn nll(logits: &[f32], n_vocab: usize, targets: &[u32]) -> Vec<f64> {
    assert_eq!(
        logits.len(),
        targets.len() * n_vocab,
        "one logits row per target"
    );
    logits
        .chunks_exact(n_vocab)
        .zip(targets)
        .map(|(row, &t)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            max + sum.ln() - row[t as usize] as f64
        })
        .collect()
}

/// Per token: KL(P_base ‖ P) in nats (f64) between the softmaxes of two logits rows, and whether
/// both rows have the same arg-max (llama-perplexity's KL-divergence statistics).
pub fn kl_divergence(base: &[f32], logits: &[f32], n_vocab: usize) -> Vec<(f64, bool)> {
    assert_eq!(
        base.len(),
        logits.len(),
        "base and logits of the same shape"
    );
    let log_softmax = |row: &[f32]| -> Vec<f64> {
        let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v)) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        row.iter().map(|&v| v as f64 - lse).collect()
    };
    let argmax = |row: &[f32]| {
        row.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0
    };
    base.chunks_exact(n_vocab)
        .zip(logits.chunks_exact(n_vocab))
        .map(|(b, q)| {
            let (lb, lq) = (log_softmax(b), log_softmax(q));
            let kl: f64 = lb.iter().zip(&lq).map(|(&x, &y)| x.exp() * (x - y)).sum();
            (kl.max(0.0), argmax(b) == argmax(q))
        })
        .collect()
}

#[cfg(test)]
mod nll_tests {
    #[test]
    fn kl_of_equal_rows_is_zero_and_of_shifted_rows_is_known() {
        let a = [1.0f32, 2.0, 3.0, 0.5];
        let v = super::kl_divergence(&a, &a, 4);
        assert_eq!(v, vec![(0.0, true)]);
        // P = softmax(a), Q uniform: KL = Σ p log p + log 4
        let u = [0.0f32; 4];
        let z: f64 = a.iter().map(|&x| (x as f64).exp()).sum();
        let want: f64 = a
            .iter()
            .map(|&x| {
                let p = (x as f64).exp() / z;
                p * p.ln()
            })
            .sum::<f64>()
            + 4f64.ln();
        let got = super::kl_divergence(&a, &u, 4);
        assert!((got[0].0 - want).abs() < 1e-12 && !got[0].1);
    }

    #[test]
    fn nll_of_uniform_and_peaked_rows() {
        let uniform = [0.5f32; 4];
        let v = super::nll(&uniform, 4, &[2]);
        assert!((v[0] - 4f64.ln()).abs() < 1e-12);
        let peaked = [0.0f32, 100.0, 0.0, 0.0, 1.0, 2.0, 3.0, 4.0];
        let v = super::nll(&peaked, 4, &[1, 0]);
        assert!(v[0] < 1e-40 + 3.0 * (-100f64).exp());
        let z: f64 = (1..=4).map(|i| (i as f64).exp()).sum();
        assert!((v[1] - (z.ln() - 1.0)).abs() < 1e-12);
    }
}
