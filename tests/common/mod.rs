//! Shared by the integration tests: where the real model and the golden data are.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;

pub const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/golden/smollm2-135m-instruct.jsonl"
);
pub const WIKITEXT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/data/wikitext-2-raw-test.txt"
);

#[derive(Deserialize, Clone)]
pub struct Golden {
    pub name: String,
    pub text: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    pub greedy_text: String,
    pub ref_top5_ids: Vec<Vec<u32>>,
    pub ref_top5_logits: Vec<Vec<f32>>,
    pub ref_margin: Vec<f32>,
}

pub fn golden() -> Vec<Golden> {
    let text =
        std::fs::read_to_string(GOLDEN).unwrap_or_else(|e| panic!("cannot read {GOLDEN}: {e}"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("golden line parses"))
        .collect()
}

/// The default model: `$BITNEST_TEST_MODEL`, else the cached (fetched on first use) default.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| match std::env::var_os("BITNEST_TEST_MODEL") {
        Some(p) => PathBuf::from(p),
        None => bitnest::fetch::resolve_model(bitnest::fetch::DEFAULT_MODEL)
            .expect("fetch the default model"),
    })
    .clone()
}
