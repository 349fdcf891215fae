//! Stop strings over streamed text.
//!
//! Text arrives a token at a time, and a stop string can span tokens. Emitting text as soon as
//! it arrives would leak the first half of a stop string into the stream before the second half
//! shows that it was one, so the matcher holds back the longest tail that could still grow into
//! a stop string and releases it only once it cannot.

#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What one piece of text produced: text safe to emit, and whether a stop string was hit (the
/// stop string and everything after it are dropped).
#[derive(Debug, PartialEq, Eq)]
pub struct Matched {
    pub emit: String,
    pub stopped: bool,
}

impl StopMatcher {
    /// Empty stop strings would match everywhere; they are ignored.
    pub fn new(stops: Vec<String>) -> Self {
        Self { stops: stops.into_iter().filter(|s| !s.is_empty()).collect(), pending: String::new() }
    }

    pub fn push(&mut self, text: &str) -> Matched {
        self.pending.push_str(text);
        if self.stops.is_empty() {
            return Matched { emit: std::mem::take(&mut self.pending), stopped: false };
        }
        let first = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first {
            self.pending.truncate(at);
            return Matched { emit: std::mem::take(&mut self.pending), stopped: true };
        }
        let hold = self.held_tail();
        let emit = self.pending[..self.pending.len() - hold].to_string();
        self.pending.drain(..self.pending.len() - hold);
        Matched { emit, stopped: false }
    }

    /// The text held back when generation ends without a stop string: it is plain output.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that are a proper prefix of some stop string.
    fn held_tail(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for s in &self.stops {
            let longest = (s.len() - 1).min(p.len());
            for len in (best + 1..=longest).rev() {
                let start = p.len() - len;
                if p.is_char_boundary(start) && s.starts_with(&p[start..]) {
                    best = len;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.emit);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.flush());
        (out, false)
    }

    #[test]
    fn no_stops_passes_everything_through() {
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
        assert_eq!(run(&[""], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn stop_spanning_pieces_is_cut_and_never_leaked() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("hello E"), Matched { emit: "hello ".into(), stopped: false });
        assert_eq!(m.push("N"), Matched { emit: "".into(), stopped: false });
        assert_eq!(m.push("D and more"), Matched { emit: "".into(), stopped: true });
    }

    #[test]
    fn false_start_is_released() {
        assert_eq!(run(&["END"], &["E", "N", "x"]), ("ENx".into(), false));
        assert_eq!(run(&["END"], &["EN"]), ("EN".into(), false));
    }

    #[test]
    fn earliest_of_several_stops_wins() {
        assert_eq!(run(&["b", "a"], &["xxab"]), ("xx".into(), true));
        assert_eq!(run(&["\n\n", "."], &["one", ".", " two"]), ("one".into(), true));
    }

    #[test]
    fn multibyte_text_is_held_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["caf", "é", "?"]), ("café?".into(), false));
        assert_eq!(run(&["é!"], &["caf", "é", "!"]), ("caf".into(), true));
        assert_eq!(run(&["🚀x"], &["a🚀", "y"]), ("a🚀y".into(), false));
    }
}
