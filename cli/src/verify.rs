//! `volna cluster verify`: compares every replica of every partition by
//! digest.
//!
//! Each node answers `GET /admin/cluster/partitions/{p}/digest` with its
//! digest of the partition's state and the Raft entry it stands at. Two
//! replicas are comparable only at the same applied entry: while they
//! differ (a follower still applying, a publish in flight) the partition
//! is asked again, until every replica stands at one entry or the time is
//! up. A partition whose replicas stand at one entry with different
//! digests has diverged: that is an error, whatever else agrees.
//!
//! Which nodes replicate a partition comes from the partition map (the
//! newest map any given node reports), not from which nodes say they host
//! it: a replica that lost its group silently would otherwise drop out of
//! the comparison. Replicas the map names but that were not given are
//! listed as not checked. A replica that cannot answer yet (it is
//! restoring the partition from a snapshot) is asked again.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::admin::AdminApi;

/// One replica's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Replica {
    node: u64,
    /// `(term, index)` of the last applied entry.
    applied: Option<(u64, u64)>,
    /// The partition's time: it decides which producer windows are idle.
    time_ms: u64,
    sha256: String,
    messages: u64,
}

/// What verifying one partition found.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every replica at the same entry, with the same digest.
    Agree {
        /// The entry.
        index: u64,
        /// The digest.
        sha256: String,
        /// How many replicas.
        replicas: usize,
        /// Messages the partition holds.
        messages: u64,
    },
    /// Replicas at the same entry disagree.
    Diverged(String),
    /// The replicas never stood at one entry in time.
    Unsettled(String),
}

fn judge(replicas: &[Replica]) -> Option<Verdict> {
    let first = replicas.first()?;
    if replicas.iter().any(|r| r.applied != first.applied) {
        return None;
    }
    if replicas
        .iter()
        .all(|r| r.sha256 == first.sha256 && r.time_ms == first.time_ms)
    {
        return Some(Verdict::Agree {
            index: first.applied.map_or(0, |(_, index)| index),
            sha256: first.sha256.clone(),
            replicas: replicas.len(),
            messages: first.messages,
        });
    }
    let each: Vec<String> = replicas
        .iter()
        .map(|r| {
            format!(
                "node {}: {} ({} messages, time {})",
                r.node,
                short(&r.sha256),
                r.messages,
                r.time_ms
            )
        })
        .collect();
    Some(Verdict::Diverged(format!(
        "at entry {:?}: {}",
        first.applied,
        each.join(", ")
    )))
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}

fn replica(value: &Value) -> anyhow::Result<Replica> {
    Ok(Replica {
        node: value["node"]
            .as_u64()
            .context("a digest without its node")?,
        applied: match &value["applied"] {
            Value::Null => None,
            applied => Some((
                applied["term"].as_u64().context("applied term")?,
                applied["index"].as_u64().context("applied index")?,
            )),
        },
        time_ms: value["time_ms"].as_u64().unwrap_or(0),
        sha256: value["sha256"]
            .as_str()
            .context("a digest without its sha256")?
            .to_owned(),
        messages: value["messages"].as_u64().unwrap_or(0),
    })
}

