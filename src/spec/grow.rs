//! Growing a step's draft tree: which sources to use, the free part (context lookup and Token
//! Recycling, most valuable node first) and the self-drafted chain, each sized by the cost model.

use std::time::Instant;

use anyhow::Result;

use super::mode::{AUTO_CANDIDATES, Sources, SpecMode};
use super::tree::{FROM_LOOKUP, FROM_RECYCLE, FROM_SELF};
use super::{Speculator, lookup, recycle};
use crate::model::{Llama, Session};
use crate::sampling::argmax;

impl Speculator {
    fn self_possible(&self, model: &Llama) -> bool {
        self.draft_view(model).is_some()
    }

    /// Expected seconds of a verification pass over `n` nodes.
    fn verify_estimate(&self, n: usize) -> Option<f64> {
        self.verify_cost.estimate(n as f64)
    }

    /// Length of the self-drafted chain with the best expected tokens per second.
    fn draft_len(&self, extra_nodes: usize) -> usize {
        if !self.opts.adaptive {
            return self.opts.max_draft;
        }
        let a = self.alpha.0.unwrap_or(0.7).clamp(0.0, 0.98);
        let (Some(cd), Some(_)) = (self.draft_cost.0, self.verify_estimate(1)) else {
            return self.opts.max_draft.min(3);
        };
        let mut best = (0, 0.0);
        for k in 0..=self.opts.max_draft {
            let tokens = 1.0 + (1..=k).map(|i| a.powi(i as i32)).sum::<f64>();
            let verify = self.verify_estimate(1 + k + extra_nodes).unwrap_or(0.0);
            let time = (k as f64 * cd + verify).max(1e-9);
            let rate = tokens / time;
            if rate > best.1 {
                best = (k, rate);
            }
        }
        // Now and then one longer than the model says, so its estimates keep up with reality.
        if self.stats.steps % 16 == 15 { (best.0 + 1).min(self.opts.max_draft) } else { best.0 }
    }

    /// Grows the free part of the next tree (context lookup and Token Recycling) onto the
    /// root, most valuable node first. A node's value is the chance that it is accepted: a
    /// lookup token `i` deep, the measured per-token acceptance of lookups after a match of
    /// that length, to the power `i`; a recycled template node, the product of its ranks' hit
    /// rates along its path. The expected tokens of a tree are one plus the sum of its nodes'
    /// values (a candidate that lands on a node already there adds neither a node nor value),
    /// and the tree stops at the size with the best expected tokens per second of verification
    /// (at most `--tree-nodes` recycled and `--max-draft` looked-up candidates). Now and then it
    /// grows one node past that, so that the cost estimates keep up with reality.
    fn grow_free(&mut self, history: &[u32], src: Sources, max_nodes: usize) {
        let mut chain = std::mem::take(&mut self.chain);
        self.matched = 0;
        chain.clear();
        if src.has(FROM_LOOKUP) {
            self.matched = lookup::continuation(history, self.opts.max_draft, &mut chain);
        }
        let rates = self.rank_hits[usize::from(self.matched > 0)].rates();
        let tpl = if src.has(FROM_RECYCLE) { recycle::template(self.opts.tree_nodes, &rates) } else { Vec::new() };
        let a = self.lookup_alpha[self.matched].0.unwrap_or(0.6).clamp(0.0, 0.98);
        // (value, lookup depth or template index); values fall along every path, so a stable
        // sort keeps parents before children.
        let mut cands: Vec<(f64, Result<usize, usize>)> = (0..chain.len())
            .map(|i| (a.powi(i as i32 + 1), Err(i)))
            .chain(tpl.iter().enumerate().map(|(j, t)| (t.2, Ok(j))))
            .collect();
        cands.sort_by(|x, y| y.0.total_cmp(&x.0));
        let rec = self.recycler.lock().unwrap_or_else(|e| e.into_inner());
        let mut tree = std::mem::take(&mut self.tree);
        let root = tree.tokens[0];
        // Inserts the first `steps` candidates; returns the tree size and expected tokens after each.
        let mut grow = |steps: usize| -> Vec<(usize, f64)> {
            tree.reset(root);
            let (mut last_lookup, mut node_of) = (0, vec![0; tpl.len()]);
            let mut tokens = 1.0;
            let mut out = Vec::with_capacity(steps);
            for &(value, c) in cands.iter().take(steps) {
                if tree.len() >= max_nodes {
                    break;
                }
                let before = tree.len();
                match c {
                    Err(i) => last_lookup = tree.insert(last_lookup, chain[i], FROM_LOOKUP),
                    Ok(j) => {
                        let (parent, rank, _) = tpl[j];
                        let p = parent.map_or(0, |p| node_of[p]);
                        node_of[j] = tree.insert(p, rec.candidate(tree.tokens[p], rank), FROM_RECYCLE);
                    }
                }
                if tree.len() > before {
                    tokens += value;
                }
                out.push((tree.len(), tokens));
            }
            out
        };
        let grown = grow(cands.len());
        if self.opts.adaptive {
            let steps = if self.verify_estimate(1).is_none() {
                grown.iter().take_while(|g| g.0 <= 3).count()
            } else {
                let rate = |&(len, tokens): &(usize, f64)| tokens / self.verify_estimate(len).unwrap_or(1.0).max(1e-9);
                let mut best = (0, 1.0 / self.verify_estimate(1).unwrap_or(1.0).max(1e-9));
                for (k, g) in grown.iter().enumerate() {
                    if rate(g) > best.1 {
                        best = (k + 1, rate(g));
                    }
                }
                let mut steps = best.0;
                if self.stats.steps % 16 == 7 {
                    // One node more: through the candidates that only merged into nodes.
                    let len = if steps == 0 { 1 } else { grown[steps - 1].0 };
                    steps = grown.iter().position(|g| g.0 > len).map_or(grown.len(), |k| k + 1);
                }
                steps
            };
            grow(steps);
        }
        drop(rec);
        self.tree = tree;
        self.chain = chain;
    }

