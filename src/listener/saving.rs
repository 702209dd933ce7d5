//! The one rule for saving a named consumer's position: a position is saved only once every
//! event read up to it has left the pipeline, at most every [`SAVE_EVERY`] while it moves, and
//! at least every heartbeat while it does not (so a running consumer never expires).
//!
//! The listener notes the position after each read with the count of events forwarded by
//! then; the pipeline counts the events it has settled (routed or dropped). A position whose
//! count `settled` has reached is safe: nothing before it is still on its way.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How often a named consumer's position may be saved while events flow.
pub(crate) const SAVE_EVERY: Duration = Duration::from_millis(100);

/// A named consumer's saving state; it survives reconnects.
#[derive(Debug)]
pub(crate) struct Saving<P> {
    /// (events forwarded when a read ended, the position after it), oldest first.
    unsaved: VecDeque<(u64, P)>,
    /// The newest position whose events have all left the pipeline, not saved yet.
    safe: Option<P>,
    /// The last position saved, and when.
    saved: Option<(P, Instant)>,
}

impl<P> Default for Saving<P> {
    fn default() -> Self {
        Saving {
            unsaved: VecDeque::new(),
            safe: None,
            saved: None,
        }
    }
}

impl<P: Clone + PartialEq> Saving<P> {
    /// The position was placed and recorded in the database (registered or resumed) at `at`.
    pub fn placed(&mut self, position: P, at: Instant) {
        self.saved = Some((position, at));
    }

    /// A read ended at `position`, when `forwarded` events had been handed to the pipeline.
    pub fn note(&mut self, forwarded: u64, position: P) {
        let same = self
            .unsaved
            .back()
            .map(|(_, p)| p)
            .or(self.safe.as_ref())
            .or(self.saved.as_ref().map(|(p, _)| p))
            == Some(&position);
        if !same {
            self.unsaved.push_back((forwarded, position));
        }
    }

    /// The position to save now, if a save is due: it is safe (`settled` events have left the
    /// pipeline), and it moved at least `SAVE_EVERY` after the last save, or `heartbeat` has
    /// passed since (then the last safe position is saved again, saying the consumer is alive).
    pub fn due(&mut self, settled: u64, heartbeat: Duration, now: Instant) -> Option<P> {
        while self
            .unsaved
            .front()
            .is_some_and(|(forwarded, _)| *forwarded <= settled)
        {
            self.safe = self.unsaved.pop_front().map(|(_, position)| position);
        }
        let position = self
            .safe
            .clone()
            .or_else(|| self.saved.as_ref().map(|(p, _)| p.clone()))?;
        let due = match &self.saved {
            None => true,
            Some((saved, at)) => {
                let since = now.saturating_duration_since(*at);
                (position != *saved && since >= SAVE_EVERY) || since >= heartbeat
            }
        };
        due.then_some(position)
    }

    /// `position` (what [`due`](Self::due) returned) was saved at `at`.
    pub fn saved(&mut self, position: P, at: Instant) {
        if self.safe.as_ref() == Some(&position) {
            self.safe = None;
        }
        self.saved = Some((position, at));
    }

    /// When the next save could become due without a new read: the heartbeat, or sooner
    /// while positions wait to be saved.
    pub fn next_check(&self, heartbeat: Duration, now: Instant) -> Duration {
        let Some((_, at)) = &self.saved else {
            return Duration::ZERO;
        };
        let since = now.saturating_duration_since(*at);
        if self.safe.is_some() || !self.unsaved.is_empty() {
            return SAVE_EVERY
                .saturating_sub(since)
                .max(Duration::from_millis(1));
        }
        heartbeat.saturating_sub(since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEAT: Duration = Duration::from_secs(10);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_position_is_saved_only_once_its_events_have_left_the_pipeline() {
        let t0 = Instant::now();
        let mut s = Saving::default();
        s.placed(0, t0);
        s.note(10, 5);
        s.note(20, 9);
        // Nothing settled: nothing to save but the placement, which is not due.
        assert_eq!(s.due(0, BEAT, t0 + ms(500)), None);
        // The first read's events settled: its position, not the second's.
        assert_eq!(s.due(15, BEAT, t0 + ms(500)), Some(5));
        s.saved(5, t0 + ms(500));
        // The rest settles; the next save waits SAVE_EVERY.
        assert_eq!(s.due(20, BEAT, t0 + ms(550)), None);
        assert_eq!(s.due(20, BEAT, t0 + ms(600)), Some(9));
    }

    #[test]
    fn an_unmoved_position_is_saved_again_on_the_heartbeat_only() {
        let t0 = Instant::now();
        let mut s = Saving::default();
        s.placed(7, t0);
        s.note(0, 7);
        assert_eq!(s.due(0, BEAT, t0 + ms(200)), None);
        assert_eq!(s.due(0, BEAT, t0 + BEAT), Some(7));
        s.saved(7, t0 + BEAT);
        assert_eq!(s.due(0, BEAT, t0 + BEAT + ms(200)), None);
    }

    #[test]
    fn an_unplaced_consumer_saves_its_first_safe_position_at_once() {
        let t0 = Instant::now();
        let mut s: Saving<i64> = Saving::default();
        assert_eq!(s.due(0, BEAT, t0), None);
        s.note(3, 4);
        assert_eq!(s.due(3, BEAT, t0), Some(4));
    }

    #[test]
    fn the_next_check_comes_sooner_while_positions_wait() {
        let t0 = Instant::now();
        let mut s = Saving::default();
        s.placed(1, t0);
        assert_eq!(s.next_check(BEAT, t0 + ms(1000)), BEAT - ms(1000));
        s.note(1, 2);
        assert_eq!(s.next_check(BEAT, t0 + ms(30)), ms(70));
        assert_eq!(s.next_check(BEAT, t0 + ms(300)), ms(1));
    }
}
