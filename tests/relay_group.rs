//! Placeholder replaced by the relay group test.
