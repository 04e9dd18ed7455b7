//! Net changes: what a run of row changes does to each row, so that a window of a batch is
//! applied as one set-based statement per table and kind (deletes, then updates, then inserts)
//! instead of statements in source order.
//!
//! Why the result is the same: the window's changes are applied inside one target transaction
//! (the batch), so no one sees the order in between. A row's final state depends only on the
//! changes to its key, kept here in order as one entry per key, provided that nothing ties rows
//! together on the target: no unique index or exclusion constraint besides the key's, no
//! foreign key checks or triggers that fire (the caller checks the target's catalog; see
//! `reorderable` in [`apply`](super::apply)). Deletes go first, so a key deleted and inserted
//! again, or moved by a key change, is free when its insert runs.
//!
//! A change the window cannot absorb without guessing (an insert of a key it holds, an update or
//! delete of a row it has deleted, a key change with unchanged TOAST values it does not hold)
//! is refused: the caller applies the window, then the change in source order, so the target
//! behaves as with in-order apply (reports the duplicate key, finds no row).
//!
//! The window is bounded ([`WINDOW_ROWS`], [`WINDOW_BYTES`]); a full window is applied and a new
//! one starts, so a source transaction larger than memory still streams through.

use foldhash::fast::RandomState;
use indexmap::map::Entry;
use indexmap::IndexMap;
use smallvec::SmallVec;

use super::apply::{Change, StreamRelation};
use crate::cdc::decoder::Value;

/// A window is applied once it has absorbed this many changes...
pub const WINDOW_ROWS: usize = 50_000;
/// ...or holds this many bytes of values.
pub const WINDOW_BYTES: usize = 16 * 1024 * 1024;

/// Keys a table's map has room for before it first grows (a busy stream fills windows with
/// thousands; growing from a few rows would rehash them again and again).
const TABLE_ROWS: usize = 4096;

/// The net change to one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Net {
    /// Not there before the window: insert it.
    Insert(Vec<Value>),
    /// There before the window: delete it, then insert this row with the same key.
    Replace(Vec<Value>),
    /// There before and after: set the columns that are not [`Value::Unchanged`] (the key
    /// columns hold the key).
    Update(Vec<Value>),
    /// There before, gone after; the key columns hold the key.
    Delete(Vec<Value>),
    /// Inserted and deleted again within the window: nothing to do.
    Nothing,
}

/// Keys hash with a per-process random seed: they come from the source's data, and a fixed
/// hash would let crafted keys collide.
type Map<K, V> = IndexMap<K, V, RandomState>;

/// A row's key: the values of its key columns. Most keys have one column, held without an
/// allocation of its own.
pub type Key = SmallVec<[Value; 1]>;

/// One table's net changes, by key, in order of each key's first change.
pub struct TableNet {
    pub rel: StreamRelation,
    pub rows: Map<Key, Net>,
}

/// Net changes of several tables, by relation id in order of their first change.
#[derive(Default)]
pub struct Window {
    tables: Map<u32, TableNet>,
    changes: usize,
    bytes: usize,
}

/// The key of `row`: its key columns' values; `None` if one was not sent.
fn key_of(rel: &StreamRelation, row: &[Value]) -> Option<Key> {
    let key: Key = rel
        .rel
        .columns
        .iter()
        .zip(row)
        .filter(|(c, _)| c.key)
        .map(|(_, v)| v.clone())
        .collect();
    (!key.is_empty() && !key.contains(&Value::Unchanged)).then_some(key)
}

/// Sets in `row` every value of `new` that was sent.
fn merge_into(row: &mut [Value], new: impl IntoIterator<Item = Value>) {
    for (r, n) in row.iter_mut().zip(new) {
        if !matches!(n, Value::Unchanged) {
            *r = n;
        }
    }
}

fn size(row: &[Value]) -> usize {
    row.iter()
        .map(|v| match v {
            Value::Text(b) | Value::Binary(b) => b.len() + 16,
            _ => 16,
        })
        .sum()
}

impl Window {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// True once the window should be applied.
    pub fn is_full(&self) -> bool {
        self.changes >= WINDOW_ROWS || self.bytes >= WINDOW_BYTES
    }

    /// Folds `change` into the window, or gives it back (and leaves the window unchanged)
    /// when it cannot. The caller checked that rows have `rel`'s width.
    pub fn absorb(&mut self, rel: &StreamRelation, change: Change) -> Result<(), Change> {
        let id = rel.rel.id;
        if let Some(t) = self.tables.get(&id) {
            if t.rel.generation != rel.generation {
                return Err(change);
            }
        }
        let bytes = size(change.row());
        let table = self.tables.entry(id).or_insert_with(|| TableNet {
            rel: rel.clone(),
            rows: Map::with_capacity_and_hasher(TABLE_ROWS, RandomState::default()),
        });
        let absorbed = match change {
            Change::Insert(new) => insert(table, rel, new).map_err(Change::Insert),
            Change::Delete(old) => delete(table, rel, old).map_err(Change::Delete),
            Change::Update { old, new } => {
                update(table, rel, old, new).map_err(|(old, new)| Change::Update { old, new })
            }
        };
        if table.rows.is_empty() {
            // Only a table entered just now for a refused change is empty: it is the last one.
            self.tables.pop();
        }
        if absorbed.is_ok() {
            self.changes += 1;
            self.bytes += bytes;
        }
        absorbed
    }

