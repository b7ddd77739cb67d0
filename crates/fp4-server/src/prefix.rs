//! Prefix cache for a hybrid model: a sequence's whole state (every attention layer's KV rows,
//! every GDN layer's conv inputs and recurrent state) snapshotted at the end of each prompt, where
//! the next turn of the same conversation resumes: its prompt is this one, the reply and a new
//! message, so only those are prefilled. A GDN state cannot be cut back to a shorter prefix the
//! way KV rows can, so a snapshot serves exactly the prompts that start with all of its tokens;
//! the longest such snapshot wins. Least recently used snapshots go first when the byte budget
//! is full. The snapshots are copies of the prefill state on the model's device (CPU or GPU):
//! the model's cache, and for a sequence that drafts with the MTP head, the head's too.

use fp4_model::{Cache, LayerCache};

/// What a snapshot holds.
pub trait Snapshot: Clone {
    /// Device bytes it takes.
    fn bytes(&self) -> usize;
}

impl Snapshot for Cache {
    fn bytes(&self) -> usize {
        cache_bytes(self)
    }
}

/// Snapshots of prefilled prompts within a byte budget.
pub struct PrefixCache<S = Cache> {
    entries: Vec<Entry<S>>,
    budget: usize,
    used: usize,
    clock: u64,
}

struct Entry<S> {
    tokens: Vec<u32>,
    snapshot: S,
    bytes: usize,
    last_used: u64,
}

/// Bytes of every tensor of `cache` (f32 elements).
pub fn cache_bytes(cache: &Cache) -> usize {
    cache.layers.iter().map(layer_bytes).sum()
}

/// Bytes of one layer's state (f32 elements).
pub fn layer_bytes(layer: &LayerCache) -> usize {
    let elems = match layer {
        LayerCache::Attention { k, v } => {
            k.as_ref().map_or(0, |t| t.elem_count()) + v.as_ref().map_or(0, |t| t.elem_count())
        }
        LayerCache::Gdn { conv, state } => conv.elem_count() + state.elem_count(),
    };
    elems * std::mem::size_of::<f32>()
}

impl<S: Snapshot> PrefixCache<S> {
    /// An empty cache that holds up to `budget` bytes of snapshots (0: nothing is kept).
    pub fn new(budget: usize) -> PrefixCache<S> {
        PrefixCache { entries: Vec::new(), budget, used: 0, clock: 0 }
    }

    /// A copy of the longest `usable` snapshot whose tokens `prompt` starts with, leaving at
    /// least one prompt token to prefill (its logits give the first output token), and its length.
    pub fn lookup(&mut self, prompt: &[u32], usable: impl Fn(&S) -> bool) -> Option<(S, usize)> {
        self.clock += 1;
        let best = self
            .entries
            .iter_mut()
            .filter(|e| e.tokens.len() < prompt.len() && prompt.starts_with(&e.tokens) && usable(&e.snapshot))
            .max_by_key(|e| e.tokens.len())?;
        best.last_used = self.clock;
        Some((best.snapshot.clone(), best.tokens.len()))
    }

    /// Keeps a copy of `snapshot`, the state after `tokens`, evicting the least recently used
    /// snapshots until it fits; one larger than the whole budget is not kept. A snapshot of the
    /// same tokens is only refreshed, or replaced by one that holds more (the MTP head's state).
    pub fn insert(&mut self, tokens: &[u32], snapshot: &S) {
        self.clock += 1;
        let bytes = snapshot.bytes();
        if let Some(i) = self.entries.iter().position(|e| e.tokens == tokens) {
            self.entries[i].last_used = self.clock;
            if bytes <= self.entries[i].bytes {
                return;
            }
            self.used -= self.entries.swap_remove(i).bytes;
        }
        if bytes > self.budget {
            return;
        }
        while self.used + bytes > self.budget {
            let oldest = (0..self.entries.len()).min_by_key(|&i| self.entries[i].last_used).expect("used > 0");
            self.used -= self.entries.swap_remove(oldest).bytes;
        }
        self.used += bytes;
        self.entries.push(Entry { tokens: tokens.to_vec(), snapshot: snapshot.clone(), bytes, last_used: self.clock });
    }

