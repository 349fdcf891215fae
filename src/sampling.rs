//! Choosing the next token id from a logits vector.
//!
//! The pipeline follows llama.cpp's default sampler chain so that a given set of parameters
//! behaves the way users of llama.cpp expect:
//!
//! 1. **Repetition penalty** over the distinct ids among the last `repeat_last_n` entries of the
//!    history. A positive logit is divided by the penalty and a non-positive one multiplied, so a
//!    penalty above 1 always pushes the token down whatever the sign of its logit. Each distinct
//!    id is penalised once, however often it repeats.
//! 2. **Greedy** (`temperature == 0`): argmax, ties to the lowest id, no randomness used.
//! 3. **Top-k**, then **top-p**, then **min-p**, all judged on the untempered (temperature 1)
//!    distribution. Each of them keeps at least the most likely token.
//! 4. **Temperature** and softmax over the survivors, then one draw.
//!
//! Filtering before tempering is what llama.cpp does; it means the temperature reshapes the
//! distribution among the survivors but does not change which tokens survive.
//!
//! Non-finite logits: NaN is treated as `-inf` (the token can never be chosen unless nothing
//! else can), `+inf` as the largest finite value (such a token wins outright).
//!
//! Allocation: [`Sampler`] keeps its scratch buffers between calls. They grow to the vocabulary
//! size on the first call (or up front with [`Sampler::reserve`]) and are only reused after that.

use anyhow::{Result, bail};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

/// How to turn logits into a token. Field semantics match llama.cpp's CLI flags of the same
/// names, so settings can be carried over from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// Softmax temperature; 0 selects greedy decoding.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables the filter.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability mass reaches `top_p`;
    /// 1.0 disables the filter.
    pub top_p: f32,
    /// Drop tokens whose probability is below `min_p` times that of the most likely token;
    /// 0 disables the filter.
    pub min_p: f32,
    /// Repetition penalty factor; 1.0 disables it.
    pub repeat_penalty: f32,
    /// How many of the most recent history ids the penalty looks at; 0 disables it.
    pub repeat_last_n: usize,
    /// RNG seed for reproducible runs; `None` seeds from the operating system.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    /// llama.cpp's CLI defaults.
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Deterministic decoding: always the most likely token, no penalty.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repeat_penalty: 1.0, repeat_last_n: 64, seed: None }
    }

    /// Reject settings that have no sensible meaning. [`Sampler`] never panics on bad values
    /// (it degrades them to the nearest sensible behaviour), so this is the place where a user
    /// typo becomes an error message instead of silently odd output.
    pub fn validate(&self) -> Result<()> {
        let t = self.temperature;
        if !t.is_finite() || t < 0.0 {
            bail!("temperature must be a finite number >= 0 (0 = greedy), got {t}");
        }
        let p = self.top_p;
        if !(p > 0.0 && p <= 1.0) {
            bail!("top_p must be in (0, 1] (1 = off), got {p}");
        }
        let m = self.min_p;
        if !(0.0..=1.0).contains(&m) {
            bail!("min_p must be in [0, 1] (0 = off), got {m}");
        }
        let r = self.repeat_penalty;
        if !r.is_finite() || r <= 0.0 {
            bail!("repeat_penalty must be a finite number > 0 (1 = off), got {r}");
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        // NaN and negative temperatures fall back to greedy rather than producing NaN weights.
        self.temperature.is_nan() || self.temperature <= 0.0
    }

    fn penalty_active(&self) -> bool {
        let r = self.repeat_penalty;
        self.repeat_last_n > 0 && r.is_finite() && r > 0.0 && r != 1.0
    }
}

/// Stateful sampler: owns the RNG (so a seeded run is reproducible across calls) and the scratch
/// buffers (so the per-token path does not allocate).
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// `(id, value)`: the value is a logit while filtering and an unnormalised weight (or, after
    /// [`Sampler::probabilities`], a probability) at the end.
    candidates: Vec<(u32, f32)>,
    /// Distinct ids of the penalty window.
    window: Vec<u32>,
}

