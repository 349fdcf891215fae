//! Which precision each layer is read at.

use std::path::Path;

use anyhow::{Context, Result, bail, ensure};

/// Planes to read per tensor: a default plus rules matched on tensor names.
///
/// A plan file has one rule per line, `PATTERN BITS`, where `PATTERN` is a tensor-name prefix
/// (`blk.0.`, `blk.12.ffn_down`, `output`, `token_embd`) or `*`; later lines override earlier
/// ones; `#` starts a comment. Unmatched tensors use the default (`--bits`, else the master).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BitsPlan {
    pub default: Option<u32>,
    pub rules: Vec<(String, u32)>,
}

impl BitsPlan {
    pub fn uniform(bits: Option<u32>) -> Self {
        BitsPlan { default: bits, rules: Vec::new() }
    }

    pub fn parse(text: &str, default: Option<u32>) -> Result<Self> {
        let mut rules = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(pat), Some(bits), None) = (parts.next(), parts.next(), parts.next()) else {
                bail!("plan line {}: expected `PATTERN BITS`, got {line:?}", i + 1);
            };
            let bits: u32 = bits.parse().with_context(|| format!("plan line {}: {bits:?} is not a number", i + 1))?;
            ensure!((1..=8).contains(&bits), "plan line {}: bits {bits} outside 1..=8", i + 1);
            rules.push((pat.to_string(), bits));
        }
        Ok(BitsPlan { default, rules })
    }

    pub fn from_file(path: &Path, default: Option<u32>) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read plan {}", path.display()))?;
        Self::parse(&text, default).with_context(|| format!("in plan {}", path.display()))
    }

    /// Planes to read for `name`, given the tensor stores `master` planes: the rule's or the
    /// default's width, capped at `master` (a file transcoded from a mixed GGUF keeps each
    /// tensor's own width: `--bits 5` reads 4 planes of a 4-plane tensor and 5 of a 6-plane one).
    pub fn bits_for(&self, name: &str, master: u32) -> Result<u32> {
        let rule = self.rules.iter().rev().find(|(p, _)| p == "*" || name.starts_with(p.as_str())).map(|r| r.1);
        let bits = rule.or(self.default).unwrap_or(master);
        ensure!(bits >= 1, "tensor {name}: cannot read 0 planes");
        Ok(bits.min(master))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_rules_win_and_default_applies() {
        let p = BitsPlan::parse("* 4\nblk.0. 8 # first layer\noutput 6\n", Some(3)).unwrap();
        assert_eq!(p.bits_for("blk.0.attn_q.weight", 8).unwrap(), 8);
        assert_eq!(p.bits_for("blk.1.attn_q.weight", 8).unwrap(), 4);
        assert_eq!(p.bits_for("output.weight", 8).unwrap(), 6);
        assert_eq!(BitsPlan::uniform(None).bits_for("x", 6).unwrap(), 6);
        assert_eq!(BitsPlan::uniform(Some(8)).bits_for("x", 4).unwrap(), 4, "capped at the planes stored");
        assert!(BitsPlan::parse("blk.0 nine", None).is_err());
        assert!(BitsPlan::parse("blk.0 9", None).is_err());
        assert!(BitsPlan::parse("a 1 2", None).is_err());
    }
}
