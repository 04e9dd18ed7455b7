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
//! Consecutive changes of one kind to one table are merged into one set-based statement
//! (`INSERT .. SELECT .. FROM unnest(..)`, `DELETE .. USING unnest(..)`, `UPDATE .. FROM
//! unnest(..)`), prepared once per session, relation definition and kind, and executed with one
//! text array per column, so the target parses and plans once per kind instead of once per row
//! or group. Only neighbours merge, so changes keep their source order; an UPDATE group is closed
//! before a row whose old or new key it already touched, because one set-based UPDATE sees each
//! row once and would lose the later effect. Where the target's column types are not known (a
//! column just added) or rows are found by every column (REPLICA IDENTITY FULL), a row gets a
//! statement of its own.
//!
//! A window of net changes (see [`net`](super::net)) is written the same way, but its
//! set-based statements run over the extended protocol with binary `text[]` parameters
//! ([`TextArray`]), which spares the target lexing and parsing array literals.
//!
//! Values travel in their text form (as pgoutput sends them), as array elements or SQL
//! literals, and the target reads them with each column's input function (a cast from text),
//! the way PostgreSQL's own apply does; both sessions pin the formats
//! ([`TEXT_FORM`](crate::pg::settings::TEXT_FORM)). Columns sent as unchanged TOAST are left
//! out of the UPDATE, so they keep their value. Apply sessions carry the replication origin
//! [`names::origin`](crate::cdc::names::origin), so what they write is recognisable
//! and not streamed back by a pipeline in the opposite direction.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{oneshot, Notify};
use tokio_postgres::{Client, SimpleQueryMessage};

use super::net::{Net, Window};
use super::writer::{Judge, TextArray, Writer};
use super::{progress, SyncError};
use crate::cdc::decoder::{
    Relation, RelationColumn, Value, TRUNCATE_CASCADE, TRUNCATE_RESTART_IDENTITY,
};
use crate::cdc::names;
use crate::config::MissingRows;
use crate::pg::schema::TableModel;
use crate::pg::settings::set_text_form_sql;
use crate::pg::{quote_ident, ConnInfo, Fence, Lsn, PgError, TableInfo, TableName};

/// SQL is sent to the target once this much is buffered, also inside a transaction.
const PIECE_BYTES: usize = 256 * 1024;

/// Whether a table's changes may be applied as net changes (see [`net`](super::net)): a plain
/// table whose only unique index is on exactly the stream's key columns (`$2`), without
/// exclusion constraints or rules, without foreign keys unless this session's replication role
/// keeps their checks quiet, and without user triggers that fire in this session.
const REORDERABLE: &str = "\
SELECT c.relkind = 'r' AND NOT c.relhasrules \
  AND (SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique) = 1 \
  AND EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisunique \
    AND i.indpred IS NULL AND i.indexprs IS NULL \
    AND ARRAY(SELECT a.attname::text FROM pg_attribute a \
              WHERE a.attrelid = c.oid AND a.attnum = ANY (i.indkey) ORDER BY 1) \
      = ARRAY(SELECT k FROM unnest($2::text[]) k ORDER BY 1)) \
  AND NOT EXISTS (SELECT 1 FROM pg_constraint x WHERE x.conrelid = c.oid AND x.contype = 'x') \
  AND (current_setting('session_replication_role') = 'replica' \
    OR NOT EXISTS (SELECT 1 FROM pg_constraint f WHERE f.contype = 'f' \
                   AND (f.conrelid = c.oid OR f.confrelid = c.oid))) \
  AND NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal \
    AND t.tgenabled IN ('A', CASE current_setting('session_replication_role') \
                             WHEN 'replica' THEN 'R' ELSE 'O' END)) \
FROM pg_class c WHERE c.oid = $1::text::regclass";

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

/// A change to apply, owning its rows: a window keeps them without copying (with several
/// targets, the last one takes the decoded message's rows and the others a copy).
#[derive(Clone)]
pub enum Change {
    Insert(Vec<Value>),
    Update {
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete(Vec<Value>),
}

impl Change {
    /// The row that carries every column: the new one, or the old one of a delete.
    pub fn row(&self) -> &[Value] {
        match self {
            Change::Insert(row) | Change::Delete(row) | Change::Update { new: row, .. } => row,
        }
    }
}

fn literal(v: &Value) -> Result<String, SyncError> {
    let mut out = String::new();
    push_literal(&mut out, v)?;
    Ok(out)
}

/// The text of a value, `None` for NULL.
fn text_of(v: &Value) -> Result<Option<&str>, SyncError> {
    text_bytes(v)?
        .map(|b| {
            std::str::from_utf8(b)
                .map_err(|_| SyncError::Protocol("a column value is not valid UTF-8".into()))
        })
        .transpose()
}

/// The bytes of a value's text form, `None` for NULL.
fn text_bytes(v: &Value) -> Result<Option<&[u8]>, SyncError> {
    match v {
        Value::Null => Ok(None),
        Value::Text(b) => Ok(Some(b)),
        Value::Binary(_) => Err(SyncError::Protocol(
            "a column value arrived in binary; invsync streams text values".into(),
        )),
        Value::Unchanged => Err(SyncError::Protocol(
            "an unchanged TOAST value where a value is needed".into(),
        )),
    }
}

/// Appends `v` as an SQL literal (or NULL) to `out`, without a temporary string per value.
fn push_literal(out: &mut String, v: &Value) -> Result<(), SyncError> {
    match text_of(v)? {
        None => out.push_str("NULL"),
        Some(text) => {
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
    }
    Ok(())
}

/// Appends `v` as an element to `array`, an array literal being written inside an SQL string
/// literal (see [`Group::arrays`]): quoted, with `\` and `"` escaped for the array and `'`
/// doubled for the string.
fn push_element(array: &mut String, v: &Value) -> Result<(), SyncError> {
    if array.len() > ARRAY_OPEN.len() {
        array.push(',');
    }
    match text_of(v)? {
        None => array.push_str("NULL"),
        Some(text) => {
            array.reserve(text.len() + 2);
            array.push('"');
            if text.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\'')) {
                for c in text.chars() {
                    match c {
                        '\\' => array.push_str("\\\\"),
                        '"' => array.push_str("\\\""),
                        '\'' => array.push_str("''"),
                        c => array.push(c),
                    }
                }
            } else {
                array.push_str(text);
            }
            array.push('"');
        }
    }
    Ok(())
}

