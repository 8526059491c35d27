//! The choices routing makes, as pure functions over indices so that they
//! can be tested without workers: power of two choices, weighted choice of a
//! version, and consistent hashing with bounded load. Randomness comes from
//! one lock-free generator that tests seed.

use std::sync::atomic::{AtomicU64, Ordering};

use lmgrid_proto::lmgrid::v1 as pb;

/// Virtual nodes per worker on a consistent-hashing ring: enough that
/// workers own near-equal arcs.
pub(super) const VIRTUAL_NODES: usize = 64;

/// A small, fast, lock-free random number generator (a Weyl sequence mixed
/// by SplitMix64). Not for secrets; good for picking workers.
#[derive(Debug)]
pub(super) struct Rng(AtomicU64);

impl Rng {
    pub(super) fn seeded(seed: u64) -> Rng {
        Rng(AtomicU64::new(seed))
    }

    /// Seeded from the clock and the address of a stack value, so that
    /// gateways started together do not pick in lockstep.
    pub(super) fn from_entropy() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let local = 0u8;
        Rng::seeded(nanos ^ (&local as *const u8 as u64).rotate_left(32))
    }

    pub(super) fn next_u64(&self) -> u64 {
        mix(self.0.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed))
    }

    /// Uniform in `0..n` (`n` > 0).
    pub(super) fn below(&self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// SplitMix64's finalizer: every input bit affects every output bit.
pub(super) fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of `bytes` (FNV-1a, then mixed): the same in every
/// gateway and every release, unlike `std`'s hasher.
pub(super) fn hash(bytes: &[u8]) -> u64 {
    let mut hasher = StableHasher::default();
    hasher.write(bytes);
    hasher.finish()
}

/// [`hash`] fed in pieces.
#[derive(Debug, Clone, Copy)]
pub(super) struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        StableHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl StableHasher {
    pub(super) fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    pub(super) fn finish(self) -> u64 {
        mix(self.0)
    }
}

/// The affinity key of a generation request: a hash of the first `chars`
/// characters of its prompt, or of its conversation (each message's role
/// and content), so that requests sharing that prefix share a key.
pub(super) fn prompt_key(input: &pb::generate_request::Input, chars: usize) -> u64 {
    let mut hasher = StableHasher::default();
    let mut left = chars;
    match input {
        pb::generate_request::Input::Prompt(prompt) => feed(&mut hasher, prompt, &mut left),
        pb::generate_request::Input::Chat(chat) => {
            for message in &chat.messages {
                if left == 0 {
                    break;
                }
                hasher.write(message.role.as_bytes());
                hasher.write(&[0]);
                feed(&mut hasher, &message.content, &mut left);
                hasher.write(&[0]);
            }
        }
    }
    hasher.finish()
}

/// Hashes at most `left` characters of `text`, counting them off.
fn feed(hasher: &mut StableHasher, text: &str, left: &mut usize) {
    let (end, taken) = match text.char_indices().nth(*left) {
        Some((at, _)) => (at, *left),
        None => (text.len(), text.chars().count()),
    };
    hasher.write(&text.as_bytes()[..end]);
    *left -= taken;
}

/// Power of two choices: of two distinct eligible indices picked at random
/// among `0..n`, the one with the lower score (the first on a tie).
pub(super) fn two_choices(
    rng: &Rng,
    n: usize,
    eligible: impl Fn(usize) -> bool,
    score: impl Fn(usize) -> u64,
) -> Option<usize> {
    let count = (0..n).filter(|&i| eligible(i)).count();
    let nth = |rank: usize| (0..n).filter(|&i| eligible(i)).nth(rank);
    match count {
        0 => None,
        1 => nth(0),
        _ => {
            let a = rng.below(count as u64) as usize;
            // A different second pick: one of the other count - 1.
            let b = (a + 1 + rng.below(count as u64 - 1) as usize) % count;
            let (a, b) = (nth(a)?, nth(b)?);
            Some(if score(b) < score(a) { b } else { a })
        }
    }
}

/// One of `weights`' indices with probability proportional to its weight;
/// `None` when every weight is 0.
pub(super) fn weighted(rng: &Rng, weights: impl Iterator<Item = u32> + Clone) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut point = rng.below(total);
    for (i, weight) in weights.enumerate() {
        let weight = u64::from(weight);
        if point < weight {
            return Some(i);
        }
        point -= weight;
    }
    None
}

