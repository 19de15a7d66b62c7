//! net-conf.json: parsing and validation never panic; what is accepted has
//! a cluster network that holds its own subnets.
#![no_main]
use flannel_agent::config::NetConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cfg) = NetConfig::parse(text) {
        for subnet in cfg.subnets().take(4) {
            assert!(cfg.in_range(subnet), "{subnet} out of its own range");
        }
    }
});
