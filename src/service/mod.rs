//! The long-running service: the supervisor of the target loops (`daemon`), the HTTP API
//! (`http`), the `/status` document (`status`), Prometheus metrics (`metrics`) and systemd
//! notifications (`systemd`). The loops report here through [`ServiceReporter`].

pub mod daemon;
pub mod http;
pub mod metrics;
pub mod status;
pub mod systemd;

use std::sync::Arc;
use std::time::Duration;

use crate::agent::{Reporter, TargetState};
use crate::digest::Digest;
use crate::registry::Observer;
use metrics::Metrics;
use status::Board;

/// Where the target loops report: the board (`/status`, systemd's STATUS=) and the metrics.
pub struct ServiceReporter {
    pub board: Board,
    pub metrics: Arc<Metrics>,
}

impl Reporter for ServiceReporter {
    fn state(&self, state: &TargetState) {
        self.board.apply(state);
        self.metrics.serving(&state.name, state.serving.as_ref());
        self.metrics.pinned(&state.name, state.pin.is_some());
    }

    fn finished(
        &self,
        target: &str,
        label: &'static str,
        took: Duration,
        failures: u32,
        serving: Option<&Digest>,
        _previous: Option<&Digest>,
    ) {
        // Recovery at start and a repair check that found nothing are no operations on what
        // is served; everything else is counted.
        if !matches!(label, "recovered" | "healthy") {
            self.metrics.sync_finished(target, label, took, failures);
        }
        // What is served (and who signed it) follows from the state reported next.
        let _ = serving;
    }

    fn signature_checked(&self, target: &str, result: &'static str) {
        self.metrics.signature_checked(target, result);
    }

    fn tag_resolved(&self, target: &str, digest: &Digest) {
        self.metrics.tag_resolved(target, digest);
    }

    fn free_space(&self, target: &str, bytes: u64) {
        self.metrics.free_space(target, bytes);
    }

    fn repaired(&self, target: &str) {
        self.metrics.self_repaired(target);
    }

    fn hook_failed(&self, target: &str) {
        self.metrics.hook_failed(target);
    }

    fn observer(&self, target: &str) -> Option<Arc<dyn Observer>> {
        Some(Arc::new(HostBoard {
            metrics: self.metrics.observer(target),
            board: self.board.clone(),
        }))
    }
}

/// Registry traffic to the metrics, and each host's state (upstream or mirror) to `/status`.
struct HostBoard {
    metrics: Arc<dyn Observer>,
    board: Board,
}

impl Observer for HostBoard {
    fn response(&self, host: &str, kind: &'static str, status: u16) {
        self.metrics.response(host, kind, status);
    }

    fn bytes(&self, host: &str, n: u64) {
        self.metrics.bytes(host, n);
    }

    fn blob_started(&self, digest: &str, size: u64) {
        self.metrics.blob_started(digest, size);
    }

    fn endpoint(&self, host: &str, role: &'static str, error: Option<&str>) {
        self.board.host_answered(host, role, error);
    }
}
