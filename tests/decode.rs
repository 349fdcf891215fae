//! The decode driver advances several sequences in one pass each step, and each gets exactly
//! what it gets alone: plain greedy, seeded sampling, speculative, different prompt lengths,
//! prompt chunks sharing passes with decode tokens, limits and stop tokens.

use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};

use bitnest::decode::{Decoder, FinishReason, Sequence};
use bitnest::engine::Engine;
use bitnest::sampling::{Sampler, SamplingParams};
use bitnest::spec::{SpecOptions, Speculator, TokenRecycler};

mod common;

struct Case {
    prompt: Vec<u32>,
    max_tokens: usize,
    params: SamplingParams,
    spec: Option<&'static str>,
}

fn sequence(e: &Engine, c: &Case) -> Sequence {
    let session = e.model.new_batched_session(256, 64);
    let spec = c.spec.map(|m| {
        let rec = Arc::new(Mutex::new(TokenRecycler::new(e.model.config.vocab_size)));
        Speculator::new(SpecOptions { mode: m.parse().unwrap(), ..SpecOptions::default() }, rec)
    });
    Sequence::new(session, &[], &c.prompt, c.max_tokens, Sampler::new(c.params.clone()), spec).unwrap()
}

#[test]
fn sequences_stepped_together_get_what_they_get_alone() {
    let path = common::model_path();
    let planes = bitnest::transcode::cached_planes(&path, false).unwrap().unwrap_or(path);
    let e = Engine::load(&planes, None).unwrap();
    let text = |s: &str| e.tokenizer.encode(s, true).unwrap();
    let seeded = |t: f32, seed: u64| SamplingParams { temperature: t, seed: Some(seed), ..SamplingParams::greedy() };
    let long = "The history of the city goes back to Roman times, when a small settlement grew up beside the river. \
                Over the centuries it became a market town, then an industrial centre, and today";
    let cases = [
        Case { prompt: text("Once upon a time"), max_tokens: 24, params: SamplingParams::greedy(), spec: None },
        Case { prompt: text(long), max_tokens: 20, params: seeded(0.8, 7), spec: None },
        Case {
            prompt: text("1, 2, 3, 4, 5, 6, 7, 8,"),
            max_tokens: 30,
            params: SamplingParams::greedy(),
            spec: Some("recycle+lookup"),
        },
        Case { prompt: text("Paris is"), max_tokens: 3, params: seeded(1.0, 3), spec: None },
        Case { prompt: text(long), max_tokens: 16, params: seeded(0.9, 11), spec: Some("lookup") },
    ];
    let stop = e.stop_ids();
    let alone: Vec<(Vec<u32>, FinishReason, usize)> = cases
        .iter()
        .map(|c| {
            let mut seq = sequence(&e, c);
            let mut out = Vec::new();
            let st = Decoder::new(&e.model, stop.clone(), 512)
                .generate(&mut seq, |t, _| {
                    out.push(t);
                    ControlFlow::Continue(())
                })
                .unwrap();
            (out, st.finish, seq.session.pos)
        })
        .collect();

    // Together, with a small prefill budget so that prompt chunks share passes with the
    // others' decode tokens and trees; the last case joins after a few steps.
    let mut seqs: Vec<Sequence> = cases.iter().map(|c| sequence(&e, c)).collect();
    let mut outs = vec![Vec::new(); cases.len()];
    let mut dec = Decoder::new(&e.model, stop.clone(), 7);
    let mut steps = 0;
    let mut most = 0;
    while seqs.iter().any(|s| !s.is_done()) {
        let joined = if steps < 3 { seqs.len() - 1 } else { seqs.len() };
        let mut refs: Vec<&mut Sequence> = seqs[..joined].iter_mut().collect();
        let offset: Vec<usize> = (0..joined).collect();
        let r = dec
            .step(&mut refs, |i, t, _| {
                outs[offset[i]].push(t);
                ControlFlow::Continue(())
            })
            .unwrap();
        most = most.max(r.sequences);
        steps += 1;
        assert!(steps < 500, "the sequences do not finish");
    }
    assert!(most >= 4, "at most {most} sequences shared a pass");
    for (i, (seq, (want, finish, pos))) in seqs.iter().zip(&alone).enumerate() {
        assert_eq!(&outs[i], want, "case {i}: tokens");
        assert_eq!(seq.finish(), Some(*finish), "case {i}: finish reason");
        assert_eq!(seq.session.pos, *pos, "case {i}: cache position");
    }
    // The limits were reached where they apply (a real test of the cases above).
    assert_eq!(alone[3].0.len(), 3);
    assert_eq!(alone[3].1, FinishReason::Length);
}