/// Verifies every partition the nodes at `nodes` (their HTTP addresses)
/// replicate, waiting at most `within` for each partition's replicas to
/// stand at one entry. Prints one line per partition; fails when any
/// partition diverged or never settled.
pub async fn verify(nodes: &[AdminApi], within: Duration) -> anyhow::Result<()> {
    // Each given node by its id, and the newest partition map among their
    // reports: which nodes replicate which partition.
    let mut given: BTreeMap<u64, &AdminApi> = BTreeMap::new();
    let mut newest: Option<(u64, Value)> = None;
    for api in nodes {
        let report = api.call("GET", "/admin/cluster", None).await?;
        let id = report["node"]
            .as_u64()
            .context("a cluster report without its node")?;
        given.insert(id, api);
        let version = report["map_version"].as_u64().unwrap_or(0);
        if newest.as_ref().is_none_or(|(v, _)| version > *v) {
            newest = Some((version, report));
        }
    }
    let Some((_, report)) = newest else {
        bail!("no node given");
    };
    let mut hosts: BTreeMap<u32, (Vec<&AdminApi>, Vec<u64>)> = BTreeMap::new();
    for partition in report["partitions"]
        .as_array()
        .context("a cluster report without partitions")?
    {
        let id = partition["partition"]
            .as_u64()
            .and_then(|p| u32::try_from(p).ok())
            .context("a partition without its number")?;
        let entry = hosts.entry(id).or_default();
        for replica in partition["replicas"].as_array().into_iter().flatten() {
            let node = replica.as_u64().context("a replica without its node id")?;
            match given.get(&node) {
                Some(api) => entry.0.push(*api),
                None => entry.1.push(node),
            }
        }
    }
    hosts.retain(|_, (apis, _)| !apis.is_empty());
    if hosts.is_empty() {
        bail!("no node given replicates any partition");
    }
    let mut failed = 0usize;
    for (partition, (apis, unchecked)) in &hosts {
        if !unchecked.is_empty() {
            println!("partition {partition}: replicas {unchecked:?} not given, not checked");
        }
        let verdict = verify_partition(*partition, apis, within).await?;
        match &verdict {
            Verdict::Agree {
                index,
                sha256,
                replicas,
                messages,
            } => println!(
                "partition {partition}: {replicas} replicas agree at entry {index} ({messages} messages, {})",
                short(sha256)
            ),
            Verdict::Diverged(why) => {
                failed += 1;
                println!("partition {partition}: DIVERGED {why}");
            }
            Verdict::Unsettled(why) => {
                failed += 1;
                println!("partition {partition}: UNSETTLED {why}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} partitions did not verify", hosts.len());
    }
    println!(
        "verify: {} partitions, every replica identical",
        hosts.len()
    );
    Ok(())
}

async fn verify_partition(
    partition: u32,
    apis: &[&AdminApi],
    within: Duration,
) -> anyhow::Result<Verdict> {
    let started = Instant::now();
    let path = format!("/admin/cluster/partitions/{partition}/digest");
    loop {
        let mut replicas = Vec::with_capacity(apis.len());
        let mut refused = Vec::new();
        for api in apis {
            // A replica that does not host the partition (yet, or any
            // more) or is restoring it answers with an error: not settled.
            match api.call("GET", &path, None).await {
                Ok(answer) => replicas.push(replica(&answer)?),
                Err(e) => refused.push(format!("{e:#}")),
            }
        }
        if refused.is_empty()
            && let Some(verdict) = judge(&replicas)
        {
            return Ok(verdict);
        }
        if started.elapsed() >= within {
            let mut at: Vec<String> = replicas
                .iter()
                .map(|r| format!("node {} at {:?}", r.node, r.applied))
                .collect();
            at.extend(refused);
            return Ok(Verdict::Unsettled(format!(
                "no common entry within {within:?}: {}",
                at.join(", ")
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(node: u64, index: u64, sha: &str) -> Replica {
        Replica {
            node,
            applied: Some((1, index)),
            time_ms: 7,
            sha256: sha.into(),
            messages: 3,
        }
    }

    #[test]
    fn replicas_are_judged_only_at_one_entry() {
        assert_eq!(judge(&[at(1, 5, "aa"), at(2, 4, "bb")]), None);
        assert!(matches!(
            judge(&[at(1, 5, "aa"), at(2, 5, "aa")]),
            Some(Verdict::Agree {
                index: 5,
                replicas: 2,
                ..
            })
        ));
        assert!(matches!(
            judge(&[at(1, 5, "aa"), at(2, 5, "ab")]),
            Some(Verdict::Diverged(_))
        ));
    }
}
