//! Lossless speculative decoding without a second model.
//!
//! Each step proposes a [`DraftTree`] of continuations of the next token and checks the whole
//! tree in one batched forward pass of the full-precision model ([`Llama::forward_tree`]).
//! Walking from the root, the target picks its token at each node exactly as plain decoding
//! would (same sampler, same history, same random draws); while that token is a child in the
//! tree the walk goes on, so every accepted token is the one plain decoding produces and the
//! pass yields one more token than it accepted drafts. Two draft sources, both free of any
//! second model:
//! - **self**: the same `.bnest` weights read at fewer planes (`--draft-bits`) propose a chain,
//!   its length adapted to the measured acceptance and the measured draft/verify costs;
//! - **recycle**: [Token Recycling](recycle): candidates recycled from the top-k of earlier
//!   passes fill a static tree.
//!
//! `both` merges the two into one tree; `auto` measures tokens per second of each and keeps
//! using the best, re-trying the others now and then.
//!
//! Sampling at temperature > 0 stays exact: drafts are deterministic proposals, and a node's
//! child is followed only when the token drawn from the target's own distribution equals it
//! (for deterministic drafts this is recursive rejection sampling: a draft `x` with proposal
//! mass 1 is accepted with probability `p(x)`, and on rejection the residual is `p` without
//! `x`). Each emitted token is drawn from exactly the distribution plain decoding uses, with the
//! same draws in the same order, so a seeded run gives the same tokens as plain decoding.

mod cost;
mod grow;
pub mod lookup;
mod mode;
pub mod recycle;
pub mod tree;
mod verify;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Result, bail, ensure};
use serde::Serialize;

pub use recycle::{RankHits, TokenRecycler};
pub use tree::{DraftTree, FROM_LOOKUP, FROM_RECYCLE, FROM_SELF};

use crate::model::Llama;

use cost::{CostFit, Ema};
pub use mode::{AUTO_CANDIDATES, DraftExperts, Sources, SpecMode, SpecOptions};
pub use verify::{Pick, StepEnd};

/// What speculation achieved, cumulated over the generations of one [`Speculator`].
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpecStats {
    /// Verification passes.
    pub steps: usize,
    /// Tokens produced by those passes (accepted drafts plus the one each pass adds).
    pub tokens: usize,
    /// Tree nodes verified (root included).
    pub nodes: usize,
    /// Self-drafted tokens proposed and accepted (for the per-position acceptance rate).
    pub self_drafted: usize,
    pub self_accepted: usize,
    /// Accepted draft tokens by source (a token both sources proposed counts for both).
    pub accepted_self_source: usize,
    pub accepted_recycle_source: usize,
    pub accepted_lookup_source: usize,
    /// Draft nodes verified (roots excluded) and how many of them were accepted.
    pub drafted: usize,
    pub accepted: usize,
    /// Seconds spent drafting with the low-precision view, and verifying.
    pub draft_s: f64,
    pub verify_s: f64,
    /// Steps run with each of [`AUTO_CANDIDATES`], for `auto`.
    pub mode_steps: [usize; AUTO_CANDIDATES.len()],
}

impl SpecStats {
    /// Mean accepted tokens per step (MAT): tokens per verification pass, the extra one included.
    pub fn mat(&self) -> f64 {
        if self.steps == 0 { 0.0 } else { self.tokens as f64 / self.steps as f64 }
    }
    /// Fraction of self-drafted tokens the target accepted.
    pub fn self_acceptance(&self) -> f64 {
        if self.self_drafted == 0 { 0.0 } else { self.self_accepted as f64 / self.self_drafted as f64 }
    }
}

/// Speculative decoding state that outlives one generation: the options, the Token Recycling
/// matrix (shared, so a server's requests teach each other), the measured costs and rates the
/// adaptive choices use, and the statistics.
pub struct Speculator {
    pub opts: SpecOptions,
    recycler: Arc<Mutex<TokenRecycler>>,
    pub stats: SpecStats,
    /// Per-position acceptance of self-drafted tokens.
    alpha: Ema,
    /// Per-position acceptance of context-lookup tokens, by the length of the match.
    lookup_alpha: [Ema; lookup::MAX_NGRAM + 1],
    /// Length of the match behind this step's lookup chain.
    matched: usize,
    /// Seconds per self-draft forward.
    draft_cost: Ema,
    /// Seconds per verification pass against tree size.
    verify_cost: CostFit,
    /// Tokens per second of each concrete mode, for `auto`.
    mode_rate: [Ema; AUTO_CANDIDATES.len()],
    /// Hit rate of each recycled-candidate rank at the root, which shapes and sizes the
    /// recycled tree: `[0]` when context lookup found no match (or did not look), `[1]` when
    /// it did (the text is then being copied, and recycled candidates hit more often).
    pub rank_hits: [RankHits; 2],
    tree: DraftTree,
    path: Vec<usize>,
    /// The target's choice at each node of the accepted path (the last one the extra token).
    picks: Vec<u32>,
    chain: Vec<u32>,
    /// The sources and start of the step in flight (between propose and accept).
    step_sources: Sources,
    step_start: Option<Instant>,
}

impl Speculator {
    /// `recycler` may be shared with other speculators (a server's slots).
    pub fn new(opts: SpecOptions, recycler: Arc<Mutex<TokenRecycler>>) -> Self {
        Speculator {
            opts,
            recycler,
            stats: SpecStats::default(),
            alpha: Ema::default(),
            lookup_alpha: [Ema::default(); lookup::MAX_NGRAM + 1],
            matched: 0,
            draft_cost: Ema::default(),
            verify_cost: CostFit::default(),
            mode_rate: [Ema::default(); AUTO_CANDIDATES.len()],
            rank_hits: [RankHits::default(), RankHits::default()],
            tree: DraftTree::default(),
            path: Vec::new(),
            picks: Vec::new(),
            chain: Vec::new(),
            step_sources: Sources(0),
            step_start: None,
        }
    }

    /// What the self-draft reads of `model`: fewer planes, and of a mixture fewer experts
    /// (`None` when that is the whole model, which cannot draft for itself).
    pub fn draft_view(&self, model: &Llama) -> Option<crate::model::View> {
        let experts = self.opts.draft_experts.resolve(model.experts_used());
        let bits_cut = model.bits().is_some_and(|b| (1..b).contains(&self.opts.draft_bits));
        (bits_cut || experts.is_some()).then_some(crate::model::View {
            bits: if bits_cut { self.opts.draft_bits } else { crate::model::ALL_BITS },
            experts,
        })
    }

    /// Checks that `model` supports the options (self-drafting needs a bit-plane model read
    /// above the draft precision).
    pub fn check(&self, model: &Llama) -> Result<()> {
        let o = &self.opts;
        ensure!(o.tree_nodes <= 256 && o.max_draft <= 64, "draft tree too large");
        if matches!(o.mode, SpecMode::Drafts(s) if s.has(FROM_SELF)) {
            if let Some(v) = self.draft_view(model)
                && v.experts.is_some()
            {
                // Fewer experts make a draft at any precision.
                return Ok(());
            }
            let Some(bits) = model.bits() else {
                bail!(
                    "--spec {}: self-drafting reads fewer planes of a .bnest model, and this model has no bit \
                     planes (make one with `bitnest quantize`); --spec recycle works on any model",
                    o.mode
                )
            };
            ensure!(
                (1..bits).contains(&o.draft_bits),
                "--draft-bits {} must be below the {bits} bits the model is read at",
                o.draft_bits
            );
        }
        Ok(())
    }
}