    /// The sources of the next step's tree.
    pub(super) fn pick_sources(&self, model: &Llama) -> Sources {
        match self.opts.mode {
            SpecMode::Auto => {
                let usable: Vec<usize> = (0..AUTO_CANDIDATES.len())
                    .filter(|&i| !AUTO_CANDIDATES[i].has(FROM_SELF) || self.self_possible(model))
                    .collect();
                // Try each a few times first, then the best, re-trying the others every 32 steps.
                if let Some(&i) = usable.iter().find(|&&i| self.stats.mode_steps[i] < 4) {
                    return AUTO_CANDIDATES[i];
                }
                if self.stats.steps % 32 == 31 {
                    return AUTO_CANDIDATES[usable[(self.stats.steps / 32) % usable.len()]];
                }
                let best = usable
                    .iter()
                    .copied()
                    .max_by(|&a, &b| self.mode_rate[a].0.unwrap_or(0.0).total_cmp(&self.mode_rate[b].0.unwrap_or(0.0)));
                AUTO_CANDIDATES[best.unwrap_or(0)]
            }
            SpecMode::Drafts(s) => s,
            SpecMode::None => Sources(0),
        }
    }

    /// Builds the draft tree of one step rooted at `root` (not yet in the cache), at most
    /// `max_nodes` nodes.
    pub(super) fn draft(
        &mut self,
        model: &Llama,
        s: &mut Session,
        history: &[u32],
        src: Sources,
        max_nodes: usize,
    ) -> Result<()> {
        let root = *history.last().expect("the root is in the history");
        self.tree.reset(root);
        self.grow_free(history, src, max_nodes);
        if src.has(FROM_SELF) {
            // A looked-up copy, when the tree took one, is free and usually right: the self-draft
            // would mostly propose the same tokens at the price of a forward pass each.
            let copying = self.tree.origin.iter().any(|&o| o & FROM_LOOKUP != 0);
            let k = if copying {
                0
            } else {
                self.draft_len(self.tree.len() - 1).min(max_nodes.saturating_sub(self.tree.len()))
            };
            self.chain.clear();
            let view = self.draft_view(model);
            if let (true, Some(view)) = (k > 0, view) {
                let t0 = Instant::now();
                let start = s.pos;
                let mut tok = root;
                for _ in 0..k {
                    // The low-bit view reads the target's own cache for the committed prefix
                    // and writes its guesses past it; the verification pass overwrites them.
                    let logits = model.forward_view(s, &[tok], 1, view)?;
                    tok = argmax(logits);
                    self.chain.push(tok);
                }
                s.truncate(start);
                let dt = t0.elapsed().as_secs_f64();
                self.draft_cost.add(dt / k as f64, 0.2);
                self.stats.draft_s += dt;
            }
            let mut at = 0;
            for &t in &self.chain {
                at = self.tree.insert(at, t, FROM_SELF);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::super::{DraftTree, SpecOptions, TokenRecycler};
    use super::*;

    fn free_tree(per_node: f64) -> DraftTree {
        let opts = SpecOptions { mode: "recycle+lookup".parse().unwrap(), ..SpecOptions::default() };
        let mut rec = TokenRecycler::new(100);
        // Token 9 is followed by 4 (then 5), as recycled logits have it.
        let mut logits = vec![0f32; 100];
        logits[4] = 3.0;
        logits[5] = 2.0;
        rec.update(9, &logits);
        let mut spec = Speculator::new(opts, Arc::new(Mutex::new(rec)));
        for n in 1..=8 {
            for _ in 0..4 {
                spec.verify_cost.add(n as f64, 1.0 + per_node * (n - 1) as f64);
            }
        }
        // "7 8 9 1 2 3 … 7 8 9": lookup matches "7 8 9" and proposes "1 2 3".
        let history = [7, 8, 9, 1, 2, 3, 6, 7, 8, 9];
        spec.tree.reset(9);
        spec.grow_free(&history, Sources(FROM_RECYCLE | FROM_LOOKUP), 64);
        assert_eq!(spec.matched, 3);
        spec.tree.clone()
    }

    #[test]
    fn the_free_tree_takes_the_nodes_that_pay() {
        // Nodes almost free: the whole lookup chain and recycled candidates, parents first.
        let t = free_tree(0.01);
        assert!(t.parents.iter().enumerate().all(|(i, p)| p.is_none_or(|p| p < i)));
        let first = t.child(0, 1).expect("the looked-up chain");
        let second = t.child(first, 2).expect("its second token");
        assert!(t.child(second, 3).is_some());
        assert_eq!(t.origin[first], FROM_LOOKUP);
        assert!(t.child(0, 4).is_some_and(|i| t.origin[i] == FROM_RECYCLE));
        assert!(t.len() > 5);
        // A node costs a whole pass: nothing pays, the root goes alone.
        assert_eq!(free_tree(1.0).len(), 1);
    }
}
