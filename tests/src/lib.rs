//! The lab: a multi-node cluster built from network namespaces on one
//! machine, for the privileged tests, the demo and the benchmarks.
//!
//! A fabric namespace holds a bridge (the node network); each node is a
//! namespace with an `eth0` on that bridge and, unless it plays a stock
//! Flannel node, a `flannel-agent` process; each pod is a namespace with a
//! veth into its node. Every name carries the lab's unique id, nothing
//! touches the root namespace's interfaces, and `Drop` removes everything
//! (agents, namespaces, pins, temp files), on failure and panic too;
//! [`interrupt`] does the same when the demo or the bench is interrupted.

pub mod etcd;
pub mod fakekube;
pub mod interrupt;
pub mod kubelet;
pub mod lab;
pub mod manifest;
pub mod netns;
pub mod podman;
pub mod progtest;
pub mod traffic;

pub use lab::{Lab, NodeKind, NodeSpec};
