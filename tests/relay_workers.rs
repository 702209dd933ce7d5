//! Placeholder replaced by the workers test.
