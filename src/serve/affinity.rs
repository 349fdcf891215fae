//! Prefix affinity: a key that names a conversation's opening, so that a router in front of
//! several replicas can send every turn of it to the replica whose KV slots already hold it.
//!
//! The key goes in the request header [`HEADER`]; standard routers hash on it (nginx
//! `hash $http_x_bitnest_prefix consistent`, Envoy's ring hash on a header, ingress-nginx
//! `upstream-hash-by`). The server needs nothing from it (any replica answers any request the
//! same); it computes the key of every generation request itself and returns it in the same
//! header, so a client may take it from the first answer instead of computing it.
//!
//! The key, version 1 (stable; `docs/SERVER.md` and `deploy/prefix_key.py` implement it too):
//! `"p1-"` followed by the first 16 lowercase hex digits of the SHA-256 of
//! - chat: for each message up to and including the first `user` message, its role, a line feed
//!   (0x0A), its text (a list of text parts joined with nothing), and a record separator (0x1E);
//! - completions: `"prompt"`, 0x0A and the prompt's first 2048 bytes (whole characters), or for
//!   a prompt of token ids their decimal values joined by commas, within the same 2048 bytes.
//!
//! So a conversation keeps its key as it grows (system prompt and first question do not change),
//! and two conversations with different first questions spread over the replicas.

use sha2::{Digest, Sha256};

use bitnest::chat::Message;

/// The request and response header that carries the key.
pub const HEADER: &str = "x-bitnest-prefix";

/// How much of a completion prompt the key covers.
const COMPLETION_PREFIX_BYTES: usize = 2048;

fn finish(h: Sha256) -> String {
    let d = h.finalize();
    let mut s = String::with_capacity(19);
    s.push_str("p1-");
    for b in &d[..8] {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The key of a chat request.
pub fn chat_key(messages: &[Message]) -> String {
    let mut h = Sha256::new();
    for m in messages {
        h.update(m.role.as_bytes());
        h.update(b"\n");
        h.update(m.content.as_bytes());
        h.update(b"\x1e");
        if m.role == "user" {
            break;
        }
    }
    finish(h)
}

/// The key of a completion request with a text prompt.
pub fn text_key(prompt: &str) -> String {
    let mut end = prompt.len().min(COMPLETION_PREFIX_BYTES);
    while !prompt.is_char_boundary(end) {
        end -= 1;
    }
    let mut h = Sha256::new();
    h.update(b"prompt\n");
    h.update(&prompt.as_bytes()[..end]);
    finish(h)
}

/// The key of a completion request whose prompt is token ids.
pub fn ids_key(ids: &[u32]) -> String {
    let mut text = String::new();
    for (i, id) in ids.iter().enumerate() {
        let next = if i == 0 { id.to_string() } else { format!(",{id}") };
        if text.len() + next.len() > COMPLETION_PREFIX_BYTES {
            break;
        }
        text.push_str(&next);
    }
    let mut h = Sha256::new();
    h.update(b"prompt\n");
    h.update(text.as_bytes());
    finish(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_conversation_keeps_its_key_as_it_grows() {
        let m = |r: &str, c: &str| Message::new(r, c);
        let first = vec![m("system", "You are terse."), m("user", "Name a prime.")];
        let mut later = first.clone();
        later.extend([m("assistant", "7"), m("user", "Another.")]);
        assert_eq!(chat_key(&first), chat_key(&later));
        let other = vec![m("system", "You are terse."), m("user", "Name a colour.")];
        assert_ne!(chat_key(&first), chat_key(&other));
        // The separators keep role and content apart.
        assert_ne!(chat_key(&[m("user", "ab")]), chat_key(&[m("userab", "")]));
    }

    #[test]
    fn the_key_is_the_documented_hash() {
        // Computed apart, with Python: hashlib.sha256(b"system\nBe brief.\x1euser\nHi\x1e")
        // .hexdigest()[:16], and likewise b"prompt\nOnce upon" and b"prompt\n1,22,333".
        let k = chat_key(&[Message::new("system", "Be brief."), Message::new("user", "Hi")]);
        assert_eq!(k, "p1-334ac557a4261059");
        assert_eq!(text_key("Once upon"), "p1-492e4c73150cb49d");
        assert_eq!(ids_key(&[1, 22, 333]), "p1-9234ec2ba2a7d2ea");
    }

    #[test]
    fn long_prompts_are_cut_on_a_character_boundary() {
        let long = "é".repeat(5000);
        assert_eq!(text_key(&long), text_key(&long[..2048]));
        assert_eq!(text_key(&long), text_key(&format!("{long}tail")));
        let ids: Vec<u32> = (0..5000).collect();
        assert_eq!(ids_key(&ids), ids_key(&ids[..1000]));
    }
}
