//! One target: the state its loop owns (`state`), the one sync decision (`decide`, pure), the
//! operations that change what is served and the epilogue each ends in (`runner`), the loop that
//! runs them from its schedule and its commands (`machine`), and the post-publish hook.

pub mod decide;
mod hook;
mod machine;
mod runner;
mod state;

pub use machine::TargetLoop;
#[cfg(test)]
pub use runner::Quiet;
pub use runner::{plan, Context, Done, Reporter, Runner};
pub use state::{Command, Phase, TargetState};
