//! Token Recycling (Luo et al., ACL 2025): every verification pass computes logits at every
//! tree node, accepted or not; the top-k of each is "recycled" into an adjacency matrix
//! `vocab × k` (row `t`: the likeliest tokens seen to follow `t`), and the next draft tree is
//! read out of that matrix along a static template. Drafting costs a few lookups, no model.

/// The Token Recycling matrix. Kept for the life of the process ("hot start"): later requests
/// draft from what earlier ones taught it.
#[derive(Debug, Clone)]
pub struct TokenRecycler {
    k: usize,
    vocab: usize,
    /// `vocab × k`, column 0 the most likely successor; all zeros until a token is seen.
    matrix: Vec<u32>,
    /// Scratch for the top-k selection.
    best: Vec<(f32, u32)>,
}

/// Candidates kept per token (the paper's k).
pub const RECYCLE_K: usize = 8;

/// Token Recycling's static tree "2.2.2" (80 nodes; `[a, b]` = the root's a-th candidate, then
/// that token's b-th candidate), from the authors' code (`tree_template_.py`).
const TEMPLATE: &[&[u8]] = &[
    &[0],
    &[1],
    &[2],
    &[3],
    &[4],
    &[5],
    &[6],
    &[7],
    &[0, 0],
    &[0, 1],
    &[0, 2],
    &[0, 3],
    &[0, 4],
    &[0, 5],
    &[0, 6],
    &[0, 7],
    &[1, 0],
    &[1, 1],
    &[1, 2],
    &[1, 3],
    &[2, 0],
    &[2, 1],
    &[2, 2],
    &[3, 0],
    &[3, 1],
    &[4, 0],
    &[5, 0],
    &[6, 0],
    &[7, 0],
    &[0, 0, 0],
    &[0, 0, 1],
    &[0, 0, 2],
    &[0, 0, 3],
    &[0, 0, 4],
    &[0, 0, 5],
    &[0, 0, 6],
    &[0, 0, 7],
    &[0, 1, 0],
    &[0, 1, 1],
    &[0, 1, 2],
    &[0, 2, 0],
    &[0, 2, 1],
    &[0, 3, 0],
    &[0, 4, 0],
    &[0, 5, 0],
    &[0, 6, 0],
    &[0, 7, 0],
    &[1, 0, 0],
    &[1, 0, 1],
    &[1, 1, 0],
    &[2, 0, 0],
    &[3, 0, 0],
    &[4, 0, 0],
    &[5, 0, 0],
    &[0, 0, 0, 0],
    &[0, 0, 0, 1],
    &[0, 0, 0, 2],
    &[0, 0, 0, 3],
    &[0, 0, 0, 4],
    &[0, 0, 1, 0],
    &[0, 0, 1, 1],
    &[0, 0, 2, 0],
    &[0, 0, 3, 0],
    &[0, 0, 4, 0],
    &[0, 1, 0, 0],
    &[0, 2, 0, 0],
    &[1, 0, 0, 0],
    &[2, 0, 0, 0],
    &[3, 0, 0, 0],
    &[0, 0, 0, 0, 0],
    &[0, 0, 0, 0, 1],
    &[0, 0, 0, 0, 2],
    &[0, 0, 0, 1, 0],
    &[0, 0, 0, 2, 0],
    &[0, 0, 1, 0, 0],
    &[0, 1, 0, 0, 0],
    &[1, 0, 0, 0, 0],
    &[0, 0, 0, 0, 0, 0],
    &[0, 0, 0, 0, 0, 1],
    &[0, 0, 0, 1, 0, 0],
];

/// Prior of how often the target's next token is the recycled candidate of each rank, used
/// until [`RankHits`] has measured it. A template node's value is the product along its path:
/// the chance the whole path is accepted.
pub const RANK_HIT_PRIOR: [f64; RECYCLE_K] = [0.50, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01];

/// Measured hit rate of each candidate rank: how often the token the target chose at a tree
/// node was the `j`-th recycled successor of that node's token.
#[derive(Debug, Clone, Default)]
pub struct RankHits {
    hits: [u64; RECYCLE_K],
    total: u64,
}

impl RankHits {
    pub fn record(&mut self, rank: Option<usize>) {
        self.total += 1;
        if let Some(r) = rank.filter(|&r| r < RECYCLE_K) {
            self.hits[r] += 1;
        }
    }
    /// Rates, blended with the prior by 32 pseudo-observations so early steps stay sensible.
    pub fn rates(&self) -> [f64; RECYCLE_K] {
        let w = 32.0;
        std::array::from_fn(|j| (self.hits[j] as f64 + w * RANK_HIT_PRIOR[j]) / (self.total as f64 + w))
    }
}

