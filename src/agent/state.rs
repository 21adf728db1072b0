//! The state of one target, owned by its loop (as zincati's update agent owns its state): the
//! only place that knows what a target serves, whether it is pinned, how its last operation
//! went and when it acts next. `/status` shows copies of it; nothing else writes it.
//!
//! ```text
//!              recover                 sync (poll, POST /sync, config change)
//!   Starting ----------> Idle <------------------------------------------+
//!                         |  \---> Syncing --(published / up to date / failed)
//!                         |  \---> Repairing --(relinked / healthy)-------+
//!                         |            \--(damaged: re-download)--> Syncing
//!                         |  \---> RollingBack --(pinned)-----------------+
//!                         |  \---> Unpinning --(pin removed)--> Syncing
//! ```
//!
//! Every transition back to Idle goes through the one epilogue (`runner`): the profile, this
//! state, the metrics, the hook when what is served changed, a log line.

use std::time::SystemTime;

use tokio::sync::oneshot;

use crate::digest::Digest;
use crate::store::VersionManifest;

/// What the loop is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Started; startup recovery not done yet.
    Starting,
    /// Waiting for its next check, a command or a change under `dest`.
    Idle,
    /// Checking the reference, and publishing when it moved.
    Syncing,
    /// Checking what is served against the store.
    Repairing,
    /// Switching to a retained version and pinning it.
    RollingBack,
    /// Lifting a pin (a sync follows).
    Unpinning,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Idle => "idle",
            Phase::Syncing => "syncing",
            Phase::Repairing => "repairing",
            Phase::RollingBack => "rolling_back",
            Phase::Unpinning => "unpinning",
        }
    }
}

/// One target's state.
#[derive(Debug, Clone)]
pub struct TargetState {
    pub name: String,
    pub phase: Phase,
    /// The version served, as the store recorded it.
    pub serving: Option<VersionManifest>,
    /// The rollback pin in force.
    pub pin: Option<Digest>,
    pub last_check: Option<SystemTime>,
    pub last_success: Option<SystemTime>,
    /// Why the last operation failed (cleared by the next success).
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub next_check: Option<SystemTime>,
    /// Served files or links restored after something else changed them.
    pub self_repairs: u64,
    /// What startup recovery found, when it had to act.
    pub recovery: Option<String>,
    pub hook_failures: u64,
    pub last_hook_error: Option<String>,
}

impl TargetState {
    pub fn new(name: &str, serving: Option<VersionManifest>) -> TargetState {
        TargetState {
            name: name.to_string(),
            phase: Phase::Starting,
            serving,
            pin: None,
            last_check: None,
            last_success: None,
            last_error: None,
            consecutive_failures: 0,
            next_check: None,
            self_repairs: 0,
            recovery: None,
            hook_failures: 0,
            last_hook_error: None,
        }
    }

    pub fn serving_digest(&self) -> Option<&Digest> {
        self.serving.as_ref().map(|m| &m.digest)
    }
}

/// A request to a target's loop (from the API, the file watcher, the CLI, the supervisor).
#[derive(Debug)]
pub enum Command {
    /// Check the reference now.
    Sync,
    /// Something changed under `dest`: check what is served against the store.
    Changed,
    /// Switch to a retained version (the one before the current, or a digest or unique hex
    /// prefix) after re-hashing it, and pin it there.
    Rollback {
        to: Option<String>,
        reply: oneshot::Sender<Result<VersionManifest, String>>,
    },
    /// Follow the reference again; answers whether there was a pin.
    Unpin {
        reply: oneshot::Sender<Result<bool, String>>,
    },
}
