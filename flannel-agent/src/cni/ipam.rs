//! Running the IPAM plugin the way the spec says: found by name in
//! `CNI_PATH`, the command in `CNI_COMMAND`, the config on stdin, the
//! result or error on stdout.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::{json, Map, Value};

use super::spec::{at_least, code, CniEnv, CniError, CniResult, SUPPORTED};

/// The first executable file called `name` in the `CNI_PATH` list.
pub fn find_plugin(cni_path: &str, name: &str) -> CniResult<PathBuf> {
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::INVALID_CONFIG,
                format!("IPAM plugin {name:?} not found in CNI_PATH {cni_path:?}"),
            )
        })
}

/// One call. `Ok(None)` when the plugin printed nothing (DEL, CHECK, GC).
pub fn exec(
    plugin: &Path,
    command: &str,
    env: &CniEnv,
    container_id: &str,
    ifname: &str,
    stdin: &Value,
) -> CniResult<Option<Value>> {
    let name = plugin
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", &env.netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_ARGS", &env.args)
        .env("CNI_PATH", &env.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::io(format!("running IPAM plugin {name}"), e))?;
    let bytes = serde_json::to_vec(stdin).expect("a JSON value serialises");
    if let Some(mut w) = child.stdin.take() {
        // A plugin may exit before reading; its exit status tells why.
        let _ = w.write_all(&bytes);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| CniError::io(format!("waiting for IPAM plugin {name}"), e))?;
    let parsed: Option<Value> = serde_json::from_slice(&out.stdout).ok();
    if !out.status.success() {
        if let Some(e) = parsed.as_ref().and_then(CniError::from_json) {
            return Err(e);
        }
        return Err(CniError::io(
            format!("IPAM plugin {name} {command} failed ({})", out.status),
            String::from_utf8_lossy(&out.stdout).trim(),
        ));
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    parsed.map(Some).ok_or_else(|| {
        CniError::new(
            code::DECODE,
            format!("IPAM plugin {name} {command} printed something that is not JSON"),
        )
    })
}

/// The newest version both sides serve, not above `want`.
pub fn negotiate(plugin: &Path, env: &CniEnv, want: &str) -> CniResult<String> {
    let info =
        exec(plugin, "VERSION", env, "", "", &json!({"cniVersion": want}))?.unwrap_or(Value::Null);
    let theirs: Vec<&str> = info["supportedVersions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    SUPPORTED
        .iter()
        .rev()
        .find(|v| at_least(want, v) && theirs.contains(v))
        .map(|v| v.to_string())
        .ok_or_else(|| {
            CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "IPAM plugin {} serves none of the versions up to {want} (it serves {theirs:?})",
                    plugin.display()
                ),
            )
        })
}

/// An IPAM plugin bound to one config.
pub struct Ipam<'a> {
    pub plugin: PathBuf,
    pub env: &'a CniEnv,
    pub stdin: Map<String, Value>,
}

impl Ipam<'_> {
    pub fn version(&self) -> &str {
        self.stdin
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    fn call(&self, command: &str, id: &str, ifname: &str) -> CniResult<Option<Value>> {
        exec(
            &self.plugin,
            command,
            self.env,
            id,
            ifname,
            &Value::Object(self.stdin.clone()),
        )
    }

    /// Runs `command`; when the plugin does not serve our version (code 1,
    /// as host-local 1.1 answers 1.1.0), steps down to the newest version
    /// it serves and tries again. The version used stays in `stdin`.
    pub fn run(&mut self, command: &str, id: &str, ifname: &str) -> CniResult<Option<Value>> {
        match self.call(command, id, ifname) {
            Err(e) if e.code == code::INCOMPATIBLE_VERSION => {
                let want = self.version().to_string();
                let v = negotiate(&self.plugin, self.env, &want)?;
                if v == want {
                    return Err(e);
                }
                self.stdin.insert("cniVersion".into(), json!(v));
                if let Some(prev) = self.stdin.get_mut("prevResult") {
                    prev["cniVersion"] = json!(v);
                    if !at_least(&v, "1.0.0") {
                        for ip in prev["ips"].as_array_mut().into_iter().flatten() {
                            ip["version"] = json!("4");
                        }
                    }
                }
                self.call(command, id, ifname)
            }
            other => other,
        }
    }
}