/// The `nodes` template nodes of highest expected acceptance under `rank_hit`, as
/// `(parent template index or None for the root, candidate rank, value)`, parents before
/// children. The paper sized its 80-node tree for a GPU, where 81 tokens cost about what one
/// does; on a CPU every node costs compute, so the tree is cut to what a pass can afford.
pub fn template(nodes: usize, rank_hit: &[f64; RECYCLE_K]) -> Vec<(Option<usize>, usize, f64)> {
    let value = |path: &[u8]| path.iter().map(|&c| rank_hit[c as usize]).product::<f64>();
    let mut order: Vec<usize> = (0..TEMPLATE.len()).collect();
    // A child's value is below its parent's, so any prefix of this order is a tree.
    order.sort_by(|&a, &b| value(TEMPLATE[b]).total_cmp(&value(TEMPLATE[a])).then(a.cmp(&b)));
    order.truncate(nodes);
    // Parents first: by depth, then by template order.
    order.sort_by_key(|&i| (TEMPLATE[i].len(), i));
    let mut out = Vec::with_capacity(order.len());
    for (k, &i) in order.iter().enumerate() {
        let path = TEMPLATE[i];
        let parent = if path.len() == 1 {
            None
        } else {
            let pp = &path[..path.len() - 1];
            // The parent's value is at least the child's, so it was kept (ties broken by
            // template order, where parents come first).
            match order[..k].iter().position(|&j| TEMPLATE[j] == pp) {
                Some(p) => Some(p),
                None => continue,
            }
        };
        out.push((parent, *path.last().unwrap() as usize, value(path)));
    }
    out
}

impl TokenRecycler {
    pub fn new(vocab: usize) -> Self {
        TokenRecycler { k: RECYCLE_K, vocab, matrix: vec![0; vocab * RECYCLE_K], best: Vec::new() }
    }

    /// Rank of `next` among the recycled successors of `token`, if it is one.
    pub fn rank_of(&self, token: u32, next: u32) -> Option<usize> {
        let t = token as usize;
        if t >= self.vocab {
            return None;
        }
        self.matrix[t * self.k..(t + 1) * self.k].iter().position(|&c| c == next)
    }

    /// The `rank`-th recycled successor of `token`.
    pub fn candidate(&self, token: u32, rank: usize) -> u32 {
        let t = (token as usize).min(self.vocab - 1);
        self.matrix[t * self.k + rank.min(self.k - 1)]
    }

    /// Records the top-k of `logits` as the successors of `token` (overwriting: the most recent
    /// context wins, as in the paper).
    pub fn update(&mut self, token: u32, logits: &[f32]) {
        let t = token as usize;
        if t >= self.vocab {
            return;
        }
        top_k(logits, self.k, &mut self.best);
        for (slot, &(_, id)) in self.matrix[t * self.k..(t + 1) * self.k].iter_mut().zip(&self.best) {
            *slot = id;
        }
    }

    /// Bytes held by the matrix.
    pub fn bytes(&self) -> usize {
        self.matrix.len() * 4
    }
}

/// The `k` largest values of `x` with their indices, largest first (ties: lower index first).
pub fn top_k(x: &[f32], k: usize, out: &mut Vec<(f32, u32)>) {
    out.clear();
    let mut min = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        // NaN never ranks.
        if v.is_nan() || (out.len() == k && v <= min) {
            continue;
        }
        // Insert keeping descending order; equal values keep the earlier index first.
        let at = out.iter().position(|&(b, _)| v > b).unwrap_or(out.len());
        if at < k {
            if out.len() == k {
                out.pop();
            }
            out.insert(at, (v, i as u32));
        }
        if out.len() == k {
            min = out[k - 1].0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_is_the_papers_tree_when_whole() {
        let t = template(usize::MAX, &RANK_HIT_PRIOR);
        assert_eq!(t.len(), 80);
        let per_depth: Vec<usize> = (1..=6).map(|d| TEMPLATE.iter().filter(|p| p.len() == d).count()).collect();
        assert_eq!(per_depth, [8, 21, 25, 15, 8, 3]);
        for n in [1usize, 4, 8, 16, 31] {
            let t = template(n, &RANK_HIT_PRIOR);
            assert_eq!(t.len(), n);
            assert!(t.iter().enumerate().all(|(i, (p, _, _))| p.is_none_or(|p| p < i)));
        }
        // The best single node is the top candidate; the best pair adds its top successor.
        let two: Vec<_> = template(2, &RANK_HIT_PRIOR).iter().map(|&(p, c, _)| (p, c)).collect();
        assert_eq!(two, vec![(None, 0), (Some(0), 0)]);
        // With flat rates the tree grows wide before it grows deep.
        let flat = [0.1; RECYCLE_K];
        assert!(template(8, &flat).iter().all(|&(p, _, _)| p.is_none()));
    }

    #[test]
    fn top_k_matches_a_full_sort() {
        let x: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 613) as f32 * 0.5).collect();
        let mut out = Vec::new();
        top_k(&x, 8, &mut out);
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
        let want: Vec<(f32, u32)> = idx[..8].iter().map(|&i| (x[i], i as u32)).collect();
        assert_eq!(out, want);
    }

    #[test]
    fn update_then_candidates() {
        let mut r = TokenRecycler::new(10);
        assert_eq!(r.candidate(3, 0), 0);
        let logits = [0.0, 5.0, 1.0, 9.0, 2.0, 3.0, 4.0, 6.0, 7.0, 8.0];
        r.update(3, &logits);
        assert_eq!((0..8).map(|k| r.candidate(3, k)).collect::<Vec<_>>(), [3, 9, 8, 7, 1, 6, 5, 4]);
        assert_eq!((r.rank_of(3, 8), r.rank_of(3, 2), r.rank_of(99, 1)), (Some(2), None, None));
        let mut h = RankHits::default();
        for _ in 0..1000 {
            h.record(Some(1));
        }
        assert!(h.rates()[1] > 0.95 && h.rates()[0] < 0.05);
        r.update(42, &logits); // out of range: ignored
    }
}
