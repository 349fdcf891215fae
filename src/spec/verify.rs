//! One speculative step, seen from outside: [`Speculator::propose`] drafts a tree, the caller
//! verifies it in a forward pass (alone or batched with other sequences), and
//! [`Speculator::accept`] walks it as plain decoding would.

use std::time::Instant;

use anyhow::{Result, ensure};

use super::Speculator;
use super::cost::per_position;
use super::mode::AUTO_CANDIDATES;
use super::tree::{DraftTree, FROM_LOOKUP, FROM_RECYCLE, FROM_SELF};
use crate::model::{Llama, Session};
use crate::sampling::Sampler;

/// What a step's caller makes of each token the target picks ([`Speculator::accept`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// Output it and go on: into the tree if a draft holds it, else it ends the step as the
    /// root of the next one.
    Take,
    /// Output it, and end the generation with it in the cache (the length limit: the next
    /// turn of a conversation starts from a cache holding the whole answer).
    TakeLast,
    /// Output it and end the generation, the cache left without it (a cancelled request).
    TakeAndStop,
    /// Do not output it, and end the generation (an end-of-text token).
    Refuse,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEnd {
    /// The last pick, outside the tree, is the next step's root (the history's last token,
    /// output but not yet in the cache).
    Next,
    /// A [`Pick`] other than `Take` ended the generation.
    Ended(Pick),
    /// [`Pick::TakeLast`] on a token outside the tree ended the generation: the history's
    /// last token still has to go into the cache.
    EndedUnfed,
    /// The context is full.
    Full,
}

impl Speculator {
    /// Drafts the tree of the next step after `history`, whose last token (output, not yet in
    /// the cache) is the root: the free sources, then the self-draft's low-precision passes
    /// over `session` (they write past the committed prefix and are forgotten). The tree is
    /// then [`Speculator::tree`], to verify in one pass (alone, [`Llama::forward_tree`], or
    /// batched with other sequences) and hand to [`Speculator::accept`]. Needs room for one
    /// more token in the cache.
    pub fn propose(&mut self, model: &Llama, session: &mut Session, history: &[u32]) -> Result<&DraftTree> {
        let cap = session.capacity();
        ensure!(session.pos + 1 < cap, "the context is full");
        self.step_start = Some(Instant::now());
        let src = self.pick_sources(model);
        self.step_sources = src;
        let max_nodes = (cap - session.pos).min(session.max_batch());
        self.draft(model, session, history, src, max_nodes)?;
        Ok(&self.tree)
    }

    /// The tree the last [`Speculator::propose`] drafted.
    pub fn tree(&self) -> &DraftTree {
        &self.tree
    }

    /// Walks the verified tree (`logits`: every node's, from a pass of `verify_s` seconds) as
    /// plain decoding would, handing `on_pick` each token the target picks with the logits it
    /// was drawn from, in order. Picks the caller takes go onto `history`; the cache ends up
    /// holding the root and every accepted draft.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        model: &Llama,
        session: &mut Session,
        sampler: &mut Sampler,
        history: &mut Vec<u32>,
        logits: &[f32],
        verify_s: f64,
        mut on_pick: impl FnMut(u32, &[f32]) -> Pick,
    ) -> Result<StepEnd> {
        let cap = session.capacity();
        let tree = std::mem::take(&mut self.tree);
        let n = tree.len();
        let vocab = model.config.vocab_size;
        ensure!(logits.len() == n * vocab, "{} logits for a tree of {n} nodes", logits.len());
        let base = session.pos;

        // Walk: the target chooses at each node; follow the child holding its choice.
        self.path.clear();
        self.path.push(0);
        self.picks.clear();
        let mut node = 0;
        let end = loop {
            let row = &logits[node * vocab..(node + 1) * vocab];
            let pick = sampler.sample(row, history);
            self.picks.push(pick);
            let how = on_pick(pick, row);
            if how == Pick::Refuse {
                break StepEnd::Ended(how);
            }
            history.push(pick);
            let child = tree.child(node, pick);
            if how == Pick::TakeAndStop {
                break StepEnd::Ended(how);
            }
            let Some(child) = child else {
                if how == Pick::TakeLast {
                    break StepEnd::EndedUnfed;
                }
                break StepEnd::Next;
            };
            self.path.push(child);
            node = child;
            if how == Pick::TakeLast {
                break StepEnd::Ended(how);
            }
            if base + tree.depth[child] + 1 > cap - 1 {
                break StepEnd::Full;
            }
        };
        let accepted = self.path.len() - 1;

        // Recycle every node's top-k, accepted or not.
        {
            let mut rec = self.recycler.lock().unwrap_or_else(|e| e.into_inner());
            // How the target's choice at the root ranked among its recycled candidates, before
            // updating. (Only at the root: deeper nodes on the accepted path are there because
            // they were predictable, so their hits would overstate every node's chances.)
            self.rank_hits[usize::from(self.matched > 0)].record(rec.rank_of(tree.tokens[0], self.picks[0]));
            for (i, &t) in tree.tokens.iter().enumerate() {
                rec.update(t, &logits[i * vocab..(i + 1) * vocab]);
            }
        }
        session.accept_path(&self.path, model.config.n_layers);

        // Statistics and the adaptive estimates.
        let st = &mut self.stats;
        st.steps += 1;
        st.tokens += self.path.len();
        st.nodes += n;
        st.verify_s += verify_s;
        let (drafted_self, acc_self) = tree.proposed_accepted(&self.path, FROM_SELF);
        st.self_drafted += drafted_self;
        st.self_accepted += acc_self;
        st.accepted_self_source += acc_self;
        st.accepted_recycle_source += tree.proposed_accepted(&self.path, FROM_RECYCLE).1;
        st.drafted += n - 1;
        st.accepted += accepted;
        if drafted_self > 0 {
            self.alpha.add(per_position(acc_self, drafted_self), 0.1);
        }
        let (drafted_lk, acc_lk) = tree.proposed_accepted(&self.path, FROM_LOOKUP);
        st.accepted_lookup_source += acc_lk;
        if drafted_lk > 0 {
            self.lookup_alpha[self.matched].add(per_position(acc_lk, drafted_lk), 0.1);
        }
        self.verify_cost.add(n as f64, verify_s);
        if let Some(i) = AUTO_CANDIDATES.iter().position(|&c| c == self.step_sources) {
            st.mode_steps[i] += 1;
            let secs = self.step_start.take().map_or(verify_s, |t| t.elapsed().as_secs_f64());
            self.mode_rate[i].add((accepted + 1) as f64 / secs.max(1e-9), 0.1);
        }
        self.tree = tree;
        Ok(end)
    }
}
