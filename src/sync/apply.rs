//! Applying decoded changes to one target.
//!
//! A [`Target`] turns changes into SQL and sends them inside one target transaction (a batch)
//! that may hold several source transactions, always whole ones: the batch ends only at a source
//! commit, and [`Target::flush`] writes the last commit's end LSN with
//! [`progress::record`](super::progress::record) before `COMMIT`. A batch that fails is rolled
//! back whole, so a source transaction is never half-visible and progress never runs ahead of
//! the data. Changes are sent as they arrive, in pieces of bounded size, so a source transaction
//! larger than memory streams through.
//!
//! Consecutive changes of one kind to one table are merged into one set-based statement (a
//! multi-row INSERT, `DELETE .. WHERE (key) IN (..)`, `UPDATE .. FROM (VALUES ..)`), so the
//! target parses and plans once per group instead of once per row. Only neighbours merge, so
//! changes keep their source order; an UPDATE group is closed before a row whose old or new key
//! it already touched, because one set-based UPDATE sees each row once and would lose the later
//! effect.
//!
//! Values are written in their text form (as pgoutput sends them) as SQL literals, which the
//! target reads with each column's input function, the way PostgreSQL's own apply does; both
//! sessions pin the formats ([`SESSION_SETTINGS`](super::slot::SESSION_SETTINGS)). Columns sent as
//! unchanged TOAST are left out of the UPDATE, so they keep their value. Apply sessions carry the
//! replication origin [`names::origin`](super::names::origin), so what they write is recognisable
//! and not streamed back by a pipeline in the opposite direction.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::decoder::{
    Relation, RelationColumn, Value, TRUNCATE_CASCADE, TRUNCATE_RESTART_IDENTITY,
};
use super::{copy::settings_sql, names, progress, schema, SyncError};
use crate::pg::{quote_ident, quote_literal, ConnInfo, Lsn, PgError, TableInfo, TableName};

/// SQL is sent to the target once this much is buffered, also inside a transaction.
const PIECE_BYTES: usize = 256 * 1024;

/// Numbers relation definitions across the whole process, so a target's record of what it
/// checked for drift never matches a definition from another stream session.
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// A relation known to the stream, with a generation that changes with each new definition.
#[derive(Debug, Clone)]
pub struct StreamRelation {
    pub rel: Relation,
    pub generation: u64,
    quoted: String,
    full_identity: bool,
}

impl StreamRelation {
    pub fn new(rel: Relation) -> Self {
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let quoted = TableName::new(&rel.schema, &rel.name).quoted();
        let full_identity = rel.replica_identity == b'f';
        StreamRelation {
            rel,
            generation,
            quoted,
            full_identity,
        }
    }

    pub fn table(&self) -> TableName {
        TableName::new(&self.rel.schema, &self.rel.name)
    }
}

