//! Placeholder replaced by the relay benchmark.
fn main() {}
