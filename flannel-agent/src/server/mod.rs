//! What the agent serves beside its reconcile loop: the local API socket
//! ([`socket`]: pods registered and removed by the CNI plugin, `status`)
//! and the HTTP port ([`http`]: `/healthz`). Requests reach the loop as
//! messages; nothing here touches the agent's state.

pub mod http;
pub mod socket;