impl Sampler {
    /// Does not validate `params` (see [`SamplingParams::validate`]); out-of-range values are
    /// clamped or treated as "off" instead of panicking.
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::try_from_os_rng().unwrap_or_else(|_| {
                // No OS entropy is unusual enough that a clock-derived seed is acceptable: the
                // user asked for an unseeded run, not a cryptographic one.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                StdRng::seed_from_u64(nanos ^ u64::from(std::process::id()))
            }),
        };
        Self { params, rng, candidates: Vec::new(), window: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Grow the scratch buffers for a vocabulary of `n_vocab` now, so that even the first
    /// [`Sampler::sample`] call does not allocate.
    pub fn reserve(&mut self, n_vocab: usize) {
        self.candidates.reserve(n_vocab.saturating_sub(self.candidates.len()));
        self.window.reserve(self.params.repeat_last_n.saturating_sub(self.window.len()));
    }

    /// Pick the next token id. `history` is the ids generated or read so far (only its tail
    /// matters, for the repetition penalty); ids in it that are out of range are ignored.
    ///
    /// Empty `logits` returns 0 rather than panicking: the caller always has a vocabulary, so
    /// this is a bug elsewhere that should not bring the process down mid-generation.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        if self.params.is_greedy() && !self.params.penalty_active() {
            return argmax(logits);
        }
        let total = self.distribution(logits, history);
        let mut u = self.rng.random::<f64>() * total;
        for &(id, w) in &self.candidates {
            u -= f64::from(w);
            if u < 0.0 {
                return id;
            }
        }
        // Rounding can leave `u` a hair above zero after the last candidate.
        self.candidates.last().map_or(0, |&(id, _)| id)
    }

    /// The distribution [`Sampler::sample`] would draw from: the tokens that survive filtering
    /// with their normalised probabilities (all > 0, summing to 1), in no particular order.
    /// Greedy settings give a single `(argmax, 1.0)`; empty `logits` give an empty slice.
    /// Consumes no randomness, so interleaving it with `sample` does not disturb a seeded run.
    pub fn probabilities(&mut self, logits: &[f32], history: &[u32]) -> &[(u32, f32)] {
        if logits.is_empty() {
            self.candidates.clear();
            return &self.candidates;
        }
        let total = self.distribution(logits, history);
        let inv = (1.0 / total) as f32;
        for c in &mut self.candidates {
            c.1 *= inv;
        }
        // A subnormal weight can round to zero when normalised (a logit ~100 temperatures
        // below the max); such a token has no probability worth reporting.
        self.candidates.retain(|&(_, p)| p > 0.0);
        &self.candidates
    }

    /// Leaves `self.candidates` holding the survivors with positive unnormalised weights and
    /// returns the total weight (always > 0). Requires non-empty `logits`.
    fn distribution(&mut self, logits: &[f32], history: &[u32]) -> f64 {
        let p = &self.params;
        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, sanitize(l))));

        if p.penalty_active() {
            let start = history.len().saturating_sub(p.repeat_last_n);
            self.window.clear();
            self.window.extend_from_slice(&history[start..]);
            self.window.sort_unstable();
            self.window.dedup();
            let r = p.repeat_penalty;
            for &id in &self.window {
                // `candidates` is still indexed by id here; nothing has been reordered yet.
                if let Some(c) = cands.get_mut(id as usize) {
                    c.1 = if c.1 > 0.0 { c.1 / r } else { c.1 * r };
                }
            }
        }

        let (best, max) =
            cands.iter().fold((0u32, f32::NEG_INFINITY), |(bi, bv), &(i, v)| if v > bv { (i, v) } else { (bi, bv) });
        if p.is_greedy() || max == f32::NEG_INFINITY {
            // All-masked logits have no distribution; fall back to the argmax rule (id 0).
            cands.clear();
            cands.push((best, 1.0));
            return 1.0;
        }

        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, by_rank);
            cands.truncate(p.top_k);
        }

        if p.top_p < 1.0 {
            top_p(cands, p.top_p, max);
        }

        if p.min_p > 0.0 {
            // p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p); no softmax needed.
            let threshold = max + p.min_p.min(1.0).ln();
            cands.retain(|&(_, l)| l >= threshold);
        }

        // An infinite temperature would turn -inf logits into NaN weights; clamping gives the
        // same uniform-over-finite-logits limit without that hazard.
        let t = p.temperature.min(f32::MAX);
        let mut total = 0.0f64;
        for c in cands.iter_mut() {
            // Subtracting the max before dividing keeps exp() in range for any temperature.
            c.1 = ((c.1 - max) / t).exp();
            total += f64::from(c.1);
        }
        // Underflowed weights would be dead entries in `probabilities`; the max itself has
        // weight exp(0) = 1, so at least one candidate always remains.
        cands.retain(|&(_, w)| w > 0.0);
        total
    }
}