    /// Empties the window; its tables in order of their first change.
    pub fn take(&mut self) -> Vec<TableNet> {
        self.changes = 0;
        self.bytes = 0;
        std::mem::take(&mut self.tables).into_values().collect()
    }
}

/// Whether an insert of `key` can join: the key is free at this point of the window.
fn free(table: &TableNet, key: &[Value]) -> bool {
    matches!(
        table.rows.get(key),
        None | Some(Net::Delete(_)) | Some(Net::Nothing)
    )
}

/// Folds a change of one row into the entry of its key: `first` is its net change where the
/// window does not hold the key, `then` the net change after the one it holds, or the row given
/// back. The row is given back too when a key column was not sent.
fn fold(
    table: &mut TableNet,
    rel: &StreamRelation,
    row: Vec<Value>,
    first: fn(Vec<Value>) -> Net,
    then: fn(&Net, Vec<Value>) -> Result<Net, Vec<Value>>,
) -> Result<(), Vec<Value>> {
    let Some(key) = key_of(rel, &row) else {
        return Err(row);
    };
    match table.rows.entry(key) {
        Entry::Vacant(e) => {
            e.insert(first(row));
        }
        Entry::Occupied(mut e) => {
            let net = then(e.get(), row)?;
            e.insert(net);
        }
    }
    Ok(())
}

/// Folds an insert of `new`; gives the row back when it cannot.
fn insert(table: &mut TableNet, rel: &StreamRelation, new: Vec<Value>) -> Result<(), Vec<Value>> {
    fold(table, rel, new, Net::Insert, |net, new| match net {
        Net::Delete(_) => Ok(Net::Replace(new)),
        Net::Nothing => Ok(Net::Insert(new)),
        Net::Insert(_) | Net::Replace(_) | Net::Update(_) => Err(new),
    })
}

/// Folds a delete of the row `old` identifies; gives it back when it cannot.
fn delete(table: &mut TableNet, rel: &StreamRelation, old: Vec<Value>) -> Result<(), Vec<Value>> {
    fold(table, rel, old, Net::Delete, |net, old| match net {
        Net::Update(_) | Net::Replace(_) => Ok(Net::Delete(old)),
        Net::Insert(_) => Ok(Net::Nothing),
        // The row is gone already: in source order the delete finds nothing.
        Net::Delete(_) | Net::Nothing => Err(old),
    })
}

/// The rows of an update: the old key or row (when sent) and the new row.
type UpdateRows = (Option<Vec<Value>>, Vec<Value>);

