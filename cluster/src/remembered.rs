//! What a node last learned from etcd, kept in its own RocksDB so that it
//! can start while etcd is down (issue 28, item 8).
//!
//! etcd is the control plane only: the partition map, the peers' addresses
//! and the cluster's fixed settings change rarely, and every partition's
//! data path is its Raft group. A node that restarts during an etcd outage
//! serves from the view it saved last — the groups it replicates elect and
//! commit with their peers as usual — and takes etcd's view again as soon
//! as etcd answers. What needs etcd (joining the membership, the placer,
//! creating a group for the first time) waits for it.
//!
//! The view is saved whenever it changes (the map's version, a node's
//! addresses), unsynced: a view lost in a crash is an older view, which
//! the node replaces from etcd as before.

use std::collections::BTreeMap;

use rocksdb::DB;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::control::{ClusterConfig, NodeInfo};
use crate::placement::{NodeId, PartitionMap};

/// The key of the view in the default column family.
const KEY: &[u8] = b"volna.cluster.view";

/// Why the remembered view could not be read or kept.
#[derive(Debug, Error)]
pub enum RememberedError {
    /// RocksDB refused the read or write.
    #[error("the remembered cluster view: {0}")]
    Store(#[from] rocksdb::Error),
    /// The stored bytes do not decode.
    #[error("the remembered cluster view is malformed: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// The cluster as this node last saw it in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RememberedView {
    /// The cluster's fixed settings.
    pub config: ClusterConfig,
    /// The last partition map.
    pub map: PartitionMap,
    /// Every node seen, with its addresses.
    pub nodes: BTreeMap<NodeId, NodeInfo>,
}

impl RememberedView {
    /// The view saved in `db`, if any (blocking: call it off the async
    /// workers).
    pub fn load(db: &DB) -> Result<Option<Self>, RememberedError> {
        match db.get(KEY)? {
            Some(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Saves the view in `db` (blocking, like [`Self::load`]).
    pub fn save(&self, db: &DB) -> Result<(), RememberedError> {
        db.put(KEY, serde_json::to_vec(self)?)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_view_reads_back_after_the_store_is_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let view = RememberedView {
            config: ClusterConfig {
                partitions: 4,
                replicas: 3,
            },
            map: PartitionMap {
                version: 7,
                replicas: vec![vec![1, 2, 3], vec![2, 3, 1], vec![3, 1, 2], vec![1, 2, 3]],
            },
            nodes: (1..=3)
                .map(|id| {
                    (
                        id,
                        NodeInfo {
                            id,
                            quic: format!("127.0.0.1:{}", 7000 + id),
                            peer: format!("127.0.0.1:{}", 8000 + id),
                            log_format: crate::raft::LOG_FORMAT,
                            peer_protocol: crate::raft::network::PEER_PROTOCOL,
                        },
                    )
                })
                .collect(),
        };
        {
            let db = DB::open_default(dir.path()).unwrap();
            assert_eq!(RememberedView::load(&db).unwrap(), None);
            view.save(&db).unwrap();
        }
        let db = DB::open_default(dir.path()).unwrap();
        assert_eq!(RememberedView::load(&db).unwrap(), Some(view));
    }

    #[test]
    fn a_malformed_view_is_an_error_not_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let db = DB::open_default(dir.path()).unwrap();
        db.put(KEY, b"{\"config\":").unwrap();
        assert!(matches!(
            RememberedView::load(&db),
            Err(RememberedError::Malformed(_))
        ));
    }
}
