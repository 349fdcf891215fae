//! Readiness and drain: the server's life as a load balancer sees it.
//!
//! The socket is bound before the model loads, and every request passes through one [`Gate`]:
//!
//! | phase      | `/health`              | generation requests               | other routes |
//! |------------|------------------------|-----------------------------------|--------------|
//! | `loading`  | 503 `{"status":"loading"}`  | 503 `loading`, `Retry-After`  | 503 `loading` |
//! | `ready`    | 200 `{"status":"ok", …}`    | served                        | served        |
//! | `draining` | 503 `{"status":"draining"}` | 503 `draining`, `Retry-After` | served        |
//!
//! SIGTERM (or Ctrl-C) starts draining: requests already accepted run to the end, new ones are
//! turned away with a 503 that a router retries on another replica (nothing of them was
//! computed here), and once nothing is in flight the listener closes and the process exits 0.
//! `--grace` bounds the wait; past it the worker cancels what still runs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tower::ServiceExt;

use super::error::ApiError;
use super::metrics::Metrics;

/// Where the server is in its life; stored in [`Metrics::phase`] so `/metrics` shows it too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Loading = 0,
    Ready = 1,
    Draining = 2,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
        }
    }

    fn from_u64(v: u64) -> Self {
        match v {
            0 => Phase::Loading,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }
}

/// Stands in front of the application router: answers for it while the model loads, turns new
/// work away while draining, and counts what it let through.
pub struct Gate {
    metrics: Arc<Metrics>,
    app: OnceLock<Router>,
    /// Generation requests let through whose response head has not been produced yet (for a
    /// non-streaming request: the whole answer). Together with the worker's queue and slots this
    /// says when draining is done.
    in_flight: AtomicU64,
}

impl Gate {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Self> {
        metrics.phase.store(Phase::Loading as u64, Ordering::Relaxed);
        Arc::new(Self { metrics, app: OnceLock::new(), in_flight: AtomicU64::new(0) })
    }

    pub fn phase(&self) -> Phase {
        Phase::from_u64(self.metrics.phase.load(Ordering::Relaxed))
    }

    /// The model is loaded: from now on requests go to `app`.
    pub fn open(&self, app: Router) {
        let _ = self.app.set(app);
        self.metrics.phase.store(Phase::Ready as u64, Ordering::Relaxed);
    }

    /// Stop taking new generation requests (`/health` turns 503).
    pub fn drain(&self) {
        self.metrics.phase.store(Phase::Draining as u64, Ordering::Relaxed);
    }

    /// True when no accepted request is left: none between the gate and the worker, none queued
    /// and none holding a slot.
    pub fn idle(&self) -> bool {
        let m = &self.metrics;
        self.in_flight.load(Ordering::Acquire) == 0
            && m.queue_depth.load(Ordering::Acquire) == 0
            && m.active.load(Ordering::Acquire) == 0
    }

    /// Waits until [`Gate::idle`] or `deadline`; true if idle. Polls: draining is rare and
    /// a few milliseconds of latency on it cost nothing.
    pub async fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            if self.idle() {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The router the listener serves: every request goes through [`dispatch`].
pub fn router(gate: Arc<Gate>) -> Router {
    Router::new().fallback(dispatch).with_state(gate)
}

/// The two endpoints that start work on the model.
fn is_generation(req: &Request) -> bool {
    req.method() == Method::POST && matches!(req.uri().path(), "/v1/chat/completions" | "/v1/completions")
}

async fn dispatch(State(gate): State<Arc<Gate>>, req: Request) -> Response {
    let phase = gate.phase();
    let health = req.uri().path() == "/health";
    let app = match (phase, gate.app.get()) {
        (Phase::Loading, _) | (_, None) if health => return not_ready(Phase::Loading),
        (Phase::Loading, _) | (_, None) => return ApiError::loading().into_response(),
        (Phase::Draining, _) if health => return not_ready(Phase::Draining),
        (Phase::Draining, _) if is_generation(&req) => {
            let mut r = ApiError::draining().into_response();
            // Let the client (or router) open its next connection elsewhere.
            r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        (_, Some(app)) => app.clone(),
    };
    if !is_generation(&req) {
        return app.oneshot(req).await.unwrap_or_else(|e| match e {});
    }
    gate.in_flight.fetch_add(1, Ordering::AcqRel);
    // Decrements even if the client goes away and this future is dropped.
    struct Done<'a>(&'a AtomicU64);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let _done = Done(&gate.in_flight);
    app.oneshot(req).await.unwrap_or_else(|e| match e {})
}

fn not_ready(phase: Phase) -> Response {
    let mut r = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": phase.name()}))).into_response();
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::routing::{get, post};

    fn app() -> Router {
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/v1/chat/completions", post(|| async { "answer" }))
            .route("/v1/models", get(|| async { "models" }))
    }

    async fn call(gate: &Arc<Gate>, method: Method, path: &str) -> (StatusCode, String) {
        let req = Request::builder().method(method).uri(path).body(Body::empty()).unwrap();
        let r = router(gate.clone()).oneshot(req).await.unwrap();
        let status = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn each_phase_answers_as_documented() {
        let metrics = Arc::new(Metrics::default());
        let gate = Gate::new(metrics.clone());
        let (s, b) = call(&gate, Method::GET, "/health").await;
        assert_eq!((s, b.as_str()), (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"loading"}"#));
        let (s, b) = call(&gate, Method::POST, "/v1/chat/completions").await;
        assert!(s == StatusCode::SERVICE_UNAVAILABLE && b.contains("\"loading\""), "{s} {b}");
        assert_eq!(call(&gate, Method::GET, "/v1/models").await.0, StatusCode::SERVICE_UNAVAILABLE);

        gate.open(app());
        assert_eq!(metrics.phase.load(Ordering::Relaxed), Phase::Ready as u64);
        assert_eq!(call(&gate, Method::GET, "/health").await, (StatusCode::OK, "ok".into()));
        assert_eq!(call(&gate, Method::POST, "/v1/chat/completions").await, (StatusCode::OK, "answer".into()));
        assert!(gate.idle());

        gate.drain();
        let (s, b) = call(&gate, Method::GET, "/health").await;
        assert_eq!((s, b.as_str()), (StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#));
        let (s, b) = call(&gate, Method::POST, "/v1/chat/completions").await;
        assert!(s == StatusCode::SERVICE_UNAVAILABLE && b.contains("\"draining\""), "{s} {b}");
        // What is not new work is still served while draining.
        assert_eq!(call(&gate, Method::GET, "/v1/models").await, (StatusCode::OK, "models".into()));
    }

    #[tokio::test]
    async fn draining_waits_for_queued_and_running_requests() {
        let metrics = Arc::new(Metrics::default());
        let gate = Gate::new(metrics.clone());
        gate.open(app());
        gate.drain();
        metrics.active.store(1, Ordering::Relaxed);
        assert!(!gate.idle());
        assert!(!gate.wait_idle(Instant::now() + Duration::from_millis(50)).await);
        metrics.active.store(0, Ordering::Relaxed);
        metrics.queue_depth.store(2, Ordering::Relaxed);
        assert!(!gate.idle());
        metrics.queue_depth.store(0, Ordering::Relaxed);
        assert!(gate.wait_idle(Instant::now() + Duration::from_secs(5)).await);
    }
}
