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

pub mod bench;
pub mod lookup;
pub mod recycle;
pub mod tree;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Result, bail, ensure};
use serde::Serialize;

pub use recycle::{RankHits, TokenRecycler};
pub use tree::{DraftTree, FROM_LOOKUP, FROM_RECYCLE, FROM_SELF};

use crate::model::{Llama, Session};
use crate::sampling::{Sampler, argmax};

/// Which draft sources fill a step's tree: a set of the [`FROM_SELF`], [`FROM_RECYCLE`] and
/// [`FROM_LOOKUP`] bits (the same bits mark where each tree node came from).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sources(pub u8);

impl Sources {
    pub const SELF: Sources = Sources(FROM_SELF);
    pub const RECYCLE: Sources = Sources(FROM_RECYCLE);
    pub const LOOKUP: Sources = Sources(FROM_LOOKUP);
    pub fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

/// How drafts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecMode {
    /// Plain decoding.
    None,
    /// One tree from these sources: `self` (the low-precision view of the same weights drafts
    /// a chain), `recycle` (Token Recycling), `lookup` (continuations copied from the context),
    /// joined with `+`; `both` is `self+recycle`.
    Drafts(Sources),
    /// Whichever of [`AUTO_CANDIDATES`] measures fastest.
    Auto,
}

impl SpecMode {
    pub const SELF: SpecMode = SpecMode::Drafts(Sources::SELF);
    pub const RECYCLE: SpecMode = SpecMode::Drafts(Sources::RECYCLE);
    pub const LOOKUP: SpecMode = SpecMode::Drafts(Sources::LOOKUP);
    pub const BOTH: SpecMode = SpecMode::Drafts(Sources(FROM_SELF | FROM_RECYCLE));

    /// Whether the mode may draw on source `bit` (a [`FROM_SELF`]-style bit): the self-draft
    /// needs a bit-plane model, and the Token Recycling tree's size is what `--tree-nodes` caps.
    pub fn may_use(self, bit: u8) -> bool {
        match self {
            SpecMode::None => false,
            SpecMode::Drafts(s) => s.has(bit),
            SpecMode::Auto => AUTO_CANDIDATES.iter().any(|c| c.has(bit)),
        }
    }
}

/// The source sets `auto` chooses between: context lookup alone, with Token Recycling, and with
/// both Token Recycling and the self-draft (which pays a low-precision forward per drafted
/// token, so it drafts only when lookup found nothing to copy).
pub const AUTO_CANDIDATES: [Sources; 3] =
    [Sources(FROM_LOOKUP), Sources(FROM_RECYCLE | FROM_LOOKUP), Sources(FROM_SELF | FROM_RECYCLE | FROM_LOOKUP)];

impl FromStr for SpecMode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let unknown = || {
            anyhow::anyhow!(
                "unknown speculative mode {s:?}; expected none, auto, or draft sources joined with '+' \
                 (self, recycle, lookup; both = self+recycle)"
            )
        };
        Ok(match s {
            "none" => SpecMode::None,
            "auto" => SpecMode::Auto,
            "both" => SpecMode::BOTH,
            _ => {
                let mut bits = 0u8;
                for part in s.split('+') {
                    let bit = match part {
                        "self" => FROM_SELF,
                        "recycle" => FROM_RECYCLE,
                        "lookup" => FROM_LOOKUP,
                        _ => return Err(unknown()),
                    };
                    ensure!(bits & bit == 0, "speculative mode {s:?} names {part} twice");
                    bits |= bit;
                }
                SpecMode::Drafts(Sources(bits))
            }
        })
    }
}

impl std::fmt::Display for SpecMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            SpecMode::None => f.write_str("none"),
            SpecMode::Auto => f.write_str("auto"),
            m if m == SpecMode::BOTH => f.write_str("both"),
            SpecMode::Drafts(s) => {
                let names = [(FROM_SELF, "self"), (FROM_RECYCLE, "recycle"), (FROM_LOOKUP, "lookup")];
                let parts: Vec<&str> = names.iter().filter(|(b, _)| s.has(*b)).map(|(_, n)| *n).collect();
                f.write_str(&parts.join("+"))
            }
        }
    }
}

