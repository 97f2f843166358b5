//! Volna's cluster control plane (DESIGN.md §7, issue 12).
//!
//! - [`partition`]: which partition a channel belongs to (a fixed hash);
//! - [`placement`]: where each partition's replicas live, a pure function
//!   of the live nodes and the current map;
//! - [`control`]: membership (leases), the placer's election and the fenced
//!   partition map, on etcd.
//!
//! This is the first part of the cluster: the data path (partition logs
//! replicated with openraft, forwarding, edges) is not built yet, and the
//! broker does not use this crate yet; a broker is single-node.

pub mod control;
pub mod partition;
pub mod placement;

pub use control::{ClusterConfig, Control, ControlError, Membership, NodeInfo, Placer};
pub use partition::{PartitionId, partition_of};
pub use placement::{NodeId, PartitionMap, place};
