//! One async reader's events from several subscriptions through one bounded channel
//! ([`StreamSink`] on the registry's side, [`StreamReceiver`] on the reader's): in commit
//! order across the subscriptions, each event once, and every event a subscription's overflow
//! policy threw away counted where the reader sees it before the events handed over after it.
//!
//! The registry buffers per subscription, so two subscriptions feeding one reader could
//! overtake each other while the reader is slow. In ordered mode the sink refuses (as a full
//! mailbox) every event but the oldest one selected and not yet handed over or lost; the
//! registry's retry hands the older one over first. An event that two subscriptions of the
//! same reader select is handed over once. `KeepLatestPerKey` replaces a waiting event in place
//! (reordering by design), so a sink for it is unordered — but there too an event two of its
//! subscriptions select is handed over once.
//!
//! A reader may ask to be cut off rather than lose an event (the web endpoint's
//! `SlowClient::Disconnect`): once it is armed (it takes events live), the registry cuts it
//! ([`StreamSink::cut`]) when one of its subscriptions' buffers is full of events selected
//! since — or when it took nothing for a while and the listener waits for in-flight budget —
//! and discards what its subscriptions held, giving their budget back at once: the reader's
//! task may not be polled any more (actix-web stops polling a response body whose client does
//! not read), so it could not do this itself. The reader then gets [`Received::Cut`], and the
//! hook it gave is told at the cut, on the registry's thread.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Notify};

use crate::event::ChangeEvent;

#[derive(Default)]
struct Gate {
    /// Ordinals selected and neither handed over nor lost, with how many subscriptions hold them.
    pending: BTreeMap<u64, u32>,
    /// The ordinal of the last event handed over (ordered mode).
    handed: Option<u64>,
    /// Unordered mode: events handed over that another subscription still holds (its copy
    /// is dropped when it comes).
    delivered: HashSet<u64>,
}

impl Gate {
    fn release(&mut self, ordinal: u64) {
        if let Some(count) = self.pending.get_mut(&ordinal) {
            *count -= 1;
            if *count == 0 {
                self.pending.remove(&ordinal);
                self.delivered.remove(&ordinal);
            }
        }
    }
}

/// What the sink and the receiver share.
struct Shared {
    /// This channel's own number ([`StreamSink::key`]).
    key: u64,
    gate: Mutex<Gate>,
    ordered: bool,
    /// Events lost since the reader last took them.
    lost: Mutex<Lost>,
    /// Woken when events are lost, and at a cut.
    lost_notice: Notify,
    /// Told of a cut; a reader without one is never cut off.
    on_cut: Option<CutHook>,
    /// The reader takes events live: only then does a full buffer cut it off. Before (a web
    /// client reading the journal first), its losses are counted as usual and it decides.
    armed: AtomicBool,
    /// The ordinal of the first event selected once armed (`u64::MAX` before): a buffer
    /// cuts the reader off only when the event it would drop is one of these, not one that
    /// waited from before (which the reader may have read from the journal).
    armed_from: AtomicU64,
    /// Cut off: the reader gets [`Received::Cut`]; the sink takes nothing more.
    cut: AtomicBool,
    /// The cut was told to `on_cut`.
    reported: AtomicBool,
    /// When the channel was made: `asked` counts from it.
    born: Instant,
    /// When the reader last asked for what comes next ([`StreamReceiver::touch`]), in
    /// milliseconds after `born`: a reader that keeps asking is not stuck, whatever its
    /// subscriptions hand over — it may be reading a journal replay first, or taking the
    /// events of another of its subscriptions that must go first.
    asked: AtomicU64,
}

/// Told once when a reader is cut off, on the registry's thread, with how many of its events
/// were lost then (those its subscriptions held for it, and the one that found no room).
pub(crate) type CutHook = Box<dyn Fn(u64) + Send + Sync>;

/// Events lost since the reader last took them: how many, and the newest journal position
/// among them (so a reader that has every event up to some position from elsewhere — a
/// client resuming from the journal — can tell a loss it need not report).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Lost {
    /// How many.
    pub count: u64,
    /// The largest `sequence` among them; `None` when one had none (a NOTIFY event).
    pub newest: Option<i64>,
}

