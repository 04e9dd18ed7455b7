//! The rows a stretch of a source's change stream touched, table by table: what a
//! verification must compare again after that stretch, when it compared everything before it.
//!
//! Each insert, update and delete names its row by the replica identity the stream sends
//! (the key columns of the table's Relation message); an update that moves a row names both
//! keys. A table whose change cannot be tied to a key (a truncate, a key value not sent as
//! text, a key that changed shape mid-stretch) is *whole*: every row of it must be compared. A
//! change to a relation the stretch never described makes every table whole. Memory holds one
//! key per touched row, however often it changed.
//!
//! A stretch may leave out the transactions of some replication origins (a pipeline's own
//! apply sessions, when what matters is who *else* wrote): pgoutput names a transaction's
//! origin right after its Begin, and the changes of such a transaction are not counted (the
//! relations it describes still are, as later transactions rely on them).

use std::collections::{HashMap, HashSet};

use tokio::sync::watch;

use crate::cdc::decoder::{Message, Relation, Value};
use crate::cdc::slot::TemporarySlot;
use crate::cdc::CdcError;
use crate::pg::keyrange::{Key, Shape};
use crate::pg::{Lsn, TableName};

/// The rows the changes of one table touched.
#[derive(Debug, Clone)]
enum Rows {
    /// The key values (the stream's key columns, named by `names`, in the Relation's order).
    Keys {
        names: Vec<String>,
        keys: HashSet<Vec<String>>,
    },
    /// Compare the whole table.
    Whole,
}

/// How the stream describes a relation: its table (`schema.name`) and which columns carry
/// the key.
#[derive(Debug, Clone)]
struct Described {
    table: String,
    names: Vec<String>,
    positions: Vec<usize>,
}

/// The changes of a stretch being read in the background ([`Touched::follow`]).
pub struct Following {
    end: watch::Sender<Option<Lsn>>,
    task: tokio::task::JoinHandle<Result<Touched, CdcError>>,
}

impl Following {
    /// The rows touched by the transactions whose commit ends at or before `until`, once the
    /// stream has reached it.
    pub async fn until(self, until: Lsn) -> Result<Touched, CdcError> {
        let _ = self.end.send(Some(until));
        match self.task.await {
            Ok(touched) => touched,
            Err(e) => Err(CdcError::Protocol(format!(
                "reading the changes since the verification stopped: {e}"
            ))),
        }
    }
}

/// The rows touched so far; feed it the stretch's messages in order ([`Touched::absorb`]).
#[derive(Debug, Clone, Default)]
pub struct Touched {
    relations: HashMap<u32, Described>,
    /// By `schema.name`, as verification reports name tables.
    tables: HashMap<String, Rows>,
    /// A change arrived for a relation not described: any table may have changed.
    everything: bool,
    /// Transactions of these replication origins are left out.
    ignored_origins: HashSet<String>,
    /// The current transaction is of an ignored origin.
    skipping: bool,
}

impl Touched {
    /// Nothing touched yet; the transactions of `ignored_origins` will be left out.
    pub fn except_origins(ignored_origins: impl IntoIterator<Item = String>) -> Touched {
        Touched {
            ignored_origins: ignored_origins.into_iter().collect(),
            ..Touched::default()
        }
    }

    /// Starts reading the changes `slot` streams from its consistent point into `touched`, in
    /// the background, until [`Following::until`] says where the stretch ends.
    pub fn follow(self, slot: TemporarySlot) -> Following {
        let mut touched = self;
        let (end, told) = watch::channel(None);
        let task = tokio::spawn(async move {
            slot.changes_to(told, &mut |message| {
                touched.absorb(message);
                Ok(())
            })
            .await?;
            Ok(touched)
        });
        Following { end, task }
    }

    /// Takes the next message of the stream.
    pub fn absorb(&mut self, message: Message) {
        match message {
            Message::Begin { .. } => self.skipping = false,
            Message::Origin { name, .. } => self.skipping = self.ignored_origins.contains(&name),
            Message::Relation(rel) => self.describe(rel),
            _ if self.skipping => {}
            Message::Insert { relation, new } => self.touch(relation, &new),
            Message::Delete { relation, old } => self.touch(relation, &old),
            Message::Update { relation, old, new } => {
                if let Some(old) = old {
                    self.touch(relation, &old);
                }
                self.touch(relation, &new);
            }
            Message::Truncate { relations, .. } => {
                for relation in relations {
                    match self.relations.get(&relation) {
                        Some(d) => {
                            self.tables.insert(d.table.clone(), Rows::Whole);
                        }
                        None => self.everything = true,
                    }
                }
            }
            _ => {}
        }
    }

