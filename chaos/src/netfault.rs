//! Real network faults between node processes on loopback.
//!
//! Cluster nodes talk to each other directly over UDP (QUIC), each from
//! its own peer port, so a cut between nodes is a pair of packet filters:
//! every datagram from one side's peer ports to the other's is dropped in
//! the kernel (nftables, a table of the test's own, removed when the cut
//! is healed or dropped — also when the test panics). Device traffic uses
//! other ports and passes: a node cut from its peers is still reached by
//! its clients, the case a leader must notice by itself.
//!
//! Needs root and `nft` (Debian `nftables`). Where they are missing,
//! [`NetCut::available`] says why; tests then fail under `CI=true` and
//! skip loudly otherwise.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::ChaosError;

static NEXT_TABLE: AtomicU64 = AtomicU64::new(0);

/// A cut between two sets of UDP ports on loopback, in both directions,
/// until healed (or dropped).
#[derive(Debug)]
pub struct NetCut {
    table: String,
    healed: bool,
}

impl NetCut {
    /// Whether cuts can be made here; `Err` says why not.
    pub fn available() -> Result<(), String> {
        let probe = Self::between(&[9], &[9]).map_err(|e| e.to_string())?;
        probe.heal().map_err(|e| e.to_string())
    }

    /// Drops every UDP datagram from a port in `a` to a port in `b`, and
    /// from `b` to `a`.
    pub fn between(a: &[u16], b: &[u16]) -> Result<Self, ChaosError> {
        let table = format!(
            "volna_cut_{}_{}",
            std::process::id(),
            NEXT_TABLE.fetch_add(1, Ordering::Relaxed)
        );
        let set = |ports: &[u16]| {
            let list: Vec<String> = ports.iter().map(u16::to_string).collect();
            format!("{{ {} }}", list.join(", "))
        };
        // Both hooks: loopback packets pass output then input, and a drop
        // at either is a loss for QUIC.
        let script = format!(
            "table inet {table} {{\n\
             \tchain input {{ type filter hook input priority -10; policy accept;\n\
             \t\tudp sport {a} udp dport {b} drop\n\
             \t\tudp sport {b} udp dport {a} drop\n\
             \t}}\n\
             \tchain output {{ type filter hook output priority -10; policy accept;\n\
             \t\tudp sport {a} udp dport {b} drop\n\
             \t\tudp sport {b} udp dport {a} drop\n\
             \t}}\n\
             }}\n",
            a = set(a),
            b = set(b),
        );
        nft(&["-f", "-"], Some(&script))?;
        Ok(Self {
            table,
            healed: false,
        })
    }

    /// Removes the cut.
    pub fn heal(mut self) -> Result<(), ChaosError> {
        self.healed = true;
        nft(&["delete", "table", "inet", &self.table], None)
    }
}

impl Drop for NetCut {
    fn drop(&mut self) {
        if !self.healed {
            let _ = nft(&["delete", "table", "inet", &self.table], None);
        }
    }
}

fn nft(args: &[&str], input: Option<&str>) -> Result<(), ChaosError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.unwrap_or_default().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ChaosError::Process(std::io::Error::other(format!(
            "nft {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))))
    }
}