impl Shared {
    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An event handed over, and whether every older event the reader's subscriptions selected
/// was handed over before it or counted lost (always, in ordered mode).
struct Handed {
    event: ChangeEvent,
    in_order: bool,
}

/// The registry's side (a `Sink::Stream`); cloned into every subscription of one reader.
#[derive(Clone)]
pub(crate) struct StreamSink {
    tx: mpsc::Sender<Handed>,
    shared: Arc<Shared>,
}

/// Why a stream sink did not take an event.
pub(crate) enum StreamRefused {
    /// Full, or an older event must go first: keep it and retry.
    Full(ChangeEvent),
    /// The reader is gone.
    Closed,
}

/// The reader's side.
pub(crate) struct StreamReceiver {
    rx: mpsc::Receiver<Handed>,
    shared: Arc<Shared>,
    /// An event received after a loss was counted: handed out after the loss.
    stashed: Option<Handed>,
}

/// A sink and its receiver: `capacity` events wait in the channel; `ordered` as the module
/// says (false for `KeepLatestPerKey`); with `on_cut`, the reader is cut off rather than lose
/// events once armed ([`StreamReceiver::arm`]).
pub(crate) fn stream_channel(
    capacity: usize,
    ordered: bool,
    on_cut: Option<CutHook>,
) -> (StreamSink, StreamReceiver) {
    static KEYS: AtomicU64 = AtomicU64::new(1);
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let shared = Arc::new(Shared {
        key: KEYS.fetch_add(1, Ordering::Relaxed),
        gate: Mutex::new(Gate::default()),
        ordered,
        lost: Mutex::new(Lost::default()),
        lost_notice: Notify::new(),
        on_cut,
        armed: AtomicBool::new(false),
        armed_from: AtomicU64::new(u64::MAX),
        cut: AtomicBool::new(false),
        reported: AtomicBool::new(false),
        born: Instant::now(),
        asked: AtomicU64::new(0),
    });
    (
        StreamSink {
            tx,
            shared: shared.clone(),
        },
        StreamReceiver {
            rx,
            shared,
            stashed: None,
        },
    )
}

impl StreamSink {
    /// This channel's number, unique in the process: the registry finds a reader's
    /// subscriptions by it.
    pub fn key(&self) -> u64 {
        self.shared.key
    }

    /// Whether the reader is gone (its receiver dropped or closed).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Whether the reader is to be cut off rather than lose events: it asked to be, and is
    /// armed.
    pub fn cuts(&self) -> bool {
        self.shared.on_cut.is_some() && self.shared.armed.load(Ordering::Acquire)
    }

    /// Whether the reader is to be cut off rather than lose `oldest`, the event a full
    /// buffer would drop: it [`cuts`](Self::cuts), and `oldest` was selected once it was
    /// armed.
    pub fn cuts_rather_than_drop(&self, oldest: &ChangeEvent) -> bool {
        self.cuts() && oldest.ordinal() >= self.shared.armed_from.load(Ordering::Relaxed)
    }

