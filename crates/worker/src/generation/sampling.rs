//! Choosing the next token from a row of logits: penalties, then greedy
//! decoding or seeded sampling with temperature, top-k and top-p.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};

/// How one sequence picks its tokens.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SamplingParams {
    /// 0: greedy decoding.
    pub temperature: f32,
    /// Keep the smallest set of tokens whose probability reaches this; 1: off.
    pub top_p: f32,
    /// Keep this many most likely tokens; 0: off.
    pub top_k: usize,
    /// Divides positive (multiplies negative) logits of every token already in
    /// the prompt or the completion; 1: off.
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated.
    pub presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Seeds the generator: the same seed gives the same tokens.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplingParams {
    /// Checks the ranges; the message names the field.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if !(0.0..=100.0).contains(&self.temperature) {
            return Err(format!(
                "temperature {} is not within 0..=100",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p {} is not within (0, 1]", self.top_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(format!(
                "repetition_penalty {} must be a positive number",
                self.repetition_penalty
            ));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return Err(format!("{name} {value} is not within -2..=2"));
            }
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    fn has_penalties(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// xoshiro256** seeded through splitmix64: small, fast, and the same
/// sequence on every platform for a seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    state: [u64; 4],
}

impl Rng {
    pub(crate) fn seeded(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Rng {
            state: [next(), next(), next(), next()],
        }
    }

    /// A generator seeded from the process's random hasher keys.
    pub(crate) fn from_entropy() -> Self {
        Rng::seeded(RandomState::new().hash_one(std::time::Instant::now()))
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let s = &mut self.state;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Candidates sorted before top-p falls back to sorting the whole vocabulary.
const TOP_P_CANDIDATES: usize = 256;

/// Picks the tokens of one sequence.
#[derive(Debug)]
pub(crate) struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// Times each token was generated.
    generated: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt: Vec<u32>,
    scratch: Vec<f32>,
}

impl Sampler {
    pub(crate) fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = params.seed.map_or_else(Rng::from_entropy, Rng::seeded);
        let mut prompt = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        prompt.sort_unstable();
        prompt.dedup();
        Sampler {
            params,
            rng,
            generated: HashMap::new(),
            prompt,
            scratch: Vec::new(),
        }
    }

    /// Chooses the next token from `logits` (one row, the vocabulary wide)
    /// and remembers it for the penalties.
    pub(crate) fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = if !self.params.has_penalties() && self.params.is_greedy() {
            argmax(logits)
        } else {
            let mut scores = std::mem::take(&mut self.scratch);
            scores.clear();
            scores.extend_from_slice(logits);
            self.penalize(&mut scores);
            let token = if self.params.is_greedy() {
                argmax(&scores)
            } else {
                self.draw(&scores)
            };
            self.scratch = scores;
            token
        };
        *self.generated.entry(token).or_default() += 1;
        token
    }

    fn penalize(&self, scores: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let seen = self
                .prompt
                .iter()
                .copied()
                .chain(self.generated.keys().copied());
            let mut done = std::collections::HashSet::new();
            for token in seen {
                if !done.insert(token) {
                    continue;
                }
                if let Some(s) = scores.get_mut(token as usize) {
                    *s = if *s > 0.0 {
                        *s / p.repetition_penalty
                    } else {
                        *s * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&token, &count) in &self.generated {
                if let Some(s) = scores.get_mut(token as usize) {
                    *s -= p.presence_penalty + p.frequency_penalty * count as f32;
                }
            }
        }
    }

    /// Samples from softmax(scores / temperature) restricted by top-k and top-p.
    fn draw(&mut self, scores: &[f32]) -> u32 {
        let p = &self.params;
        let mut candidates: Vec<(u32, f32)> = scores
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_finite())
            .map(|(i, &s)| (i as u32, s))
            .collect();
        if candidates.is_empty() {
            return argmax(scores);
        }
        let by_score = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < candidates.len() {
            candidates.select_nth_unstable_by(p.top_k - 1, by_score);
            candidates.truncate(p.top_k);
        }
        let max = candidates
            .iter()
            .map(|c| c.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / p.temperature as f64;
        let mut weights: Vec<(u32, f64)> = candidates
            .iter()
            .map(|&(i, s)| (i, ((s - max) as f64 * inv_t).exp()))
            .collect();
        if p.top_p < 1.0 {
            let total: f64 = weights.iter().map(|w| w.1).sum();
            let keep = top_p_prefix(&mut weights, p.top_p as f64 * total);
            weights.truncate(keep);
        }
        let total: f64 = weights.iter().map(|w| w.1).sum();
        let mut target = self.rng.next_f64() * total;
        for &(token, weight) in &weights {
            if target < weight {
                return token;
            }
            target -= weight;
        }
        weights.last().map_or(0, |w| w.0)
    }
}

/// Sorts the heaviest weights first and returns how many of them reach
/// `mass`. Only the leading candidates are sorted unless they fall short.
fn top_p_prefix(weights: &mut [(u32, f64)], mass: f64) -> usize {
    let by_weight = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let head = TOP_P_CANDIDATES.min(weights.len());
    if head < weights.len() {
        weights.select_nth_unstable_by(head - 1, by_weight);
    }
    weights[..head].sort_unstable_by(by_weight);
    if let Some(n) = reach(&weights[..head], mass) {
        return n;
    }
    weights.sort_unstable_by(by_weight);
    reach(weights, mass).unwrap_or(weights.len())
}

