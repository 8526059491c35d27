//! Liveness, readiness and the admin HTTP server.
//!
//! `/livez` answers 200 while the process can serve HTTP at all. `/readyz` is
//! a latch: each component that must be up before traffic is welcome (the gRPC
//! server, a model, a store) holds a [`Latch`], and the node is ready once
//! every latch is released — until shutdown starts draining it.

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::watch;

use crate::metrics;

/// What readiness is waiting for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadyState {
    /// Components not up yet.
    pub pending: BTreeSet<String>,
    /// Shutdown has begun; never ready again.
    pub draining: bool,
}

impl ReadyState {
    pub fn is_ready(&self) -> bool {
        self.pending.is_empty() && !self.draining
    }

    /// A one-line human explanation.
    pub fn describe(&self) -> String {
        if self.draining {
            "not ready: draining".to_string()
        } else if self.pending.is_empty() {
            "ready".to_string()
        } else {
            let waiting: Vec<&str> = self.pending.iter().map(String::as_str).collect();
            format!("not ready: waiting for {}", waiting.join(", "))
        }
    }
}

/// The readiness of one node. Cloning shares it.
#[derive(Debug, Clone)]
pub struct Readiness {
    state: Arc<watch::Sender<ReadyState>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl Readiness {
    pub fn new() -> Self {
        Readiness {
            state: Arc::new(watch::Sender::new(ReadyState::default())),
        }
    }

    /// Holds readiness back until the returned latch is released.
    pub fn latch(&self, component: &str) -> Latch {
        self.state.send_modify(|s| {
            s.pending.insert(component.to_string());
        });
        Latch {
            readiness: self.clone(),
            component: component.to_string(),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.state.borrow().is_ready()
    }

    pub fn state(&self) -> ReadyState {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<ReadyState> {
        self.state.subscribe()
    }

    /// Waits until ready. Never returns once draining has begun.
    pub async fn wait_ready(&self) {
        let mut rx = self.state.subscribe();
        if rx.wait_for(ReadyState::is_ready).await.is_err() {
            // The sender lives as long as `self`, so this cannot happen.
            std::future::pending::<()>().await;
        }
    }

    /// Fails readiness for good: the first step of shutdown.
    pub fn set_draining(&self) {
        self.state.send_modify(|s| s.draining = true);
    }
}

/// One component's hold on readiness. Dropping it without [`Latch::release`]
/// keeps the node unready, which is the truth if the component never came up.
#[derive(Debug)]
pub struct Latch {
    readiness: Readiness,
    component: String,
}

impl Latch {
    /// The component is up.
    pub fn release(self) {
        self.readiness.state.send_modify(|s| {
            s.pending.remove(&self.component);
        });
    }
}

/// `/livez`, `/readyz` and `/metrics`, to serve on the admin port (and on the
/// public port in `lmgrid up`).
pub fn admin_router(readiness: Readiness) -> Router {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(readiness)
}

async fn livez() -> &'static str {
    "live\n"
}

async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    let state = readiness.state();
    let status = if state.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{}\n", state.describe()))
}

async fn metrics_text() -> impl IntoResponse {
    match metrics::encode() {
        Ok(text) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response(),
        Err(error) => {
            tracing::error!(%error, "encode metrics");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("encode metrics: {error}\n"),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_latch_is_released_and_not_draining() {
        let readiness = Readiness::new();
        assert!(readiness.is_ready(), "nothing to wait for");
        let grpc = readiness.latch("grpc");
        let models = readiness.latch("models");
        assert_eq!(
            readiness.state().describe(),
            "not ready: waiting for grpc, models"
        );
        grpc.release();
        assert!(!readiness.is_ready());
        models.release();
        assert!(readiness.is_ready());
        readiness.set_draining();
        assert!(!readiness.is_ready());
        assert_eq!(readiness.state().describe(), "not ready: draining");
    }

    #[test]
    fn a_dropped_latch_keeps_the_node_unready() {
        let readiness = Readiness::new();
        drop(readiness.latch("store"));
        assert!(!readiness.is_ready());
    }

    #[tokio::test]
    async fn wait_ready_returns_once_released() {
        let readiness = Readiness::new();
        let latch = readiness.latch("grpc");
        let waiter = tokio::spawn({
            let readiness = readiness.clone();
            async move { readiness.wait_ready().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        latch.release();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
    }
}
