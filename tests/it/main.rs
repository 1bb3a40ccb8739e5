//! Cairn's integration tests: one binary, a module per concern. They use real files, real child
//! processes killed with SIGKILL, network faults between processes in network namespaces, and a
//! fault-injecting file system for power loss.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod broker;
mod broker_process;
mod chaos;
mod cluster;
mod compaction;
mod embedded;
mod groups;
mod kafka;
mod kill9;
mod log_basics;
mod log_model;
mod netns;
mod power_loss;
mod proxy;
mod recovery_fixtures;
mod replication;
mod security;
mod support;
