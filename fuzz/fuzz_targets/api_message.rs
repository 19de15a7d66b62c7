//! A line on the agent's API socket: never panics; an accepted request
//! survives a round trip unchanged.
#![no_main]
use flannel_agent::api::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        let again: Request = serde_json::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(again, req);
    }
});