fn reach(sorted: &[(u32, f64)], mass: f64) -> Option<usize> {
    let mut sum = 0.0;
    for (i, w) in sorted.iter().enumerate() {
        sum += w.1;
        if sum >= mass {
            return Some(i + 1);
        }
    }
    None
}

/// The index of the largest logit; the lowest index wins a tie.
pub(crate) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_score = f32::NEG_INFINITY;
    for (i, &s) in logits.iter().enumerate() {
        if s > best_score {
            best = i;
            best_score = s;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: Some(7),
            ..SamplingParams::default()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit_and_the_lowest_index_on_ties() {
        let mut sampler = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(sampler.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..1000).map(|i| ((i * 37) % 101) as f32 / 20.0).collect();
        let run = |seed| {
            let mut sampler = Sampler::new(
                SamplingParams {
                    seed: Some(seed),
                    ..params(1.0)
                },
                &[],
            );
            (0..50).map(|_| sampler.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_only_the_head() {
        let logits = [1.0, 5.0, 4.9, -2.0];
        let mut k1 = Sampler::new(
            SamplingParams {
                top_k: 1,
                ..params(1.0)
            },
            &[],
        );
        assert!((0..100).all(|_| k1.sample(&logits) == 1));
        // Tokens 1 and 2 hold ~99.9% of the mass; top_p 0.9 excludes 0 and 3.
        let mut p = Sampler::new(
            SamplingParams {
                top_p: 0.9,
                ..params(1.0)
            },
            &[],
        );
        let drawn: Vec<u32> = (0..400).map(|_| p.sample(&logits)).collect();
        assert!(drawn.iter().all(|&t| t == 1 || t == 2), "{drawn:?}");
        assert!(drawn.contains(&1) && drawn.contains(&2));
    }

    #[test]
    fn top_p_falls_back_to_the_whole_vocabulary_when_the_head_is_not_enough() {
        // A flat distribution over 1000 tokens: 256 candidates hold 25.6%.
        let mut weights: Vec<(u32, f64)> = (0..1000).map(|i| (i, 1.0)).collect();
        assert_eq!(top_p_prefix(&mut weights, 500.0), 500);
        let mut weights: Vec<(u32, f64)> = (0..1000).map(|i| (i, 1.0 + i as f64)).collect();
        let n = top_p_prefix(&mut weights, 10.0);
        assert_eq!(n, 1, "the heaviest token alone (1000) reaches 10");
        assert_eq!(weights[0].0, 999);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p(0) = 1/(1+e) ≈ 0.27, p(1) ≈ 0.73.
        let mut sampler = Sampler::new(params(1.0), &[]);
        let ones = (0..4000)
            .filter(|_| sampler.sample(&[0.0, 1.0]) == 1)
            .count();
        let share = ones as f64 / 4000.0;
        assert!((share - 0.731).abs() < 0.03, "{share}");
    }

    #[test]
    fn penalties_steer_greedy_decoding_away_from_repeats() {
        let logits = [2.0, 1.9, 0.0];
        let mut plain = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(plain.sample(&logits), 0);
        assert_eq!(plain.sample(&logits), 0);

        let mut presence = Sampler::new(
            SamplingParams {
                presence_penalty: 0.5,
                ..SamplingParams::default()
            },
            &[],
        );
        assert_eq!(presence.sample(&logits), 0);
        assert_eq!(presence.sample(&logits), 1, "0 is penalised after one use");

        let mut repetition = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.5,
                ..SamplingParams::default()
            },
            &[0],
        );
        assert_eq!(repetition.sample(&logits), 1, "0 is in the prompt");

        let mut frequency = Sampler::new(
            SamplingParams {
                frequency_penalty: 0.06,
                ..SamplingParams::default()
            },
            &[],
        );
        assert_eq!(frequency.sample(&logits), 0);
        assert_eq!(frequency.sample(&logits), 0, "1.94 still beats 1.9");
        assert_eq!(frequency.sample(&logits), 1, "1.88 does not");
    }

    #[test]
    fn out_of_range_parameters_are_named() {
        let bad = |p: SamplingParams| p.validate().unwrap_err();
        assert!(
            bad(SamplingParams {
                temperature: -1.0,
                ..Default::default()
            })
            .contains("temperature")
        );
        assert!(
            bad(SamplingParams {
                top_p: 0.0,
                ..Default::default()
            })
            .contains("top_p")
        );
        assert!(
            bad(SamplingParams {
                top_p: f32::NAN,
                ..Default::default()
            })
            .contains("top_p")
        );
        assert!(
            bad(SamplingParams {
                repetition_penalty: 0.0,
                ..Default::default()
            })
            .contains("repetition_penalty")
        );
        assert!(
            bad(SamplingParams {
                presence_penalty: 3.0,
                ..Default::default()
            })
            .contains("presence_penalty")
        );
        assert!(SamplingParams::default().validate().is_ok());
    }
}
