//! `bitnest chat`: an interactive, streaming, multi-turn conversation in the terminal.
//!
//! Ctrl-C while an answer streams stops that answer and keeps the conversation; at the prompt
//! it asks for a second Ctrl-C to quit. Commands start with `/` (see [`HELP`]).

use std::io::{BufRead, Write};
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::Result;

use bitnest::chat::Message;
use bitnest::decode::{Decoder, GenerationStats, Sequence};
use bitnest::engine::Engine;
use bitnest::format::bnest::BnestFile;
use bitnest::model::BitsPlan;
use bitnest::sampling::{Sampler, SamplingParams};
use bitnest::spec::{SpecMode, SpecOptions, Speculator, TokenRecycler};

const HELP: &str = "commands: /reset (forget the conversation), /bits R (reload a .bnest model at R bits), \
/spec MODE (speculative decoding), /stats (last answer's speed), /help; empty line or Ctrl-D quits; \
Ctrl-C stops an answer";

pub struct ChatOptions {
    pub path: PathBuf,
    pub system: Option<String>,
    pub max_tokens: usize,
    pub ctx: usize,
    pub params: SamplingParams,
    pub spec: SpecOptions,
}

/// What Ctrl-C means right now.
const IDLE: u8 = 0;
const ANSWERING: u8 = 1;
const STOP_ANSWER: u8 = 2;
const IDLE_WARNED: u8 = 3;