/// A consistent-hashing ring: [`VIRTUAL_NODES`] points per worker, sorted.
#[derive(Debug, Default)]
pub(super) struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// The ring of workers named `ids` (index `i` is `ids[i]`). A worker
    /// keeps its points whoever else joins or leaves.
    pub(super) fn new<'a>(ids: impl Iterator<Item = &'a str>) -> Ring {
        let mut points = Vec::new();
        for (index, id) in ids.enumerate() {
            for node in 0..VIRTUAL_NODES {
                let point = hash(format!("{id}#{node}").as_bytes());
                points.push((point, index as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// Consistent hashing with bounded load: walking the ring clockwise from
    /// `key`, the first eligible worker whose load, with this request, stays
    /// within `factor` × the average (rounded up). Falls back to `None` only
    /// when no worker is eligible.
    pub(super) fn choose(
        &self,
        key: u64,
        n: usize,
        factor: f64,
        eligible: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        let (count, total) = (0..n)
            .filter(|&i| eligible(i))
            .fold((0u64, 0u64), |(c, t), i| (c + 1, t + load(i)));
        if count == 0 || self.points.is_empty() {
            return None;
        }
        let bound = (factor * (total + 1) as f64 / count as f64).ceil() as u64;
        let start = self.points.partition_point(|(point, _)| *point < key);
        let walk = self.points[start..].iter().chain(&self.points[..start]);
        let mut fallback = None;
        for &(_, index) in walk {
            let index = index as usize;
            if index >= n || !eligible(index) {
                continue;
            }
            if load(index) < bound {
                return Some(index);
            }
            fallback.get_or_insert(index);
        }
        fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_choices_prefer_the_lower_score_and_skip_the_ineligible() {
        let rng = Rng::seeded(1);
        let loads = [5u64, 0, 9];
        let mut picked = [0usize; 3];
        for _ in 0..3000 {
            let i = two_choices(&rng, 3, |_| true, |i| loads[i]).unwrap();
            picked[i] += 1;
        }
        // The least loaded wins every pair it is in (2/3 of pairs); the most
        // loaded never wins.
        assert_eq!(picked[2], 0, "{picked:?}");
        assert!((1800..2200).contains(&picked[1]), "{picked:?}");
        assert!(two_choices(&rng, 3, |i| i == 2, |i| loads[i]) == Some(2));
        assert!(two_choices(&rng, 3, |_| false, |i| loads[i]).is_none());
        assert!(two_choices(&rng, 0, |_| true, |_| 0).is_none());
        // Equal scores spread evenly.
        let mut even = [0usize; 4];
        for _ in 0..4000 {
            even[two_choices(&rng, 4, |_| true, |_| 1).unwrap()] += 1;
        }
        assert!(even.iter().all(|&c| (850..1150).contains(&c)), "{even:?}");
    }

    #[test]
    fn weighted_choices_follow_the_weights() {
        let rng = Rng::seeded(7);
        let weights = [90u32, 10, 0];
        let mut counts = [0u64; 3];
        let n = 20_000u64;
        for _ in 0..n {
            counts[weighted(&rng, weights.iter().copied()).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0);
        // Pearson's chi-square with one degree of freedom: 10.83 is p = 0.001.
        let expected = [0.9 * n as f64, 0.1 * n as f64];
        let chi2: f64 = (0..2)
            .map(|i| (counts[i] as f64 - expected[i]).powi(2) / expected[i])
            .sum();
        assert!(chi2 < 10.83, "chi-square {chi2} for {counts:?}");
        assert_eq!(weighted(&rng, [0u32, 0].into_iter()), None);
    }

    #[test]
    fn hashing_is_stable() {
        // Gateways must agree on the ring, across processes and releases.
        assert_eq!(hash(b""), mix(0xcbf2_9ce4_8422_2325));
        assert_eq!(hash(b"prompt"), hash(b"prompt"));
        assert_ne!(hash(b"prompt a"), hash(b"prompt b"));
    }

    #[test]
    fn prompt_keys_depend_on_the_prefix_only() {
        let prompt = |text: &str| pb::generate_request::Input::Prompt(text.to_string());
        let key = |text: &str| prompt_key(&prompt(text), 8);
        assert_eq!(
            key("You are helpful. Say hi"),
            key("You are helpful. Say bye")
        );
        assert_ne!(key("You are helpful."), key("You were helpful."));
        assert_eq!(key("héllo wörld, again"), key("héllo wörld"));
        let chat = |messages: &[(&str, &str)]| {
            pb::generate_request::Input::Chat(pb::ChatMessages {
                messages: messages
                    .iter()
                    .map(|(role, content)| pb::ChatMessage {
                        role: role.to_string(),
                        content: content.to_string(),
                        ..Default::default()
                    })
                    .collect(),
            })
        };
        let system = ("system", "You are a helpful assistant.");
        assert_eq!(
            prompt_key(&chat(&[system, ("user", "a")]), 20),
            prompt_key(&chat(&[system, ("user", "b")]), 20)
        );
        assert_ne!(
            prompt_key(&chat(&[system, ("user", "a")]), 100),
            prompt_key(&chat(&[system, ("user", "b")]), 100)
        );
        assert_ne!(
            prompt_key(&chat(&[("user", "hi")]), 100),
            prompt_key(&chat(&[("system", "hi")]), 100)
        );
    }

    #[test]
    fn a_ring_keeps_keys_on_their_worker_and_moves_few_when_one_leaves() {
        let ids = ["w0", "w1", "w2", "w3"];
        let ring = Ring::new(ids.iter().copied());
        let idle = |_| 0u64;
        let keys: Vec<u64> = (0..1000u64).map(|k| hash(&k.to_le_bytes())).collect();
        let owners: Vec<usize> = keys
            .iter()
            .map(|&k| ring.choose(k, 4, 1.25, |_| true, idle).unwrap())
            .collect();
        let mut share = [0usize; 4];
        for &owner in &owners {
            share[owner] += 1;
        }
        assert!(share.iter().all(|&s| (150..350).contains(&s)), "{share:?}");
        // Without w3, only w3's keys move.
        let moved = keys
            .iter()
            .zip(&owners)
            .filter(|&(&k, &owner)| ring.choose(k, 4, 1.25, |i| i != 3, idle).unwrap() != owner)
            .count();
        assert_eq!(moved, share[3]);
    }

    #[test]
    fn bounded_load_moves_a_key_off_a_worker_over_the_bound() {
        let ring = Ring::new(["a", "b", "c"].into_iter());
        let key = hash(b"a shared system prompt");
        let home = ring.choose(key, 3, 1.25, |_| true, |_| 0).unwrap();
        // The home worker holds 6 of 6 outstanding: the bound is
        // ceil(1.25 × 7 / 3) = 3, so the key goes to the next worker along.
        let loads = |i: usize| if i == home { 6 } else { 0 };
        let next = ring.choose(key, 3, 1.25, |_| true, loads).unwrap();
        assert_ne!(next, home);
        // Under the bound it stays home.
        let light = |i: usize| if i == home { 2 } else { 1 };
        assert_eq!(ring.choose(key, 3, 1.25, |_| true, light), Some(home));
        assert_eq!(ring.choose(key, 3, 1.25, |_| false, light), None);
        assert_eq!(Ring::default().choose(key, 3, 1.25, |_| true, light), None);
    }
}
