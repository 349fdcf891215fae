//! The decode loop's forward pass allocates nothing per token: every buffer lives in the
//! `Session`, sized once. Counted with a global allocator wrapper.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use bitnest::kernels::PlaneLinear;
use bitnest::kernels::cpu::Isa;
use bitnest::model::ModelSource;
use bitnest::quant::bitplane::{BitPlanes, QuantConfig};
use bitnest::quant::dtype::ALL;

mod common;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn decode_forward_allocates_nothing_per_token() {
    // The real model, so the multi-threaded kernel paths run as they do in production.
    let m = ModelSource::open(&common::model_path(), None).unwrap().load_f32().unwrap();
    let mut s = m.new_session(200, 32);
    // As the CLI does: run on a pool worker, so kernels' parallel jobs use its local queue.
    let pool = rayon::ThreadPoolBuilder::new().build().unwrap();
    pool.install(|| {
        // Warm up: prefill (parallel paths) and a few decode steps start the thread pool.
        m.forward(&mut s, &(0..40).collect::<Vec<u32>>(), 1).unwrap();
        for t in 0..4 {
            m.forward(&mut s, &[t], 1).unwrap();
        }
        let before = ALLOCS.load(Ordering::Relaxed);
        for t in 0..30u32 {
            let logits = m.forward(&mut s, &[t * 7], 1).unwrap();
            assert!(logits[0].is_finite());
        }
        let n = ALLOCS.load(Ordering::Relaxed) - before;
        assert_eq!(n, 0, "{n} allocations in 30 decode steps");
    });

    // The bit-plane kernel (what a .bnest model runs on), at several precisions, in the same
    // test so that no other test's allocations are counted.
    let cfg = QuantConfig::new(128, 8, ALL.to_vec());
    let (rows, cols) = (1536, 576);
    let w: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let lin = PlaneLinear::from_bitplanes(&BitPlanes::quantize(&w, rows, cols, &cfg).unwrap(), 8).unwrap();
    let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
    let mut y = vec![0f32; rows];
    pool.install(|| {
        lin.forward_with(&x, 1, &mut y, 8, Isa::detect());
        let before = ALLOCS.load(Ordering::Relaxed);
        for r in [8, 4, 2, 8] {
            for _ in 0..10 {
                lin.forward_with(&x, 1, &mut y, r, Isa::detect());
            }
        }
        let n = ALLOCS.load(Ordering::Relaxed) - before;
        assert_eq!(n, 0, "{n} allocations in 40 bit-plane GEMVs");
    });
}
