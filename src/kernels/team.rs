//! A spinning fork-join team for the parallel regions of a forward pass.
//!
//! Decoding one token runs about 200 small parallel regions (every matmul, attention), each a
//! few tens of microseconds long. A pool whose idle workers go to sleep (rayon's) pays a
//! futex wake-up and a scheduler round trip per region, which on two cores cost more than the
//! second core earned: two threads decoded *slower* than one. The team's workers instead spin
//! on a generation counter for a short while after each region, so the next region starts
//! within a cache-line transfer; after `SPIN` without work they park, so an idle server or a
//! paused chat costs no CPU.
//!
//! The team is an implementation detail of [`parallel_for`]: whoever cannot use it (a nested
//! call, a second thread using the kernels concurrently, a different thread count) falls back to
//! rayon, with the same results, since each task writes its own disjoint output.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

use rayon::prelude::*;

/// How long an idle worker spins before parking: longer than the gap between two regions of a
/// decode step (norms, sampling), far shorter than anything a person would notice as load.
const SPIN: Duration = Duration::from_millis(2);

/// How long the caller spins for unfinished workers before it starts yielding its core.
const YIELD_AFTER: Duration = Duration::from_micros(200);

/// Runs `f(0) … f(count − 1)`, spread over the current thread count (rayon's, so `--threads`
/// applies), and returns when all are done. Tasks may run in any order on any thread.
pub fn parallel_for(count: usize, f: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if count <= 1 || threads <= 1 {
        (0..count).for_each(f);
        return;
    }
    let team = TEAM.get_or_init(|| Team::spawn(threads));
    // A panic inside a region poisons the lock but leaves the team sound (`Team::run` waits for
    // every worker before unwinding), so a poisoned lock is still usable.
    let guard = match team.lock.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    };
    match guard {
        Some(_held) if team.workers + 1 == threads => team.run(count, &f),
        _ => (0..count).into_par_iter().for_each(&f),
    }
}

/// Runs `f` over `0..total` cut into chunks that shrink as the work runs out (guided
/// scheduling): early chunks are long, so each task streams a long stretch of weights, and the
/// last ones are `min_chunk` long, so the threads finish within a small chunk of each other
/// instead of one waiting out the other's last long task. Chunks are handed out in order.
pub fn parallel_chunks(total: usize, min_chunk: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    let b = guided_bounds(total, min_chunk, rayon::current_num_threads());
    parallel_for(b.chunks, |i| f(b.at[i]..b.at[i + 1]));
}

/// Most chunks [`parallel_chunks`] makes of one range.
const MAX_CHUNKS: usize = 256;

/// Chunk boundaries for [`parallel_chunks`], on the stack (no allocation per region): chunk
/// `i` is `at[i]..at[i + 1]`.
struct ChunkBounds {
    at: [usize; MAX_CHUNKS + 1],
    chunks: usize,
}

/// Each chunk takes a `2·threads`-th of what is left (at least `min_chunk`); the last of
/// [`MAX_CHUNKS`] takes the remainder.
fn guided_bounds(total: usize, min_chunk: usize, threads: usize) -> ChunkBounds {
    let mut b = ChunkBounds { at: [0; MAX_CHUNKS + 1], chunks: 0 };
    let (min_chunk, share) = (min_chunk.max(1), 2 * threads.max(1));
    let mut at = 0;
    while at < total {
        let left = total - at;
        let step = if b.chunks + 1 == MAX_CHUNKS { left } else { left.div_ceil(share).max(min_chunk).min(left) };
        at += step;
        b.chunks += 1;
        b.at[b.chunks] = at;
    }
    b
}

static TEAM: OnceLock<Team> = OnceLock::new();

/// What one region asks of the workers; it lives on the caller's stack for the region's span.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    count: usize,
    next: AtomicUsize,
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Takes tasks until none are left. A panicking task is recorded, not propagated, so that
    /// every participant still checks in and the caller's stack frame outlives all readers.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.f)(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
        }
    }
}

struct Shared {
    /// Bumped once per region; workers watch it.
    generation: AtomicUsize,
    /// The current region's job (a `Job` on the caller's stack, lifetime erased).
    job: AtomicPtr<Job<'static>>,
    /// Workers done with the current region.
    finished: AtomicUsize,
    /// Workers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    park: Mutex<()>,
    wake: Condvar,
}

struct Team {
    shared: &'static Shared,
    workers: usize,
    /// Held by the one caller that owns the team for a region.
    lock: Mutex<()>,
}

