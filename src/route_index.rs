//! The routing index of one channel: which subscriptions an event can match, found without
//! looking at the others.
//!
//! A subscription with an equality filter (`eq`, or `is_in` with its values) on a scalar value
//! is kept under that filter's column and value(s) — the first such filter of the
//! subscription; every other subscription stays in a plain list. An event's candidates are that
//! list plus, for each indexed column, the subscriptions kept under the event's value of the
//! column. A candidate is not yet a match: the caller still checks all of its filters, so the
//! index only has to never miss a subscription, and never name one twice.
//!
//! Value keys follow [`Filter`]'s typed equality (`json_eq`): numbers compare by value, so a
//! number's key is its `f64` (with `-0.0` as `0.0`) — every pair of equal numbers shares a key
//! (two large integers that only their `f64`s confuse share one too, and the caller's filter
//! check tells them apart); strings, booleans and null key as themselves. Arrays and objects
//! are not indexed. Subscriptions are named by slot numbers the caller chooses (stable while
//! the subscription lives).

use std::collections::hash_map::Entry;
use std::collections::HashMap;

use foldhash::fast::RandomState;

use serde_json::Value;

use crate::filter::Filter;

/// The key of a scalar value under typed equality.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    Scalar(Scalar),
    String(Box<str>),
}

/// The key of a scalar value other than a string (`Copy`: looked up without allocating).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scalar {
    Null,
    Bool(bool),
    /// The bits of the number's `f64`, `-0.0` folded into `0.0`.
    Number(u64),
}

impl Key {
    /// The key of `value`, or `None` for an array or object (never indexed).
    fn of(value: &Value) -> Option<Key> {
        match value {
            Value::String(s) => Some(Key::String(s.as_str().into())),
            other => Scalar::of(other).map(Key::Scalar),
        }
    }
}

impl Scalar {
    /// The key of `value` when it is neither a string, an array nor an object.
    fn of(value: &Value) -> Option<Scalar> {
        Some(match value {
            Value::Null => Scalar::Null,
            Value::Bool(b) => Scalar::Bool(*b),
            Value::Number(n) => {
                let f = n.as_f64()?;
                Scalar::Number(if f == 0.0 { 0.0f64 } else { f }.to_bits())
            }
            Value::String(_) | Value::Array(_) | Value::Object(_) => return None,
        })
    }
}

/// The subscriptions kept under one value: most values have one, kept inline (no allocation,
/// and one memory access fewer per lookup).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slots {
    One(usize),
    Many(Vec<usize>),
}

impl Slots {
    fn push(&mut self, slot: usize) {
        match self {
            Slots::One(first) => *self = Slots::Many(vec![*first, slot]),
            Slots::Many(slots) => slots.push(slot),
        }
    }

    /// Removes `slot`; returns whether it was there and whether none is left.
    fn remove(&mut self, slot: usize) -> (bool, bool) {
        match self {
            Slots::One(only) => (*only == slot, *only == slot),
            Slots::Many(slots) => match slots.iter().position(|s| *s == slot) {
                Some(pos) => {
                    slots.swap_remove(pos);
                    (true, slots.is_empty())
                }
                None => (false, slots.is_empty()),
            },
        }
    }

    fn as_slice(&self) -> &[usize] {
        match self {
            Slots::One(slot) => std::slice::from_ref(slot),
            Slots::Many(slots) => slots,
        }
    }
}

/// The subscriptions kept under one column, by value: strings apart, so that an event's string
/// is looked up as the `&str` it is.
#[derive(Debug)]
struct ColumnIndex {
    column: String,
    by_scalar: HashMap<Scalar, Slots, RandomState>,
    by_string: HashMap<Box<str>, Slots, RandomState>,
    /// Subscriptions kept under this column.
    subscriptions: usize,
}

impl ColumnIndex {
    fn add(&mut self, key: Key, slot: usize) {
        match key {
            Key::Scalar(key) => add_to(&mut self.by_scalar, key, slot),
            Key::String(key) => add_to(&mut self.by_string, key, slot),
        }
    }

