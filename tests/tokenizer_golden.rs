//! The tokenizer and chat template against llama.cpp's output for SmolLM2-135M-Instruct.
//!
//! The golden ids come from llama.cpp itself, so any disagreement means our prompts would not
//! be the prompts the model was evaluated with.

use bitnest::chat::{ChatTemplate, Message};
use bitnest::format::gguf::GgufFile;
use bitnest::tokenizer::Tokenizer;

mod common;
use common::{golden, model_path as test_model_path};

fn open_model() -> GgufFile {
    let path = test_model_path();
    assert!(path.exists(), "test model not found at {} (set BITNEST_TEST_MODEL)", path.display());
    GgufFile::open(&path).unwrap()
}

#[test]
fn encode_matches_llama_cpp() {
    let tok = Tokenizer::from_gguf(&open_model()).unwrap();
    assert!(!tok.add_bos());
    assert_eq!((tok.bos_id(), tok.eos_id()), (Some(1), Some(2)));
    assert_eq!(tok.vocab_size(), 49152);
    for g in golden() {
        assert_eq!(tok.encode(&g.text, true).unwrap(), g.prompt_ids, "prompt {}", g.name);
    }
}

#[test]
fn special_tokens_are_text_unless_parsed() {
    let tok = Tokenizer::from_gguf(&open_model()).unwrap();
    let chat = golden().into_iter().find(|g| g.name == "chat-haiku").unwrap();
    let plain = tok.encode(&chat.text, false).unwrap();
    assert!(plain.iter().all(|&id| id > 16), "no control token may appear: {plain:?}");
    assert_eq!(tok.decode(&plain).unwrap(), chat.text);
    assert_eq!(tok.decode_with_special(&chat.prompt_ids).unwrap(), chat.text);
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
}

#[test]
fn decode_and_stream_match_llama_cpp() {
    let tok = Tokenizer::from_gguf(&open_model()).unwrap();
    for g in golden() {
        assert_eq!(tok.decode(&g.greedy_ids).unwrap(), g.greedy_text, "continuation {}", g.name);
        let mut stream = tok.stream();
        let mut streamed: String = g.greedy_ids.iter().filter_map(|&id| stream.push(id)).collect();
        streamed.extend(stream.finish());
        assert_eq!(streamed, g.greedy_text, "streamed continuation {}", g.name);
        // Whatever the model generated, prompt and continuation re-encode to the same text.
        let all: Vec<u32> = g.prompt_ids.iter().chain(&g.greedy_ids).copied().collect();
        assert_eq!(tok.decode(&all).unwrap(), tok.decode(&g.prompt_ids).unwrap() + &g.greedy_text);
    }
}

#[test]
fn chat_template_reproduces_the_golden_prompt() {
    let gguf = open_model();
    let src = gguf.get("tokenizer.chat_template").and_then(|v| v.as_str()).unwrap();
    let tok = Tokenizer::from_gguf(&gguf).unwrap();
    let text = |id: Option<u32>| tok.token_str(id.unwrap()).unwrap();
    let template = ChatTemplate::new(src, &text(tok.bos_id()), &text(tok.eos_id())).unwrap();

    let system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face";
    let haiku = golden().into_iter().find(|g| g.name == "chat-haiku").unwrap();
    let messages = [Message::new("system", system), Message::new("user", "Write a haiku about the sea.")];
    let prompt = template.render(&messages, true).unwrap();
    assert_eq!(prompt, haiku.text);
    assert_eq!(tok.encode(&prompt, true).unwrap(), haiku.prompt_ids);

    // Without a system turn, the template supplies its own default (the same sentence).
    assert!(src.contains(system));
    let user_only = template.render(&messages[1..], true).unwrap();
    assert_eq!(user_only, haiku.text);

    let no_prompt = template.render(&messages, false).unwrap();
    assert_eq!(no_prompt, haiku.text.strip_suffix("<|im_start|>assistant\n").unwrap());
}
