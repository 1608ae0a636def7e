//! bulkhead-http