impl Team {
    fn spawn(threads: usize) -> Team {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            finished: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            park: Mutex::new(()),
            wake: Condvar::new(),
        }));
        let mut workers = 0;
        for i in 1..threads {
            let spawned = std::thread::Builder::new().name(format!("bitnest-team-{i}")).spawn(move || worker(shared));
            // A worker that cannot be started only means less parallelism: `parallel_for`
            // then sees a team smaller than wanted and uses rayon instead.
            if spawned.is_ok() {
                workers += 1;
            }
        }
        Team { shared, workers, lock: Mutex::new(()) }
    }

    /// Runs one region; the caller holds `self.lock`.
    fn run(&self, count: usize, f: &(dyn Fn(usize) + Sync)) {
        let s = self.shared;
        let job = Job { f, count, next: AtomicUsize::new(0), panicked: AtomicBool::new(false) };
        s.finished.store(0, Ordering::Relaxed);
        s.job.store(&job as *const Job as *mut Job<'static>, Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job.work();
        // Spin for the workers, but yield the core once the wait is long: on an oversubscribed
        // machine (more busy threads than cores) a worker may be waiting for this very core.
        let started = Instant::now();
        let mut spins = 0u32;
        while s.finished.load(Ordering::Acquire) < self.workers {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(1024) && started.elapsed() > YIELD_AFTER {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        s.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        if job.panicked.load(Ordering::Relaxed) {
            resume_unwind(Box::new("a parallel kernel task panicked"));
        }
    }
}

fn worker(s: &'static Shared) {
    // Generation 0 is the team's birth; a worker that starts late must still take region 1.
    let mut seen = 0;
    loop {
        // Spin for new work, then park.
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.generation.load(Ordering::Acquire) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(1024) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut g = s.park.lock().unwrap_or_else(|e| e.into_inner());
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            while s.generation.load(Ordering::SeqCst) == seen {
                g = s.wake.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            break;
        }
        seen = s.generation.load(Ordering::Acquire);
        // SAFETY: the caller published `job` before bumping the generation and does not return
        // (so the job stays alive) until every worker has incremented `finished` below.
        let job = unsafe { &*s.job.load(Ordering::Acquire) };
        job.work();
        s.finished.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_exactly_once() {
        let team = Team::spawn(3);
        assert_eq!(team.workers, 2);
        for round in 0..200 {
            for count in [1usize, 2, 3, 7, 64, 1000] {
                let hits: Vec<AtomicU64> = (0..count).map(|_| AtomicU64::new(0)).collect();
                team.run(count, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "count {count}, round {round}");
            }
            if round == 100 {
                // Let the workers park, so the next region has to wake them.
                std::thread::sleep(SPIN * 3);
            }
        }
    }

    #[test]
    fn guided_chunks_cover_the_range_once_and_shrink() {
        for total in [0usize, 1, 5, 60, 96, 3072, 100_000] {
            for threads in [1usize, 2, 3, 8] {
                for min_chunk in [1usize, 4] {
                    let b = guided_bounds(total, min_chunk, threads);
                    assert!(b.chunks <= MAX_CHUNKS);
                    assert_eq!(b.at[b.chunks], total, "total {total}, threads {threads}");
                    let sizes: Vec<usize> = (0..b.chunks).map(|i| b.at[i + 1] - b.at[i]).collect();
                    assert!(sizes.iter().all(|&s| s > 0));
                    // Non-increasing, except that the capped last chunk takes the remainder.
                    let body = &sizes[..sizes.len().saturating_sub(1)];
                    assert!(body.windows(2).all(|w| w[0] >= w[1]), "{sizes:?}");
                    if b.chunks < MAX_CHUNKS && total >= 2 * min_chunk * threads {
                        assert!(*sizes.last().unwrap() <= min_chunk.max(1), "{sizes:?}");
                    }
                }
            }
        }
        let hits: Vec<AtomicU64> = (0..1000).map(|_| AtomicU64::new(0)).collect();
        parallel_chunks(1000, 3, |r| {
            r.for_each(|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            })
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_team_survives() {
        let team = Team::spawn(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(16, &|i| {
                if i == 11 {
                    panic!("task 11");
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicU64::new(0);
        team.run(16, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn concurrent_and_nested_callers_fall_back_without_losing_tasks() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let total = AtomicU64::new(0);
        pool.install(|| {
            rayon::scope(|sc| {
                for _ in 0..4 {
                    sc.spawn(|_| {
                        for _ in 0..50 {
                            parallel_for(8, |_| {
                                parallel_for(4, |_| {
                                    total.fetch_add(1, Ordering::Relaxed);
                                });
                            });
                        }
                    });
                }
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 8 * 4);
    }
}
