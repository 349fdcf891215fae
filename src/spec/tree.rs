//! The draft tree one verification pass checks: a trie of candidate continuations rooted at
//! the next token, every node's parent before it so attention can list ancestors in order.

/// Where a draft node came from; a node proposed by both sources carries both bits.
pub const FROM_SELF: u8 = 1;
pub const FROM_RECYCLE: u8 = 2;
pub const FROM_LOOKUP: u8 = 4;

/// Candidate continuations as a trie: node 0 is the root (the token the model has chosen but
/// not yet read), every other node a draft token whose parent comes earlier. Siblings hold
/// distinct tokens, so the longest matching path is found by walking from the root.
#[derive(Debug, Clone, Default)]
pub struct DraftTree {
    pub tokens: Vec<u32>,
    pub parents: Vec<Option<usize>>,
    pub depth: Vec<usize>,
    /// [`FROM_SELF`] / [`FROM_RECYCLE`] bits per node.
    pub origin: Vec<u8>,
}

impl DraftTree {
    /// Starts a tree at `root` (reusing the buffers).
    pub fn reset(&mut self, root: u32) {
        self.tokens.clear();
        self.parents.clear();
        self.depth.clear();
        self.origin.clear();
        self.tokens.push(root);
        self.parents.push(None);
        self.depth.push(0);
        self.origin.push(0);
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The child of `node` holding `token`, if any.
    pub fn child(&self, node: usize, token: u32) -> Option<usize> {
        // Children come after their parent; trees are small (tens of nodes).
        (node + 1..self.len()).find(|&i| self.parents[i] == Some(node) && self.tokens[i] == token)
    }

    /// How many nodes source `bit` proposed, and how many of those lie on `path` past its root
    /// (the accepted drafts).
    pub fn proposed_accepted(&self, path: &[usize], bit: u8) -> (usize, usize) {
        let from = |i: usize| self.origin[i] & bit != 0;
        ((0..self.len()).filter(|&i| from(i)).count(), path.iter().skip(1).filter(|&&i| from(i)).count())
    }

    /// Adds `token` under `parent` unless that child exists; returns the node either way.
    pub fn insert(&mut self, parent: usize, token: u32, origin: u8) -> usize {
        if let Some(i) = self.child(parent, token) {
            self.origin[i] |= origin;
            return i;
        }
        self.tokens.push(token);
        self.parents.push(Some(parent));
        self.depth.push(self.depth[parent] + 1);
        self.origin.push(origin);
        self.len() - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_deduplicates_siblings_and_keeps_parents_first() {
        let mut t = DraftTree::default();
        t.reset(7);
        let a = t.insert(0, 1, FROM_SELF);
        let b = t.insert(a, 2, FROM_SELF);
        assert_eq!(t.insert(0, 1, FROM_RECYCLE), a);
        assert_eq!(t.origin[a], FROM_SELF | FROM_RECYCLE);
        let c = t.insert(0, 3, FROM_RECYCLE);
        assert_eq!((t.len(), t.depth[b], t.depth[c]), (4, 2, 1));
        assert_eq!(t.child(a, 2), Some(b));
        assert_eq!(t.child(0, 2), None);
        assert!(t.parents.iter().enumerate().all(|(i, p)| p.is_none_or(|p| p < i)));
    }
}
