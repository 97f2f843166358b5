//! Disks in tests: a small disk for a test to fill (a tmpfs mounted on a
//! temporary directory, which needs root, unmounted when dropped), and
//! how much a directory takes.

use std::path::Path;
use std::process::Command;

/// The bytes of every file under `dir`, recursively (what a data
/// directory takes; files that vanish while it is walked count 0).
pub fn directory_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => directory_bytes(&entry.path()),
            Ok(meta) => meta.len(),
            Err(_) => 0,
        })
        .sum()
}

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

    /// With `VOLNA_CHAOS_KEEP` set, copies the broker logs of the data
    /// directories on the disk (`<dir>/broker.log`, one level down) to a
    /// directory that outlives the mount, and says where.
    fn keep_logs(&self) {
        if std::env::var_os("VOLNA_CHAOS_KEEP").is_none() {
            return;
        }
        let Ok(kept) = tempfile::tempdir().map(tempfile::TempDir::keep) else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(self.path()) else {
            return;
        };
        for entry in entries.flatten() {
            let log = entry.path().join("broker.log");
            if log.is_file() {
                let name = format!("{}.log", entry.file_name().to_string_lossy());
                let _ = std::fs::copy(&log, kept.join(name));
            }
        }
        eprintln!("logs from the small disk kept in {}", kept.display());
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        self.keep_logs();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
