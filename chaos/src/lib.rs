//! bulkhead-chaos