pub fn chat(mut engine: Engine, o: ChatOptions) -> Result<()> {
    let state = Arc::new(AtomicU8::new(IDLE));
    {
        let state = state.clone();
        // The handler runs on its own thread (not in signal context), so printing is fine.
        let installed = ctrlc::set_handler(move || match state.load(Ordering::SeqCst) {
            ANSWERING => state.store(STOP_ANSWER, Ordering::SeqCst),
            IDLE_WARNED => {
                eprintln!();
                std::process::exit(130);
            }
            STOP_ANSWER => {}
            _ => {
                state.store(IDLE_WARNED, Ordering::SeqCst);
                eprint!("\n(Ctrl-C again, an empty line or Ctrl-D to quit)\n> ");
            }
        });
        if let Err(e) = installed {
            eprintln!("bitnest: cannot catch Ctrl-C ({e}); it will end the program");
        }
    }
    let mut session = engine.model.new_batched_session(o.ctx, 512);
    let mut sampler = Sampler::new(o.params.clone());
    // One Token Recycling matrix for the whole conversation (hot start across turns).
    let recycler = Arc::new(std::sync::Mutex::new(TokenRecycler::new(engine.model.config.vocab_size)));
    let mut spec = Speculator::new(o.spec, recycler.clone());
    spec.check(&engine.model)?;
    let mut messages: Vec<Message> = o.system.iter().map(|s| Message::new("system", s.as_str())).collect();
    // Tokens currently in the KV cache, so each turn only prefills what is new.
    let mut cached: Vec<u32> = Vec::new();
    let mut last: Option<(GenerationStats, bool, Option<f64>)> = None;
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("bitnest chat: {} — {HELP}", engine.path.display());
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        state.store(IDLE, Ordering::SeqCst);
        let line = line.trim_end_matches(['\n', '\r']);
        if line.is_empty() {
            break;
        }
        if let Some(cmd) = line.strip_prefix('/') {
            let mut words = cmd.split_whitespace();
            match (words.next().unwrap_or(""), words.next()) {
                ("reset", _) => {
                    messages.retain(|m| m.role == "system");
                    cached.clear();
                    session.reset();
                    eprintln!("[conversation cleared]");
                }
                ("bits", Some(r)) => match r.parse::<u32>() {
                    Ok(r) if (1..=8).contains(&r) => {
                        if !BnestFile::sniff(&o.path) {
                            eprintln!(
                                "[/bits needs a .bnest model; {} is not one (make one with `bitnest quantize`)]",
                                o.path.display()
                            );
                            continue;
                        }
                        eprintln!("[reloading {} at {r} bits…]", o.path.display());
                        match Engine::load(&o.path, Some(BitsPlan::uniform(Some(r)))) {
                            Ok(mut e) => {
                                e.model.kv_type = engine.model.kv_type;
                                engine = e;
                                session = engine.model.new_batched_session(o.ctx, 512);
                                cached.clear();
                                if let Err(e) = spec.check(&engine.model) {
                                    eprintln!("[{e:#}; speculative decoding is off]");
                                    spec = Speculator::new(
                                        SpecOptions { mode: SpecMode::None, ..spec.opts },
                                        recycler.clone(),
                                    );
                                }
                                eprintln!("[now at {r} bits; the conversation is kept and re-read on the next turn]");
                            }
                            Err(e) => eprintln!("[cannot reload at {r} bits: {e:#}]"),
                        }
                    }
                    _ => eprintln!("[/bits takes a number of bit planes from 1 to 8]"),
                },
                ("spec", Some(m)) => match m.parse::<SpecMode>() {
                    Ok(mode) => {
                        let next = Speculator::new(SpecOptions { mode, ..spec.opts }, recycler.clone());
                        match next.check(&engine.model) {
                            Ok(()) => {
                                spec = next;
                                eprintln!("[speculative decoding: {mode}]");
                            }
                            Err(e) => eprintln!("[{e:#}]"),
                        }
                    }
                    Err(e) => eprintln!("[{e:#}]"),
                },
                ("stats", _) => match &last {
                    Some((s, stopped, mat)) => eprintln!(
                        "[last answer: prompt {} tokens at {:.1} tok/s, {} tokens generated at {:.1} tok/s ({}){}; context {} / {} tokens]",
                        s.prompt_tokens,
                        s.prefill_tok_s,
                        s.generated_tokens,
                        s.decode_tok_s,
                        if *stopped {
                            "stopped by Ctrl-C".to_string()
                        } else {
                            format!("{:?}", s.finish).to_lowercase()
                        },
                        mat.map(|m| format!(", speculative {}: {m:.2} tokens per pass", spec.opts.mode))
                            .unwrap_or_default(),
                        session.pos,
                        session.capacity()
                    ),
                    None => eprintln!("[no answer yet; context {} / {} tokens]", session.pos, session.capacity()),
                },
                _ => eprintln!("[{HELP}]"),
            }
            continue;
        }
        messages.push(Message::new("user", line));
        let ids = engine.chat_prompt(&messages)?;
        let mut stream = engine.tokenizer.stream();
        let mut answer = Vec::new();
        state.store(ANSWERING, Ordering::SeqCst);
        let before = spec.stats.clone();
        // The sequence borrows the conversation's session, sampler and speculator for the turn.
        // (Checked first: a prompt that does not fit leaves the conversation as it was.)
        let result = Sequence::check(&session, &cached, &ids).and_then(|_| {
            let sess = std::mem::replace(&mut session, engine.model.new_batched_session(1, 1));
            let smp = std::mem::replace(&mut sampler, Sampler::new(o.params.clone()));
            let opts = spec.opts;
            let sp = std::mem::replace(&mut spec, Speculator::new(opts, recycler.clone()));
            let sp = (opts.mode != SpecMode::None).then_some(sp);
            let mut seq = Sequence::new(sess, &cached, &ids, o.max_tokens, smp, sp)?;
            let r = Decoder::new(&engine.model, engine.stop_ids(), 512).generate(&mut seq, |id, _| {
                if state.load(Ordering::SeqCst) == STOP_ANSWER {
                    return ControlFlow::Break(());
                }
                answer.push(id);
                if let Some(t) = stream.push(id) {
                    print!("{t}");
                    let _ = std::io::stdout().flush();
                }
                ControlFlow::Continue(())
            });
            let parts = seq.into_parts();
            (session, cached, sampler) = (parts.session, parts.cached, parts.sampler);
            if let Some(sp) = parts.spec {
                spec = sp;
            }
            r
        });
        let stopped = state.swap(IDLE, Ordering::SeqCst) == STOP_ANSWER;
        match result {
            Ok(stats) => {
                if let Some(t) = stream.finish() {
                    print!("{t}");
                }
                println!();
                if stopped {
                    eprintln!("[stopped]");
                }
                messages.push(Message::new("assistant", engine.tokenizer.decode(&answer)?));
                let (steps, tokens) = (spec.stats.steps - before.steps, spec.stats.tokens - before.tokens);
                last = Some((stats, stopped, (steps > 0).then(|| tokens as f64 / steps as f64)));
            }
            Err(e) => {
                eprintln!("bitnest: {e:#}; use /reset or a larger --ctx");
                messages.pop();
            }
        }
    }
    Ok(())
}