    /// Cuts the reader off: from now on it gets [`Received::Cut`], and the sink takes no event
    /// (as if the reader were gone). Call it before the events its subscriptions hold are
    /// discarded ([`lost`](Self::lost)), so that the reader sees the cut, not those losses;
    /// then [`report_cut`](Self::report_cut).
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::Release);
        self.shared.lost_notice.notify_one();
    }

    /// Whether the reader was cut off.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::Acquire)
    }

    /// How long the reader has not asked for anything ([`StreamReceiver::touch`]) at `now`.
    pub fn idle(&self, now: Instant) -> Duration {
        let asked = Duration::from_millis(self.shared.asked.load(Ordering::Relaxed));
        now.saturating_duration_since(self.shared.born + asked)
    }

    /// Once a cut's events are discarded: tells the hook (once) how many the reader lost.
    pub fn report_cut(&self) {
        if self.shared.reported.swap(true, Ordering::AcqRel) {
            return;
        }
        let lost = {
            let mut lost = self.shared.lost.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *lost).count
        };
        if let Some(hook) = &self.shared.on_cut {
            hook(lost);
        }
    }

    /// A subscription selected `event` (before it is handed over or buffered).
    pub fn selected(&self, event: &ChangeEvent) {
        // Only the registry's thread writes it.
        if self.shared.armed_from.load(Ordering::Relaxed) == u64::MAX && self.cuts() {
            self.shared
                .armed_from
                .store(event.ordinal(), Ordering::Relaxed);
        }
        *self
            .shared
            .gate()
            .pending
            .entry(event.ordinal())
            .or_insert(0) += 1;
    }

    /// A selected event will never be handed over (the policy dropped it, or its subscription
    /// ended): counted as lost unless the reader has it through another subscription.
    pub fn lost(&self, event: &ChangeEvent) {
        {
            let mut gate = self.shared.gate();
            let ordinal = event.ordinal();
            let has = if self.shared.ordered {
                gate.handed.is_some_and(|h| ordinal <= h)
            } else {
                gate.delivered.contains(&ordinal)
            };
            gate.release(ordinal);
            if has {
                return;
            }
        }
        {
            let mut lost = self.shared.lost.lock().unwrap_or_else(|p| p.into_inner());
            lost.newest = match (lost.count, lost.newest, event.sequence()) {
                (0, _, sequence) => sequence,
                (_, Some(newest), Some(sequence)) => Some(newest.max(sequence)),
                _ => None,
            };
            lost.count += 1;
        }
        self.shared.lost_notice.notify_one();
    }

    pub fn try_deliver(&self, event: ChangeEvent) -> Result<(), StreamRefused> {
        if self.is_cut() {
            return Err(StreamRefused::Closed);
        }
        let ordinal = event.ordinal();
        let mut gate = self.shared.gate();
        if !self.shared.ordered {
            if gate.delivered.contains(&ordinal) {
                // Another subscription of this reader handed it over already.
                gate.release(ordinal);
                return Ok(());
            }
            // Overtaking an older event still waiting (in place of a replaced one, or in
            // another subscription's buffer): the reader must not name this one as how far
            // it got, or a resume from there would skip the older one.
            let in_order = !gate
                .pending
                .range(..ordinal)
                .any(|(older, _)| !gate.delivered.contains(older));
            self.tx
                .try_send(Handed { event, in_order })
                .map_err(refused)?;
            gate.release(ordinal);
            if gate.pending.contains_key(&ordinal) {
                gate.delivered.insert(ordinal);
            }
            return Ok(());
        }
        if gate.handed.is_some_and(|h| ordinal <= h) {
            // Another subscription of this reader handed it over already.
            gate.release(ordinal);
            return Ok(());
        }
        if gate
            .pending
            .keys()
            .next()
            .is_some_and(|&first| first < ordinal)
        {
            return Err(StreamRefused::Full(event));
        }
        self.tx
            .try_send(Handed {
                event,
                in_order: true,
            })
            .map_err(refused)?;
        gate.release(ordinal);
        gate.handed = Some(ordinal);
        Ok(())
    }
}

fn refused(e: mpsc::error::TrySendError<Handed>) -> StreamRefused {
    match e {
        mpsc::error::TrySendError::Full(handed) => StreamRefused::Full(handed.event),
        mpsc::error::TrySendError::Closed(_) => StreamRefused::Closed,
    }
}

/// What [`StreamReceiver::next`] found.
#[cfg_attr(not(feature = "web"), allow(dead_code))]
pub(crate) enum Received {
    /// The next event. `in_order`: every older event the reader's subscriptions selected
    /// came before it or was reported lost — so the reader has everything up to it. Always
    /// true in ordered mode; in unordered mode (`KeepLatestPerKey`) false for an event that
    /// overtook an older one still waiting.
    Event { event: ChangeEvent, in_order: bool },
    /// These events were lost before the events still to come.
    Lost(Lost),
    /// The reader was cut off ([`StreamSink::cut`]): nothing more comes, and what still
    /// waits in the channel is not handed out. Its losses were told to its hook.
    Cut,
    /// Every subscription feeding the receiver is gone (unsubscribed, or the notifier
    /// stopped).
    Closed,
}

#[cfg_attr(not(feature = "web"), allow(dead_code))]
impl StreamReceiver {
    /// The next event — or, first, how many were lost before it: an event the policy dropped
    /// is counted before any event handed over after it, so a loss is reported before the
    /// events that follow it.
    pub async fn next(&mut self) -> Received {
        self.touch();
        loop {
            if self.is_cut() {
                return Received::Cut;
            }
            if let Some(lost) = self.take_lost() {
                return Received::Lost(lost);
            }
            if let Some(Handed { event, in_order }) = self.stashed.take() {
                return Received::Event { event, in_order };
            }
            tokio::select! {
                biased;
                _ = self.shared.lost_notice.notified() => {}
                event = self.rx.recv() => match event {
                    Some(event) => self.stashed = Some(event),
                    None => return Received::Closed,
                },
            }
        }
    }

    /// This channel's number (see [`StreamSink::key`]).
    pub fn key(&self) -> u64 {
        self.shared.key
    }

