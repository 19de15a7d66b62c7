//! A CNI call's input: the network configuration on stdin, then NUL, then
//! `KEY=VALUE` lines of environment. Parsing and every validation the
//! plugin runs before touching anything never panic; what they accept is
//! safe to use as a file name or an interface name.
#![no_main]
use std::collections::HashMap;

use flannel_agent::cni::{
    conf::NetConf,
    spec::{valid_container_id, valid_ifname, valid_netns, CniEnv},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == 0).unwrap_or(data.len());
    if let Ok(conf) = NetConf::parse(&data[..split]) {
        let _ = conf.bridge();
        let _ = conf.ipam_type();
        if let Ok(env) = conf.subnet_env() {
            let ipam = conf.ipam_config(&env);
            let _ = conf.ipam_stdin("1.0.0", &ipam);
            let _ = conf.mtu(&env);
        }
    }
    let Ok(text) = std::str::from_utf8(data.get(split + 1..).unwrap_or_default()) else {
        return;
    };
    let vars: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let env = CniEnv::from_map(&vars);
    let _ = env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"]);
    let _ = env.args_map();
    if valid_container_id(&env.container_id).is_ok() {
        assert!(!env.container_id.contains('/') && !env.container_id.is_empty());
    }
    if valid_ifname(&env.ifname).is_ok() {
        let n = &env.ifname;
        assert!(n.len() <= 15 && !n.contains('/') && n != "." && n != "..");
        assert!(n.bytes().all(|b| b.is_ascii_graphic()));
    }
    if valid_netns(&env.netns).is_ok() {
        assert!(env.netns.starts_with('/'));
    }
});
