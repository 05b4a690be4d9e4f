//! Broadcast sessions: many nodes moving to one image version at once without the master
//! being the bottleneck.
//!
//! - [`plan`]: who feeds whom. Nodes are grouped by rack (then switch, then subnet), each
//!   group is a chain fed by its head; the heads form a tree of small fan-out rooted at the
//!   master, so each rack uplink carries the stream in once and out at most `fanout` times,
//!   and the master sends it `fanout` times whatever the number of nodes. A session small for
//!   the master's link is planned direct (every node from the master).
//! - [`sim`]: a piece-level simulation of such a plan (links, per-node processing rate,
//!   per-hop latency, relay failures with their detection time and the reattachment), to
//!   predict completion for thousands of nodes from figures measured on a few.

pub mod plan;
pub mod sim;
