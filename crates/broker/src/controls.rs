//! Negative controls: safety rules broken on purpose, so that the fault tests can show they
//! notice (each control must turn its test red; `tests/it/chaos.rs`). They exist only in builds
//! with the `negative-controls` feature (the test suite's broker binary), where the TOML key
//! `negative_control` picks one; a build without the feature refuses that key like any unknown
//! one. A broker running with one says so at start, at ERROR.

use serde::{Deserialize, Serialize};

/// A safety rule to break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NegativeControl {
    /// acks=all is answered once the leader appended, not once the high watermark passed.
    AcksOnLogEnd,
    /// A leader shrinks its ISR on its own, without the controller (Jepsen 2013's Kafka).
    IsrShrinkWithoutController,
    /// Followers do not keep the idempotent producers' state of the batches they copy.
    FollowersForgetProducers,
    /// Topics created without `unclean.leader.election.enable` get it on (as if that were the
    /// default).
    UncleanElectionByDefault,
    /// Followers never truncate where their log diverges from the leader's: each fetch claims
    /// its log ends in the leader's current epoch, so the leader's divergence check passes and
    /// the follower appends the leader's records after its own stale ones (KIP-101's bug).
    FollowersKeepDivergentLogs,
}
