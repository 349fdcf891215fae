//! Wikitext-2 perplexity, measured as llama-perplexity does, against llama.cpp's anchor on the
//! same model (F16 = dequantized source: 23.2992, `../shared/anchors/llamacpp-smollm2.md`).
//! This is the heaviest test (80 × 512 tokens, a few minutes on 2 cores) and the one that
//! catches subtle tokenizer or numerics regressions that golden prompts miss.

use bitnest::engine::Engine;

mod common;

const LLAMA_CPP_PPL: f64 = 23.2992;

#[test]
fn wikitext_ppl_within_one_percent_of_llama_cpp() {
    let e = Engine::load(&common::model_path(), None).unwrap();
    let text = std::fs::read_to_string(common::shared("data/wikitext-2-raw-test.txt")).unwrap();
    let tokens = e.tokenizer.encode(&text, false).unwrap();
    let bos = e.tokenizer.add_bos().then(|| e.tokenizer.bos_id()).flatten();
    let r = bitnest::ppl::perplexity(&e.model, &tokens, 512, Some(80), bos, |_| {}).unwrap();
    assert_eq!(r.chunks, 80);
    assert_eq!(r.tokens_scored, 80 * 255);
    let rel = (r.ppl() - LLAMA_CPP_PPL).abs() / LLAMA_CPP_PPL;
    eprintln!(
        "PPL = {:.4} ± {:.4} ({:+.3}% vs llama.cpp)",
        r.ppl(),
        r.stderr(),
        100.0 * (r.ppl() / LLAMA_CPP_PPL - 1.0)
    );
    assert!(rel < 0.01, "PPL {:.4} is {:.2}% away from llama.cpp's {LLAMA_CPP_PPL}", r.ppl(), rel * 100.0);
}