    /// Removes `slot` from under `key`; returns whether it was there.
    fn take(&mut self, key: &Key, slot: usize) -> bool {
        match key {
            Key::Scalar(key) => take_from(&mut self.by_scalar, key, slot),
            Key::String(key) => take_from(&mut self.by_string, key, slot),
        }
    }

    /// The subscriptions kept under `value`.
    fn under(&self, value: &Value) -> &[usize] {
        let slots = match value {
            Value::String(s) => self.by_string.get(s.as_str()),
            other => Scalar::of(other).and_then(|key| self.by_scalar.get(&key)),
        };
        slots.map_or(&[], Slots::as_slice)
    }
}

fn add_to<K: std::hash::Hash + Eq>(map: &mut HashMap<K, Slots, RandomState>, key: K, slot: usize) {
    match map.entry(key) {
        Entry::Occupied(mut slots) => slots.get_mut().push(slot),
        Entry::Vacant(entry) => {
            entry.insert(Slots::One(slot));
        }
    }
}

fn take_from<K: std::hash::Hash + Eq>(
    map: &mut HashMap<K, Slots, RandomState>,
    key: &K,
    slot: usize,
) -> bool {
    let Some(slots) = map.get_mut(key) else {
        return false;
    };
    let (found, empty) = slots.remove(slot);
    if empty {
        map.remove(key);
    }
    found
}

/// Where a subscription is kept: under a column and its distinct value keys, or in the
/// unindexed list.
enum Place {
    Column(String, Vec<Key>),
    Unindexed,
}

/// Subscriptions of one channel, by the value of a column their filters require.
#[derive(Debug, Default)]
pub(crate) struct RouteIndex {
    unindexed: Vec<usize>,
    /// Position of each unindexed slot in `unindexed`.
    unindexed_at: HashMap<usize, usize>,
    columns: Vec<ColumnIndex>,
}

impl RouteIndex {
    /// Where a subscription with `filters` is kept (the same answer every time).
    fn place(filters: &[Filter]) -> Place {
        for filter in filters {
            let Some(values) = filter.equals_one_of() else {
                continue;
            };
            let Some(mut keys) = values.iter().map(Key::of).collect::<Option<Vec<_>>>() else {
                continue;
            };
            // `is_in(c, [1, 1.0])` is kept once under 1.
            let mut distinct = Vec::with_capacity(keys.len());
            for key in keys.drain(..) {
                if !distinct.contains(&key) {
                    distinct.push(key);
                }
            }
            return Place::Column(filter.column().to_string(), distinct);
        }
        Place::Unindexed
    }

    /// Whether being a candidate is enough for a subscription with `filters`: its one filter is
    /// the one it is indexed under, and a value with the key of one of the filter's values
    /// equals that value under typed equality (strings, booleans, null, fractional numbers,
    /// integers of magnitude below 2⁵³ — a larger integer shares its key with its neighbours).
    /// Then the caller need not check the filter again.
    pub(crate) fn settles(filters: &[Filter]) -> bool {
        let [filter] = filters else {
            return false;
        };
        const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
        matches!(Self::place(filters), Place::Column(..))
            && filter.equals_one_of().is_some_and(|values| {
                values.iter().all(|v| match v {
                    Value::Number(n) if n.is_f64() => true,
                    Value::Number(n) => n.as_f64().is_some_and(|f| f.abs() < EXACT),
                    _ => true,
                })
            })
    }

    /// Adds the subscription in `slot` with `filters`.
    pub(crate) fn insert(&mut self, slot: usize, filters: &[Filter]) {
        match Self::place(filters) {
            Place::Unindexed => {
                self.unindexed_at.insert(slot, self.unindexed.len());
                self.unindexed.push(slot);
            }
            Place::Column(column, keys) => {
                let at = match self.columns.iter().position(|c| c.column == column) {
                    Some(at) => at,
                    None => {
                        self.columns.push(ColumnIndex {
                            column,
                            by_scalar: HashMap::default(),
                            by_string: HashMap::default(),
                            subscriptions: 0,
                        });
                        self.columns.len() - 1
                    }
                };
                let index = &mut self.columns[at];
                index.subscriptions += 1;
                for key in keys {
                    index.add(key, slot);
                }
            }
        }
    }

