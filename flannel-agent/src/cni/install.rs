//! Installing the plugin binary and the conflist, as Flannel's
//! `install-cni` init containers do, but atomically: each file is written
//! to a temporary name in its target directory, synced, and renamed over
//! the old one, so a kubelet or runtime never sees half a binary or half
//! a config. Files that are already identical are left untouched.

use std::{
    io,
    path::{Path, PathBuf},
};

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
    // Check the conflist before touching anything.
    check_conflist(&spec.conflist)?;
    let mut changed = Vec::new();
    changed.extend(install_plugin(&spec.plugin, &spec.bin_dir)?);
    changed.extend(install_conflist(
        &spec.conflist,
        &spec.conf_dir,
        &spec.conf_name,
    )?);
    Ok(changed)
}

/// Copies the plugin binary `plugin` to `<bin_dir>/flannel` (the
/// `install-cni-plugin` init container); the path if it changed.
pub fn install_plugin(plugin: &Path, bin_dir: &Path) -> io::Result<Option<PathBuf>> {
    let binary = std::fs::read(plugin).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("reading the plugin {}: {e}", plugin.display()),
        )
    })?;
    let bin = bin_dir.join("flannel");
    Ok(put_file(&bin, &binary, 0o755)?.then_some(bin))
}

/// Writes `conflist` to `<conf_dir>/<name>` once it is checked (the
/// `install-cni` init container); the path if it changed.
pub fn install_conflist(
    conflist: &str,
    conf_dir: &Path,
    name: &str,
) -> io::Result<Option<PathBuf>> {
    check_conflist(conflist)?;
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the conflist name {name:?} is not a file name"),
        ));
    }
    let conf = conf_dir.join(name);
    Ok(put_file(&conf, conflist.as_bytes(), 0o644)?.then_some(conf))
}

/// A conflist is JSON with a plugin of type `flannel`.
fn check_conflist(conflist: &str) -> io::Result<()> {
    let conf: serde_json::Value = serde_json::from_str(conflist).map_err(|e| {
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
    Ok(())
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
        // The init containers' halves, one file each.
        let other = dir.join("other");
        assert_eq!(
            install_plugin(&src, &other).unwrap(),
            Some(other.join("flannel"))
        );
        assert_eq!(install_plugin(&src, &other).unwrap(), None);
        assert_eq!(
            install_conflist(FLANNEL_CONFLIST, &other, "10-flannel.conflist").unwrap(),
            Some(other.join("10-flannel.conflist"))
        );
        for name in ["", "../x", ".."] {
            let e = install_conflist(FLANNEL_CONFLIST, &other, name).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{name}");
        }
        let e = install_plugin(&dir.join("missing"), &other).unwrap_err();
        assert!(e.to_string().contains("reading the plugin"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
