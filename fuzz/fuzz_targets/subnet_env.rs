//! subnet.env as the CNI plugin reads it: never panics, and what parses
//! renders back to the same values.
#![no_main]
use flannel_agent::subnet::env::SubnetEnv;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(env) = SubnetEnv::parse(text) {
        assert_eq!(SubnetEnv::parse(&env.render()), Ok(env));
    }
});
