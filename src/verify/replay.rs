//! The exact comparison of a target that a live pipeline feeds: the source is read at a cut C
//! (a temporary slot's exported snapshot), the target at the position T its pipeline has
//! applied (read in the same transaction as its rows, T >= C), and the source's changes
//! committed in (C, T] are decoded from the temporary slot and replayed onto the source's rows
//! at C. The result is the source as of T, which is exactly what the target must hold.
//!
//! For each key that differs between the two snapshots ([`Replay::decide`]):
//! - its source row at C with the changes applied equals the target row: the target only
//!   lags ([`Outcome::Lag`]);
//! - a value known after the replay differs from the target's, or the row's presence does:
//!   a proven difference ([`Outcome::Differs`]); a key untouched in (C, T] that differs is one;
//! - otherwise the replay does not know every value (an unchanged TOAST value of a row whose
//!   image is not known, a value in binary form, a change that names no key of the table, a
//!   row filter the replay cannot evaluate): [`Outcome::Undecided`], never a difference.
//!
//! Memory: only the changes of the keys asked about are kept, folded into one [`Delta`] per
//! key as they arrive, so a row rewritten thousands of times costs one row.

use std::collections::{HashMap, HashSet};

use super::side::RowText;
use crate::cdc::decoder::{Message, Relation, Value};
use crate::pg::keyrange::{Key, Shape};

/// One column of a row as the replay knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Cell {
    /// The value's text, `None` for NULL.
    Known(Option<String>),
    /// Changed in a way the stream does not show.
    Unknown,
}

/// What the changes after the cut did to one row, whatever the row was at the cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Delta {
    /// Updated in place: per column the value set, or `None` where it is as at the cut.
    Patch(Vec<Option<Cell>>),
    /// Inserted, deleted, or moved by a key change: the row afterwards (`None`: absent),
    /// whatever it was at the cut.
    Replace(Option<Vec<Cell>>),
}

/// What the replay decides for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The target holds the source's row as of its position.
    Lag,
    /// Proven different: the source's row as of the target's position (`None`: absent), with
    /// any value the replay does not know taken from the target, as it is not in question.
    Differs(Option<RowText>),
    /// Neither proven equal nor proven different.
    Undecided,
}

/// The table as the stream describes it: its relation id, and per stream column the compared
/// column it fills (`None`: not compared), and the stream columns of the key, in key order.
struct StreamTable {
    id: u32,
    columns: Vec<Option<usize>>,
    key: Option<Vec<usize>>,
}

/// Folds a table's decoded changes into one delta per key of interest, then decides each key.
pub(crate) struct Replay<'a> {
    shape: &'a Shape,
    wanted: &'a HashSet<Key>,
    /// Rows are compared under a filter the replay cannot evaluate on a changed row.
    filtered: bool,
    table: Option<StreamTable>,
    deltas: HashMap<Key, Delta>,
    /// A change of the table could not be tied to a key: it may have touched any of them.
    lost: bool,
}