/// A change to apply, borrowed from the decoded message.
#[derive(Clone, Copy)]
pub enum Change<'a> {
    Insert(&'a [Value]),
    Update {
        old: Option<&'a [Value]>,
        new: &'a [Value],
    },
    Delete(&'a [Value]),
}

fn literal(v: &Value) -> Result<String, SyncError> {
    match v {
        Value::Null => Ok("NULL".into()),
        Value::Text(b) => std::str::from_utf8(b)
            .map(quote_literal)
            .map_err(|_| SyncError::Protocol("a column value is not valid UTF-8".into())),
        Value::Binary(_) => Err(SyncError::Protocol(
            "a column value arrived in binary; invsync streams text values".into(),
        )),
        Value::Unchanged => Err(SyncError::Protocol(
            "an unchanged TOAST value where a value is needed".into(),
        )),
    }
}

fn check_width(rel: &StreamRelation, values: &[Value]) -> Result<(), SyncError> {
    if values.len() != rel.rel.columns.len() {
        return Err(SyncError::Protocol(format!(
            "{}: a row has {} values, the relation {} columns",
            rel.table(),
            values.len(),
            rel.rel.columns.len()
        )));
    }
    Ok(())
}

/// The WHERE clause that finds the old row: by key columns, or, with REPLICA IDENTITY FULL, the
/// first row equal in every sent column.
fn row_filter(rel: &StreamRelation, old: &[Value]) -> Result<String, SyncError> {
    check_width(rel, old)?;
    let mut conds = Vec::new();
    for (col, v) in rel.rel.columns.iter().zip(old) {
        if rel.full_identity {
            match v {
                Value::Unchanged => {}
                Value::Null => conds.push(format!("{} IS NULL", quote_ident(&col.name))),
                _ => conds.push(format!(
                    "{}::text = {}",
                    quote_ident(&col.name),
                    literal(v)?
                )),
            }
        } else if col.key {
            conds.push(format!("{} = {}", quote_ident(&col.name), literal(v)?));
        }
    }
    if conds.is_empty() {
        return Err(SyncError::Protocol(format!(
            "{}: a change arrived without key columns",
            rel.table()
        )));
    }
    Ok(if rel.full_identity {
        format!(
            "ctid = (SELECT ctid FROM {} WHERE {} LIMIT 1)",
            rel.quoted,
            conds.join(" AND ")
        )
    } else {
        conds.join(" AND ")
    })
}

/// The key columns of `rel` with their positions.
fn key_columns(rel: &StreamRelation) -> impl Iterator<Item = (usize, &RelationColumn)> {
    rel.rel.columns.iter().enumerate().filter(|(_, c)| c.key)
}

/// The key values of a row as comma-separated literals.
fn key_literals(rel: &StreamRelation, row: &[Value]) -> Result<String, SyncError> {
    let keys: Result<Vec<String>, _> = key_columns(rel).map(|(i, _)| literal(&row[i])).collect();
    let keys = keys?;
    if keys.is_empty() {
        return Err(SyncError::Protocol(format!(
            "{}: a change arrived without key columns",
            rel.table()
        )));
    }
    Ok(keys.join(", "))
}

/// One target of a pipeline and its open batch.
pub struct Target {
    pub name: String,
    pub conn: ConnInfo,
    pipeline: String,
    client: Option<Client>,
    /// End LSN of the last source commit this target holds (committed, durable).
    pub durable: Lsn,
    /// Whether `durable` was read from the target in this session.
    pub known: bool,
    /// Relation generations checked for schema drift on this target.
    checked: HashMap<u32, u64>,
    /// Per relation, the target's type of each column of the stream's definition (`None` where
    /// the target lacked the column when checked); set-based UPDATEs cast to them.
    types: HashMap<u32, Vec<Option<String>>>,
    batch: Batch,
    /// When to try reconnecting after the target went away.
    pub retry_at: Instant,
    backoff: Duration,
}

#[derive(Default)]
struct Batch {
    /// `BEGIN` was sent: a target transaction is open.
    open: bool,
    sql: String,
    /// The set-based statement still open at the end of `sql`.
    group: Option<Group>,
    last_end: Option<Lsn>,
    last_time: Option<DateTime<Utc>>,
    rows: usize,
}

/// A set-based statement that more rows may join: same relation, same [`GroupKind`].
struct Group {
    rel: u32,
    kind: GroupKind,
    /// What closes the statement after its last row.
    suffix: String,
    /// Key literals an UPDATE group touched (old and new keys).
    keys: HashSet<String>,
}

#[derive(PartialEq, Eq)]
enum GroupKind {
    Insert,
    Delete,
    /// An UPDATE setting the columns flagged `true`.
    Update(Vec<bool>),
}

/// Microseconds since 2000-01-01 (PostgreSQL's epoch) as a time.
pub fn pg_time(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros.checked_add(946_684_800_000_000)?)
}

impl Target {
    pub fn new(pipeline: &str, name: &str, conn: ConnInfo) -> Self {
        Target {
            name: name.to_string(),
            conn,
            pipeline: pipeline.to_string(),
            client: None,
            durable: Lsn(0),
            known: false,
            checked: HashMap::new(),
            types: HashMap::new(),
            batch: Batch::default(),
            retry_at: Instant::now(),
            backoff: Duration::from_millis(500),
        }
    }

    pub fn is_up(&self) -> bool {
        self.client.is_some()
    }

