//! Applying decoded changes to one target.
//!
//! A [`Target`] turns changes into SQL and sends them inside one target transaction (a batch)
//! that may hold several source transactions, always whole ones: the batch ends only at a source
//! commit, and [`Target::flush`] writes the last commit's end LSN with
//! [`progress::record`](super::progress::record) before `COMMIT`. A batch that fails is rolled
//! back whole, so a source transaction is never half-visible and progress never runs ahead of
//! the data. Changes are sent as they arrive, in pieces of bounded size handed to the target's
//! [`Writer`], so a source transaction larger than memory streams through, and the target
//! executes one piece while the next is decoded and built.
//!
//! Apply sessions commit asynchronously (`synchronous_commit = off`, as PostgreSQL's apply
//! workers): a crash of the target may lose the last commits, always together with their
//! progress, so the restart position read from the target stays exact. `applied` is what the
//! target has committed, `durable` what its WAL flush position covers; only `durable` may be
//! confirmed to the source's slot.
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

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_postgres::Client;

use super::decoder::{
    Relation, RelationColumn, Value, TRUNCATE_CASCADE, TRUNCATE_RESTART_IDENTITY,
};
use super::writer::Writer;
use super::{copy::settings_sql, names, progress, schema, SyncError};
use crate::pg::{quote_ident, ConnInfo, Lsn, PgError, TableInfo, TableName};

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
    let mut out = String::new();
    push_literal(&mut out, v)?;
    Ok(out)
}

/// Appends `v` as an SQL literal (or NULL) to `out`, without a temporary string per value.
fn push_literal(out: &mut String, v: &Value) -> Result<(), SyncError> {
    match v {
        Value::Null => out.push_str("NULL"),
        Value::Text(b) => {
            let text = std::str::from_utf8(b)
                .map_err(|_| SyncError::Protocol("a column value is not valid UTF-8".into()))?;
            out.reserve(text.len() + 2);
            out.push('\'');
            for (i, part) in text.split('\'').enumerate() {
                if i > 0 {
                    out.push_str("''");
                }
                out.push_str(part);
            }
            out.push('\'');
        }
        Value::Binary(_) => {
            return Err(SyncError::Protocol(
                "a column value arrived in binary; invsync streams text values".into(),
            ))
        }
        Value::Unchanged => {
            return Err(SyncError::Protocol(
                "an unchanged TOAST value where a value is needed".into(),
            ))
        }
    }
    Ok(())
}

/// Appends the values of `row` as comma-separated literals.
fn push_literals<'a>(
    out: &mut String,
    row: impl Iterator<Item = &'a Value>,
) -> Result<(), SyncError> {
    for (i, v) in row.enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_literal(out, v)?;
    }
    Ok(())
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
    let mut out = String::new();
    push_literals(&mut out, key_columns(rel).map(|(i, _)| &row[i]))?;
    if out.is_empty() {
        return Err(SyncError::Protocol(format!(
            "{}: a change arrived without key columns",
            rel.table()
        )));
    }
    Ok(out)
}