impl<'a> Replay<'a> {
    /// A replay of `shape`'s table that keeps the changes of `wanted` keys.
    pub fn new(shape: &'a Shape, wanted: &'a HashSet<Key>, filtered: bool) -> Replay<'a> {
        Replay {
            shape,
            wanted,
            filtered,
            table: None,
            deltas: HashMap::new(),
            lost: false,
        }
    }

    /// Takes the next message of the stream, in commit order.
    pub fn absorb(&mut self, message: Message) {
        match message {
            Message::Relation(rel) => self.describe(&rel),
            Message::Insert { relation, new } if self.is_table(relation) => {
                let row = self.full(&new);
                self.set(&new, Delta::Replace(Some(row)));
            }
            Message::Delete { relation, old } if self.is_table(relation) => {
                self.set(&old, Delta::Replace(None));
            }
            Message::Update { relation, old, new } if self.is_table(relation) => {
                self.update(old, new)
            }
            Message::Truncate { relations, .. } if relations.iter().any(|&r| self.is_table(r)) => {
                for key in self.wanted {
                    self.deltas.insert(key.clone(), Delta::Replace(None));
                }
            }
            _ => {}
        }
    }

    fn describe(&mut self, rel: &Relation) {
        if rel.schema != self.shape.table.schema || rel.name != self.shape.table.name {
            return;
        }
        let columns: Vec<Option<usize>> = rel
            .columns
            .iter()
            .map(|c| self.shape.columns.iter().position(|s| s.name == c.name))
            .collect();
        let key = self
            .shape
            .key
            .iter()
            .map(|k| rel.columns.iter().position(|c| c.name == k.name))
            .collect();
        self.table = Some(StreamTable {
            id: rel.id,
            columns,
            key,
        });
    }

    fn is_table(&self, relation: u32) -> bool {
        self.table.as_ref().is_some_and(|t| t.id == relation)
    }

    /// The key of a row image; `None` when a key value was not sent as text.
    fn key_of(&self, row: &[Value]) -> Option<Key> {
        let positions = self.table.as_ref()?.key.as_ref()?;
        positions
            .iter()
            .map(|&i| match row.get(i) {
                Some(Value::Text(b)) => std::str::from_utf8(b).ok().map(str::to_string),
                _ => None,
            })
            .collect()
    }

    /// A row image as the compared columns: per column the value it sets, `None` where the
    /// image leaves it as it was (an unchanged TOAST value); a column the stream does not
    /// carry (a generated one) may have changed with the others, so it is unknown.
    fn cells(&self, row: &[Value]) -> Vec<Option<Cell>> {
        let mut cells = vec![Some(Cell::Unknown); self.shape.columns.len()];
        let Some(table) = &self.table else {
            return cells;
        };
        for (value, target) in row.iter().zip(&table.columns) {
            let Some(i) = *target else { continue };
            cells[i] = match value {
                Value::Null => Some(Cell::Known(None)),
                Value::Text(b) => Some(match std::str::from_utf8(b) {
                    Ok(s) => Cell::Known(Some(s.to_string())),
                    Err(_) => Cell::Unknown,
                }),
                Value::Binary(_) => Some(Cell::Unknown),
                Value::Unchanged => None,
            };
        }
        cells
    }

    /// A whole row: what an image leaves as it was is unknown.
    fn full(&self, row: &[Value]) -> Vec<Cell> {
        self.cells(row)
            .into_iter()
            .map(|c| c.unwrap_or(Cell::Unknown))
            .collect()
    }

    /// Records `delta` as the key's state, if the key is wanted.
    fn set(&mut self, row: &[Value], delta: Delta) {
        match self.key_of(row) {
            Some(key) if self.wanted.contains(&key) => {
                self.deltas.insert(key, delta);
            }
            Some(_) => {}
            None => self.lost = true,
        }
    }

    fn update(&mut self, old: Option<Vec<Value>>, new: Vec<Value>) {
        let old_key = old.as_deref().map(|o| self.key_of(o));
        let new_key = self.key_of(&new);
        let (key, moved_from) = match (old_key, new_key) {
            (Some(Some(old)), Some(new)) if old != new => (new, Some(old)),
            (_, Some(new)) => (new, None),
            (Some(Some(old)), None) => (old, None),
            _ => {
                self.lost = true;
                return;
            }
        };
        let cells = self.cells(&new);
        if let Some(from) = moved_from {
            // A key change: the old key's row is gone; the new key's row has the sent values,
            // and the old row's where none was sent, when the replay knows them.
            let before = match self.deltas.get(&from) {
                Some(Delta::Replace(Some(row))) => Some(row.clone()),
                _ => None,
            };
            if self.wanted.contains(&from) {
                self.deltas.insert(from, Delta::Replace(None));
            }
            if self.wanted.contains(&key) {
                let row = cells
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        c.or_else(|| before.as_ref().map(|b| b[i].clone()))
                            .unwrap_or(Cell::Unknown)
                    })
                    .collect();
                self.deltas.insert(key, Delta::Replace(Some(row)));
            }
            return;
        }
        if !self.wanted.contains(&key) {
            return;
        }
        let merged = match self.deltas.remove(&key) {
            None => Delta::Patch(cells),
            Some(Delta::Patch(mut patch)) => {
                for (p, c) in patch.iter_mut().zip(cells) {
                    if c.is_some() {
                        *p = c;
                    }
                }
                Delta::Patch(patch)
            }
            Some(Delta::Replace(Some(mut row))) => {
                for (r, c) in row.iter_mut().zip(cells) {
                    if let Some(c) = c {
                        *r = c;
                    }
                }
                Delta::Replace(Some(row))
            }
            // An update of a row the replay saw deleted: its unsent values are unknown.
            Some(Delta::Replace(None)) => Delta::Replace(Some(
                cells
                    .into_iter()
                    .map(|c| c.unwrap_or(Cell::Unknown))
                    .collect(),
            )),
        };
        self.deltas.insert(key, merged);
    }

    /// Decides `key` from its source row at the cut and its target row at the target's
    /// position (`None`: absent, or filtered out).
    pub fn decide(&self, key: &Key, at_cut: Option<&RowText>, target: Option<&RowText>) -> Outcome {
        let delta = self.deltas.get(key);
        let predicted: Option<Vec<Cell>> = match delta {
            None => at_cut.map(|row| row.iter().cloned().map(Cell::Known).collect()),
            Some(Delta::Replace(row)) => row.clone(),
            Some(Delta::Patch(patch)) => Some(match at_cut {
                Some(row) => row
                    .iter()
                    .zip(patch)
                    .map(|(v, p)| p.clone().unwrap_or_else(|| Cell::Known(v.clone())))
                    .collect(),
                // Not at the cut (under a filter: filtered out), yet updated.
                None => patch
                    .iter()
                    .map(|p| p.clone().unwrap_or(Cell::Unknown))
                    .collect(),
            }),
        };
        let differs = |row: Option<RowText>| {
            if self.lost {
                Outcome::Undecided
            } else {
                Outcome::Differs(row)
            }
        };
        match (predicted, target) {
            (None, None) => Outcome::Lag,
            (None, Some(_)) => differs(None),
            (Some(row), None) => {
                // A changed row may not pass the filter; a row with unknown values cannot be
                // written out.
                let known: Option<RowText> = row
                    .into_iter()
                    .map(|c| match c {
                        Cell::Known(v) => Some(v),
                        Cell::Unknown => None,
                    })
                    .collect();
                match known {
                    Some(row) if !(self.filtered && delta.is_some()) => differs(Some(row)),
                    _ => Outcome::Undecided,
                }
            }
            (Some(row), Some(target)) => {
                let mut unknown = false;
                let mut mismatch = false;
                for (cell, value) in row.iter().zip(target) {
                    match cell {
                        Cell::Known(v) if v != value => mismatch = true,
                        Cell::Known(_) => {}
                        Cell::Unknown => unknown = true,
                    }
                }
                if mismatch {
                    differs(Some(
                        row.into_iter()
                            .zip(target)
                            .map(|(c, t)| match c {
                                Cell::Known(v) => v,
                                Cell::Unknown => t.clone(),
                            })
                            .collect(),
                    ))
                } else if unknown {
                    Outcome::Undecided
                } else {
                    Outcome::Lag
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::decoder::RelationColumn;
    use crate::pg::keyrange::Col;
    use crate::pg::TableName;

    fn shape() -> Shape {
        let col = |name: &str| Col {
            name: name.into(),
            quoted: name.into(),
            type_name: "text".into(),
            generated: false,
        };
        Shape::new(
            &TableName::new("public", "teller"),
            vec![col("tid"), col("balance"), col("note")],
            &["tid".to_string()],
            None,
        )
    }

    fn relation() -> Message {
        let col = |name: &str, key: bool| RelationColumn {
            key,
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        Message::Relation(Relation {
            id: 9,
            schema: "public".into(),
            name: "teller".into(),
            replica_identity: b'd',
            // The stream's column order need not be the compared order.
            columns: vec![col("note", false), col("tid", true), col("balance", false)],
        })
    }

    fn t(s: &str) -> Value {
        Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    /// A stream row (note, tid, balance).
    fn image(note: Value, tid: &str, balance: &str) -> Vec<Value> {
        vec![note, t(tid), t(balance)]
    }

    /// A compared row (tid, balance, note).
    fn row(tid: &str, balance: &str, note: Option<&str>) -> RowText {
        vec![
            Some(tid.into()),
            Some(balance.into()),
            note.map(str::to_string),
        ]
    }

    fn key(k: &str) -> Key {
        vec![k.to_string()]
    }

    fn update(new: Vec<Value>) -> Message {
        Message::Update {
            relation: 9,
            old: None,
            new,
        }
    }

    #[test]
    fn a_hot_row_that_only_lags_is_lag_and_a_row_untouched_since_the_cut_differs() {
        let shape = shape();
        let wanted: HashSet<Key> = ["1", "2", "3"].iter().map(|k| key(k)).collect();
        let mut replay = Replay::new(&shape, &wanted, false);
        replay.absorb(relation());
        // Teller 1 is updated many times after the cut (note is TOASTed and not sent); the
        // target holds the last value: lag.
        for balance in ["110", "125", "90"] {
            replay.absorb(update(image(Value::Unchanged, "1", balance)));
        }
        // A change of a key nobody asked about is not kept.
        replay.absorb(update(image(Value::Unchanged, "7", "1")));
        assert_eq!(replay.deltas.len(), 1);
        let at_cut = row("1", "100", Some("long"));
        assert_eq!(
            replay.decide(
                &key("1"),
                Some(&at_cut),
                Some(&row("1", "90", Some("long")))
            ),
            Outcome::Lag
        );
        // The target has an intermediate value: it is not the source as of its position.
        assert_eq!(
            replay.decide(
                &key("1"),
                Some(&at_cut),
                Some(&row("1", "125", Some("long")))
            ),
            Outcome::Differs(Some(row("1", "90", Some("long"))))
        );
        // Untouched since the cut, and different: a real difference.
        assert_eq!(
            replay.decide(
                &key("2"),
                Some(&row("2", "5", None)),
                Some(&row("2", "6", None))
            ),
            Outcome::Differs(Some(row("2", "5", None)))
        );
        // Untouched and missing on the target.
        assert_eq!(
            replay.decide(&key("3"), Some(&row("3", "5", None)), None),
            Outcome::Differs(Some(row("3", "5", None)))
        );
    }

    #[test]
    fn inserts_deletes_and_key_changes_replace_the_row() {
        let shape = shape();
        let wanted: HashSet<Key> = ["1", "2", "4", "5"].iter().map(|k| key(k)).collect();
        let mut replay = Replay::new(&shape, &wanted, false);
        replay.absorb(relation());
        replay.absorb(Message::Insert {
            relation: 9,
            new: image(Value::Null, "4", "1"),
        });
        replay.absorb(update(image(Value::Unchanged, "4", "2")));
        replay.absorb(Message::Delete {
            relation: 9,
            old: vec![Value::Null, t("1"), Value::Null],
        });
        // Key 2 moves to 5, its note not sent: unknown, as the old row is not known.
        replay.absorb(Message::Update {
            relation: 9,
            old: Some(vec![Value::Null, t("2"), Value::Null]),
            new: image(Value::Unchanged, "5", "8"),
        });
        // Inserted after the cut, on the target with the last value: lag; extra rows too.
        assert_eq!(
            replay.decide(&key("4"), None, Some(&row("4", "2", None))),
            Outcome::Lag
        );
        assert_eq!(
            replay.decide(&key("1"), Some(&row("1", "0", None)), None),
            Outcome::Lag
        );
        // Deleted on the source, still on the target at a position past the delete.
        assert_eq!(
            replay.decide(
                &key("1"),
                Some(&row("1", "0", None)),
                Some(&row("1", "0", None))
            ),
            Outcome::Differs(None)
        );
        assert_eq!(
            replay.decide(&key("2"), Some(&row("2", "7", Some("n"))), None),
            Outcome::Lag
        );
        // The moved row's known values match; its note is unknown: undecided, not different.
        assert_eq!(
            replay.decide(&key("5"), None, Some(&row("5", "8", Some("n")))),
            Outcome::Undecided
        );
        // A known value that differs is proof even beside an unknown one.
        assert_eq!(
            replay.decide(&key("5"), None, Some(&row("5", "9", Some("n")))),
            Outcome::Differs(Some(row("5", "8", Some("n"))))
        );
        // Missing on the target, with a value unknown: it cannot be written out.
        assert_eq!(replay.decide(&key("5"), None, None), Outcome::Undecided);
    }

    #[test]
    fn what_the_stream_does_not_show_is_undecided_never_different() {
        let shape = shape();
        let wanted: HashSet<Key> = ["1", "2"].iter().map(|k| key(k)).collect();
        // A change whose key was not sent as text might have touched any row.
        let mut replay = Replay::new(&shape, &wanted, false);
        replay.absorb(relation());
        replay.absorb(Message::Delete {
            relation: 9,
            old: vec![
                Value::Null,
                Value::Binary(bytes::Bytes::from_static(b"\0")),
                Value::Null,
            ],
        });
        assert_eq!(
            replay.decide(
                &key("2"),
                Some(&row("2", "5", None)),
                Some(&row("2", "6", None))
            ),
            Outcome::Undecided
        );
        // Under a row filter, a changed row absent from the target may just be filtered out.
        let mut replay = Replay::new(&shape, &wanted, true);
        replay.absorb(relation());
        replay.absorb(update(image(t("x"), "1", "3")));
        assert_eq!(
            replay.decide(&key("1"), Some(&row("1", "1", None)), None),
            Outcome::Undecided
        );
        // A truncate empties the table.
        replay.absorb(Message::Truncate {
            options: 0,
            relations: vec![9],
        });
        assert_eq!(
            replay.decide(&key("1"), Some(&row("1", "1", None)), None),
            Outcome::Lag
        );
        // Changes of another table with the same name in another schema are not this table's.
        let mut replay = Replay::new(&shape, &wanted, false);
        let Message::Relation(mut other) = relation() else {
            unreachable!()
        };
        other.schema = "audit".into();
        replay.absorb(Message::Relation(other));
        replay.absorb(update(image(t("x"), "1", "3")));
        assert!(replay.deltas.is_empty() && !replay.lost);
    }
}