/// Folds an update; gives its rows back when it cannot.
fn update(
    table: &mut TableNet,
    rel: &StreamRelation,
    old: Option<Vec<Value>>,
    new: Vec<Value>,
) -> Result<(), UpdateRows> {
    let Some(old_key) = key_of(rel, old.as_deref().unwrap_or(&new)) else {
        return Err((old, new));
    };
    let new_key = match key_of(rel, &new) {
        Some(k) => k,
        None if old.is_none() => old_key.clone(),
        None => return Err((old, new)),
    };
    if old_key == new_key {
        match table.rows.entry(old_key) {
            Entry::Vacant(e) => {
                e.insert(Net::Update(new));
            }
            Entry::Occupied(mut e) => match e.get_mut() {
                Net::Insert(row) | Net::Replace(row) | Net::Update(row) => merge_into(row, new),
                Net::Delete(_) | Net::Nothing => return Err((old, new)),
            },
        }
        return Ok(());
    }
    // A key change (rare, so its rows are copied): the old key's row is deleted and the new
    // key's inserted, with every value.
    let row = if new.contains(&Value::Unchanged) {
        match table.rows.get(&old_key) {
            Some(Net::Insert(row)) | Some(Net::Replace(row)) => {
                let mut row = row.clone();
                merge_into(&mut row, new.iter().cloned());
                row
            }
            _ => return Err((old, new)),
        }
    } else {
        new.clone()
    };
    let old_row = old.clone().unwrap_or_else(|| new.clone());
    let deletable = !matches!(
        table.rows.get(&old_key),
        Some(Net::Delete(_)) | Some(Net::Nothing)
    );
    if !deletable
        || !free(table, &new_key)
        || delete(table, rel, old_row).is_err()
        || insert(table, rel, row).is_err()
    {
        return Err((old, new));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::decoder::{Relation, RelationColumn};

    fn rel() -> StreamRelation {
        let col = |name: &str, key: bool| RelationColumn {
            key,
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        };
        StreamRelation::new(Relation {
            id: 7,
            schema: "public".into(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![col("id", true), col("a", false), col("b", false)],
        })
    }

    fn t(s: &str) -> Value {
        Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes()))
    }

    fn row(id: &str, a: &str, b: Value) -> Vec<Value> {
        vec![t(id), t(a), b]
    }

    /// An update whose old row was sent (`Some`, the key changed) or not.
    fn update_of(old: Option<&[Value]>, new: &[Value]) -> Change {
        Change::Update {
            old: old.map(<[Value]>::to_vec),
            new: new.to_vec(),
        }
    }

    fn nets(w: &mut Window) -> Vec<(Vec<Value>, Net)> {
        w.take()
            .into_iter()
            .flat_map(|t| t.rows.into_iter())
            .map(|(key, net)| (key.to_vec(), net))
            .collect()
    }

    #[test]
    fn insert_update_delete_of_one_key_fold_into_its_net_change() {
        let r = rel();
        let mut w = Window::default();
        let (r1, r2) = (row("1", "x", t("y")), row("2", "x", t("y")));
        assert!(w.absorb(&r, Change::Insert(r1.clone())).is_ok());
        let upd = row("1", "z", Value::Unchanged);
        assert!(w.absorb(&r, update_of(None, &upd)).is_ok());
        assert!(w.absorb(&r, Change::Insert(r2.clone())).is_ok());
        assert!(w.absorb(&r, Change::Delete(r2.clone())).is_ok());
        let got = nets(&mut w);
        assert_eq!(got[0], (vec![t("1")], Net::Insert(row("1", "z", t("y")))));
        assert_eq!(got[1], (vec![t("2")], Net::Nothing));
        assert!(w.is_empty());
    }

    #[test]
    fn delete_then_insert_replaces_and_updates_merge() {
        let r = rel();
        let mut w = Window::default();
        let old = row("1", "x", t("y"));
        assert!(w.absorb(&r, Change::Delete(old.clone())).is_ok());
        let new = row("1", "n", Value::Null);
        assert!(w.absorb(&r, Change::Insert(new.clone())).is_ok());
        let u1 = row("3", "p", Value::Unchanged);
        let u2 = vec![t("3"), Value::Unchanged, t("q")];
        assert!(w.absorb(&r, update_of(None, &u1)).is_ok());
        assert!(w.absorb(&r, update_of(None, &u2)).is_ok());
        let got = nets(&mut w);
        assert_eq!(got[0].1, Net::Replace(new));
        assert_eq!(got[1].1, Net::Update(row("3", "p", t("q"))));
    }

    #[test]
    fn a_key_change_becomes_a_delete_and_an_insert() {
        let r = rel();
        let mut w = Window::default();
        let old = vec![t("1"), Value::Null, Value::Null];
        let new = row("2", "a", t("b"));
        assert!(w.absorb(&r, update_of(Some(&old), &new)).is_ok());
        let got = nets(&mut w);
        assert_eq!(got[0], (vec![t("1")], Net::Delete(old)));
        assert_eq!(got[1], (vec![t("2")], Net::Insert(new)));
    }

    #[test]
    fn changes_it_cannot_fold_are_refused_and_leave_the_window_alone() {
        let r = rel();
        let mut w = Window::default();
        let r1 = row("1", "x", t("y"));
        assert!(w.absorb(&r, Change::Insert(r1.clone())).is_ok());
        // A second insert of the key: in source order the target reports the duplicate. The
        // refused change comes back whole, for the caller to apply in order.
        let Err(Change::Insert(back)) = w.absorb(&r, Change::Insert(r1.clone())) else {
            panic!("a second insert of a key the window holds was absorbed");
        };
        assert_eq!(back, r1);
        assert!(w.absorb(&r, Change::Delete(r1.clone())).is_ok());
        // Update and delete of a row the window deleted find nothing in source order.
        let upd = row("1", "z", t("z"));
        assert!(w.absorb(&r, update_of(None, &upd)).is_err());
        assert!(w.absorb(&r, Change::Delete(r1.clone())).is_err());
        // A key change with an unchanged TOAST value of a row the window does not hold.
        let old = vec![t("5"), Value::Null, Value::Null];
        let new = row("6", "a", Value::Unchanged);
        assert!(w.absorb(&r, update_of(Some(&old), &new)).is_err());
        let got = nets(&mut w);
        assert_eq!(got, vec![(vec![t("1")], Net::Nothing)]);
    }

    #[test]
    fn a_new_relation_definition_is_refused_until_the_window_is_applied() {
        let r = rel();
        let mut w = Window::default();
        let r1 = row("1", "x", t("y"));
        assert!(w.absorb(&r, Change::Insert(r1.clone())).is_ok());
        let again = StreamRelation::new(r.rel.clone());
        let r2 = row("2", "x", t("y"));
        assert!(w.absorb(&again, Change::Insert(r2.clone())).is_err());
        assert_eq!(w.take().len(), 1);
        assert!(w.absorb(&again, Change::Insert(r2.clone())).is_ok());
    }

    #[test]
    fn the_window_is_full_after_its_row_limit() {
        let r = rel();
        let mut w = Window::default();
        for i in 0..WINDOW_ROWS {
            let id = i.to_string();
            let r1 = row(&id, "x", Value::Null);
            assert!(!w.is_full());
            assert!(w.absorb(&r, Change::Insert(r1.clone())).is_ok());
        }
        assert!(w.is_full());
    }
}
