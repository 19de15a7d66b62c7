//! What the agent serves beside its reconcile loop: the local API socket
//! ([`socket`]: pods registered and removed by the CNI plugin, `status`)
//! and the HTTP port ([`http`]: `/healthz`, `/metrics`). API requests
//! reach the loop as messages; the metrics are only read here.

pub mod http;
pub mod slots;
pub mod socket;
