//! bulkhead-actors