/// Most likely first; equal logits ordered by id so that which of them a cut keeps does not
/// depend on the selection algorithm's internal order.
fn by_rank(a: &(u32, f32), b: &(u32, f32)) -> std::cmp::Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// NaN can never be chosen; +inf must not poison `l - max` with `inf - inf`.
fn sanitize(l: f32) -> f32 {
    if l.is_nan() { f32::NEG_INFINITY } else { l.min(f32::MAX) }
}

/// Keep the smallest most-likely prefix whose temperature-1 mass reaches `top_p`.
///
/// Sorting the whole vocabulary just to keep a few dozen tokens is wasteful, so this first
/// selects and sorts a small head and only widens it when the head's mass falls short.
fn top_p(cands: &mut Vec<(u32, f32)>, top_p: f32, max: f32) {
    let total: f64 = cands.iter().map(|&(_, l)| f64::from((l - max).exp())).sum();
    let target = f64::from(top_p) * total;
    let n = cands.len();
    let mut head = n.min(64);
    loop {
        if head < n {
            cands.select_nth_unstable_by(head - 1, by_rank);
        }
        cands[..head].sort_unstable_by(by_rank);
        let mut cum = 0.0f64;
        for i in 0..head {
            cum += f64::from((cands[i].1 - max).exp());
            if cum >= target {
                cands.truncate(i + 1);
                return;
            }
        }
        if head == n {
            // Only reachable through rounding at top_p ~ 1: keep everything.
            return;
        }
        head = head.saturating_mul(8).min(n);
    }
}

/// Index of the largest logit; ties go to the lowest id and NaN never wins, so greedy decoding
/// is reproducible bit for bit. Empty or all-NaN/-inf input gives 0.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0u32;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i as u32;
            best_v = v;
        }
    }
    best
}

