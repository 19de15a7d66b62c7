//! Installing the plugin binary and the conflist, as Flannel's
//! `install-cni` init containers do, but atomically: each file is written
//! to a temporary name in its target directory, synced, and renamed over
//! the old one, so a kubelet or runtime never sees half a binary or half
//! a config. Files that are already identical are left untouched.

use std::{io, path::PathBuf};

use crate::fsutil::put_file;

/// Flannel's `cni-conf.json`, unchanged.
pub const FLANNEL_CONFLIST: &str = r#"{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}
"#;

#[derive(Clone, Debug)]
pub struct InstallSpec {
    /// The `flannel` binary to install.
    pub plugin: PathBuf,
    pub bin_dir: PathBuf,
    pub conf_dir: PathBuf,
    /// e.g. `10-flannel.conflist`.
    pub conf_name: String,
    pub conflist: String,
}

/// Installs both files; returns the paths that changed.
pub fn install(spec: &InstallSpec) -> io::Result<Vec<PathBuf>> {
    let conf: serde_json::Value = serde_json::from_str(&spec.conflist).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the CNI conflist is not JSON: {e}"),
        )
    })?;
    if !conf["plugins"]
        .as_array()
        .is_some_and(|p| p.iter().any(|p| p["type"] == "flannel"))
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the CNI conflist has no plugin of type \"flannel\"",
        ));
    }
    let binary = std::fs::read(&spec.plugin).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("reading the plugin {}: {e}", spec.plugin.display()),
        )
    })?;
    let mut changed = Vec::new();
    let bin = spec.bin_dir.join("flannel");
    if put_file(&bin, &binary, 0o755)? {
        changed.push(bin);
    }
    let conf = spec.conf_dir.join(&spec.conf_name);
    if put_file(&conf, spec.conflist.as_bytes(), 0o644)? {
        changed.push(conf);
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn installs_once_replaces_on_change_and_refuses_bad_conflists() {
        let dir = std::env::temp_dir().join(format!("flannel-install-{}", std::process::id()));
        let src = dir.join("src-flannel");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&src, b"binary v1").unwrap();
        let spec = InstallSpec {
            plugin: src.clone(),
            bin_dir: dir.join("bin"),
            conf_dir: dir.join("net.d"),
            conf_name: "10-flannel.conflist".into(),
            conflist: FLANNEL_CONFLIST.into(),
        };
        assert_eq!(install(&spec).unwrap().len(), 2);
        let bin = dir.join("bin/flannel");
        assert_eq!(
            std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777,
            0o755
        );
        assert!(
            install(&spec).unwrap().is_empty(),
            "identical files rewritten"
        );
        std::fs::write(&src, b"binary v2").unwrap();
        assert_eq!(install(&spec).unwrap(), vec![bin.clone()]);
        assert_eq!(std::fs::read(&bin).unwrap(), b"binary v2");
        // No temporary files stay behind.
        let names: Vec<_> = std::fs::read_dir(dir.join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        for bad in ["{", r#"{"plugins":[{"type":"bridge"}]}"#] {
            let e = install(&InstallSpec {
                conflist: bad.into(),
                ..spec.clone()
            })
            .unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
