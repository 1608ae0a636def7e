//! bulkhead-cluster