    /// Connects, prepares the apply session (formats, origin) and reads the applied LSN.
    pub async fn connect(&mut self) -> Result<(), SyncError> {
        let client = self.conn.connect().await?;
        let conn = self.conn.clone();
        let q = |what: &'static str| {
            let conn = conn.clone();
            move |e| PgError::query(what, &conn, e)
        };
        client
            .batch_execute(&format!(
                "{} SET standard_conforming_strings = on;",
                settings_sql()
            ))
            .await
            .map_err(q("preparing the apply session"))?;
        // As PostgreSQL's apply workers do: user triggers and foreign keys stay quiet, the source
        // already checked them. Needs superuser; without it they fire.
        if let Err(e) = client
            .batch_execute("SET session_replication_role = replica")
            .await
        {
            tracing::debug!(target = %self.name, "session_replication_role not set: {}", crate::pg::describe(&e));
        }
        let origin = names::origin(&self.pipeline, &self.name);
        progress::ensure_origin(&client, &self.conn, &origin).await?;
        if let Err(e) = client
            .execute("SELECT pg_replication_origin_session_setup($1)", &[&origin])
            .await
        {
            return Err(
                if e.code() == Some(&tokio_postgres::error::SqlState::OBJECT_IN_USE) {
                    SyncError::OriginInUse {
                        origin,
                        target: self.conn.to_string(),
                    }
                } else {
                    PgError::query("taking the pipeline's replication origin", &self.conn, e).into()
                },
            );
        }
        let p = progress::load(&client, &self.conn, &self.pipeline)
            .await?
            .filter(|p| p.state == progress::State::Streaming)
            .ok_or_else(|| SyncError::NotSetUp {
                pipeline: self.pipeline.clone(),
                target: self.conn.to_string(),
            })?;
        self.durable = p.applied;
        self.known = true;
        self.checked.clear();
        self.batch = Batch::default();
        self.client = Some(client);
        self.backoff = Duration::from_millis(500);
        Ok(())
    }

    /// Marks the target down after `error`; its open batch is lost (rolled back by the server)
    /// and it is retried with growing backoff.
    pub fn went_away(&mut self, error: &SyncError) {
        tracing::warn!(target = %self.name, "target went away: {error}; retrying in {:?}", self.backoff);
        self.client = None;
        self.batch = Batch::default();
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
    }

    /// True if this target still needs the source transaction that commits at `commit_lsn`.
    pub fn wants(&self, commit_lsn: Lsn) -> bool {
        self.is_up() && commit_lsn >= self.durable
    }

    /// True when changes are buffered or a target transaction is open.
    pub fn pending(&self) -> bool {
        self.batch.open || !self.batch.sql.is_empty()
    }

    /// Rows in the open batch.
    pub fn batch_rows(&self) -> usize {
        self.batch.rows
    }

    async fn send(&mut self, force: bool) -> Result<(), SyncError> {
        if self.batch.sql.is_empty() || (!force && self.batch.sql.len() < PIECE_BYTES) {
            return Ok(());
        }
        self.close_group();
        let client = self.client.as_ref().ok_or_else(|| gone(&self.conn))?;
        let mut sql = std::mem::take(&mut self.batch.sql);
        if !self.batch.open {
            sql.insert_str(0, "BEGIN;\n");
        }
        client.batch_execute(&sql).await.map_err(|e| {
            PgError::query(
                format!("applying changes of pipeline {}", self.pipeline),
                &self.conn,
                e,
            )
        })?;
        self.batch.open = true;
        Ok(())
    }

    /// Ends an open set-based statement (before a relation's definition changes).
    pub fn close_group(&mut self) {
        if let Some(g) = self.batch.group.take() {
            self.batch.sql.push_str(&g.suffix);
            self.batch.sql.push_str(";\n");
        }
    }

    /// Starts a row of the group `kind` on `rel`: continues the open group, or closes it and
    /// writes `header` to open a new one. The caller then writes the row's parenthesised values.
    fn join_group(&mut self, rel: u32, kind: GroupKind, header: impl FnOnce() -> (String, String)) {
        match &self.batch.group {
            Some(g) if g.rel == rel && g.kind == kind => self.batch.sql.push_str(",\n"),
            _ => {
                self.close_group();
                let (header, suffix) = header();
                self.batch.sql.push_str(&header);
                self.batch.group = Some(Group {
                    rel,
                    kind,
                    suffix,
                    keys: HashSet::new(),
                });
            }
        }
    }

    /// Adds to the target the columns the source has and the target lacks, once per relation
    /// definition. Fails with the DDL to run when that is not possible.
    pub async fn check_drift(
        &mut self,
        rel: &StreamRelation,
        source: &Client,
        source_conn: &ConnInfo,
    ) -> Result<(), SyncError> {
        if self.checked.get(&rel.rel.id) == Some(&rel.generation) {
            return Ok(());
        }
        let table = rel.table();
        let client = self.client.as_ref().ok_or_else(|| gone(&self.conn))?;
        let have = TableInfo::load(client, &self.conn, &table).await?;
        let types = rel
            .rel
            .columns
            .iter()
            .map(|c| {
                have.columns
                    .iter()
                    .find(|h| h.name == c.name)
                    .map(|h| h.type_name.clone())
            })
            .collect();
        self.types.insert(rel.rel.id, types);
        let missing: Vec<&str> = rel
            .rel
            .columns
            .iter()
            .filter(|c| !have.columns.iter().any(|h| h.name == c.name))
            .map(|c| c.name.as_str())
            .collect();
        if !missing.is_empty() {
            let src = TableInfo::load(source, source_conn, &table).await?;
            let mut ddl = Vec::new();
            for name in &missing {
                match src.columns.iter().find(|c| c.name == *name) {
                    Some(c) => ddl.push(schema::add_column_sql(&src, c)),
                    None => {
                        return Err(SyncError::SchemaDrift {
                            table: table.to_string(),
                            target: self.conn.to_string(),
                            ddl: format!(
                                "ALTER TABLE {} ADD COLUMN {} <type>",
                                table.quoted(),
                                quote_ident(name)
                            ),
                            reason: format!(
                                "the source sends column {name}, which is no longer in its catalog"
                            ),
                        })
                    }
                }
            }
            let ddl = ddl.join(";\n");
            self.batch.sql.push_str(&ddl);
            self.batch.sql.push_str(";\n");
            match self.send(true).await {
                Ok(()) => {
                    tracing::info!(table = %table, target = %self.name, "added column(s) {}: {ddl}", missing.join(", "))
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    return Err(SyncError::SchemaDrift {
                        table: table.to_string(),
                        target: self.conn.to_string(),
                        ddl,
                        reason: e.to_string(),
                    })
                }
            }
        }
        self.checked.insert(rel.rel.id, rel.generation);
        Ok(())
    }

    /// Adds one row change to the batch.
    pub async fn change(
        &mut self,
        rel: &StreamRelation,
        change: Change<'_>,
    ) -> Result<(), SyncError> {
        match change {
            Change::Insert(new) => self.insert(rel, new)?,
            Change::Update { old, new } => self.update(rel, old, new)?,
            Change::Delete(old) => self.delete(rel, old)?,
        }
        self.batch.rows += 1;
        self.send(false).await
    }

    fn insert(&mut self, rel: &StreamRelation, new: &[Value]) -> Result<(), SyncError> {
        check_width(rel, new)?;
        let values: Result<Vec<String>, _> = new.iter().map(literal).collect();
        let values = values?.join(", ");
        self.join_group(rel.rel.id, GroupKind::Insert, || {
            let names: Vec<String> = rel
                .rel
                .columns
                .iter()
                .map(|c| quote_ident(&c.name))
                .collect();
            (
                format!("INSERT INTO {} ({}) VALUES\n", rel.quoted, names.join(", ")),
                String::new(),
            )
        });
        self.batch.sql.push('(');
        self.batch.sql.push_str(&values);
        self.batch.sql.push(')');
        Ok(())
    }

    fn delete(&mut self, rel: &StreamRelation, old: &[Value]) -> Result<(), SyncError> {
        if rel.full_identity {
            let filter = row_filter(rel, old)?;
            self.close_group();
            self.batch
                .sql
                .push_str(&format!("DELETE FROM {} WHERE {};\n", rel.quoted, filter));
            return Ok(());
        }
        check_width(rel, old)?;
        let key = key_literals(rel, old)?;
        self.join_group(rel.rel.id, GroupKind::Delete, || {
            let names: Vec<String> = key_columns(rel)
                .map(|(_, c)| quote_ident(&c.name))
                .collect();
            (
                format!(
                    "DELETE FROM {} WHERE ({}) IN (\n",
                    rel.quoted,
                    names.join(", ")
                ),
                ")".into(),
            )
        });
        self.batch.sql.push('(');
        self.batch.sql.push_str(&key);
        self.batch.sql.push(')');
        Ok(())
    }

    fn update(
        &mut self,
        rel: &StreamRelation,
        old: Option<&[Value]>,
        new: &[Value],
    ) -> Result<(), SyncError> {
        check_width(rel, new)?;
        let set: Vec<bool> = new.iter().map(|v| *v != Value::Unchanged).collect();
        if !set.contains(&true) {
            return Ok(());
        }
        let types = self.types.get(&rel.rel.id).filter(|t| {
            t.len() == set.len()
                && t.iter()
                    .zip(&rel.rel.columns)
                    .zip(&set)
                    .all(|((t, c), s)| t.is_some() || !(*s || c.key))
        });
        let Some(types) = types.filter(|_| !rel.full_identity).cloned() else {
            // One statement for this row: REPLICA IDENTITY FULL finds rows by every column, and
            // without the target's types the values cannot be cast.
            let mut sets = Vec::new();
            for (col, v) in rel.rel.columns.iter().zip(new) {
                if *v != Value::Unchanged {
                    sets.push(format!("{} = {}", quote_ident(&col.name), literal(v)?));
                }
            }
            let filter = row_filter(rel, old.unwrap_or(new))?;
            self.close_group();
            self.batch.sql.push_str(&format!(
                "UPDATE {} SET {} WHERE {};\n",
                rel.quoted,
                sets.join(", "),
                filter
            ));
            return Ok(());
        };
        let old_key = key_literals(rel, old.unwrap_or(new))?;
        let new_key = match old {
            Some(_) if key_columns(rel).all(|(i, _)| new[i] != Value::Unchanged) => {
                key_literals(rel, new)?
            }
            _ => old_key.clone(),
        };
        let kind = GroupKind::Update(set.clone());
        if let Some(g) = &self.batch.group {
            if g.rel == rel.rel.id
                && g.kind == kind
                && (g.keys.contains(&old_key) || g.keys.contains(&new_key))
            {
                self.close_group();
            }
        }
        let mut values = Vec::new();
        for (v, s) in new.iter().zip(&set) {
            if *s {
                values.push(literal(v)?);
            }
        }
        values.push(old_key.clone());
        self.join_group(rel.rel.id, kind, || {
            let cols = &rel.rel.columns;
            let mut sets = Vec::new();
            let mut names = Vec::new();
            for (i, c) in cols.iter().enumerate().filter(|(i, _)| set[*i]) {
                let ty = types[i].as_deref().unwrap_or("text");
                sets.push(format!("{} = v.n{i}::{ty}", quote_ident(&c.name)));
                names.push(format!("n{i}"));
            }
            let mut conds = Vec::new();
            for (i, c) in key_columns(rel) {
                let ty = types[i].as_deref().unwrap_or("text");
                conds.push(format!("t.{} = v.k{i}::{ty}", quote_ident(&c.name)));
                names.push(format!("k{i}"));
            }
            (
                format!(
                    "UPDATE {} AS t SET {} FROM (VALUES\n",
                    rel.quoted,
                    sets.join(", ")
                ),
                format!(") AS v({}) WHERE {}", names.join(", "), conds.join(" AND ")),
            )
        });
        self.batch.sql.push('(');
        self.batch.sql.push_str(&values.join(", "));
        self.batch.sql.push(')');
        if let Some(g) = self.batch.group.as_mut() {
            g.keys.insert(old_key);
            g.keys.insert(new_key);
        }
        Ok(())
    }

    /// Adds a TRUNCATE of `rels` to the batch.
    pub async fn truncate(
        &mut self,
        rels: &[&StreamRelation],
        options: u8,
    ) -> Result<(), SyncError> {
        if rels.is_empty() {
            return Ok(());
        }
        self.close_group();
        let names: Vec<&str> = rels.iter().map(|r| r.quoted.as_str()).collect();
        let mut sql = format!("TRUNCATE {}", names.join(", "));
        if options & TRUNCATE_RESTART_IDENTITY != 0 {
            sql.push_str(" RESTART IDENTITY");
        }
        if options & TRUNCATE_CASCADE != 0 {
            sql.push_str(" CASCADE");
        }
        sql.push_str(";\n");
        self.batch.sql.push_str(&sql);
        self.batch.rows += 1;
        self.send(false).await
    }

    /// Notes the end of a source transaction whose changes were added.
    pub fn end_source_transaction(&mut self, end_lsn: Lsn, commit_time: Option<DateTime<Utc>>) {
        self.batch.last_end = Some(end_lsn);
        self.batch.last_time = commit_time;
    }

    /// Commits the batch with its progress. Afterwards `durable` is the batch's last source
    /// commit.
    pub async fn flush(&mut self) -> Result<(), SyncError> {
        let Some(end) = self.batch.last_end else {
            return Ok(());
        };
        if !self.batch.open && self.batch.sql.is_empty() {
            self.batch = Batch::default();
            return Ok(());
        }
        self.send(true).await?;
        let client = self.client.as_ref().ok_or_else(|| gone(&self.conn))?;
        progress::record(
            client,
            &self.conn,
            &self.pipeline,
            end,
            self.batch.last_time,
        )
        .await?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|e| PgError::query("committing applied changes", &self.conn, e))?;
        self.durable = end;
        self.batch = Batch::default();
        Ok(())
    }

    /// Drops the connection without committing (used when stopping after an error elsewhere).
    pub fn disconnect(&mut self) {
        self.client = None;
        self.batch = Batch::default();
    }
}

fn gone(conn: &ConnInfo) -> SyncError {
    SyncError::Pg(PgError::Connect {
        target: conn.to_string(),
        reason: "the connection was closed".into(),
    })
}
