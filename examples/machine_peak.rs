//! The machine's ceilings for the roofline in `docs/KERNELS.md`: how many int8 multiply-adds
//! per second `vpdpbusd` can retire, and how many bytes per second a plain read streams, on
//! 1 and on N threads at once. Comparing the two thread counts also shows whether the cores a
//! VM reports are separate cores or hyperthreads of one: siblings share the vector ports, so
//! the arithmetic peak does not grow with the second thread while the read rate can.
//!
//! `cargo run --release --example machine_peak [THREADS] [SECONDS]`  (default 2 threads, 1 s)

use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: usize = args.get(1).and_then(|t| t.parse().ok()).unwrap_or(2);
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let dur = Duration::from_secs_f64(secs);
    println!("threads  int8 MAC/s (vpdpbusd)     read GB/s (256 MiB per thread)");
    for n in 1..=threads {
        // Best of three rounds: the host is shared, and a ceiling is what the machine can do.
        let macs = (0..3).map(|_| run(n, || mac_rate(dur))).fold(0.0, f64::max);
        let read = (0..3).map(|_| run(n, || read_rate(dur))).fold(0.0, f64::max);
        println!("{n:>7}  {:>10.1} G {:>20.1}", macs / 1e9, read / 1e9);
    }
}

/// Runs `f` on `n` threads at once and sums their rates.
fn run(n: usize, f: impl Fn() -> f64 + Sync) -> f64 {
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n).map(|_| s.spawn(&f)).collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    })
}

/// Multiply-adds per second of one thread running independent `vpdpbusd` chains.
fn mac_rate(dur: Duration) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512vnni") {
        return unsafe { x86::mac_rate(dur) };
    }
    let _ = dur;
    0.0
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::time::{Duration, Instant};

    /// Twelve accumulators hide the instruction's latency; each `vpdpbusd` is 64 u8 × s8
    /// multiply-adds.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub unsafe fn mac_rate(dur: Duration) -> f64 {
        let a = _mm512_set1_epi8(3);
        let b = _mm512_set1_epi8(-2);
        let mut acc = [_mm512_setzero_si512(); 12];
        let t = Instant::now();
        let mut iters = 0u64;
        while t.elapsed() < dur {
            for _ in 0..10_000 {
                for x in acc.iter_mut() {
                    *x = _mm512_dpbusd_epi32(*x, a, b);
                }
            }
            iters += 10_000;
        }
        let s = t.elapsed().as_secs_f64();
        // Keep the result alive so the loop is not removed.
        let mut sum = 0i64;
        for x in acc {
            sum += _mm512_reduce_add_epi32(x) as i64;
        }
        std::hint::black_box(sum);
        (iters * 12 * 64) as f64 / s
    }
}

/// Bytes per second of one thread reading its own 256 MiB buffer over and over.
fn read_rate(dur: Duration) -> f64 {
    let words = 256 << 17; // 256 MiB of u64
    let buf: Vec<u64> = (0..words as u64).collect();
    let t = Instant::now();
    let mut bytes = 0usize;
    let mut sum = 0u64;
    while t.elapsed() < dur {
        // Eight independent sums so the adds do not limit the read.
        let mut s = [0u64; 8];
        for c in buf.chunks_exact(8) {
            for (a, &v) in s.iter_mut().zip(c) {
                *a = a.wrapping_add(v);
            }
        }
        sum = sum.wrapping_add(s.iter().fold(0, |x, &y| x.wrapping_add(y)));
        bytes += words * 8;
    }
    std::hint::black_box(sum);
    bytes as f64 / t.elapsed().as_secs_f64()
}