impl Serialize for SpecMode {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> std::result::Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

/// Knobs of speculative decoding.
#[derive(Debug, Clone, Copy)]
pub struct SpecOptions {
    pub mode: SpecMode,
    /// Planes the self-draft reads.
    pub draft_bits: u32,
    /// Longest self-drafted chain; the length used adapts below it.
    pub max_draft: usize,
    /// Most draft nodes taken from the Token Recycling template (root excluded); the number
    /// used adapts below it.
    pub tree_nodes: usize,
    /// Adapt the chain length and tree size to measured costs (else always the maximum: for
    /// measuring acceptance at a fixed shape, as the papers report it).
    pub adaptive: bool,
}

impl Default for SpecOptions {
    fn default() -> Self {
        SpecOptions { mode: SpecMode::Auto, draft_bits: 3, max_draft: 6, tree_nodes: 16, adaptive: true }
    }
}

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

/// Verification time as a line in the tree size, `c(n) = c̄ + slope·(n − n̄)`, fitted by least
/// squares over the recent passes (older ones fade, one percent a pass): passes of any size
/// inform the estimate at every size, so a size seldom or never verified (a pass without
/// drafts, when drafts are usual) is not guessed from its nearest neighbour alone.
#[derive(Debug, Clone, Copy, Default)]
struct CostFit {
    w: f64,
    n: f64,
    nn: f64,
    c: f64,
    nc: f64,
}

impl CostFit {
    /// Until the sizes seen vary: each node beyond the first costs this fraction of a
    /// one-node pass (what `examples/verify_cost` measures for small trees on a 2-core Zen 4).
    const PRIOR_SLOPE: f64 = 0.25;

    fn add(&mut self, n: f64, c: f64) {
        let d = 0.99;
        self.w = d * self.w + 1.0;
        self.n = d * self.n + n;
        self.nn = d * self.nn + n * n;
        self.c = d * self.c + c;
        self.nc = d * self.nc + n * c;
    }

    fn estimate(&self, n: f64) -> Option<f64> {
        if self.w == 0.0 {
            return None;
        }
        let (mn, mc) = (self.n / self.w, self.c / self.w);
        let var = self.nn / self.w - mn * mn;
        let one = mc / (1.0 + Self::PRIOR_SLOPE * (mn - 1.0));
        let slope = if var > 0.5 { (self.nc / self.w - mn * mc) / var } else { Self::PRIOR_SLOPE * one };
        // A pass over more nodes never costs less, nor more than a whole pass per node.
        let slope = slope.clamp(0.02 * one, one);
        Some((mc + slope * (n - mn)).max(0.2 * mc))
    }
}

/// Per-position acceptance of a drafted chain: `accepted` successes out of `accepted` trials,
/// plus one more when the walk stopped inside the chain (`accepted < drafted`).
fn per_position(accepted: usize, drafted: usize) -> f64 {
    accepted as f64 / (accepted + usize::from(accepted < drafted)) as f64
}

/// Exponential moving average that starts at its first sample.
#[derive(Debug, Clone, Copy, Default)]
struct Ema(Option<f64>);
impl Ema {
    fn add(&mut self, x: f64, w: f64) {
        self.0 = Some(self.0.map_or(x, |m| m + w * (x - m)));
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

    /// Checks that `model` supports the options (self-drafting needs a bit-plane model read
    /// above the draft precision).
    pub fn check(&self, model: &Llama) -> Result<()> {
        let o = &self.opts;
        ensure!(o.tree_nodes <= 256 && o.max_draft <= 64, "draft tree too large");
        if matches!(o.mode, SpecMode::Drafts(s) if s.has(FROM_SELF)) {
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

    fn self_possible(&self, model: &Llama) -> bool {
        model.bits().is_some_and(|b| (1..b).contains(&self.opts.draft_bits))
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
    fn pick_sources(&self, model: &Llama) -> Sources {
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
    fn draft(&mut self, model: &Llama, s: &mut Session, history: &[u32], src: Sources, max_nodes: usize) -> Result<()> {
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
            if k > 0 {
                let t0 = Instant::now();
                let start = s.pos;
                let mut tok = root;
                for _ in 0..k {
                    // The low-bit view reads the target's own cache for the committed prefix
                    // and writes its guesses past it; the verification pass overwrites them.
                    let logits = model.forward_capped(s, &[tok], 1, self.opts.draft_bits)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_fit_recovers_a_line_and_falls_back_to_the_prior() {
        let mut f = CostFit::default();
        assert_eq!(f.estimate(1.0), None);
        for k in 0..200 {
            let n = [2.0, 3.0, 5.0, 8.0][k % 4];
            f.add(n, 5.0 + 1.25 * n);
        }
        assert!((f.estimate(1.0).unwrap() - 6.25).abs() < 1e-6);
        assert!((f.estimate(16.0).unwrap() - 25.0).abs() < 1e-6);
        // One size only: the slope is the prior's share of a one-node pass.
        let mut g = CostFit::default();
        for _ in 0..10 {
            g.add(3.0, 6.0);
        }
        let one = 6.0 / (1.0 + 2.0 * CostFit::PRIOR_SLOPE);
        assert!((g.estimate(1.0).unwrap() - one).abs() < 1e-9);
        assert!((g.estimate(4.0).unwrap() - (6.0 + CostFit::PRIOR_SLOPE * one)).abs() < 1e-9);
    }

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