    fn describe(&mut self, rel: Relation) {
        let (positions, names): (Vec<usize>, Vec<String>) = rel
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, c)| (i, c.name.clone()))
            .unzip();
        self.relations.insert(
            rel.id,
            Described {
                table: TableName::new(rel.schema, rel.name).to_string(),
                names,
                positions,
            },
        );
    }

    fn touch(&mut self, relation: u32, row: &[Value]) {
        let Some(d) = self.relations.get(&relation) else {
            self.everything = true;
            return;
        };
        let key: Option<Vec<String>> = d
            .positions
            .iter()
            .map(|&i| match row.get(i) {
                Some(Value::Text(b)) => std::str::from_utf8(b).ok().map(str::to_string),
                _ => None,
            })
            .collect();
        let rows = self
            .tables
            .entry(d.table.clone())
            .or_insert_with(|| Rows::Keys {
                names: d.names.clone(),
                keys: HashSet::new(),
            });
        match (key, &mut *rows) {
            (Some(key), Rows::Keys { names, keys }) if *names == d.names && !names.is_empty() => {
                keys.insert(key);
            }
            (_, Rows::Whole) => {}
            _ => *rows = Rows::Whole,
        }
    }

    /// The rows touched by either stretch (of two databases holding the same tables).
    pub fn union(mut self, other: Touched) -> Touched {
        self.everything |= other.everything;
        for (table, rows) in other.tables {
            let merged = match (self.tables.remove(&table), rows) {
                (None, rows) => rows,
                (
                    Some(Rows::Keys { names, mut keys }),
                    Rows::Keys {
                        names: other_names,
                        keys: other_keys,
                    },
                ) if names == other_names => {
                    keys.extend(other_keys);
                    Rows::Keys { names, keys }
                }
                _ => Rows::Whole,
            };
            self.tables.insert(table, merged);
        }
        self
    }

    /// The keys of `shape`'s table that were touched, in the shape's key order (the stream's
    /// text of each value); `None` when the whole table must be compared.
    pub(crate) fn keys_of(&self, shape: &Shape) -> Option<Vec<Key>> {
        let names: Vec<String> = shape.key.iter().map(|k| k.name.clone()).collect();
        self.keys_in(&shape.table.to_string(), &names)
    }

    /// The keys of `table` (`schema.name`) that were touched, as values of `key_columns` in
    /// that order (the stream's text of each value); `None` when any row of it may have
    /// changed (a change not tied to a key, or one whose key lacks one of `key_columns`).
    pub fn keys_in(&self, table: &str, key_columns: &[String]) -> Option<Vec<Vec<String>>> {
        if self.everything {
            return None;
        }
        match self.tables.get(table) {
            None => Some(Vec::new()),
            Some(Rows::Whole) => None,
            Some(Rows::Keys { names, keys }) => {
                let positions: Vec<usize> = key_columns
                    .iter()
                    .map(|k| names.iter().position(|n| n == k))
                    .collect::<Option<_>>()?;
                Some(
                    keys.iter()
                        .map(|k| positions.iter().map(|&i| k[i].clone()).collect())
                        .collect(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::decoder::RelationColumn;
    use crate::pg::keyrange::Col;

    fn relation(id: u32, name: &str, key: &[&str]) -> Message {
        let columns = ["region", "id", "note"]
            .iter()
            .map(|c| RelationColumn {
                key: key.contains(c),
                name: c.to_string(),
                type_oid: 25,
                type_modifier: -1,
            })
            .collect();
        Message::Relation(Relation {
            id,
            schema: "public".into(),
            name: name.into(),
            replica_identity: b'd',
            columns,
        })
    }

    fn t(s: &str) -> Value {
        Value::Text(s.as_bytes().to_vec().into())
    }

    /// The shape of a table keyed on (id, region): the key's order differs from the columns'.
    fn shape(name: &str) -> Shape {
        let col = |n: &str| Col {
            name: n.into(),
            quoted: n.into(),
            type_name: "text".into(),
            generated: false,
        };
        Shape::new(
            &TableName::new("public", name),
            vec![col("region"), col("id"), col("note")],
            &["id".to_string(), "region".to_string()],
            None,
        )
    }

    fn sorted(mut keys: Vec<Key>) -> Vec<Key> {
        keys.sort();
        keys
    }

    #[test]
    fn each_changed_row_is_named_once_by_its_key_in_key_order() {
        let mut touched = Touched::default();
        touched.absorb(relation(1, "invoice", &["region", "id"]));
        touched.absorb(relation(2, "item", &["region", "id"]));
        touched.absorb(Message::Insert {
            relation: 1,
            new: vec![t("n"), t("1"), t("a")],
        });
        for note in ["b", "c"] {
            touched.absorb(Message::Update {
                relation: 1,
                old: None,
                new: vec![t("n"), t("1"), t(note)],
            });
        }
        // A key change names both rows; a delete sends the key alone.
        touched.absorb(Message::Update {
            relation: 1,
            old: Some(vec![t("s"), t("2"), Value::Null]),
            new: vec![t("s"), t("3"), t("x")],
        });
        touched.absorb(Message::Delete {
            relation: 1,
            old: vec![t("e"), t("4"), Value::Null],
        });
        let k = |id: &str, region: &str| vec![id.to_string(), region.to_string()];
        assert_eq!(
            sorted(touched.keys_of(&shape("invoice")).unwrap()),
            vec![k("1", "n"), k("2", "s"), k("3", "s"), k("4", "e")]
        );
        assert_eq!(touched.keys_of(&shape("item")), Some(vec![]));
        assert_eq!(touched.keys_of(&shape("other")), Some(vec![]));
    }

    #[test]
    fn transactions_of_ignored_origins_are_left_out_but_their_relations_kept() {
        let begin = || Message::Begin {
            final_lsn: 0,
            commit_time: 0,
            xid: 1,
        };
        let origin = |name: &str| Message::Origin {
            commit_lsn: 0,
            name: name.into(),
        };
        let insert = |id: &str| Message::Insert {
            relation: 1,
            new: vec![t("n"), t(id), t("a")],
        };
        let mut touched = Touched::except_origins(["invsync_p_b".to_string()]);
        // The pipeline's own transaction describes the relation.
        touched.absorb(begin());
        touched.absorb(origin("invsync_p_b"));
        touched.absorb(relation(1, "invoice", &["region", "id"]));
        touched.absorb(insert("1"));
        // Another origin's, then one without an origin: both counted.
        touched.absorb(begin());
        touched.absorb(origin("someone_else"));
        touched.absorb(insert("2"));
        touched.absorb(begin());
        touched.absorb(insert("3"));
        let k = |id: &str| vec![id.to_string(), "n".to_string()];
        assert_eq!(
            sorted(touched.keys_of(&shape("invoice")).unwrap()),
            vec![k("2"), k("3")]
        );
    }

    #[test]
    fn a_union_holds_both_stretches_rows_and_a_whole_table_stays_whole() {
        let insert = |relation, id: &str| Message::Insert {
            relation,
            new: vec![t("n"), t(id), t("a")],
        };
        let mut a = Touched::default();
        a.absorb(relation(1, "invoice", &["region", "id"]));
        a.absorb(relation(2, "item", &["region", "id"]));
        a.absorb(insert(1, "1"));
        a.absorb(insert(2, "1"));
        let mut b = Touched::default();
        // Another database numbers its relations its own way.
        b.absorb(relation(7, "invoice", &["region", "id"]));
        b.absorb(relation(8, "item", &["region", "id"]));
        b.absorb(relation(9, "carrier", &["region", "id"]));
        b.absorb(insert(7, "2"));
        b.absorb(Message::Truncate {
            options: 0,
            relations: vec![8],
        });
        b.absorb(insert(9, "5"));
        let both = a.union(b);
        let k = |id: &str| vec![id.to_string(), "n".to_string()];
        assert_eq!(
            sorted(both.keys_of(&shape("invoice")).unwrap()),
            vec![k("1"), k("2")]
        );
        assert_eq!(both.keys_of(&shape("item")), None);
        assert_eq!(both.keys_of(&shape("carrier")), Some(vec![k("5")]));
    }

    #[test]
    fn what_cannot_be_tied_to_a_key_makes_the_table_or_everything_whole() {
        let mut touched = Touched::default();
        touched.absorb(relation(1, "invoice", &["region", "id"]));
        touched.absorb(relation(2, "item", &["region", "id"]));
        touched.absorb(relation(3, "carrier", &["region", "id"]));
        touched.absorb(Message::Truncate {
            options: 0,
            relations: vec![1],
        });
        // A key value not sent as text.
        touched.absorb(Message::Insert {
            relation: 2,
            new: vec![t("n"), Value::Unchanged, t("a")],
        });
        // A key that is not the table's key (another replica identity index).
        touched.absorb(Message::Insert {
            relation: 3,
            new: vec![t("n"), t("1"), t("a")],
        });
        touched.absorb(relation(3, "carrier", &["note"]));
        touched.absorb(Message::Insert {
            relation: 3,
            new: vec![t("n"), t("2"), t("b")],
        });
        for table in ["invoice", "item", "carrier"] {
            assert_eq!(touched.keys_of(&shape(table)), None, "{table}");
        }
        assert_eq!(touched.keys_of(&shape("other")), Some(vec![]));
        touched.absorb(Message::Delete {
            relation: 9,
            old: vec![t("n")],
        });
        assert_eq!(touched.keys_of(&shape("other")), None);
    }
}
