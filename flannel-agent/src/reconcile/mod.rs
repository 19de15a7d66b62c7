//! Reconciliation, level-triggered: every pass reads what the kernel and
//! the maps hold ([`observe`]), computes what they should hold from the
//! node, the config, the leases and the pods ([`desired`], pure), derives
//! the operations between the two ([`diff`], pure) and runs them
//! ([`apply`]). Nothing here remembers what it did between passes, save
//! the one thing the kernel cannot tell back (the masquerade rules this
//! process wrote), so a deleted route, a flapped link or a map entry
//! removed by hand is repaired by the next pass.

pub mod apply;
pub mod desired;
pub mod diff;
pub mod inspect;
pub mod observe;
pub mod trace;

pub use apply::{apply, Report, Target};
pub use desired::{desired, Desired, EbpfMode, Inputs, Node};
pub use diff::{diff, Op};
pub use observe::{observe, Devices, Observed};

#[cfg(test)]
mod tests;
