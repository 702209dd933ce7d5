//! A set of journal ids read ([`ReadSet`]), for a journal whose ids are not in commit order and
//! that is read by a gap-aware cursor (MySQL / MariaDB, `src/mysql/journal.rs`): every id up
//! to a low watermark, and above it every id up to the highest read except the open gaps.
//! What a client resuming a stream had ([`CursorPage`]), and which live events a replay for it
//! covers.
// Positions are written and read by the web endpoint; MySQL makes them.
#![cfg_attr(not(all(feature = "mysql", feature = "web")), allow(dead_code))]

use std::sync::{Arc, Mutex, OnceLock};

/// Most gap ranges a set written as text carries: beyond that its text claims less (its oldest
/// gaps merged), so a resume from it sends some rows again rather than missing any.
pub(crate) const MAX_TEXT_GAPS: usize = 64;

/// Takes `id` out of `gaps[i]`, the gap (inclusive range, in ascending disjoint ones) that
/// holds it: the gap shrinks, splits in two, or goes.
pub(crate) fn take_from_gap(gaps: &mut Vec<(i64, i64)>, i: usize, id: i64) {
    let (start, end) = gaps[i];
    match (start == id, end == id) {
        (true, true) => {
            gaps.remove(i);
        }
        (true, false) => gaps[i].0 = id + 1,
        (false, true) => gaps[i].1 = id - 1,
        (false, false) => {
            gaps[i].1 = id - 1;
            gaps.insert(i + 1, (id + 1, end));
        }
    }
}

/// Journal ids read: every id up to `low`, and the ids in `(low, high]` outside `gaps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadSet {
    pub(crate) low: i64,
    pub(crate) high: i64,
    /// Inclusive ranges of ids not read, in `(low, high)`, ascending, disjoint, not adjacent.
    pub(crate) gaps: Vec<(i64, i64)>,
}

impl ReadSet {
    /// Every id up to `low`, nothing above.
    #[cfg(test)]
    pub(crate) fn new(low: i64) -> Self {
        ReadSet {
            low,
            high: low,
            gaps: Vec::new(),
        }
    }

    /// A set from its parts, with the ids read right above `low` folded into it (one form for
    /// one set); `None` unless `gaps` are ascending, disjoint ranges strictly between `low`
    /// and `high`.
    pub(crate) fn from_parts(low: i64, high: i64, gaps: Vec<(i64, i64)>) -> Option<Self> {
        let ordered = low <= high
            && gaps.iter().all(|&(a, b)| low < a && a <= b && b < high)
            && gaps.windows(2).all(|w| w[0].1 + 1 < w[1].0);
        if !ordered {
            return None;
        }
        let low = gaps.first().map_or(high, |&(a, _)| a - 1);
        Some(ReadSet { low, high, gaps })
    }

    /// Whether `id` was read.
    pub(crate) fn contains(&self, id: i64) -> bool {
        if id <= self.low {
            return true;
        }
        if id > self.high {
            return false;
        }
        // The last gap starting at or below `id`.
        let i = self.gaps.partition_point(|&(a, _)| a <= id);
        !(i > 0 && id <= self.gaps[i - 1].1)
    }

    /// The lowest id not read.
    pub(crate) fn first_unread(&self) -> i64 {
        self.gaps
            .first()
            .map_or(self.high.saturating_add(1), |&(a, _)| a)
    }

    /// Adds `id` to the set.
    pub(crate) fn mark(&mut self, id: i64) {
        if self.contains(id) {
            return;
        }
        if id > self.high {
            if id > self.high + 1 {
                self.gaps.push((self.high + 1, id - 1));
            }
            self.high = id;
        } else {
            let i = self.gaps.partition_point(|&(a, _)| a <= id) - 1;
            take_from_gap(&mut self.gaps, i, id);
        }
        // Fold a read prefix into `low`.
        let next = self.first_unread();
        if next > self.low + 1 {
            self.low = next - 1;
            if self.low >= self.high {
                self.high = self.low;
            }
        }
    }

    /// Every id of either set.
    pub(crate) fn union(&self, other: &ReadSet) -> ReadSet {
        let (mut a, b) = if self.low >= other.low {
            (self.clone(), other)
        } else {
            (other.clone(), self)
        };
        // `a` covers everything up to its low; add what `b` has above it.
        let mut id_ranges = Vec::new();
        let mut next = b.low + 1;
        for &(ga, gb) in &b.gaps {
            if ga > next {
                id_ranges.push((next, ga - 1));
            }
            next = gb + 1;
        }
        if next <= b.high {
            id_ranges.push((next, b.high));
        }
        for (start, end) in id_ranges {
            a.mark_range(start.max(a.low + 1), end);
        }
        a
    }

