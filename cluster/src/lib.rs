//! Volna's cluster control plane (DESIGN.md §7, issue 12).
//!
//! - [`partition`]: which partition a channel belongs to (a fixed hash);
//! - [`placement`]: where each partition's replicas live, a pure function
//!   of the live nodes and the current map;
//! - [`control`]: membership (leases), the placer's election and the fenced
//!   partition map, on etcd;
//! - [`raft`]: the data path's consensus, one openraft group per partition:
//!   its log store in RocksDB and its RPCs between nodes;
//! - [`remembered`]: the view of etcd a node keeps in its own store, to
//!   start while etcd is down;
//! - [`tls`]: mutual TLS between nodes from the cluster CA.

pub mod control;
pub mod partition;
pub mod placement;
pub mod raft;
pub mod remembered;
pub mod tls;

pub use control::{ClusterConfig, Control, ControlError, Membership, NodeInfo, Placer};
pub use partition::{PartitionId, partition_of};
pub use placement::{NodeId, PartitionMap, place};
pub use remembered::{RememberedError, RememberedView};
