//! Switchyard's userspace dataplane.
//!
//! The packet path, by folder:
//! * [`io`]: ports (TAP devices in pod namespaces, in-memory ports) that move batches of
//!   frames; the only place with system calls;
//! * [`buffer`]: reusable packet buffers with headroom;
//! * [`wire`]: typed views over packet bytes;
//! * [`offload`]: segmentation, GRO merging, encapsulation: pure functions over frames;
//! * [`pipeline`]: the sans-IO stages a batch goes through (neighbour answers, routing,
//!   rewrite, ICMP errors), with a named counter for every drop;
//! * [`tables`]: the immutable forwarding snapshot (ports, LPM routes, next hops) and
//!   its builder;
//! * [`worker`]: threads that poll ports and run the pipeline;
//! * [`switch`] and [`server`]: the control side: API requests change state and publish
//!   new snapshots.

pub mod buffer;
pub mod conntrack;
pub mod gateway;
pub mod io;
pub mod metrics;
pub mod node;
pub mod offload;
pub mod pipeline;
pub mod server;
pub mod switch;
pub mod tables;
pub mod wire;
pub mod worker;

pub use switch::{StateFiles, Switch, SwitchConfig};
