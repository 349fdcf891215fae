//! Which draft sources speculative decoding uses, and its knobs.

use std::str::FromStr;

use anyhow::{Result, ensure};
use serde::Serialize;

use super::tree::{FROM_LOOKUP, FROM_RECYCLE, FROM_SELF};

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
    /// Experts per token the self-draft runs, in a mixture of experts.
    pub draft_experts: DraftExperts,
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
        SpecOptions {
            mode: SpecMode::Auto,
            draft_bits: 3,
            draft_experts: DraftExperts::All,
            max_draft: 6,
            tree_nodes: 16,
            adaptive: true,
        }
    }
}

/// How many experts per token the self-draft of a mixture-of-experts model runs (ELMoE-3D's
/// second elastic axis, beside its planes): the router's best `k`, its weights as the model
/// weighs them; verification always runs the model's own number.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DraftExperts {
    /// As many as the model runs.
    #[default]
    All,
    /// Half of them, rounded up (llama.cpp PR #18029 measured half the experts of Qwen3-30B-A3B
    /// as "nearly identical").
    Auto,
    Count(usize),
}

impl DraftExperts {
    /// The draft's cap for a model that runs `used` experts per token (`None`: no cap, also for
    /// dense models).
    pub fn resolve(self, used: Option<usize>) -> Option<usize> {
        let used = used?;
        match self {
            DraftExperts::All => None,
            DraftExperts::Auto => Some(used.div_ceil(2)).filter(|&k| k < used),
            DraftExperts::Count(k) => Some(k.clamp(1, used)).filter(|&k| k < used),
        }
    }
}

impl FromStr for DraftExperts {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "all" => Ok(DraftExperts::All),
            "auto" => Ok(DraftExperts::Auto),
            _ => match s.parse::<usize>() {
                Ok(k) if k > 0 => Ok(DraftExperts::Count(k)),
                _ => anyhow::bail!("--draft-experts {s:?}: expected a count of at least 1, auto or all"),
            },
        }
    }
}

impl std::fmt::Display for DraftExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            DraftExperts::All => f.write_str("all"),
            DraftExperts::Auto => f.write_str("auto"),
            DraftExperts::Count(k) => write!(f, "{k}"),
        }
    }
}

#[cfg(test)]
mod draft_experts_tests {
    use super::DraftExperts;

    #[test]
    fn draft_experts_parse_and_resolve() {
        assert_eq!("all".parse::<DraftExperts>().unwrap(), DraftExperts::All);
        assert_eq!("auto".parse::<DraftExperts>().unwrap(), DraftExperts::Auto);
        assert_eq!("3".parse::<DraftExperts>().unwrap(), DraftExperts::Count(3));
        assert!("0".parse::<DraftExperts>().is_err() && "half".parse::<DraftExperts>().is_err());
        // A dense model has no expert axis; a cap at or above the model's count is no cap.
        assert_eq!(DraftExperts::Count(1).resolve(None), None);
        assert_eq!(DraftExperts::Count(1).resolve(Some(8)), Some(1));
        assert_eq!(DraftExperts::Count(8).resolve(Some(8)), None);
        assert_eq!(DraftExperts::Auto.resolve(Some(8)), Some(4));
        assert_eq!(DraftExperts::Auto.resolve(Some(3)), Some(2));
        assert_eq!(DraftExperts::Auto.resolve(Some(1)), None);
        assert_eq!(DraftExperts::All.resolve(Some(8)), None);
    }
}