    /// Adds the ids `start..=end`.
    pub(crate) fn mark_range(&mut self, start: i64, end: i64) {
        if start > end {
            return;
        }
        if end > self.high {
            if start > self.high + 1 {
                self.gaps.push((self.high + 1, start - 1));
            }
            self.high = end;
        }
        // Cut [start, end] out of every gap.
        let mut gaps = Vec::with_capacity(self.gaps.len() + 1);
        for &(a, b) in &self.gaps {
            if b < start || a > end {
                gaps.push((a, b));
                continue;
            }
            if a < start {
                gaps.push((a, start - 1));
            }
            if b > end {
                gaps.push((end + 1, b));
            }
        }
        self.gaps = gaps;
        let next = self.first_unread();
        if next > self.low + 1 {
            self.low = next - 1;
        }
        if self.low >= self.high {
            self.high = self.low;
            self.gaps.clear();
        }
    }

    /// [`mark`](Self::mark), keeping at most twice [`MAX_TEXT_GAPS`] gaps (merging the oldest
    /// past that, as [`bounded`](Self::bounded) does): never more ids than the exact set.
    fn mark_bounded(&mut self, id: i64) {
        self.mark(id);
        if self.gaps.len() > 2 * MAX_TEXT_GAPS {
            *self = self.bounded();
        }
    }

    /// The same set, or with more than [`MAX_TEXT_GAPS`] gaps a smaller one: its oldest gaps
    /// merged into one, with the ids between them (a resume sends those again rather than
    /// claim an id that may still commit).
    fn bounded(&self) -> ReadSet {
        if self.gaps.len() <= MAX_TEXT_GAPS {
            return self.clone();
        }
        let merged = self.gaps.len() - MAX_TEXT_GAPS;
        let mut gaps = Vec::with_capacity(MAX_TEXT_GAPS);
        gaps.push((self.gaps[0].0, self.gaps[merged].1));
        gaps.extend_from_slice(&self.gaps[merged + 1..]);
        ReadSet {
            low: self.low,
            high: self.high,
            gaps,
        }
    }

    /// Reads [`Display`](std::fmt::Display)'s form; `None` for anything else.
    pub(crate) fn parse(text: &str) -> Option<ReadSet> {
        let mut parts = text.splitn(3, ':');
        let number = |s: &str| -> Option<i64> {
            (!s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        let low = number(parts.next()?)?;
        let high = number(parts.next()?)?;
        let gaps = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|range| {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    Some((number(a)?, number(b)?))
                })
                .collect::<Option<Vec<_>>>()?,
        };
        // A client's text (Last-Event-ID) at the end of the id range is none of ours: no
        // journal id gets there.
        if gaps.len() > MAX_TEXT_GAPS || high == i64::MAX {
            return None;
        }
        ReadSet::from_parts(low, high, gaps)
    }
}

/// `low:high:a-b,c` (a single-id gap is written once): digits, colons, commas and hyphens only,
/// at most `MAX_TEXT_GAPS` (64) gaps: beyond that the oldest are merged.
impl std::fmt::Display for ReadSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = self.bounded();
        write!(f, "{}:{}:", set.low, set.high)?;
        for (i, (a, b)) in set.gaps.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        Ok(())
    }
}

/// What a cursor handed over in one batch: the set it had read before (`start`) and the ids
/// of the batch in the order they went out. The set after the batch's `i`-th row is `start`
/// plus `ids[..=i]`, as far as a set of at most 64 gaps can say it (its text never says
/// more): computed from a checkpoint every 64 rows, so that
/// a page of N ids over a cursor with G open gaps keeps O(N) memory and costs O(N) marks,
/// where a set per row would keep N × G gaps (a large transaction interleaved with others
/// leaves a gap per id).
#[derive(Debug)]
pub struct CursorPage {
    start: ReadSet,
    ids: Vec<i64>,
    /// The (bounded) set before rows `0, EVERY, 2 × EVERY, …`, once asked for.
    checkpoints: OnceLock<Vec<ReadSet>>,
    /// The last set given out, by row: every SSE client framing the same event asks for the
    /// same row, and rows are asked for in order.
    last: Mutex<Option<(usize, ReadSet)>>,
}

impl CursorPage {
    /// Rows between two checkpoints.
    const EVERY: usize = 64;

    /// A batch of `ids` (in delivery order) handed over after `start` was read.
    pub(crate) fn new(start: ReadSet, ids: Vec<i64>) -> Arc<Self> {
        Arc::new(CursorPage {
            start,
            ids,
            checkpoints: OnceLock::new(),
            last: Mutex::new(None),
        })
    }

