//! The longest duration a setting takes. A longer one (`Duration::MAX` for "never", say) is
//! taken as [`LONGEST`], so that every deadline, doubling and database interval computed
//! from a setting stays far from overflowing.

use std::time::Duration;

/// 100 years.
pub(crate) const LONGEST: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// `setting`, at most [`LONGEST`].
pub(crate) fn capped(setting: Duration) -> Duration {
    setting.min(LONGEST)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_setting_past_the_longest_is_the_longest_and_leaves_room_to_compute() {
        assert_eq!(capped(Duration::MAX), LONGEST);
        assert_eq!(capped(Duration::from_secs(5)), Duration::from_secs(5));
        let now = std::time::Instant::now();
        assert!(now.checked_add(capped(Duration::MAX) * 4).is_some());
        assert!(tokio::time::Instant::now()
            .checked_add(capped(Duration::MAX))
            .is_some());
    }
}
