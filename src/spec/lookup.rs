//! Context lookup ("prompt lookup decoding", llama.cpp's `ngram-simple`): when the last few
//! tokens of the context occurred before, the tokens that followed them then are proposed as
//! the continuation now. Summaries quote their source, answers repeat the question's names,
//! small models repeat themselves: copying is often exactly what the model will do, and the
//! draft costs one scan of the history, no model.

/// Longest suffix tried first: a longer match predicts the copy more reliably.
pub const MAX_NGRAM: usize = 4;
/// Shortest suffix tried: one token alone predicts less, but the per-token acceptance is
/// measured for each match length and the tree keeps only the nodes that pay.
pub const MIN_NGRAM: usize = 1;

/// The continuation of the most recent earlier occurrence of `history`'s longest matching
/// suffix (from [`MAX_NGRAM`] down to [`MIN_NGRAM`] tokens), at most `len` tokens, into `out`;
/// returns the length of the suffix that matched (0 if none did, and `out` is then empty).
pub fn continuation(history: &[u32], len: usize, out: &mut Vec<u32>) -> usize {
    out.clear();
    let h = history.len();
    if len == 0 {
        return 0;
    }
    for n in (MIN_NGRAM..=MAX_NGRAM.min(h.saturating_sub(1))).rev() {
        let suffix = &history[h - n..];
        // Occurrences ending before the last token, most recent first.
        if let Some(start) = (0..h - n).rev().find(|&i| &history[i..i + n] == suffix) {
            let from = start + n;
            out.extend_from_slice(&history[from..(from + len).min(h)]);
            return n;
        }
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_what_followed_the_longest_most_recent_match() {
        let mut out = Vec::new();
        // "5 6" occurred twice; the later occurrence wins, and its copy may run into the suffix.
        let h = [1, 5, 6, 7, 8, 2, 5, 6, 9, 3, 5, 6];
        assert_eq!(continuation(&h, 3, &mut out), 2);
        assert_eq!(out, [9, 3, 5]);
        // A longer suffix beats a more recent shorter one.
        let h = [4, 5, 6, 7, 1, 5, 6, 8, 4, 5, 6];
        assert_eq!(continuation(&h, 2, &mut out), 3);
        assert_eq!(out, [7, 1]);
        // Capped by the history's end.
        let h = [1, 2, 3, 1, 2];
        assert_eq!(continuation(&h, 8, &mut out), 2);
        assert_eq!(out, [3, 1, 2]);
        // One token alone, when nothing longer matches.
        assert_eq!(continuation(&[1, 2, 3, 4, 2], 4, &mut out), 1);
        assert_eq!(out, [3, 4, 2]);
        // No match at all: nothing.
        assert_eq!(continuation(&[1, 2, 3, 4], 4, &mut out), 0);
        assert!(out.is_empty());
        assert_eq!(continuation(&[], 4, &mut out), 0);
        assert_eq!(continuation(&[1, 1, 1], 0, &mut out), 0);
    }
}
