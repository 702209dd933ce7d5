//! Placeholder replaced by the workers example.
fn main() {}