/// Appends `row` as a line of COPY's text format: tab-separated, `\N` for NULL, backslash,
/// tab, newline and carriage return escaped. The bytes are not checked for UTF-8 here: the
/// target's COPY checks them against its session's encoding (UTF-8) and refuses the batch.
fn push_copy_line(out: &mut Vec<u8>, row: &[Value]) -> Result<(), SyncError> {
    for (i, v) in row.iter().enumerate() {
        if i > 0 {
            out.push(b'\t');
        }
        match text_bytes(v)? {
            None => out.extend_from_slice(b"\\N"),
            Some(text)
                if !text
                    .iter()
                    .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r')) =>
            {
                out.extend_from_slice(text)
            }
            // Byte by byte: these ASCII bytes never occur inside a multi-byte character.
            Some(text) => {
                for &b in text {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        b => out.push(b),
                    }
                }
            }
        }
    }
    out.push(b'\n');
    Ok(())
}

/// The target's type of column `i`, as the prepared statements cast to it.
fn type_of(types: &[Option<String>], i: usize) -> &str {
    types.get(i).and_then(|t| t.as_deref()).unwrap_or("text")
}

/// `text[], text[], ..`: the parameter types of a prepared group statement.
fn text_arrays(n: usize) -> String {
    vec!["text[]"; n].join(", ")
}

/// `$1, $2, .., $n`.
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
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

/// `"a", "b", ..`: every column of the relation, for an INSERT's column list.
fn column_list(rel: &StreamRelation) -> String {
    let names: Vec<String> = rel
        .rel
        .columns
        .iter()
        .map(|c| quote_ident(&c.name))
        .collect();
    names.join(", ")
}

/// `t.k = v.k0::type AND ..`: a prepared group statement's match of the table's rows (`t`) to
/// the unnested key arrays (`v`); the arrays' column aliases are appended to `aliases`.
fn key_match(rel: &StreamRelation, types: &[Option<String>], aliases: &mut Vec<String>) -> String {
    let mut conds = Vec::new();
    for (i, c) in key_columns(rel) {
        conds.push(format!(
            "t.{} = v.k{i}::{}",
            quote_ident(&c.name),
            type_of(types, i)
        ));
        aliases.push(format!("k{i}"));
    }
    conds.join(" AND ")
}

/// `DELETE .. USING unnest($1, ..)`: deletes the rows whose key the arrays hold (one array per
/// key column); with the number of parameters.
fn delete_sql(rel: &StreamRelation, types: &[Option<String>]) -> (String, usize) {
    let mut aliases = Vec::new();
    let conds = key_match(rel, types, &mut aliases);
    let sql = format!(
        "DELETE FROM {} AS t USING unnest({}) AS v({}) WHERE {}",
        rel.quoted,
        placeholders(aliases.len()),
        aliases.join(", "),
        conds
    );
    (sql, aliases.len())
}

/// `UPDATE .. FROM unnest($1, ..)`: sets the columns `sets` of the rows whose key the arrays
/// hold; the parameters are the set columns' new values, then the key columns. With the number
/// of parameters.
fn update_sql(rel: &StreamRelation, types: &[Option<String>], sets: &[usize]) -> (String, usize) {
    let mut assignments = Vec::new();
    let mut aliases = Vec::new();
    for &i in sets {
        assignments.push(format!(
            "{} = v.n{i}::{}",
            quote_ident(&rel.rel.columns[i].name),
            type_of(types, i)
        ));
        aliases.push(format!("n{i}"));
    }
    let conds = key_match(rel, types, &mut aliases);
    let sql = format!(
        "UPDATE {} AS t SET {} FROM unnest({}) AS v({}) WHERE {}",
        rel.quoted,
        assignments.join(", "),
        placeholders(aliases.len()),
        aliases.join(", "),
        conds
    );
    (sql, aliases.len())
}

/// `PREPARE name (text[], ..) AS sql`.
fn prepare_sql(name: &str, (sql, params): (String, usize)) -> String {
    format!("PREPARE {name} ({}) AS {sql}", text_arrays(params))
}

/// One array per column in `columns`, holding that column of each of `rows`.
fn column_arrays<'a>(
    columns: &[usize],
    rows: impl Iterator<Item = &'a [Value]>,
) -> Result<Vec<TextArray>, SyncError> {
    let mut arrays: Vec<TextArray> = columns.iter().map(|_| TextArray::new()).collect();
    for row in rows {
        for (array, &i) in arrays.iter_mut().zip(columns) {
            array.push(text_bytes(&row[i])?);
        }
    }
    Ok(arrays)
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

/// How a target's session records what it applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bookkeeping {
    /// A pipeline's target: the session carries the pipeline's replication origin, and each
    /// batch records its last source commit in the progress table before `COMMIT` (the resume
    /// point).
    Pipeline,
    /// A one-off replay (point-in-time restore): no origin and no progress record, so the
    /// database looks to a later `sync setup` like any other; the caller knows what it fed.
    Unrecorded,
}

/// Where the definition of a column the stream sends and a target lacks comes from.
#[derive(Clone, Copy)]
pub enum ColumnSource<'a> {
    /// The live source's catalog: the column is added as the source declares it.
    Database {
        client: &'a Client,
        conn: &'a ConnInfo,
    },
    /// Only the stream's Relation message (an archived stream): the column is added with the
    /// type it names, when that is a built-in type (same oid on every server).
    Stream { label: &'a str },
}

