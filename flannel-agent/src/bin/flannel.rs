//! `flannel`: the CNI plugin (installed into the CNI bin directory under
//! this name, so Flannel's conflist works unchanged).

fn main() {
    std::process::exit(flannel_agent::cni::main());
}
