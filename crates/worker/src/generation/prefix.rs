//! The prefix cache: the KV cache of recently prefilled prompts, so that a
//! prompt sharing a beginning with one of them (the chat template's system
//! prompt, a conversation's earlier turns, the same prompt again) prefills
//! only the rest.
//!
//! An entry is one prompt's tokens with (in the scheduler) the one-row cache
//! of all its positions and its last token's logits. A prompt equal to an entry's takes both and
//! runs nothing; one that shares a beginning of `p` tokens with an entry
//! starts its prefill at position `p` over a copy of the entry's first `p`
//! positions. Entries are kept most recently used last and the least
//! recently used leave first, so that the positions held stay within the
//! budget (`prefix_cache_tokens`).

use std::collections::VecDeque;

/// A prompt's cached prefill: its tokens and what the scheduler keeps of
/// it (`T`: the cache of every position and the last token's logits).
#[derive(Debug)]
pub(super) struct Entry<T> {
    pub tokens: Vec<u32>,
    pub value: T,
    /// Positions it counts against the budget: its tokens, and what else it
    /// holds (the logits) in positions' worth of memory.
    pub cost: usize,
}

/// Recently prefilled prompts within a budget of positions.
#[derive(Debug)]
pub(super) struct PrefixCache<T> {
    budget: usize,
    held: usize,
    /// Least recently used first.
    entries: VecDeque<Entry<T>>,
}

impl<T> PrefixCache<T> {
    /// A cache holding at most `budget` positions (0: none, the cache is off).
    pub(super) fn new(budget: usize) -> Self {
        PrefixCache {
            budget,
            held: 0,
            entries: VecDeque::new(),
        }
    }

    /// Whether it can hold anything.
    pub(super) fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Positions held (each entry's cost).
    pub(super) fn held(&self) -> usize {
        self.held
    }

    /// The entry sharing the longest beginning with `prompt` (at least one
    /// token), and that length; the entry becomes the most recently used.
    pub(super) fn lookup(&mut self, prompt: &[u32]) -> Option<(usize, &Entry<T>)> {
        let (at, common) = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt)))
            .max_by_key(|&(i, common)| (common, i))?;
        if common == 0 {
            return None;
        }
        let entry = self.entries.remove(at)?;
        self.entries.push_back(entry);
        self.entries.back().map(|e| (common, e))
    }

    /// Keeps a prompt's prefill, as the most recently used entry, evicting
    /// the least recently used ones until it fits. Entries it extends (their
    /// tokens a beginning of its own) leave: it serves every prompt they
    /// would. An entry costing more than the whole budget is not kept.
    pub(super) fn insert(&mut self, entry: Entry<T>) {
        let cost = entry.cost.max(entry.tokens.len());
        if entry.tokens.is_empty() || cost > self.budget {
            return;
        }
        let mut freed = 0;
        self.entries.retain(|e| {
            let covered = entry.tokens.starts_with(&e.tokens);
            if covered {
                freed += e.cost;
            }
            !covered
        });
        self.held -= freed;
        while self.held + cost > self.budget {
            let Some(old) = self.entries.pop_front() else {
                break;
            };
            self.held -= old.cost;
        }
        self.held += cost;
        self.entries.push_back(Entry { cost, ..entry });
    }

    /// Whether some entry holds exactly `prompt`.
    #[cfg(test)]
    pub(super) fn holds(&self, prompt: &[u32]) -> bool {
        self.entries.iter().any(|e| e.tokens == prompt)
    }
}

/// How many tokens `a` and `b` share from the start.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(tokens: &[u32]) -> Entry<()> {
        Entry {
            tokens: tokens.to_vec(),
            value: (),
            cost: tokens.len(),
        }
    }

    #[test]
    fn the_longest_shared_beginning_wins_and_nothing_shared_is_a_miss() {
        let mut cache = PrefixCache::new(100);
        cache.insert(entry(&[1, 2, 3, 4]));
        cache.insert(entry(&[1, 2, 9]));
        cache.insert(entry(&[7, 8]));
        let (common, hit) = cache.lookup(&[1, 2, 3, 5, 6]).expect("a hit");
        assert_eq!((common, hit.tokens.as_slice()), (3, &[1, 2, 3, 4][..]));
        let (common, hit) = cache.lookup(&[1, 2, 9]).expect("the same prompt");
        assert_eq!((common, hit.tokens.as_slice()), (3, &[1, 2, 9][..]));
        assert!(cache.lookup(&[5, 1, 2]).is_none());
        assert!(cache.lookup(&[]).is_none());
    }

    #[test]
    fn the_least_recently_used_leave_first_and_the_budget_holds() {
        let mut cache = PrefixCache::new(10);
        cache.insert(entry(&[1, 1, 1, 1]));
        cache.insert(entry(&[2, 2, 2, 2]));
        // Using the first makes the second the least recently used.
        assert!(cache.lookup(&[1, 1]).is_some());
        cache.insert(entry(&[3, 3, 3, 3]));
        assert_eq!(cache.held(), 8);
        assert!(cache.holds(&[1, 1, 1, 1]) && cache.holds(&[3, 3, 3, 3]));
        assert!(!cache.holds(&[2, 2, 2, 2]));
        // Longer than the whole budget: not kept, nothing evicted for it.
        cache.insert(entry(&[4; 11]));
        assert_eq!(cache.held(), 8);
        assert!(!cache.holds(&[4; 11]));
    }

    #[test]
    fn a_prompt_that_extends_an_entry_replaces_it() {
        let mut cache = PrefixCache::new(100);
        cache.insert(entry(&[1, 2]));
        cache.insert(entry(&[5, 6]));
        cache.insert(entry(&[1, 2, 3]));
        assert_eq!(cache.held(), 5);
        assert!(!cache.holds(&[1, 2]) && cache.holds(&[1, 2, 3]));
        // The same prompt again replaces itself.
        cache.insert(entry(&[1, 2, 3]));
        assert_eq!(cache.held(), 5);
    }

    #[test]
    fn an_entry_counts_what_it_holds_besides_its_tokens() {
        let mut cache = PrefixCache::new(10);
        let costly = |tokens: &[u32]| Entry {
            cost: tokens.len() + 4,
            ..entry(tokens)
        };
        cache.insert(costly(&[1, 2]));
        cache.insert(costly(&[3]));
        // 6 + 5 is over the budget: the first goes.
        assert_eq!(cache.held(), 5);
        assert!(cache.holds(&[3]) && !cache.holds(&[1, 2]));
        // Costing more than the budget: not kept.
        cache.insert(costly(&[7; 7]));
        assert!(!cache.holds(&[7; 7]));
    }

    #[test]
    fn a_zero_budget_holds_nothing() {
        let mut cache = PrefixCache::new(0);
        assert!(!cache.enabled());
        cache.insert(entry(&[1]));
        assert_eq!(cache.held(), 0);
        assert!(cache.lookup(&[1]).is_none());
    }
}