impl std::fmt::Display for ColumnSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ColumnSource::Database { conn, .. } => write!(f, "{conn}"),
            ColumnSource::Stream { label } => f.write_str(label),
        }
    }
}

/// Oids below this are built into every PostgreSQL server (`FirstNormalObjectId`).
const FIRST_NORMAL_OID: u32 = 16384;

/// One target of a pipeline and its open batch.
pub struct Target {
    pub name: String,
    pub conn: ConnInfo,
    pipeline: String,
    bookkeeping: Bookkeeping,
    /// The lease under which this run applies: every batch checks and raises the target's
    /// recorded epoch before it commits (see [`progress::fence`]).
    fence: Option<Fence>,
    client: Option<Arc<Client>>,
    /// Executes the batch's pieces while the next ones are built.
    writer: Option<Writer>,
    /// Signalled by the writer when a commit's result is back (shared by a pipeline's targets).
    answered: Arc<Notify>,
    /// End LSN of the last source commit this target has committed (possibly not yet flushed:
    /// apply sessions commit asynchronously).
    pub applied: Lsn,
    /// End LSN of the last source commit this target holds durably (its commit is flushed).
    pub durable: Lsn,
    /// Commits handed to the writer and not yet reported back.
    committing: VecDeque<Committing>,
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
    /// Per relation, whether its changes may be applied as net changes (see [`net`](super::net)),
    /// as the target's catalog said when the relation's definition was checked.
    reorderable: HashMap<u32, bool>,
    /// What an update or delete whose row is not on the target does.
    missing_rows: MissingRows,
    /// Of the writer's count of rows that updates and deletes did not find, what was logged.
    missing_reported: u64,
    batch: Batch,
    /// Statements prepared in this session, by relation, relation generation and kind.
    prepared: HashMap<(u32, u64, GroupKind), String>,
    /// When to try reconnecting after the target went away.
    pub retry_at: Instant,
    backoff: Duration,
    /// Since when the target is down (`None` while up).
    pub down_since: Option<Instant>,
    /// Cut loose for holding too much WAL: no longer streamed, nor waited for, until it is
    /// copied again.
    pub cut_loose: bool,
    /// Where a target added while the pipeline runs stands (see [`join`](super::join)).
    pub joining: super::join::Joining,
}

#[derive(Default)]
struct Batch {
    /// `BEGIN` was sent: a target transaction is open.
    open: bool,
    sql: String,
    /// The set-based statement still open at the end of `sql`.
    group: Option<Group>,
    /// Net changes not yet written as statements; they come before `sql`'s successors.
    window: Window,
    /// Rows the statements in `sql` and `group` should change.
    expect: u64,
    last_end: Option<Lsn>,
    last_time: Option<DateTime<Utc>>,
    rows: usize,
}

/// A set-based statement that more rows may join: same relation, same [`GroupKind`]. It runs as
/// `EXECUTE name(array, ..)` of a statement prepared once per session, relation definition and
/// kind, with one text array per parameter, so the target parses and plans it once.
struct Group {
    rel: u32,
    kind: GroupKind,
    /// The prepared statement's name.
    statement: String,
    /// Per parameter, the array literal so far, SQL-quoted: `'{` and the elements;
    /// [`Target::close_group`] closes it.
    arrays: Vec<String>,
    /// Key literals an UPDATE group touched (old and new keys).
    keys: HashSet<String>,
}

/// A batch whose progress record and `COMMIT` are queued on the writer.
struct Committing {
    /// The batch's last source commit.
    end: Lsn,
    /// Committed with `synchronous_commit = on`.
    durably: bool,
    /// The target's WAL insert and flush positions read right after the commit.
    positions: oneshot::Receiver<Vec<SimpleQueryMessage>>,
}

/// What opens an array literal in [`Group::arrays`].
const ARRAY_OPEN: &str = "'{";

#[derive(Clone, PartialEq, Eq, Hash)]
enum GroupKind {
    Insert,
    Delete,
    /// An UPDATE setting the columns flagged `true`.
    Update(Vec<bool>),
}

impl Target {
    /// A target of `pipeline`, not connected yet; its writer signals `answered` whenever a
    /// batch's commit is back. With a `fence`, no batch commits once a newer epoch wrote the
    /// target. `missing_rows` is the pipeline's policy for updates and deletes that find no row.
    pub fn new(
        pipeline: &str,
        name: &str,
        conn: ConnInfo,
        answered: Arc<Notify>,
        fence: Option<Fence>,
        missing_rows: MissingRows,
    ) -> Self {
        Target {
            name: name.to_string(),
            conn,
            pipeline: pipeline.to_string(),
            bookkeeping: Bookkeeping::Pipeline,
            fence,
            client: None,
            writer: None,
            answered,
            applied: Lsn(0),
            durable: Lsn(0),
            committing: VecDeque::new(),
            unflushed: VecDeque::new(),
            known: false,
            checked: HashMap::new(),
            types: HashMap::new(),
            reorderable: HashMap::new(),
            missing_rows,
            missing_reported: 0,
            batch: Batch::default(),
            prepared: HashMap::new(),
            retry_at: Instant::now(),
            backoff: Duration::from_millis(500),
            down_since: None,
            cut_loose: false,
            joining: super::join::Joining::No,
        }
    }

    /// A target that records neither origin nor progress ([`Bookkeeping::Unrecorded`]), named
    /// `label` in messages; updates and deletes that find no row are counted
    /// ([`Target::missing_rows_seen`]).
    pub fn unrecorded(label: &str, conn: ConnInfo, answered: Arc<Notify>) -> Self {
        let mut t = Target::new(label, label, conn, answered, None, MissingRows::Warn);
        t.bookkeeping = Bookkeeping::Unrecorded;
        t
    }

    /// Rows that updates and deletes did not find in this session.
    pub fn missing_rows_seen(&self) -> u64 {
        self.writer.as_ref().map_or(0, Writer::missing)
    }