/// One target of a pipeline and its open batch.
pub struct Target {
    pub name: String,
    pub conn: ConnInfo,
    pipeline: String,
    client: Option<Arc<Client>>,
    /// Executes the batch's pieces while the next ones are built.
    writer: Option<Writer>,
    /// End LSN of the last source commit this target has committed (possibly not yet flushed:
    /// apply sessions commit asynchronously).
    pub applied: Lsn,
    /// End LSN of the last source commit this target holds durably (its commit is flushed).
    pub durable: Lsn,
    /// Commits not known to be flushed yet: the target's WAL position after each commit, with
    /// the source end LSN it made applied.
    unflushed: VecDeque<(Lsn, Lsn)>,
    /// Whether `durable` was read from the target in this session.
    pub known: bool,
    /// Relation generations checked for schema drift on this target.
    checked: HashMap<u32, u64>,
    /// Per relation, the target's type of each column of the stream's definition (`None` where
    /// the target lacked the column when checked); set-based UPDATEs cast to them.
    types: HashMap<u32, Vec<Option<String>>>,
    batch: Batch,
    /// Scratch space for one row's literals, kept to spare an allocation per row.
    row: String,
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
            writer: None,
            applied: Lsn(0),
            durable: Lsn(0),
            unflushed: VecDeque::new(),
            known: false,
            checked: HashMap::new(),
            types: HashMap::new(),
            batch: Batch::default(),
            row: String::new(),
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
                // Asynchronous commit, as PostgreSQL's own apply workers: the slot is confirmed
                // only up to commits the target reports flushed (see `durable`).
                "{} SET standard_conforming_strings = on; SET synchronous_commit = off;",
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
        self.applied = p.applied;
        self.durable = p.applied;
        self.unflushed.clear();
        self.known = true;
        self.checked.clear();
        self.batch = Batch::default();
        let client = Arc::new(client);
        self.writer = Some(Writer::start(
            client.clone(),
            self.conn.clone(),
            format!("applying changes of pipeline {}", self.pipeline),
        ));
        self.client = Some(client);
        self.backoff = Duration::from_millis(500);
        Ok(())
    }

    /// Marks the target down after `error`; its open batch is lost (rolled back by the server)
    /// and it is retried with growing backoff.
    pub fn went_away(&mut self, error: &SyncError) {
        tracing::warn!(target = %self.name, "target went away: {error}; retrying in {:?}", self.backoff);
        self.disconnect();
        self.retry_at = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
    }

    /// True if this target still needs the source transaction that commits at `commit_lsn`.
    pub fn wants(&self, commit_lsn: Lsn) -> bool {
        self.is_up() && commit_lsn >= self.applied
    }

    /// True when changes are buffered, a target transaction is open, or a commit is not known
    /// to be flushed.
    pub fn pending(&self) -> bool {
        self.pending_batch() || !self.unflushed.is_empty()
    }

    /// True when only the flush of committed batches is awaited: [`Target::check_flushed`]
    /// can tell without waiting behind an open batch.
    pub fn awaits_flush(&self) -> bool {
        self.is_up() && !self.pending_batch() && !self.unflushed.is_empty()
    }

    /// Moves `durable` over the commits the target's WAL flush position `flushed` covers.
    fn flushed_up_to(&mut self, flushed: Lsn) {
        while let Some(&(wal, end)) = self.unflushed.front() {
            if wal > flushed {
                break;
            }
            self.durable = end;
            self.unflushed.pop_front();
        }
    }

    /// Asks the target how far its WAL is flushed and moves `durable` accordingly.
    pub async fn check_flushed(&mut self) -> Result<(), SyncError> {
        let client = self.client.as_ref().ok_or_else(|| gone(&self.conn))?;
        let flushed: String = client
            .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
            .await
            .map_err(|e| PgError::query("reading the WAL flush position", &self.conn, e))?
            .get(0);
        self.flushed_up_to(parse_lsn(&flushed, &self.conn)?);
        Ok(())
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
        let writer = self.writer.as_mut().ok_or_else(|| gone(&self.conn))?;
        let mut sql = std::mem::take(&mut self.batch.sql);
        if !self.batch.open {
            sql.insert_str(0, "BEGIN;\n");
        }
        writer.execute(sql).await?;
        self.batch.open = true;
        Ok(())
    }

    /// Sends what is buffered and waits until the target has run everything sent.
    async fn send_and_wait(&mut self) -> Result<(), SyncError> {
        self.send(true).await?;
        self.writer
            .as_mut()
            .ok_or_else(|| gone(&self.conn))?
            .wait()
            .await
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
        self.send_and_wait().await?;
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
            match self.send_and_wait().await {
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
        let mut values = std::mem::take(&mut self.row);
        values.clear();
        push_literals(&mut values, new.iter())?;
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
        self.row = values;
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
        let mut values = String::new();
        push_literals(
            &mut values,
            new.iter().zip(&set).filter(|(_, s)| **s).map(|(v, _)| v),
        )?;
        values.push_str(", ");
        values.push_str(&old_key);
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
        self.batch.sql.push_str(&values);
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

    /// Commits the batch with its progress: `applied` becomes the batch's last source commit.
    /// The commit is asynchronous unless `durably`; then, and also when no batch is open,
    /// `durable` catches up with `applied` before this returns.
    pub async fn flush(&mut self, durably: bool) -> Result<(), SyncError> {
        let end = self.batch.last_end;
        if let Some(end) = end.filter(|_| self.pending_batch()) {
            self.send_and_wait().await?;
            let client = self.client.as_ref().ok_or_else(|| gone(&self.conn))?;
            progress::record(
                client,
                &self.conn,
                &self.pipeline,
                end,
                self.batch.last_time,
            )
            .await?;
            // WAL is flushed in order: once the target's flush position passes the insert
            // position read right after this commit, the commit is durable.
            let commit = if durably {
                "SET LOCAL synchronous_commit = on; COMMIT;"
            } else {
                "COMMIT;"
            };
            let positions = wal_positions(
                client,
                &self.conn,
                &format!("{commit} SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"),
            )
            .await?;
            self.batch = Batch::default();
            self.applied = end;
            self.unflushed.push_back((positions.0, end));
            self.flushed_up_to(if durably { positions.0 } else { positions.1 });
        } else if end.is_some() {
            // Only source transactions without changes for this target: nothing to commit.
            self.batch = Batch::default();
        }
        if durably && !self.unflushed.is_empty() {
            // A transaction with a transaction id commits a record; committed synchronously, it
            // flushes all WAL before it, earlier asynchronous commits included.
            let client = self.client.as_ref().ok_or_else(|| gone(&self.conn))?;
            let positions = wal_positions(
                client,
                &self.conn,
                "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT; \
                 SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
            )
            .await?;
            self.flushed_up_to(positions.1);
        }
        Ok(())
    }

    /// True when changes are buffered or a target transaction is open.
    fn pending_batch(&self) -> bool {
        self.batch.open || !self.batch.sql.is_empty()
    }

    /// Drops the connection without committing (used when stopping after an error elsewhere).
    pub fn disconnect(&mut self) {
        self.writer = None;
        self.client = None;
        self.batch = Batch::default();
        self.unflushed.clear();
    }
}

/// Runs `sql` (simple protocol) whose last result row holds two LSNs (insert, flush position).
async fn wal_positions(
    client: &Client,
    conn: &ConnInfo,
    sql: &str,
) -> Result<(Lsn, Lsn), SyncError> {
    let messages = client
        .simple_query(sql)
        .await
        .map_err(|e| PgError::query("committing applied changes", conn, e))?;
    let row = messages
        .iter()
        .rev()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => Some(r),
            _ => None,
        })
        .ok_or_else(|| SyncError::Protocol(format!("{conn}: no WAL position after a commit")))?;
    let lsn = |i: usize| parse_lsn(row.get(i).unwrap_or_default(), conn);
    Ok((lsn(0)?, lsn(1)?))
}

fn parse_lsn(text: &str, conn: &ConnInfo) -> Result<Lsn, SyncError> {
    text.parse()
        .map_err(|_| SyncError::Protocol(format!("{conn}: {text:?} is not a WAL position")))
}

fn gone(conn: &ConnInfo) -> SyncError {
    SyncError::Pg(PgError::Connect {
        target: conn.to_string(),
        reason: "the connection was closed".into(),
    })
}
