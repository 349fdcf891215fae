//! A loaded model with everything needed to talk to it: weights, tokenizer, chat template.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::chat::{CHATML_TEMPLATE, ChatTemplate, Message};
use crate::model::{BitsPlan, Llama, ModelSource};
use crate::tokenizer::Tokenizer;

pub struct Engine {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// True when the template came from the model itself (or its architecture's own, for a
    /// file that carries none) rather than the ChatML fallback.
    pub has_own_template: bool,
    pub path: PathBuf,
}

/// Token texts that end an assistant turn in common chat formats.
const END_OF_TURN: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"];

impl Engine {
    /// Opens `path` (already resolved by [`crate::fetch::resolve_model`]) and loads it; a
    /// `.bnest` file is read at the precision `plan` asks for (default: all its planes).
    pub fn load(path: &Path, plan: Option<BitsPlan>) -> Result<Self> {
        Self::from_source(ModelSource::open(path, plan)?, path)
    }

    /// Loads an opened model (`path` names it in messages): what [`Engine::load`] does after
    /// opening the file, and the fuzzers' way in with a file image held in memory.
    pub fn from_source(mut source: ModelSource, path: &Path) -> Result<Self> {
        let tokenizer = source.tokenizer()?;
        source.forget_tokenizer();
        let model = source.load_f32().with_context(|| format!("loading weights from {}", path.display()))?;
        anyhow::ensure!(
            tokenizer.vocab_size() <= model.config.vocab_size,
            "tokenizer has {} tokens but the model only {}",
            tokenizer.vocab_size(),
            model.config.vocab_size
        );
        let (template, has_own_template) = chat_template(&source, &tokenizer)?;
        Ok(Engine { model, tokenizer, template, has_own_template, path: path.to_path_buf() })
    }

    /// Ids that end generation: the model's EOS plus any end-of-turn token it knows.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.tokenizer.eos_id().into_iter().collect();
        for t in END_OF_TURN {
            if let Some(id) = self.tokenizer.token_id(t).filter(|id| !ids.contains(id)) {
                ids.push(id);
            }
        }
        ids
    }

    /// Renders a conversation with the model's template and tokenizes it (specials parsed).
    /// A template that writes the BOS text itself (Gemma's) does not get a second BOS from the
    /// tokenizer: the text's copy is dropped, as llama.cpp's chat formatting does.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<Vec<u32>> {
        chat_prompt(&self.template, &self.tokenizer, messages)
    }
}

/// The chat template of a model: the file's own, else its architecture's, else ChatML; and
/// whether it is the model's (either of the first two).
pub fn chat_template(source: &ModelSource, tokenizer: &Tokenizer) -> Result<(ChatTemplate, bool)> {
    let name = |id: Option<u32>| id.and_then(|i| tokenizer.token_str(i)).unwrap_or_default();
    let (bos, eos) = (name(tokenizer.bos_id()), name(tokenizer.eos_id()));
    let own = source.chat_template().or_else(|| source.config().ok()?.spec().chat_template.map(str::to_string));
    let template = ChatTemplate::new(own.as_deref().unwrap_or(CHATML_TEMPLATE), &bos, &eos)?;
    Ok((template, own.is_some()))
}

/// [`Engine::chat_prompt`] for a template and tokenizer of one's own.
pub fn chat_prompt(template: &ChatTemplate, tokenizer: &Tokenizer, messages: &[Message]) -> Result<Vec<u32>> {
    let text = template.render(messages, true)?;
    let bos = tokenizer.bos_id().and_then(|id| tokenizer.token_str(id)).unwrap_or_default();
    let text = match text.strip_prefix(bos.as_str()) {
        Some(rest) if tokenizer.add_bos() && !bos.is_empty() => rest,
        _ => &text[..],
    };
    tokenizer.encode(text, true)
}
