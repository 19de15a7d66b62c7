//! Atomic file writes, shared by the agent (pod records), subnet.env and
//! the CNI plugin (attachment records, the installed binary and conflist):
//! a reader never sees half a file, because each file is written under a
//! temporary name in its own directory and renamed over the old one. And
//! the check that a path from a caller is a plain absolute one.

use std::{
    io::{self, Write},
    os::unix::fs::PermissionsExt,
    path::Path,
};

/// Whether `path` is absolute, without NUL bytes, and has no `.` or `..`
/// segment: a path from a caller that cannot climb out of where it says.
pub fn plain_absolute(path: &str) -> bool {
    path.starts_with('/') && !path.contains('\0') && !path.split('/').any(|s| s == "." || s == "..")
}

/// Writes `bytes` to `path` atomically (temp file + rename). Not synced:
/// for state that is rebuilt from the kernel or the store after a crash.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `target` atomically with `mode`; false when the file
/// already had exactly that content and mode.
pub fn put_file(target: &Path, bytes: &[u8], mode: u32) -> io::Result<bool> {
    if let Ok(meta) = std::fs::metadata(target) {
        if meta.permissions().mode() & 0o777 == mode
            && meta.len() == bytes.len() as u64
            && std::fs::read(target)? == bytes
        {
            return Ok(false);
        }
    }
    let dir = target.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, target)?;
        // The rename itself must survive a crash too.
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|_| true)
}

#[cfg(test)]
mod tests {
    #[test]
    fn plain_absolute_paths() {
        for ok in [
            "/",
            "/var/lib/cni",
            "/run/netns/x",
            "/a//b",
            "/proc/1/ns/net",
        ] {
            assert!(super::plain_absolute(ok), "{ok}");
        }
        for bad in [
            "", "var/lib", "/a/../b", "/a/./b", "/..", "/a/.", "/a\0b", "./a",
        ] {
            assert!(!super::plain_absolute(bad), "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = std::env::temp_dir().join(format!("fsutil-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("subnet.env");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
        let g = dir.join("bin").join("flannel");
        assert!(put_file(&g, b"binary", 0o755).unwrap(), "first write");
        assert!(
            !put_file(&g, b"binary", 0o755).unwrap(),
            "identical: untouched"
        );
        assert!(put_file(&g, b"binary", 0o700).unwrap(), "mode differs");
        assert_eq!(
            std::fs::metadata(&g).unwrap().permissions().mode() & 0o777,
            0o700
        );
        // A write into a directory that does not exist fails cleanly.
        assert!(write_atomic(&dir.join("missing").join("x"), b"x").is_err());
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