    /// Snapshots held and their bytes.
    pub fn usage(&self) -> (usize, usize) {
        (self.entries.len(), self.used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp4_model::Tensor;

    /// A cache whose every tensor holds `fill` (KV of `len` rows).
    fn cache(len: usize, fill: f32) -> Cache {
        let t = |shape: &[usize]| Tensor::from_vec(vec![fill; shape.iter().product()], shape);
        Cache {
            layers: vec![
                LayerCache::Attention { k: Some(t(&[len, 2, 4])), v: Some(t(&[len, 2, 4])) },
                LayerCache::Gdn { conv: t(&[3, 8]), state: t(&[2, 4, 4]) },
            ],
            seq_len: len,
        }
    }

    fn fill_of(c: &Cache) -> f32 {
        match &c.layers[1] {
            LayerCache::Gdn { state, .. } => state.as_slice()[0],
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_longest_proper_prefix_wins_and_is_a_copy() {
        let mut pc = PrefixCache::new(1 << 20);
        pc.insert(&[1, 2], &cache(2, 2.0));
        pc.insert(&[1, 2, 3, 4], &cache(4, 4.0));
        pc.insert(&[9, 9, 9], &cache(3, 9.0));
        let (c, n) = pc.lookup(&[1, 2, 3, 4, 5], |_| true).unwrap();
        assert_eq!((n, fill_of(&c), c.seq_len), (4, 4.0, 4));
        // The whole prompt cached: one token must still be prefilled, so the shorter one serves.
        let (c, n) = pc.lookup(&[1, 2, 3, 4], |_| true).unwrap();
        assert_eq!((n, fill_of(&c)), (2, 2.0));
        assert!(pc.lookup(&[1, 3, 4], |_| true).is_none() && pc.lookup(&[1], |_| true).is_none());
        // Changing the copy leaves the snapshot as it was.
        let (mut c, _) = pc.lookup(&[9, 9, 9, 0], |_| true).unwrap();
        if let LayerCache::Gdn { state, .. } = &mut c.layers[1] {
            state.as_mut_slice()[0] = -1.0;
        }
        assert_eq!(fill_of(&pc.lookup(&[9, 9, 9, 0], |_| true).unwrap().0), 9.0);
        // Only usable snapshots serve (a drafting sequence needs one with the MTP head's state).
        let (c, n) = pc.lookup(&[1, 2, 3, 4, 5], |c| c.seq_len < 4).unwrap();
        assert_eq!((n, fill_of(&c)), (2, 2.0));
        // The same tokens again with a snapshot that holds more: it replaces the old one.
        pc.insert(&[9, 9, 9], &cache(6, 6.0));
        assert_eq!(fill_of(&pc.lookup(&[9, 9, 9, 0], |_| true).unwrap().0), 6.0);
        assert_eq!(pc.usage(), (3, [2, 4, 6].iter().map(|&l| cache_bytes(&cache(l, 0.0))).sum()));
    }

    #[test]
    fn least_recently_used_snapshots_are_evicted_to_fit_the_budget() {
        let one = cache_bytes(&cache(4, 0.0));
        assert_eq!(one, (2 * 4 * 2 * 4 + 3 * 8 + 2 * 4 * 4) * 4);
        let mut pc = PrefixCache::new(2 * one);
        pc.insert(&[1, 1, 1, 1], &cache(4, 1.0));
        pc.insert(&[2, 2, 2, 2], &cache(4, 2.0));
        assert!(pc.lookup(&[1, 1, 1, 1, 7], |_| true).is_some()); // [1…] is now the more recent
        pc.insert(&[3, 3, 3, 3], &cache(4, 3.0));
        assert_eq!(pc.usage(), (2, 2 * one));
        assert!(pc.lookup(&[2, 2, 2, 2, 7], |_| true).is_none(), "the least recently used one goes");
        assert!(pc.lookup(&[1, 1, 1, 1, 7], |_| true).is_some() && pc.lookup(&[3, 3, 3, 3, 7], |_| true).is_some());
        // Re-inserting the same tokens refreshes, a snapshot beyond the budget is not kept.
        pc.insert(&[3, 3, 3, 3], &cache(4, 30.0));
        assert_eq!(fill_of(&pc.lookup(&[3, 3, 3, 3, 7], |_| true).unwrap().0), 3.0);
        pc.insert(&[5; 20], &cache(20, 5.0));
        assert!(pc.lookup(&[5; 21], |_| true).is_none());
        assert_eq!(pc.usage(), (2, 2 * one));
        let mut off = PrefixCache::new(0);
        off.insert(&[1, 2], &cache(2, 1.0));
        assert!(off.lookup(&[1, 2, 3], |_| true).is_none());
    }
}