    pub fn is_up(&self) -> bool {
        self.client.is_some()
    }

    /// The pipeline this target belongs to.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
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
                // only up to commits the target reports flushed (see `durable`). Rows are found
                // by their key's index, as those workers do: a prepared group statement keeps
                // its plan, which must not scan a table that was small when it was planned. No JIT:
                // statements are planned often and run briefly, and compiling them would cost
                // more than it saves (those workers do not plan at all).
                "{} SET synchronous_commit = off; \
                 SET enable_seqscan = off; SET enable_hashjoin = off; SET enable_mergejoin = off; \
                 SET jit = off;",
                set_text_form_sql()
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
        let applied = match self.bookkeeping {
            Bookkeeping::Pipeline => self.take_origin(&client).await?,
            Bookkeeping::Unrecorded => Lsn(0),
        };
        self.applied = applied;
        self.durable = applied;
        self.committing.clear();
        self.unflushed.clear();
        self.known = true;
        self.checked.clear();
        self.reorderable.clear();
        self.missing_reported = 0;
        self.prepared.clear();
        self.batch = Batch::default();
        let client = Arc::new(client);
        self.writer = Some(Writer::start(
            client.clone(),
            self.conn.clone(),
            match self.bookkeeping {
                Bookkeeping::Pipeline => format!("applying changes of pipeline {}", self.pipeline),
                Bookkeeping::Unrecorded => format!("replaying changes of {}", self.pipeline),
            },
            self.answered.clone(),
        ));
        self.client = Some(client);
        self.backoff = Duration::from_millis(500);
        self.down_since = None;
        Ok(())
    }

    /// Takes the pipeline's replication origin for the session and reads the applied LSN.
    async fn take_origin(&self, client: &Client) -> Result<Lsn, SyncError> {
        let origin = names::origin(&self.pipeline, &self.name);
        // Named after its origin (at most 63 bytes, so never truncated), so that an agent
        // taking the pipeline over can find and end the session of a holder that lost it.
        client
            .batch_execute(&format!(
                "SET application_name = {}",
                crate::pg::quote_literal(&origin)
            ))
            .await
            .map_err(|e| PgError::query("naming the apply session", &self.conn, e))?;
        progress::ensure_origin(client, &self.conn, &origin).await?;
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
        let p = progress::load(client, &self.conn, &self.pipeline)
            .await?
            .filter(|p| p.state == progress::State::Streaming)
            .ok_or_else(|| SyncError::NotSetUp {
                pipeline: self.pipeline.clone(),
                target: self.conn.to_string(),
            })?;
        progress::upgrade(client, &self.conn).await?;
        Ok(p.applied)
    }

    /// Marks the target down after `error`; its open batch is lost (rolled back by the server)
    /// and it is retried with growing backoff.
    pub fn went_away(&mut self, error: &SyncError) {
        tracing::warn!(target = %self.name, "target went away: {error}; retrying in {:?}", self.backoff);
        self.disconnect();
        self.down_since.get_or_insert_with(Instant::now);
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
        self.pending_batch() || !self.committing.is_empty() || !self.unflushed.is_empty()
    }

    /// True when only the commit or flush of earlier batches is awaited:
    /// [`Target::check_flushed`] can tell without waiting behind an open batch.
    pub fn awaits_flush(&self) -> bool {
        self.is_up()
            && !self.pending_batch()
            && (!self.committing.is_empty() || !self.unflushed.is_empty())
    }

    /// True when every batch committed so far is back from the target, without waiting: a new
    /// batch would run at once instead of queueing behind another.
    pub async fn committed_all(&mut self) -> Result<bool, SyncError> {
        self.collect_commits(false).await?;
        Ok(self.committing.is_empty())
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

    /// Takes the results of queued commits: every one if `wait`, else those already back.
    /// `applied` moves to each commit's batch end, `durable` as far as the target reported its
    /// WAL flushed.
    async fn collect_commits(&mut self, wait: bool) -> Result<(), SyncError> {
        while let Some(c) = self.committing.front_mut() {
            let result = if wait {
                (&mut c.positions).await.ok()
            } else {
                match c.positions.try_recv() {
                    Ok(r) => Some(r),
                    Err(oneshot::error::TryRecvError::Empty) => return Ok(()),
                    Err(oneshot::error::TryRecvError::Closed) => None,
                }
            };
            let Some(messages) = result else {
                let writer = self.writer.as_mut().ok_or_else(|| gone(&self.conn))?;
                return Err(writer.failure().await);
            };
            let (end, durably) = (c.end, c.durably);
            self.committing.pop_front();
            let (insert, flushed) = wal_positions(&messages, &self.conn)?;
            self.applied = end;
            self.unflushed.push_back((insert, end));
            self.flushed_up_to(if durably { insert } else { flushed });
        }
        Ok(())
    }

    /// Warns when more rows to update or delete were not found on the target since the last
    /// warning (counted per row of the statements run: a row changed twice in a window of net
    /// changes counts once).
    fn report_missing(&mut self) {
        let missing = self.writer.as_ref().map_or(0, Writer::missing);
        if missing > self.missing_reported {
            let done = match self.missing_rows {
                MissingRows::Apply => "updates inserted their rows, deletes did nothing",
                _ => "their changes were skipped",
            };
            tracing::warn!(
                target = %self.name,
                "{} rows to update or delete were not on the target ({missing} in this session): {done}; \
                 it differs from the source; `invsync verify db` names the rows that differ",
                missing - self.missing_reported
            );
            self.missing_reported = missing;
        }
    }

    /// Asks the target how far its WAL is flushed and moves `durable` accordingly.
    pub async fn check_flushed(&mut self) -> Result<(), SyncError> {
        self.collect_commits(true).await?;
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

    /// Hands the buffered SQL to the writer once there is a piece's worth, or whatever there is
    /// if `force` (the window of net changes stays; see [`Target::emit_window`]).
    async fn send(&mut self, force: bool) -> Result<(), SyncError> {
        let group = self
            .batch
            .group
            .as_ref()
            .map_or(0, |g| g.arrays.iter().map(String::len).sum());
        let buffered = self.batch.sql.len() + group;
        if buffered == 0 || (!force && buffered < PIECE_BYTES) {
            return Ok(());
        }
        self.close_group();
        let writer = self.writer.as_mut().ok_or_else(|| gone(&self.conn))?;
        let mut sql = std::mem::take(&mut self.batch.sql);
        if !self.batch.open {
            sql.insert_str(0, "BEGIN;\n");
        }
        writer
            .execute(sql, std::mem::take(&mut self.batch.expect))
            .await?;
        self.batch.open = true;
        Ok(())
    }

    /// Sends what is buffered, the window included, and waits until the target has run
    /// everything sent.
    async fn send_and_wait(&mut self) -> Result<(), SyncError> {
        self.emit_window().await?;
        self.send(true).await?;
        self.writer
            .as_mut()
            .ok_or_else(|| gone(&self.conn))?
            .wait()
            .await
    }

    /// Writes the window's net changes as statements and ends the open one, so that what comes
    /// next (a new relation definition, a TRUNCATE, a change in source order) follows them.
    pub async fn end_statements(&mut self) -> Result<(), SyncError> {
        self.emit_window().await?;
        self.close_group();
        Ok(())
    }

    /// Writes the window's net changes: per table its deletes, then its updates (grouped by the
    /// columns they set), as set-based statements with binary array parameters, then its
    /// inserts, as one COPY; each after what the batch holds so far.
    async fn emit_window(&mut self) -> Result<(), SyncError> {
        if self.batch.window.is_empty() {
            return Ok(());
        }
        for table in self.batch.window.take() {
            let rel = &table.rel;
            let types = self.types.get(&rel.rel.id).cloned().unwrap_or_default();
            let keys: Vec<usize> = key_columns(rel).map(|(i, _)| i).collect();
            let deletes: Vec<&[Value]> = table
                .rows
                .values()
                .filter_map(|net| match net {
                    Net::Delete(row) | Net::Replace(row) => Some(row.as_slice()),
                    _ => None,
                })
                .collect();
            if !deletes.is_empty() {
                let arrays = column_arrays(&keys, deletes.iter().copied())?;
                let (sql, _) = delete_sql(rel, &types);
                self.bind(sql, arrays, deletes.len()).await?;
            }
            let mut updates: Vec<(Vec<usize>, &[Value])> = table
                .rows
                .values()
                .filter_map(|net| match net {
                    Net::Update(row) => {
                        let sets = (0..row.len()).filter(|&i| row[i] != Value::Unchanged);
                        Some((sets.collect(), row.as_slice()))
                    }
                    _ => None,
                })
                .collect();
            updates.sort_by(|a, b| a.0.cmp(&b.0));
            for same in updates.chunk_by(|a, b| a.0 == b.0) {
                let sets = &same[0].0;
                let rows = same.iter().map(|(_, row)| *row);
                let columns: Vec<usize> = sets.iter().chain(&keys).copied().collect();
                let arrays = column_arrays(&columns, rows)?;
                let (sql, _) = update_sql(rel, &types, sets);
                self.bind(sql, arrays, same.len()).await?;
            }
            let mut data = Vec::new();
            for net in table.rows.values() {
                if let Net::Insert(row) | Net::Replace(row) = net {
                    push_copy_line(&mut data, row)?;
                }
            }
            if !data.is_empty() {
                self.send_before_job().await?;
                let writer = self.writer.as_mut().ok_or_else(|| gone(&self.conn))?;
                writer
                    .copy(
                        format!("COPY {} ({}) FROM STDIN", rel.quoted, column_list(rel)),
                        data,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// Hands over the statement `sql` with array parameters, which should change `rows` rows,
    /// after what the batch holds so far.
    async fn bind(
        &mut self,
        sql: String,
        arrays: Vec<TextArray>,
        rows: usize,
    ) -> Result<(), SyncError> {
        self.send_before_job().await?;
        let writer = self.writer.as_mut().ok_or_else(|| gone(&self.conn))?;
        writer.bind(sql, arrays, rows as u64).await
    }

    /// Sends what the batch holds (ending an open group) and opens the batch if it is not, so
    /// that a piece of its own (a COPY, a statement with parameters) follows inside it.
    async fn send_before_job(&mut self) -> Result<(), SyncError> {
        if !self.batch.open && self.batch.sql.is_empty() && self.batch.group.is_none() {
            // An empty statement, so that `send` has a piece to open the batch with.
            self.batch.sql.push(';');
        }
        self.send(true).await
    }

    /// Ends an open set-based statement.
    fn close_group(&mut self) {
        if let Some(g) = self.batch.group.take() {
            let sql = &mut self.batch.sql;
            sql.push_str("EXECUTE ");
            sql.push_str(&g.statement);
            sql.push('(');
            for (i, array) in g.arrays.iter().enumerate() {
                if i > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(array);
                sql.push_str("}'");
            }
            sql.push_str(");\n");
        }
    }

    /// Continues the open group of `kind` on `rel`, or closes it and opens one with `params`
    /// arrays, first preparing its statement if this session has not: `prepare(name, types)`
    /// gives the PREPARE, `types` being the target's column types. The caller then appends one
    /// element to each array.
    fn join_group(
        &mut self,
        rel: &StreamRelation,
        kind: GroupKind,
        params: usize,
        prepare: impl FnOnce(&str, &[Option<String>]) -> String,
    ) -> &mut Group {
        let open = matches!(&self.batch.group, Some(g) if g.rel == rel.rel.id && g.kind == kind);
        if !open {
            self.close_group();
            let key = (rel.rel.id, rel.generation, kind.clone());
            let statement = match self.prepared.get(&key) {
                Some(name) => name.clone(),
                None => {
                    let name = format!("invsync_{}", self.prepared.len() + 1);
                    let types = self.types.get(&rel.rel.id).map_or(&[][..], Vec::as_slice);
                    self.batch.sql.push_str(&prepare(&name, types));
                    self.batch.sql.push_str(";\n");
                    self.prepared.insert(key, name.clone());
                    name
                }
            };
            self.batch.group = Some(Group {
                rel: rel.rel.id,
                kind,
                statement,
                arrays: vec![ARRAY_OPEN.to_string(); params],
                keys: HashSet::new(),
            });
        }
        match self.batch.group.as_mut() {
            Some(g) => g,
            None => unreachable!("a group was just opened"),
        }
    }

    /// True when the target's types of every column flagged in `needed` are known.
    fn has_types(&self, rel: &StreamRelation, needed: impl Fn(usize) -> bool) -> bool {
        self.types.get(&rel.rel.id).is_some_and(|t| {
            t.len() == rel.rel.columns.len()
                && t.iter().enumerate().all(|(i, t)| t.is_some() || !needed(i))
        })
    }

    /// Adds to the target the columns the source has and the target lacks, once per relation
    /// definition. Fails with the DDL to run when that is not possible.
    pub async fn check_drift(
        &mut self,
        rel: &StreamRelation,
        source: ColumnSource<'_>,
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
        let keys: Vec<String> = key_columns(rel).map(|(_, c)| c.name.clone()).collect();
        let reorderable = client
            .query_one(REORDERABLE, &[&table.quoted(), &keys])
            .await
            .map_err(|e| PgError::query(format!("reading the indexes of {table}"), &self.conn, e))?
            .get::<_, bool>(0);
        // Net changes need every column's target type (the in-order path copes without), and
        // hide which row an update or delete missed, which only the `warn` policy does not need.
        let reorderable = reorderable
            && !rel.full_identity
            && self.has_types(rel, |_| true)
            && self.missing_rows == MissingRows::Warn;
        self.reorderable.insert(rel.rel.id, reorderable);
        let missing: Vec<&str> = rel
            .rel
            .columns
            .iter()
            .filter(|c| !have.columns.iter().any(|h| h.name == c.name))
            .map(|c| c.name.as_str())
            .collect();
        if !missing.is_empty() {
            let ddl = self.added_columns(rel, &missing, source).await?;
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

    /// The DDL that adds `missing` (columns of `rel` the target lacks), as `source` defines them.
    async fn added_columns(
        &self,
        rel: &StreamRelation,
        missing: &[&str],
        source: ColumnSource<'_>,
    ) -> Result<Vec<String>, SyncError> {
        let table = rel.table();
        let drift = |reason: String, ddl: String| SyncError::SchemaDrift {
            table: table.to_string(),
            target: self.conn.to_string(),
            ddl,
            reason,
        };
        let placeholder = |name: &str| {
            format!(
                "ALTER TABLE {} ADD COLUMN {} <type>",
                table.quoted(),
                quote_ident(name)
            )
        };
        let mut ddl = Vec::new();
        match source {
            ColumnSource::Database { client, conn } => {
                let src = TableModel::load(client, conn, &table).await?;
                for name in missing {
                    match src.table().columns.iter().find(|c| c.name == *name) {
                        Some(c) => ddl.push(c.add_sql(&table)),
                        None => {
                            return Err(drift(
                                format!(
                                "the source sends column {name}, which is no longer in its catalog"
                            ),
                                placeholder(name),
                            ))
                        }
                    }
                }
            }
            ColumnSource::Stream { label } => {
                let client = self.client.as_ref().ok_or_else(|| gone(&self.conn))?;
                for name in missing {
                    let Some(c) = rel.rel.columns.iter().find(|c| c.name == *name) else {
                        continue;
                    };
                    if c.type_oid >= FIRST_NORMAL_OID {
                        return Err(drift(
                            format!("{label} sends column {name} of a user-defined type (oid {}), which cannot be named from the stream alone", c.type_oid),
                            placeholder(name),
                        ));
                    }
                    let type_name: String = client
                        .query_one(
                            "SELECT format_type($1::oid, $2)",
                            &[&c.type_oid, &c.type_modifier],
                        )
                        .await
                        .map_err(|e| {
                            PgError::query(
                                format!("naming the type of column {name} of {table}"),
                                &self.conn,
                                e,
                            )
                        })?
                        .get(0);
                    ddl.push(format!(
                        "ALTER TABLE {} ADD COLUMN {} {type_name}",
                        table.quoted(),
                        quote_ident(name)
                    ));
                }
            }
        }
        Ok(ddl)
    }

    /// Adds one row change to the batch: to the window of net changes where the table allows,
    /// else (after the window) in source order.
    pub async fn change(&mut self, rel: &StreamRelation, change: Change) -> Result<(), SyncError> {
        check_width(rel, change.row())?;
        let change = if self.reorderable.get(&rel.rel.id) == Some(&true) {
            match self.batch.window.absorb(rel, change) {
                Ok(()) => {
                    self.batch.rows += 1;
                    if self.batch.window.is_full() {
                        self.emit_window().await?;
                        self.send(false).await?;
                    }
                    return Ok(());
                }
                Err(refused) => refused,
            }
        } else {
            change
        };
        self.emit_window().await?;
        match &change {
            Change::Insert(new) => self.insert(rel, new)?,
            Change::Update { old, new } => self.update(rel, old.as_deref(), new).await?,
            Change::Delete(old) => self.delete(rel, old).await?,
        }
        self.batch.rows += 1;
        self.send(false).await
    }

    fn insert(&mut self, rel: &StreamRelation, new: &[Value]) -> Result<(), SyncError> {
        check_width(rel, new)?;
        self.batch.expect += 1;
        if !self.has_types(rel, |_| true) {
            // Without the target's types (a column just added) the arrays cannot be cast.
            let mut sql = format!("INSERT INTO {} ({}) VALUES (", rel.quoted, column_list(rel));
            push_literals(&mut sql, new.iter())?;
            self.close_group();
            self.batch.sql.push_str(&sql);
            self.batch.sql.push_str(");\n");
            return Ok(());
        }
        let n = new.len();
        let group = self.join_group(rel, GroupKind::Insert, n, |name, types| {
            let values: Vec<String> = (0..n)
                .map(|i| format!("v.c{i}::{}", type_of(types, i)))
                .collect();
            let aliases: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
            format!(
                "PREPARE {name} ({}) AS INSERT INTO {} ({}) SELECT {} FROM unnest({}) AS v({})",
                text_arrays(n),
                rel.quoted,
                column_list(rel),
                values.join(", "),
                placeholders(n),
                aliases.join(", ")
            )
        });
        for (array, v) in group.arrays.iter_mut().zip(new) {
            push_element(array, v)?;
        }
        Ok(())
    }

    async fn delete(&mut self, rel: &StreamRelation, old: &[Value]) -> Result<(), SyncError> {
        check_width(rel, old)?;
        if self.missing_rows == MissingRows::Stop {
            let sql = format!("DELETE FROM {} WHERE {}", rel.quoted, row_filter(rel, old)?);
            let judge = self.missing_judge(rel, "DELETE", old, String::new())?;
            return self.row(sql, judge).await;
        }
        self.batch.expect += 1;
        let is_key = |i: usize| rel.rel.columns[i].key;
        if rel.full_identity || !self.has_types(rel, is_key) {
            let filter = row_filter(rel, old)?;
            self.close_group();
            self.batch
                .sql
                .push_str(&format!("DELETE FROM {} WHERE {};\n", rel.quoted, filter));
            return Ok(());
        }
        let keys: Vec<usize> = key_columns(rel).map(|(i, _)| i).collect();
        if keys.is_empty() {
            return Err(SyncError::Protocol(format!(
                "{}: a change arrived without key columns",
                rel.table()
            )));
        }
        let group = self.join_group(rel, GroupKind::Delete, keys.len(), |name, types| {
            prepare_sql(name, delete_sql(rel, types))
        });
        for (array, &i) in group.arrays.iter_mut().zip(&keys) {
            push_element(array, &old[i])?;
        }
        Ok(())
    }

    /// Adds an update. A group may hold each key once (one set-based UPDATE sees each row
    /// once), so it records the keys it touches and a row whose old or new key it holds
    /// closes it.
    async fn update(
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
        if self.missing_rows != MissingRows::Warn {
            return self.update_row(rel, old, new).await;
        }
        self.batch.expect += 1;
        let needed = |i: usize| set[i] || rel.rel.columns[i].key;
        if rel.full_identity || !self.has_types(rel, needed) {
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
        }
        let old_row = old.unwrap_or(new);
        let kind = GroupKind::Update(set.clone());
        let old_key = key_literals(rel, old_row)?;
        let new_key = match old {
            Some(_) if key_columns(rel).all(|(i, _)| new[i] != Value::Unchanged) => {
                key_literals(rel, new)?
            }
            _ => old_key.clone(),
        };
        if let Some(g) = &self.batch.group {
            if g.rel == rel.rel.id
                && g.kind == kind
                && (g.keys.contains(&old_key) || g.keys.contains(&new_key))
            {
                self.close_group();
            }
        }
        let sets: Vec<usize> = (0..new.len()).filter(|&i| set[i]).collect();
        let keys: Vec<usize> = key_columns(rel).map(|(i, _)| i).collect();
        let group = self.join_group(rel, kind, sets.len() + keys.len(), |name, types| {
            prepare_sql(name, update_sql(rel, types, &sets))
        });
        // Set columns' new values, then the old key (zipped from the indexes, which end first,
        // so that no array is skipped).
        let mut arrays = group.arrays.iter_mut();
        for (&i, array) in sets.iter().zip(arrays.by_ref()) {
            push_element(array, &new[i])?;
        }
        for (&i, array) in keys.iter().zip(arrays) {
            push_element(array, &old_row[i])?;
        }
        group.keys.insert(old_key);
        group.keys.insert(new_key);
        Ok(())
    }

    /// Adds an update as a statement of its own whose row count is checked, under the `stop`
    /// and `apply` policies: a missing row stops the pipeline, or, with `apply` and a change
    /// that carries the whole row, is inserted (one statement: the INSERT runs only when the
    /// UPDATE found nothing, and its count is the rows found missing).
    async fn update_row(
        &mut self,
        rel: &StreamRelation,
        old: Option<&[Value]>,
        new: &[Value],
    ) -> Result<(), SyncError> {
        let mut sets = Vec::new();
        for (col, v) in rel.rel.columns.iter().zip(new) {
            if *v != Value::Unchanged {
                sets.push(format!("{} = {}", quote_ident(&col.name), literal(v)?));
            }
        }
        let old_row = old.unwrap_or(new);
        let update = format!(
            "UPDATE {} SET {} WHERE {}",
            rel.quoted,
            sets.join(", "),
            row_filter(rel, old_row)?
        );
        let why = if self.missing_rows != MissingRows::Apply {
            None
        } else if new.contains(&Value::Unchanged) {
            Some("; the update does not carry the whole row (unchanged TOAST values), so `apply` cannot insert it")
        } else if !self.has_types(rel, |_| true) {
            Some("; the target's types of the row's columns are not known yet, so `apply` cannot insert it")
        } else {
            None
        };
        if self.missing_rows == MissingRows::Stop || why.is_some() {
            let judge =
                self.missing_judge(rel, "UPDATE", old_row, why.unwrap_or_default().into())?;
            return self.row(update, judge).await;
        }
        let types = self.types.get(&rel.rel.id).map_or(&[][..], Vec::as_slice);
        let mut values = Vec::new();
        for (i, v) in new.iter().enumerate() {
            values.push(format!("{}::{}", literal(v)?, type_of(types, i)));
        }
        let sql = format!(
            "WITH u AS ({update} RETURNING 1) INSERT INTO {} ({}) SELECT {} WHERE NOT EXISTS (SELECT FROM u)",
            rel.quoted,
            column_list(rel),
            values.join(", ")
        );
        self.row(sql, Box::new(Ok)).await
    }

    /// A [`Judge`] for a statement that must change the one row `row` names: any other count
    /// stops the pipeline with [`SyncError::MissingRow`].
    fn missing_judge(
        &self,
        rel: &StreamRelation,
        change: &'static str,
        row: &[Value],
        why: String,
    ) -> Result<Judge, SyncError> {
        let key = if rel.full_identity {
            "(the row equal in every column the source sent)".to_string()
        } else {
            let names: Vec<String> = key_columns(rel)
                .map(|(_, c)| quote_ident(&c.name))
                .collect();
            format!("({}) = ({})", names.join(", "), key_literals(rel, row)?)
        };
        let error = SyncError::MissingRow(Box::new(super::MissingRow {
            pipeline: self.pipeline.clone(),
            target: self.name.clone(),
            change,
            table: rel.table().to_string(),
            key,
            policy: match self.missing_rows {
                MissingRows::Warn => "warn",
                MissingRows::Stop => "stop",
                MissingRows::Apply => "apply",
            },
            why,
        }));
        Ok(Box::new(
            move |changed| {
                if changed == 1 {
                    Ok(0)
                } else {
                    Err(error)
                }
            },
        ))
    }

    /// Hands over one statement judged by `judge`, after what the batch holds so far.
    async fn row(&mut self, sql: String, judge: Judge) -> Result<(), SyncError> {
        self.send_before_job().await?;
        let writer = self.writer.as_mut().ok_or_else(|| gone(&self.conn))?;
        writer.row(sql, judge).await
    }

    /// Hands over `sql`, which is not one of the stream's changes (bringing sequences forward),
    /// to run in order with the batch's statements; its result is not awaited, and an error
    /// fails the writer as a change's would.
    pub async fn aside(&mut self, sql: String) -> Result<(), SyncError> {
        self.emit_window().await?;
        self.send(true).await?;
        let writer = self.writer.as_mut().ok_or_else(|| gone(&self.conn))?;
        writer.query(sql).await.map(drop)
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
        self.end_statements().await?;
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
            self.emit_window().await?;
            self.send(true).await?;
            // The progress record must change the pipeline's row, or the writer stops before
            // COMMIT. WAL is flushed in order: once the target's flush position passes the
            // insert position read right after this commit, the commit is durable.
            let (record, check) =
                progress::record(&self.conn, &self.pipeline, end, self.batch.last_time);
            let commit = if durably {
                "SET LOCAL synchronous_commit = on; COMMIT;"
            } else {
                "COMMIT;"
            };
            let writer = self.writer.as_mut().ok_or_else(|| gone(&self.conn))?;
            if let Some(fence) = &self.fence {
                let (sql, check) = progress::fence(&self.conn, &self.name, &self.pipeline, fence);
                writer.execute_checked(sql, check).await?;
            }
            if self.bookkeeping == Bookkeeping::Pipeline {
                writer.tally(record, check).await?;
            }
            let positions = writer
                .query(format!(
                    "{commit} SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text"
                ))
                .await?;
            self.committing.push_back(Committing {
                end,
                durably,
                positions,
            });
            self.batch = Batch::default();
        } else if end.is_some() {
            // Only source transactions without changes for this target: nothing to commit.
            self.batch = Batch::default();
        }
        self.collect_commits(durably).await?;
        self.report_missing();
        if durably && !self.unflushed.is_empty() {
            // A transaction with a transaction id commits a record; committed synchronously, it
            // flushes all WAL before it, earlier asynchronous commits included.
            let client = self.client.as_ref().ok_or_else(|| gone(&self.conn))?;
            let messages = client
                .simple_query(
                    "BEGIN; SET LOCAL synchronous_commit = on; SELECT pg_current_xact_id(); COMMIT; \
                     SELECT pg_current_wal_insert_lsn()::text, pg_current_wal_flush_lsn()::text",
                )
                .await
                .map_err(|e| PgError::query("committing applied changes", &self.conn, e))?;
            self.flushed_up_to(wal_positions(&messages, &self.conn)?.1);
        }
        Ok(())
    }

    /// True when changes are buffered (also in an open group) or a target transaction is open.
    fn pending_batch(&self) -> bool {
        self.batch.open
            || !self.batch.sql.is_empty()
            || self.batch.group.is_some()
            || !self.batch.window.is_empty()
    }

    /// Drops the connection without committing (used when stopping after an error elsewhere).
    pub fn disconnect(&mut self) {
        self.writer = None;
        self.client = None;
        self.batch = Batch::default();
        self.committing.clear();
        self.unflushed.clear();
    }
}

/// The two LSNs (insert, flush position) in the last row of a simple query's result.
fn wal_positions(
    messages: &[SimpleQueryMessage],
    conn: &ConnInfo,
) -> Result<(Lsn, Lsn), SyncError> {
    let row = messages
        .iter()
        .rev()
        .find_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_lines_escape_what_copy_text_format_reads_specially() {
        let t = |s: &str| Value::Text(bytes::Bytes::copy_from_slice(s.as_bytes()));
        let mut out = Vec::new();
        push_copy_line(
            &mut out,
            &[
                t("plain 台灣"),
                Value::Null,
                t("a\tb\nc\rd\\e"),
                t("\\."),
                t(""),
            ],
        )
        .unwrap();
        assert_eq!(
            out,
            "plain 台灣\t\\N\ta\\tb\\nc\\rd\\\\e\t\\\\.\t\n".as_bytes()
        );
        assert!(push_copy_line(&mut out, &[Value::Unchanged]).is_err());
    }
}