    /// Removes the subscription in `slot`, added with the same `filters`.
    pub(crate) fn remove(&mut self, slot: usize, filters: &[Filter]) {
        match Self::place(filters) {
            Place::Unindexed => {
                let Some(at) = self.unindexed_at.remove(&slot) else {
                    return;
                };
                self.unindexed.swap_remove(at);
                if let Some(&moved) = self.unindexed.get(at) {
                    self.unindexed_at.insert(moved, at);
                }
            }
            Place::Column(column, keys) => {
                let Some(at) = self.columns.iter().position(|c| c.column == column) else {
                    return;
                };
                let index = &mut self.columns[at];
                let mut found = false;
                for key in &keys {
                    found |= index.take(key, slot);
                }
                if found {
                    index.subscriptions -= 1;
                }
                if index.subscriptions == 0 {
                    self.columns.swap_remove(at);
                }
            }
        }
    }

    /// Calls `each` once for every subscription an event whose column values `value` returns
    /// can match: the unindexed ones, and those kept under the event's value of an indexed
    /// column. A column the event does not carry matches no filter, so it adds nobody.
    pub(crate) fn candidates<'v>(
        &self,
        value: impl Fn(&str) -> Option<&'v Value>,
        mut each: impl FnMut(usize),
    ) {
        for &slot in &self.unindexed {
            each(slot);
        }
        for index in &self.columns {
            let Some(value) = value(&index.column) else {
                continue;
            };
            for &slot in index.under(value) {
                each(slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn candidates(index: &RouteIndex, event: &Value) -> Vec<usize> {
        let mut got = Vec::new();
        index.candidates(|c| event.get(c), |slot| got.push(slot));
        got.sort_unstable();
        got
    }

    #[test]
    fn equality_filters_are_indexed_by_value_the_rest_listed() {
        let mut index = RouteIndex::default();
        index.insert(0, &[Filter::eq("user", 1)]);
        index.insert(1, &[Filter::gt("score", 3), Filter::eq("user", 2.0)]);
        index.insert(2, &[Filter::is_in("tenant", ["a", "b"])]);
        index.insert(3, &[Filter::ne("user", 1)]);
        index.insert(4, &[]);
        index.insert(5, &[Filter::eq("user", json!([1]))]);
        assert_eq!(
            candidates(&index, &json!({"user": 1.0, "tenant": "b"})),
            [0, 2, 3, 4, 5]
        );
        assert_eq!(candidates(&index, &json!({"user": 2})), [1, 3, 4, 5]);
        assert_eq!(candidates(&index, &json!({"user": "1"})), [3, 4, 5]);
        assert_eq!(candidates(&index, &json!({"user": -0.0})), [3, 4, 5]);
        index.insert(6, &[Filter::eq("user", 0)]);
        assert_eq!(candidates(&index, &json!({"user": -0.0})), [3, 4, 5, 6]);
    }

    #[test]
    fn only_a_lone_indexed_filter_whose_key_decides_equality_settles() {
        let settles = |filters: &[Filter]| RouteIndex::settles(filters);
        assert!(settles(&[Filter::eq("user", 1)]));
        assert!(settles(&[Filter::eq("user", 1.5)]));
        assert!(settles(&[Filter::eq("user", -9_007_199_254_740_991i64)]));
        assert!(settles(&[Filter::is_in("tenant", ["a", "b"])]));
        assert!(settles(&[Filter::eq("flag", json!(null))]));
        // 2^53 + 1 shares its key with 2^53.
        assert!(!settles(&[Filter::eq("user", 9_007_199_254_740_992i64)]));
        assert!(!settles(&[Filter::is_in(
            "user",
            [json!(1), json!(u64::MAX)]
        )]));
        assert!(!settles(&[Filter::eq("user", json!([1]))]), "not indexed");
        assert!(!settles(&[Filter::ne("user", 1)]));
        assert!(!settles(&[]));
        assert!(!settles(&[Filter::eq("user", 1), Filter::gt("score", 3)]));
    }

    #[test]
    fn removing_takes_every_entry_away() {
        let mut index = RouteIndex::default();
        let filters = [Filter::is_in("user", [json!(1), json!(1.0), json!(2)])];
        index.insert(7, &filters);
        index.insert(8, &[]);
        index.insert(9, &[]);
        assert_eq!(candidates(&index, &json!({"user": 1})), [7, 8, 9], "once");
        index.remove(7, &filters);
        index.remove(8, &[]);
        assert_eq!(candidates(&index, &json!({"user": 1})), [9]);
        assert!(index.columns.is_empty(), "{:?}", index.columns);
        assert_eq!(index.unindexed_at, HashMap::from([(9, 0)]));
    }
}

#[cfg(test)]
mod properties {
    //! Indexed routing selects exactly what checking every subscription's filters selects.

    use super::*;
    use proptest::prelude::*;
    use serde_json::Map;

    const COLUMNS: [&str; 3] = ["a", "b", "c"];

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-3i64..4).prop_map(Value::from),
            (-3i64..4).prop_map(|n| Value::from(n as f64)),
            Just(Value::from(0.5)),
            Just(Value::from(-0.0)),
            Just(Value::from(u64::MAX)),
            Just(Value::from(9_007_199_254_740_993i64)),
            Just(Value::from(9_007_199_254_740_992i64)),
            Just(Value::from(9_007_199_254_740_992.0)),
            "[xy]{0,2}".prop_map(Value::String),
            Just(serde_json::json!([1])),
        ]
    }

    fn filter() -> impl Strategy<Value = Filter> {
        let column = prop::sample::select(&COLUMNS[..]);
        prop_oneof![
            (column.clone(), scalar()).prop_map(|(c, v)| Filter::eq(c, v)),
            (column.clone(), prop::collection::vec(scalar(), 0..4))
                .prop_map(|(c, v)| Filter::is_in(c, v)),
            (column.clone(), scalar()).prop_map(|(c, v)| Filter::ne(c, v)),
            (column.clone(), scalar()).prop_map(|(c, v)| Filter::gt(c, v)),
            column.prop_map(Filter::is_null),
        ]
    }

    /// An event: some of the columns, with values.
    fn event() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::vec((prop::sample::select(&COLUMNS[..]), scalar()), 0..4)
            .prop_map(|pairs| pairs.into_iter().map(|(c, v)| (c.to_string(), v)).collect())
    }

    fn matches(filters: &[Filter], event: &Map<String, Value>) -> bool {
        filters
            .iter()
            .all(|f| event.get(f.column()).is_some_and(|v| f.matches_value(v)))
    }

    proptest! {
        /// For random subscriptions (some removed again) and events, the candidates that pass
        /// their filters are exactly the subscriptions a linear scan selects, each named once.
        #[test]
        fn indexed_routing_selects_what_a_linear_scan_does(
            subscriptions in prop::collection::vec((prop::collection::vec(filter(), 0..3), any::<bool>()), 0..24),
            events in prop::collection::vec(event(), 1..16),
        ) {
            let mut index = RouteIndex::default();
            for (slot, (filters, _)) in subscriptions.iter().enumerate() {
                index.insert(slot, filters);
            }
            for (slot, (filters, removed)) in subscriptions.iter().enumerate() {
                if *removed {
                    index.remove(slot, filters);
                }
            }
            for event in &events {
                let linear: Vec<usize> = subscriptions
                    .iter()
                    .enumerate()
                    .filter(|(_, (filters, removed))| !removed && matches(filters, event))
                    .map(|(slot, _)| slot)
                    .collect();
                let mut named = Vec::new();
                index.candidates(|c| event.get(c), |slot| named.push(slot));
                let mut distinct = named.clone();
                distinct.sort_unstable();
                distinct.dedup();
                prop_assert_eq!(distinct.len(), named.len(), "a candidate named twice: {:?}", named);
                prop_assert!(named.iter().all(|s| !subscriptions[*s].1), "a removed one: {:?}", named);
                for s in &named {
                    let filters = &subscriptions[*s].0;
                    prop_assert!(
                        !RouteIndex::settles(filters) || matches(filters, event),
                        "settled without matching: {:?} for {:?}", filters, event
                    );
                }
                let selected: Vec<usize> = distinct
                    .into_iter()
                    .filter(|s| matches(&subscriptions[*s].0, event))
                    .collect();
                prop_assert_eq!(selected, linear);
            }
        }
    }
}