/// `ln softmax(logits)[id]`, computed in f64 with the max subtracted so that perplexity over
/// long texts does not accumulate f32 rounding or overflow on large logits. NaN logits count
/// as `-inf`; an out-of-range or masked `id` gives `-inf`.
pub fn log_softmax_at(logits: &[f32], id: u32) -> f64 {
    let Some(&l_id) = logits.get(id as usize) else {
        return f64::NEG_INFINITY;
    };
    let as_f64 = |l: f32| {
        if l.is_nan() { f64::NEG_INFINITY } else { f64::from(l) }
    };
    let l_id = as_f64(l_id);
    let max = logits.iter().map(|&l| as_f64(l)).fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY || l_id == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    if max == f64::INFINITY {
        // The infinite logits share all the mass equally.
        if l_id < f64::INFINITY {
            return f64::NEG_INFINITY;
        }
        let n_inf = logits.iter().filter(|&&l| l == f32::INFINITY).count();
        return -(n_inf as f64).ln();
    }
    let sum: f64 = logits.iter().map(|&l| (as_f64(l) - max).exp()).sum();
    l_id - max - sum.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Upper 0.001 quantiles of the chi-square distribution for df = 1..=10 (standard table
    /// values, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.4). A correct sampler exceeds them with
    /// probability 0.1%; the seeds are fixed, so each test is deterministic.
    const CHI2_999: [f64; 10] = [10.828, 13.816, 16.266, 18.467, 20.515, 22.458, 24.322, 26.124, 27.877, 29.588];
    const N_DRAWS: usize = 20_000;
    const LOGITS: [f32; 6] = [2.0, 1.0, 0.5, 0.0, -1.0, -3.0];

    fn params(temperature: f32, top_k: usize, top_p: f32, min_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_k, top_p, min_p, repeat_penalty: 1.0, repeat_last_n: 64, seed: Some(seed) }
    }

    /// Reference softmax of `logits / t` restricted to `keep`, in f64.
    fn softmax_over(logits: &[f32], t: f64, keep: &[usize]) -> Vec<f64> {
        let mut p = vec![0.0; logits.len()];
        for &i in keep {
            p[i] = (f64::from(logits[i]) / t).exp();
        }
        let s: f64 = p.iter().sum();
        p.iter().map(|x| x / s).collect()
    }

    fn counts(params: SamplingParams, logits: &[f32]) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut c = vec![0; logits.len()];
        for _ in 0..N_DRAWS {
            c[s.sample(logits, &[]) as usize] += 1;
        }
        c
    }

    /// Pearson statistic over the cells with positive expected probability, and its df.
    /// Cells with zero expected probability must never be observed.
    fn chi_square(counts: &[usize], expected: &[f64]) -> (f64, usize) {
        let n: usize = counts.iter().sum();
        let mut stat = 0.0;
        let mut cells = 0;
        for (i, (&c, &p)) in counts.iter().zip(expected).enumerate() {
            if p == 0.0 {
                assert_eq!(c, 0, "token {i} was filtered out but drawn {c} times");
                continue;
            }
            let e = p * n as f64;
            assert!(e >= 5.0, "expected count {e} too small for the chi-square approximation");
            stat += (c as f64 - e).powi(2) / e;
            cells += 1;
        }
        (stat, cells - 1)
    }

    fn assert_fits(params: SamplingParams, logits: &[f32], expected: &[f64]) {
        let c = counts(params.clone(), logits);
        let (stat, df) = chi_square(&c, expected);
        let crit = CHI2_999[df - 1];
        assert!(stat < crit, "chi2 = {stat:.2} >= {crit} (df {df}) for {params:?}: counts {c:?} expected {expected:?}");
        // The exposed distribution must be the one drawn from.
        let mut s = Sampler::new(params);
        let probs = s.probabilities(logits, &[]);
        let mut dense = vec![0.0f64; logits.len()];
        for &(id, p) in probs {
            dense[id as usize] = f64::from(p);
        }
        for (got, want) in dense.iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{dense:?} vs {expected:?}");
        }
    }

    #[test]
    fn chi_square_has_power() {
        // Guard against a vacuous statistical test: temperature 1 draws must be rejected as
        // samples of the temperature-0.5 distribution.
        let logits = [1.0, 0.5, 0.0, -0.5, -1.0, -2.0];
        let c = counts(params(1.0, 0, 1.0, 0.0, 7), &logits);
        let (stat, df) = chi_square(&c, &softmax_over(&logits, 0.5, &[0, 1, 2, 3, 4, 5]));
        assert!(stat > CHI2_999[df - 1] * 10.0, "chi2 = {stat}");
    }

    #[test]
    fn temperature_one_matches_softmax() {
        let logits = [1.0, 0.5, 0.0, -0.5, -1.0, -2.0];
        let expected = softmax_over(&logits, 1.0, &[0, 1, 2, 3, 4, 5]);
        assert_fits(params(1.0, 0, 1.0, 0.0, 11), &logits, &expected);
    }

    #[test]
    fn temperature_half_matches_sharpened_softmax() {
        let logits = [1.0, 0.5, 0.0, -0.5, -1.0, -2.0];
        let expected = softmax_over(&logits, 0.5, &[0, 1, 2, 3, 4, 5]);
        assert_fits(params(0.5, 0, 1.0, 0.0, 12), &logits, &expected);
    }

    #[test]
    fn top_k_renormalizes_over_top_three() {
        let expected = softmax_over(&LOGITS, 1.0, &[0, 1, 2]);
        assert_fits(params(1.0, 3, 1.0, 0.0, 13), &LOGITS, &expected);
    }

    #[test]
    fn top_p_keeps_smallest_prefix_reaching_mass() {
        // Temperature-1 probabilities of LOGITS: .561 .206 .125 .076 .028 .004; cumulative
        // .561 .767 .892 .968, so top_p = 0.9 keeps four tokens with a wide margin.
        let full = softmax_over(&LOGITS, 1.0, &[0, 1, 2, 3, 4, 5]);
        let cum: f64 = full[..3].iter().sum();
        assert!(cum < 0.9 && cum + full[3] > 0.9);
        let expected = softmax_over(&LOGITS, 1.0, &[0, 1, 2, 3]);
        assert_fits(params(1.0, 0, 0.9, 0.0, 14), &LOGITS, &expected);
    }

    #[test]
    fn min_p_filters_before_temperature() {
        // At temperature 1 token 3 has p/p_max = e^-2 = 0.135 >= 0.1 and survives; at
        // temperature 0.7 its ratio would be 0.057. Keeping it shows min-p is judged before
        // tempering, as in llama.cpp; token 4 (ratio e^-3 = 0.05) is dropped.
        let expected = softmax_over(&LOGITS, 0.7, &[0, 1, 2, 3]);
        assert_fits(params(0.7, 0, 1.0, 0.1, 15), &LOGITS, &expected);
    }

    #[test]
    fn top_p_over_large_vocab_widens_head() {
        // A flat tail bigger than the initial head: top_p must look past the first 64.
        let mut logits = vec![0.0f32; 5000];
        logits[4321] = 3.0;
        let mut s = Sampler::new(params(1.0, 0, 0.5, 0.0, 3));
        let probs = s.probabilities(&logits, &[]);
        // e^3 / (e^3 + 4999) ~ 0.004, so about half of the 4999 tail tokens are needed.
        let total_mass = 3f64.exp() + 4999.0;
        let need = (0.5 * total_mass - 3f64.exp()).ceil() as usize + 1;
        assert_eq!(probs.len(), need);
        assert!(probs.iter().any(|&(id, _)| id == 4321));
        let sum: f32 = probs.iter().map(|&(_, p)| p).sum();
        assert!((sum - 1.0).abs() < 1e-4);
    }

    #[test]
    fn greedy_returns_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 0.9, -3.0, 0.2], &[]), 1);
        assert_eq!(s.sample(&[0.1, 0.9, 0.9, 0.9], &[]), 1);
        assert_eq!(s.sample(&[5.0, 5.0], &[]), 0);
        assert_eq!(argmax(&[-1.0, 2.0, 2.0]), 1);
        assert_eq!(s.probabilities(&[0.0, 3.0, 3.0], &[]), &[(1, 1.0)]);
    }

    #[test]
    fn same_seed_same_draws_and_different_seeds_differ() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, 0.0, seed));
            (0..64).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn degenerate_filters_reduce_to_argmax() {
        let logits = [0.3, 1.9, 1.8, -0.5, 1.7];
        for p in [params(1.5, 1, 1.0, 0.0, 1), params(1.5, 0, 1e-6, 0.0, 2), params(1.5, 0, 1.0, 1.0, 3)] {
            let mut s = Sampler::new(p.clone());
            for _ in 0..200 {
                assert_eq!(s.sample(&logits, &[]), 1, "{p:?}");
            }
            assert_eq!(s.probabilities(&logits, &[]), &[(1, 1.0)], "{p:?}");
        }
    }

    fn penalized(penalty: f32, last_n: usize) -> Sampler {
        Sampler::new(SamplingParams { repeat_penalty: penalty, repeat_last_n: last_n, ..SamplingParams::greedy() })
    }

    #[test]
    fn repetition_penalty_flips_greedy_choice() {
        // Positive logit is divided: 3.0 / 1.5 = 2.0 < 2.5.
        let logits = [1.0, 3.0, 2.5, -1.0];
        assert_eq!(penalized(1.0, 64).sample(&logits, &[1]), 1);
        assert_eq!(penalized(1.5, 64).sample(&logits, &[1]), 2);
        // Negative logit is multiplied: -1.0 * 1.5 = -1.5 < -1.2.
        assert_eq!(penalized(1.5, 64).sample(&[-1.0, -1.2], &[0]), 1);
        // Only the last `repeat_last_n` ids count.
        assert_eq!(penalized(1.5, 2).sample(&logits, &[1, 0, 0]), 1);
        assert_eq!(penalized(1.5, 3).sample(&logits, &[1, 0, 0]), 2);
        // Repeats are penalised once: 4.0 / 1.5 = 2.67 still beats 2.5.
        assert_eq!(penalized(1.5, 64).sample(&[4.0, 2.5], &[0, 0, 0, 0]), 0);
        // Out-of-range history ids are ignored.
        assert_eq!(penalized(1.5, 64).sample(&[4.0, 2.5], &[7, 1000]), 0);
    }

    #[test]
    fn repetition_penalty_lowers_sampled_probability() {
        let logits = [1.0, 1.0, 1.0];
        let mut s = Sampler::new(SamplingParams { repeat_penalty: 1.3, ..params(1.0, 0, 1.0, 0.0, 5) });
        let probs = s.probabilities(&logits, &[2]).to_vec();
        let p2 = probs.iter().find(|&&(id, _)| id == 2).unwrap().1;
        let p0 = probs.iter().find(|&&(id, _)| id == 0).unwrap().1;
        assert!(p2 < p0, "{probs:?}");
    }

    #[test]
    fn non_finite_logits_do_not_panic() {
        let mut s = Sampler::new(params(1.0, 0, 0.9, 0.05, 9));
        for _ in 0..100 {
            assert_ne!(s.sample(&[f32::NAN, 0.0, 0.1], &[]), 0);
        }
        assert_eq!(s.sample(&[0.0, f32::INFINITY, 5.0], &[]), 1);
        assert_eq!(s.sample(&[f32::NAN, f32::NAN], &[]), 0);
        assert_eq!(s.sample(&[f32::NEG_INFINITY; 3], &[]), 0);
        assert_eq!(s.sample(&[], &[]), 0);
        assert!(s.probabilities(&[], &[]).is_empty());
        assert_eq!(argmax(&[f32::NAN, -1.0]), 1);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn invalid_params_degrade_instead_of_panicking() {
        let logits = [0.5, 2.0, 1.0];
        for p in [
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { temperature: f32::INFINITY, ..Default::default() },
            SamplingParams { top_p: f32::NAN, ..Default::default() },
            SamplingParams { top_p: -1.0, ..Default::default() },
            SamplingParams { min_p: 7.0, ..Default::default() },
            SamplingParams { repeat_penalty: f32::NAN, ..Default::default() },
            SamplingParams { repeat_penalty: -2.0, ..Default::default() },
        ] {
            assert!(p.validate().is_err(), "{p:?}");
            let mut s = Sampler::new(SamplingParams { seed: Some(1), ..p });
            assert!(s.sample(&logits, &[1, 1]) < 3);
            let sum: f32 = s.probabilities(&logits, &[1]).iter().map(|&(_, p)| p).sum();
            assert!((sum - 1.0).abs() < 1e-5);
        }
    }

    #[test]
    fn validate_accepts_good_and_rejects_bad() {
        assert!(SamplingParams::default().validate().is_ok());
        assert!(SamplingParams::greedy().validate().is_ok());
        let bad = [
            SamplingParams { temperature: -0.1, ..Default::default() },
            SamplingParams { temperature: f32::NAN, ..Default::default() },
            SamplingParams { top_p: 0.0, ..Default::default() },
            SamplingParams { top_p: 1.01, ..Default::default() },
            SamplingParams { min_p: -0.01, ..Default::default() },
            SamplingParams { min_p: 1.5, ..Default::default() },
            SamplingParams { repeat_penalty: 0.0, ..Default::default() },
            SamplingParams { repeat_penalty: -1.0, ..Default::default() },
        ];
        let fields = ["temperature", "temperature", "top_p", "top_p", "min_p", "min_p"];
        for (i, p) in bad.iter().enumerate() {
            let msg = p.validate().unwrap_err().to_string();
            let field = fields.get(i).copied().unwrap_or("repeat_penalty");
            assert!(msg.contains(field), "{msg}");
        }
    }

    #[test]
    fn serde_fills_missing_fields_with_defaults() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature": 0.3, "seed": 5}"#).unwrap();
        assert_eq!(p.temperature, 0.3);
        assert_eq!(p.seed, Some(5));
        assert_eq!(p.top_k, SamplingParams::default().top_k);
    }

    #[test]
    fn log_softmax_matches_reference_and_is_stable() {
        let logits = [0.5f32, -1.0, 2.0];
        let s: f64 = logits.iter().map(|&l| f64::from(l).exp()).sum();
        for (i, &l) in logits.iter().enumerate() {
            let want = f64::from(l) - s.ln();
            assert!((log_softmax_at(&logits, i as u32) - want).abs() < 1e-12);
        }
        let want = -(1.0 + (-1.0f64).exp()).ln();
        assert!((log_softmax_at(&[1000.0, 999.0], 0) - want).abs() < 1e-12);
        assert_eq!(log_softmax_at(&[1.0, f32::NAN], 1), f64::NEG_INFINITY);
        assert_eq!(log_softmax_at(&[1.0], 3), f64::NEG_INFINITY);
        assert!((log_softmax_at(&[1.0, f32::NAN], 0)).abs() < 1e-12);
        assert!((log_softmax_at(&[f32::INFINITY, 0.0, f32::INFINITY], 2) + 2f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn reserved_buffers_are_not_regrown() {
        let logits: Vec<f32> = (0..49_152).map(|i| ((i * 7919) % 1000) as f32 / 100.0).collect();
        let history: Vec<u32> = (0..200).collect();
        let mut s = Sampler::new(SamplingParams { repeat_penalty: 1.1, seed: Some(1), ..Default::default() });
        s.reserve(logits.len());
        let (cap_c, cap_w) = (s.candidates.capacity(), s.window.capacity());
        for _ in 0..5 {
            s.sample(&logits, &history);
        }
        assert_eq!((s.candidates.capacity(), s.window.capacity()), (cap_c, cap_w));
    }

    fn arb_params() -> impl Strategy<Value = SamplingParams> {
        (
            prop_oneof![Just(0.0f32), 0.05f32..3.0],
            0usize..50,
            prop_oneof![Just(1.0f32), 0.01f32..=1.0],
            prop_oneof![Just(0.0f32), 0.0f32..=1.0],
            prop_oneof![Just(1.0f32), 0.5f32..2.0],
            0usize..80,
            any::<u64>(),
        )
            .prop_map(|(temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed)| {
                SamplingParams { temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed: Some(seed) }
            })
    }

    proptest! {
        #[test]
        fn sample_respects_bounds_and_top_k(
            logits in prop::collection::vec(-30.0f32..30.0, 1..300),
            history in prop::collection::vec(0u32..400, 0..100),
            p in arb_params(),
        ) {
            // Reference penalised logits, to know which tokens top-k may keep.
            let mut adj = logits.clone();
            if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
                let start = history.len().saturating_sub(p.repeat_last_n);
                let mut ids: Vec<u32> = history[start..].to_vec();
                ids.sort_unstable();
                ids.dedup();
                for id in ids {
                    if let Some(l) = adj.get_mut(id as usize) {
                        *l = if *l > 0.0 { *l / p.repeat_penalty } else { *l * p.repeat_penalty };
                    }
                }
            }
            let k = p.top_k;
            let mut s = Sampler::new(p);
            for _ in 0..4 {
                let id = s.sample(&logits, &history) as usize;
                prop_assert!(id < logits.len());
                if k > 0 {
                    let better = adj.iter().filter(|&&l| l > adj[id]).count();
                    prop_assert!(better < k, "id {} has {} better tokens, top_k {}", id, better, k);
                }
            }
            let probs = s.probabilities(&logits, &history);
            let sum: f64 = probs.iter().map(|&(_, p)| f64::from(p)).sum();
            prop_assert!((sum - 1.0).abs() < 1e-4, "sum {}", sum);
            prop_assert!(probs.iter().all(|&(id, p)| (id as usize) < logits.len() && p > 0.0));
            if k > 0 {
                prop_assert!(probs.len() <= k);
            }
            let mut ids: Vec<u32> = probs.iter().map(|&(id, _)| id).collect();
            ids.sort_unstable();
            ids.dedup();
            prop_assert_eq!(ids.len(), probs.len());
        }
    }
}