    /// Notes that the reader asks for what comes next — [`next`](Self::next) does, and so
    /// does a reader busy with something else first (a web client's journal replay, page
    /// after page): a reader that asked within the registry's `STUCK` is never relieved of
    /// its events (see [`StreamSink::idle`]).
    pub fn touch(&self) {
        let asked = self.shared.born.elapsed().as_millis();
        let asked = u64::try_from(asked).unwrap_or(u64::MAX);
        self.shared.asked.store(asked, Ordering::Relaxed);
    }

    /// From now on a reader that asked to be cut off rather than lose events is: call it
    /// once it takes events live.
    pub fn arm(&self) {
        self.shared.armed.store(true, Ordering::Release);
    }

    /// Whether the reader was cut off. A loss the reader took may belong to a cut that is
    /// under way: the cut is set before its losses are counted, so this says so then.
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::Acquire)
    }

    /// Claims the report of this reader's end: true when no cut was reported, nor will be
    /// ([`StreamSink::report_cut`] tells its hook nothing afterwards) — the reader, which ends
    /// on a loss, counts that end itself, once, whoever comes first.
    pub fn claim_report(&self) -> bool {
        !self.shared.reported.swap(true, Ordering::AcqRel)
    }

    /// Closes the channel: the sinks see the reader as gone from now on.
    pub fn close(&mut self) {
        self.rx.close();
    }

    fn take_lost(&self) -> Option<Lost> {
        let mut lost = self.shared.lost.lock().unwrap_or_else(|p| p.into_inner());
        Some(std::mem::take(&mut *lost)).filter(|l| l.count > 0)
    }

    #[cfg(test)]
    fn try_recv(&mut self) -> Option<ChangeEvent> {
        self.rx.try_recv().ok().map(|handed| handed.event)
    }

    #[cfg(test)]
    fn try_recv_in_order(&mut self) -> Option<(u64, bool)> {
        self.rx
            .try_recv()
            .ok()
            .map(|handed| (handed.event.ordinal(), handed.in_order))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::test_event as event;
    use crate::event::{Key, RawNotification};
    use serde_json::{json, Map};

    fn accepted(sink: &StreamSink, e: &ChangeEvent) -> bool {
        sink.try_deliver(e.clone()).is_ok()
    }

    #[test]
    fn an_event_waits_for_older_selected_events_and_a_duplicate_goes_once() {
        let (sink, mut rx) = stream_channel(8, true, None);
        let (a, b) = (event(1), event(2));
        sink.selected(&a);
        sink.selected(&b);
        sink.selected(&b);
        assert!(!accepted(&sink, &b), "1 is still waiting elsewhere");
        assert!(accepted(&sink, &a));
        assert!(accepted(&sink, &b));
        assert!(
            accepted(&sink, &b),
            "the second subscription's copy is taken"
        );
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv())
            .map(|e| e.ordinal())
            .collect();
        assert_eq!(got, [1, 2]);
        assert_eq!(rx.take_lost(), None);
    }

    #[test]
    fn a_lost_event_lets_later_ones_pass_and_is_counted_once() {
        let (sink, rx) = stream_channel(8, true, None);
        let (a, b) = (event(1), event(2));
        sink.selected(&a);
        sink.selected(&b);
        sink.lost(&a);
        assert!(accepted(&sink, &b));
        assert_eq!(
            rx.take_lost(),
            Some(Lost {
                count: 1,
                newest: Some(1)
            })
        );
        assert_eq!(rx.take_lost(), None);
        sink.selected(&b);
        sink.lost(&b);
        assert_eq!(
            rx.take_lost(),
            None,
            "the reader has 2 through the other subscription"
        );
    }

    #[test]
    fn a_loss_carries_its_count_and_newest_position() {
        let (sink, rx) = stream_channel(8, false, None);
        sink.lost(&event(5));
        sink.lost(&event(3));
        assert_eq!(
            rx.take_lost(),
            Some(Lost {
                count: 2,
                newest: Some(5)
            })
        );
        let channel = event(1).channel_info().clone();
        let unsequenced = ChangeEvent::new(
            Arc::new(channel),
            Key::Single(json!(9)),
            Map::new(),
            &RawNotification::new("c", ""),
            false,
        );
        sink.lost(&event(7));
        sink.lost(&unsequenced);
        assert_eq!(
            rx.take_lost(),
            Some(Lost {
                count: 2,
                newest: None
            }),
            "an event without a position: the newest is unknown"
        );
    }

    #[test]
    fn unordered_an_event_two_subscriptions_select_goes_once() {
        let (sink, mut rx) = stream_channel(8, false, None);
        let (a, b) = (event(1), event(2));
        for e in [&a, &a, &b, &b] {
            sink.selected(e);
        }
        // Out of order is fine here (KeepLatestPerKey reorders by design).
        assert!(accepted(&sink, &b));
        assert!(accepted(&sink, &a));
        assert!(accepted(&sink, &a), "the second copy is taken, not sent");
        sink.lost(&b);
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv())
            .map(|e| e.ordinal())
            .collect();
        assert_eq!(got, [2, 1]);
        assert_eq!(
            rx.take_lost(),
            None,
            "the reader has 2 through the other one"
        );
        let gate = sink.shared.gate();
        assert!(gate.pending.is_empty() && gate.delivered.is_empty());
    }

    #[test]
    fn unordered_an_event_that_overtakes_an_older_waiting_one_is_not_in_order() {
        let (sink, mut rx) = stream_channel(8, false, None);
        let (a, b, c) = (event(1), event(2), event(3));
        for e in [&a, &b, &b, &c] {
            sink.selected(e);
        }
        // 2 overtakes 1 (KeepLatestPerKey put it in an older one's place).
        assert!(accepted(&sink, &b));
        // The second copy of 2: handed over already, so not waiting for 3.
        assert!(accepted(&sink, &a));
        assert!(accepted(&sink, &c));
        assert!(accepted(&sink, &b));
        let got: Vec<_> = std::iter::from_fn(|| rx.try_recv_in_order()).collect();
        assert_eq!(
            got,
            [(2, false), (1, true), (3, true)],
            "only an event with nothing older still waiting names how far the reader got"
        );
        // A lost older event lets the next one be in order (the loss is reported first).
        let (d, e) = (event(4), event(5));
        sink.selected(&d);
        sink.selected(&e);
        sink.lost(&d);
        assert!(accepted(&sink, &e));
        assert_eq!(rx.try_recv_in_order(), Some((5, true)));
    }

    #[test]
    fn a_cut_reader_gets_the_cut_first_takes_nothing_more_and_its_hook_hears_of_it_once() {
        let told = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let told = told.clone();
            Box::new(move |lost| told.lock().unwrap().push(lost)) as CutHook
        };
        let (sink, mut rx) = stream_channel(8, true, Some(hook));
        let (a, b, c) = (event(1), event(2), event(3));
        sink.selected(&a);
        assert!(!sink.cuts(), "not armed yet");
        rx.arm();
        assert!(sink.cuts());
        for e in [&b, &c] {
            sink.selected(e);
        }
        assert!(
            !sink.cuts_rather_than_drop(&a),
            "1 was selected before: the reader decides on its loss"
        );
        assert!(sink.cuts_rather_than_drop(&b));
        assert!(accepted(&sink, &a));
        // The registry's cut: the flag, then what the subscriptions held is lost.
        sink.cut();
        sink.lost(&b);
        sink.lost(&c);
        sink.report_cut();
        sink.report_cut();
        assert_eq!(
            *told.lock().unwrap(),
            [2u64],
            "told once, with the events lost"
        );
        assert!(matches!(
            sink.try_deliver(event(4)),
            Err(StreamRefused::Closed)
        ));
        let next = futures_util::FutureExt::now_or_never(rx.next());
        assert!(
            matches!(next, Some(Received::Cut)),
            "the cut, not the event still in the channel"
        );
        assert!(rx.is_cut());
        assert!(!rx.claim_report(), "the hook counted the end");
    }

    /// A reader that ended on a loss and counted that end itself: a cut the registry makes
    /// before it hears that the reader is gone tells its hook nothing, so the end is counted
    /// once.
    #[test]
    fn a_reader_that_counted_its_end_is_not_counted_again_by_a_cut() {
        let told = Arc::new(Mutex::new(Vec::new()));
        let hook = {
            let told = told.clone();
            Box::new(move |lost| told.lock().unwrap().push(lost)) as CutHook
        };
        let (sink, rx) = stream_channel(8, true, Some(hook));
        rx.arm();
        assert!(rx.claim_report());
        sink.cut();
        sink.report_cut();
        assert!(told.lock().unwrap().is_empty());
        assert!(!rx.claim_report(), "once");
    }

    #[test]
    fn a_full_channel_refuses_and_a_closed_one_is_closed() {
        let (sink, rx) = stream_channel(1, false, None);
        assert!(accepted(&sink, &event(1)));
        assert!(matches!(
            sink.try_deliver(event(2)),
            Err(StreamRefused::Full(_))
        ));
        drop(rx);
        assert!(matches!(
            sink.try_deliver(event(3)),
            Err(StreamRefused::Closed)
        ));
    }
}