    /// The set read once the batch's `index`-th row was handed over, with at most
    /// [`MAX_TEXT_GAPS`] gaps: where the exact set has more, its oldest are merged (it claims
    /// fewer ids, so a resume from it sends some rows again rather than miss any).
    pub(crate) fn after(&self, index: usize) -> Option<ReadSet> {
        if index >= self.ids.len() {
            return None;
        }
        let checkpoints = self.checkpoints.get_or_init(|| {
            let mut set = self.start.bounded();
            let mut checkpoints = Vec::with_capacity(self.ids.len() / Self::EVERY + 1);
            for chunk in self.ids.chunks(Self::EVERY) {
                checkpoints.push(set.clone());
                for &id in chunk {
                    set.mark_bounded(id);
                }
            }
            checkpoints
        });
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        // From the last set given out when it is at or before this row and nearer than the
        // checkpoint (marking more ids into a bounded set still claims none not read).
        let at = index / Self::EVERY;
        let (mut set, from) = match &*last {
            Some((i, set)) if *i == index => return Some(set.clone()),
            Some((i, set)) if *i < index && i + 1 >= at * Self::EVERY => (set.clone(), i + 1),
            _ => (checkpoints.get(at)?.clone(), at * Self::EVERY),
        };
        for &id in &self.ids[from..=index] {
            set.mark_bounded(id);
        }
        let set = set.bounded();
        *last = Some((index, set.clone()));
        Some(set)
    }
}

impl PartialEq for CursorPage {
    fn eq(&self, other: &Self) -> bool {
        self.start == other.start && self.ids == other.ids
    }
}

