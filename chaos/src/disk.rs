//! A small disk for a test to fill: a tmpfs mounted on a temporary
//! directory (which needs root), unmounted when dropped.

use std::path::Path;
use std::process::Command;

/// A tmpfs mounted for the test, unmounted when dropped.
#[derive(Debug)]
pub struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    /// Mounts a tmpfs of `size_mib` MiB; `None` where that is not allowed
    /// (not root) or not possible.
    pub fn mount(size_mib: u32) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(Self { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes still free on it (0 when `df` cannot tell).
    pub fn available(&self) -> u64 {
        Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .ok()
            .and_then(|out| {
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .nth(1)
                    .and_then(|l| l.trim().parse().ok())
            })
            .unwrap_or(0)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