impl Eq for CursorPage {}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(low: i64, high: i64, gaps: &[(i64, i64)]) -> ReadSet {
        ReadSet::from_parts(low, high, gaps.to_vec()).unwrap()
    }

    #[test]
    fn a_text_at_the_end_of_the_id_range_is_no_set() {
        // A client's Last-Event-ID: `high + 1` must exist for first_unread and mark.
        assert_eq!(ReadSet::parse("0:9223372036854775807:"), None);
        assert_eq!(
            ReadSet::parse("9223372036854775807:9223372036854775807:"),
            None
        );
        let s = ReadSet::parse("9223372036854775805:9223372036854775806:").unwrap();
        assert_eq!(s.first_unread(), i64::MAX);
        // Built from a cursor's own parts (a journal at its end), it still answers.
        assert_eq!(set(i64::MAX, i64::MAX, &[]).first_unread(), i64::MAX);
    }

    #[test]
    fn marking_fills_gaps_opens_new_ones_and_folds_into_the_watermark() {
        let mut s = ReadSet::new(10);
        s.mark(13);
        assert_eq!(s, set(10, 13, &[(11, 12)]));
        s.mark(12);
        assert_eq!(s, set(10, 13, &[(11, 11)]));
        s.mark(16);
        assert_eq!(s, set(10, 16, &[(11, 11), (14, 15)]));
        s.mark(11);
        assert_eq!(s, set(13, 16, &[(14, 15)]));
        s.mark(5); // at or below low: nothing
        s.mark(14);
        s.mark(15);
        assert_eq!(s, set(16, 16, &[]));
        let mut s = set(0, 10, &[(2, 8)]);
        assert_eq!(s.low, 1, "the read id 1 is folded into the watermark");
        s.mark(5);
        assert_eq!(s, set(1, 10, &[(2, 4), (6, 8)]));
        for id in [0, 1, 5, 9, 10] {
            assert!(s.contains(id), "{id}");
        }
        for id in [2, 4, 6, 8, 11] {
            assert!(!s.contains(id), "{id}");
        }
        assert_eq!(s.first_unread(), 2);
    }

    #[test]
    fn a_union_has_every_id_of_either() {
        let a = set(10, 20, &[(12, 13), (17, 17)]);
        let b = set(5, 25, &[(6, 12), (19, 21)]);
        let u = a.union(&b);
        for id in 0..=30 {
            assert_eq!(
                u.contains(id),
                a.contains(id) || b.contains(id),
                "{id}: {u:?}"
            );
        }
        assert_eq!(u, b.union(&a));
        assert_eq!(u, set(11, 25, &[(12, 12), (21, 21)]));
        let far = set(40, 40, &[]);
        assert_eq!(a.union(&far), far);
    }

    #[test]
    fn text_round_trips_and_rejects_what_is_not_a_set() {
        for text in ["0:0:", "11:20:12-13,17", "4:9:5"] {
            assert_eq!(ReadSet::parse(text).unwrap().to_string(), text);
        }
        // One form for one set.
        assert_eq!(ReadSet::parse("3:9:5").unwrap().to_string(), "4:9:5");
        assert_eq!(ReadSet::parse("3:9:").unwrap().to_string(), "9:9:");
        for bad in [
            "",
            "1",
            "1:2",
            "a:2:",
            "2:1:",
            "1:5:1",
            "1:5:5",
            "1:9:3-2",
            "1:9:3-4,4-5",
            "1:9:3-4,5",
            "1:9:3;4",
            "-1:2:",
            "1:2:,",
            "1:9:3-4-5",
        ] {
            assert_eq!(ReadSet::parse(bad), None, "{bad:?}");
        }
        // Too many gaps to write: the text merges the oldest two, and has the other ids.
        let mut many = ReadSet::new(0);
        for i in 1..=(MAX_TEXT_GAPS as i64 + 1) {
            many.mark(2 * i);
        }
        assert_eq!(many.gaps.len(), MAX_TEXT_GAPS + 1);
        let text = ReadSet::parse(&many.to_string()).unwrap();
        assert_eq!(text.gaps.len(), MAX_TEXT_GAPS);
        assert!(!text.contains(1) && !text.contains(2) && !text.contains(3));
        for id in 0..=2 * (MAX_TEXT_GAPS as i64 + 2) {
            assert!(!text.contains(id) || many.contains(id), "{id}: claims more");
            if id > 3 {
                assert_eq!(text.contains(id), many.contains(id), "{id}");
            }
        }
    }

    #[test]
    fn a_page_over_many_gaps_keeps_few_and_never_claims_an_id_not_read() {
        // A cursor with 2,000 open gaps (every odd id up to 4,000), then a page that adds a
        // gap per id past it and fills some of the old ones: a set per row would hold
        // thousands of gaps each.
        let gaps: Vec<(i64, i64)> = (0..2_000).map(|i| (2 * i + 1, 2 * i + 1)).collect();
        let start = ReadSet::from_parts(0, 4_000, gaps).unwrap();
        let ids: Vec<i64> = (0..3_000)
            .map(|i| if i % 3 == 0 { 2 * i + 1 } else { 4_000 + 2 * i })
            .collect();
        let page = CursorPage::new(start.clone(), ids.clone());
        let mut exact = start;
        for (i, &id) in ids.iter().enumerate() {
            exact.mark(id);
            let after = page.after(i).unwrap();
            assert!(
                after.gaps.len() <= MAX_TEXT_GAPS,
                "row {i}: {} gaps",
                after.gaps.len()
            );
            assert_eq!(after.high, exact.high, "row {i}");
            // an id added at the top stays exact; one filling an old gap may sit in the
            // merged oldest gaps
            assert!(i % 3 == 0 || after.contains(id), "row {i}: its own id");
            for probe in (0..=exact.high + 2).step_by(7) {
                assert!(
                    !after.contains(probe) || exact.contains(probe),
                    "row {i}: claims {probe}, not read"
                );
            }
        }
        assert!(page.checkpoints.get().unwrap().len() <= ids.len() / CursorPage::EVERY + 1);
        assert_eq!(page.after(ids.len()), None);
        // Out of order (from a checkpoint, not the last set given out) and the same row twice.
        for i in [2_999, 64, 63, 1_500, 1_500, 0] {
            let mut exact = ReadSet::from_parts(
                0,
                4_000,
                (0..2_000).map(|g| (2 * g + 1, 2 * g + 1)).collect(),
            )
            .unwrap();
            for &id in &ids[..=i] {
                exact.mark(id);
            }
            let after = page.after(i).unwrap();
            assert!(
                after.gaps.len() <= MAX_TEXT_GAPS && after.high == exact.high,
                "row {i}"
            );
            for probe in (0..=exact.high + 2).step_by(5) {
                assert!(
                    !after.contains(probe) || exact.contains(probe),
                    "row {i}: {probe}"
                );
            }
        }
    }

    #[test]
    fn a_page_gives_the_set_after_each_of_its_rows() {
        let page = CursorPage::new(set(10, 12, &[(11, 11)]), vec![14, 11, 13]);
        assert_eq!(page.after(0), Some(set(10, 14, &[(11, 11), (13, 13)])));
        assert_eq!(page.after(1), Some(set(12, 14, &[(13, 13)])));
        assert_eq!(page.after(2), Some(set(14, 14, &[])));
        assert_eq!(page.after(3), None);
    }
}
