//! Restore: tables back into a database, configuration trees into a directory.
//!
//! Both first resolve every blob they will need and refuse to start if any is missing from
//! the index or its pack is gone, naming the tables and files that cannot be restored. A
//! database restore then loads the tables, two at a time on connections of their own, into
//! a fresh staging schema, where each loader also builds its table's constraints and indexes
//! (the costly part after the data, so it runs in parallel too, as `pg_restore -j` does),
//! and moves them into place in one final transaction: either every selected table appears,
//! complete, or (on a corrupt blob found while streaming, or any database error) none does. A directory restore
//! writes each file under a temporary name and renames it into place once complete, so a
//! failure leaves no file that looks whole but is not; the command then fails naming it.
//!
//! A directory restore never writes outside its target: entry paths must be plain names,
//! symlinks must resolve inside the target, and no existing symlink is followed.
//!
//! # Restores beside other work
//!
//! - Prune: a restore holds a read lock in the repository (see `lock`) from before it reads the
//!   index until it has read its last blob, so a prune beside it deletes none of its packs; a
//!   pack that is gone all the same is reported as vanished, never as damage.
//! - Other restores: a database restore holds the session-level advisory lock
//!   ([`RESTORE_LOCK_CLASS`], 0) of the target database on its main connection from before it
//!   creates its staging schema until that schema is committed into place or dropped. A second
//!   restore into the same database fails within [`LOCK_RELEASE`], naming the first. Holding that lock also
//!   proves that every `invsync_restore_*` schema found in the database belongs to a restore
//!   that has ended (killed, or its target stopped), so a restore drops such leftovers first.
//! - Readers and writers of the replaced tables: the swap transaction waits for each table
//!   lock for at most [`LOCK_ATTEMPT`] at a time (while it waits, queries on that table queue
//!   behind it), rolls back and tries again after a pause that lets them through, and after
//!   `lock_wait` fails naming the sessions holding the locks.
//! - What the database built on the replaced tables: views and materialized views on them and
//!   other tables' foreign keys into them are read in the swap transaction, dropped there, and
//!   created again once the new tables are complete (see `pg::schema::dependents`), so a
//!   foreign key the restored rows break fails the whole transaction and changes nothing.
//! - Signals: the caller's `stop` future ends the restore: its sessions are terminated, the
//!   staging schema is dropped and the error says so. Should the target stop answering, the
//!   schema stays behind until the next restore removes it.

use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt, TryStreamExt};

use super::crypto::BlobId;
use super::index::{Location, Locator, PackRef};
use super::lock::{Lock, LockKind};
use super::pack::{self, pack_path};
use super::repository::Repository;
use super::snapshot::{Snapshot, TableSnapshot};
use super::tree::{self, EntryKind};
use super::BackupError;
use crate::config::TablePattern;
use crate::pg::schema::{self, AccessOptions, Created, Dependents, Placement, Plan, TableModel};
use crate::pg::{quote_ident, ConnInfo, PgError, TableName};
use tokio_postgres::error::SqlState;

/// Largest single read from a pack: neighbouring blobs are fetched together up to this.
const MAX_READ: u64 = 8 * 1024 * 1024;
/// Reads in flight at once.
const PARALLEL_READS: usize = 4;
/// The advisory lock class of database restores (`pg_advisory_lock(class, 0)`): "invs".
pub const RESTORE_LOCK_CLASS: i32 = 0x696e_7673;
/// The longest the swap transaction queues for one lock before letting others through.
pub const LOCK_ATTEMPT: Duration = Duration::from_secs(2);
/// The pause between two attempts, in which queries queued behind the restore run.
const LOCK_PAUSE: Duration = Duration::from_millis(500);
/// How long a restore waits for the database's restore lock to be let go by a restore that
/// has just ended (its session closing) before it reports another restore as running.
const LOCK_RELEASE: Duration = Duration::from_secs(2);
/// How staging schemas are named: this prefix and 12 hex digits.
const STAGING_PREFIX: &str = "invsync_restore_";

/// Locates `wanted` and checks their packs exist. Returns the locator, or the blobs that
/// cannot be read with the reason.
async fn locate(
    repo: &Repository,
    wanted: &HashSet<BlobId>,
) -> Result<(Locator, BTreeMap<BlobId, String>), BackupError> {
    let loc = Locator::load(repo, Some(wanted)).await?;
    let mut bad = BTreeMap::new();
    let reason_missing = if loc.unreadable.is_empty() {
        "not in any index".to_string()
    } else {
        format!(
            "not in any readable index ({} damaged)",
            loc.unreadable
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let mut packs: BTreeMap<String, Vec<BlobId>> = BTreeMap::new();
    for id in wanted {
        match loc.blobs.get(id) {
            None => {
                bad.insert(*id, reason_missing.clone());
            }
            Some(l) => packs.entry(l.pack.id.clone()).or_default().push(*id),
        }
    }
    let stored: HashSet<String> = repo
        .list("data")
        .await?
        .into_iter()
        .filter_map(|(n, _)| n.rsplit('/').next().map(str::to_string))
        .collect();
    for (p, ids) in packs {
        if !stored.contains(&p) {
            for id in ids {
                bad.insert(id, format!("pack {} is missing", pack_path(&p)));
            }
        }
    }
    Ok((loc, bad))
}

/// Streams the plaintext of `ids`, in order, reading neighbouring blobs of a pack together.
fn blob_stream<'a>(
    repo: &'a Repository,
    loc: &'a Locator,
    ids: &'a [BlobId],
) -> impl Stream<Item = Result<Vec<u8>, BackupError>> + 'a {
    let mut groups: Vec<Vec<&'a Location>> = Vec::new();
    for id in ids {
        let Some(l) = loc.blobs.get(id) else {
            // `locate` ran first; a vanished entry is reported by the read below.
            groups.push(Vec::new());
            continue;
        };
        let extend = groups
            .last()
            .and_then(|g| g.last())
            .is_some_and(|last: &&Location| {
                let start = groups.last().map(|g| g[0].blob.offset).unwrap_or(0);
                Arc::ptr_eq(&last.pack, &l.pack)
                    && last.blob.range().is_some_and(|r| r.end == l.blob.offset)
                    && l.blob
                        .range()
                        .is_some_and(|r| r.end.saturating_sub(start) <= MAX_READ)
            });
        if extend {
            if let Some(g) = groups.last_mut() {
                g.push(l);
            }
        } else {
            groups.push(vec![l]);
        }
    }
    futures::stream::iter(groups)
        .map(move |g| async move { read_group(repo, &g).await })
        .buffered(PARALLEL_READS)
        .map_ok(|blobs| futures::stream::iter(blobs.into_iter().map(Ok)))
        .try_flatten()
}

async fn read_group(repo: &Repository, group: &[&Location]) -> Result<Vec<Vec<u8>>, BackupError> {
    let (Some(first), Some(last)) = (group.first(), group.last()) else {
        return Err(BackupError::Restore(
            "a blob vanished from the index during the restore".into(),
        ));
    };
    let pack: &PackRef = &first.pack;
    let path = pack_path(&pack.id);
    let corrupt = |reason: String| BackupError::Corrupt {
        object: format!("{}/{path}", repo.name),
        reason,
    };
    let start = first.blob.offset;
    let end = last
        .blob
        .range()
        .map(|r| r.end)
        .filter(|&end| end >= start)
        .ok_or_else(|| corrupt("the index lists an impossible blob range".into()))?;
    let bytes: Bytes = repo.get_range(&path, start..end).await?;
    if bytes.len() as u64 != end - start {
        return Err(corrupt("shorter than the index says (truncated)".into()));
    }
    let key = repo
        .keys
        .unwrap_object_key(&pack.wrapped_key)
        .map_err(|e| corrupt(e.to_string()))?;
    let id_key = pack
        .id_key
        .as_ref()
        .or(repo.keys.master.as_ref().map(|m| &m.id_key));
    group
        .iter()
        .map(|l| {
            let sealed = pack::sealed_in(&bytes, start, &l.blob)
                .ok_or_else(|| corrupt(format!("blob {} lies outside its pack", l.blob.id)))?;
            pack::open_blob(&key, &l.blob, sealed, id_key)
                .map_err(|e| corrupt(format!("blob {}: {e}", l.blob.id)))
        })
        .collect()
}

/// What to restore into a database.
pub struct RestoreDbOptions {
    /// Only these tables (all with an empty list).
    pub tables: Vec<TablePattern>,
    /// Drop and recreate tables that exist and hold rows.
    pub replace: bool,
    /// Whether owners and privileges are restored (`--no-owner`, `--no-acl`).
    pub access: AccessOptions,
    /// How long to keep trying for the locks on the tables to replace before failing.
    pub lock_wait: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoredTable {
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
}

/// Restores tables of `snap` into the database at `conn`: all of them, or none. When `stop`
/// completes (with what stopped it, e.g. `SIGTERM`) the restore ends as if it had failed.
pub async fn restore_db(
    repo: &Repository,
    snap: &Snapshot,
    conn: &ConnInfo,
    opts: &RestoreDbOptions,
    stop: impl Future<Output = String>,
) -> Result<Vec<RestoredTable>, BackupError> {
    repo.master("restore")?;
    let mut stop = std::pin::pin!(stop);
    let lock = tokio::select! {
        lock = Lock::acquire(repo, LockKind::Read) => lock?,
        what = &mut stop => return Err(BackupError::Interrupted(format!("restore stopped by {what}; nothing was restored"))),
    };
    let staging = Staging::default();
    let result = tokio::select! {
        r = restore_tables(repo, snap, conn, opts, &staging) => r,
        what = &mut stop => Err(BackupError::Interrupted(format!("restore stopped by {what}"))),
    };
    let result = match result {
        Ok(done) => Ok(done),
        Err(e) => Err(staging.abandon(conn, e).await),
    };
    lock.release(repo).await;
    result
}

async fn restore_tables(
    repo: &Repository,
    snap: &Snapshot,
    conn: &ConnInfo,
    opts: &RestoreDbOptions,
    staging: &Staging,
) -> Result<Vec<RestoredTable>, BackupError> {
    for p in &opts.tables {
        if !snap.tables.iter().any(|t| p.matches(&t.schema.name)) {
            return Err(BackupError::Invalid(format!(
                "the snapshot holds no table {p}; it has: {}",
                snap.tables
                    .iter()
                    .map(|t| t.schema.name.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let tables: Vec<_> = snap
        .tables
        .iter()
        .filter(|t| opts.tables.is_empty() || opts.tables.iter().any(|p| p.matches(&t.schema.name)))
        .collect();
    let wanted: HashSet<BlobId> = tables
        .iter()
        .flat_map(|t| t.chunks.iter().copied())
        .collect();
    let (loc, bad) = locate(repo, &wanted).await?;
    if !bad.is_empty() {
        let mut lines = Vec::new();
        for t in &tables {
            if let Some((id, why)) = t.chunks.iter().find_map(|c| bad.get(c).map(|w| (c, w))) {
                let n = t.chunks.iter().filter(|c| bad.contains_key(c)).count();
                lines.push(format!(
                    "table {} ({n} chunk(s) unreadable, e.g. {id}: {why})",
                    t.schema.name
                ));
            }
        }
        return Err(BackupError::Restore(format!(
            "{}; nothing was restored",
            lines.join("; ")
        )));
    }
    let client = conn.connect().await?;
    let q = |what: String, e| BackupError::Db(PgError::query(what, conn, e));
    // Server notices (`drop cascades to ...`) are not the operator's business.
    client
        .batch_execute("SET client_min_messages = warning")
        .await
        .map_err(|e| q("preparing the restore session".into(), e))?;
    staging.enlist(&client, conn).await?;
    lock_database(&client, conn).await?;
    drop_leftovers(&client, conn).await?;
    // Fail fast, before loading anything; checked again when the tables are swapped in.
    let refused = refused_tables(&client, conn, &tables, opts.replace).await?;
    if !refused.is_empty() {
        return Err(refusal(&refused));
    }
    let models = tables
        .iter()
        .map(|t| t.schema.model())
        .collect::<Result<Vec<TableModel>, _>>()?;
    let plan = Plan::new(models.iter().collect(), opts.access);
    let missing = schema::missing_roles(&client, conn, &plan).await?;
    if !missing.is_empty() {
        return Err(BackupError::Restore(format!(
            "role(s) {} own or are granted the saved objects but do not exist on {conn}; \
             create them, or restore with --no-owner --no-acl; nothing was restored",
            missing.join(", ")
        )));
    }
    for skipped in plan.skipped_foreign_keys() {
        tracing::warn!("{skipped}");
    }
    let name = staging.create(&client, conn).await?;
    // The types the tables need are created and committed before the load, and recorded in
    // the staging schema's comment: whoever drops that schema without the swap having
    // committed (this restore failing or stopped, or the next one after a crash) drops them.
    let created = schema::create_prerequisites(&client, conn, &plan, Some(&name)).await?;
    load_and_swap(
        repo,
        &loc,
        &client,
        conn,
        &tables,
        &plan,
        &name,
        staging,
        opts,
        &created.schemas(),
    )
    .await?;
    Ok(tables
        .iter()
        .map(|t| RestoredTable {
            table: t.schema.name.to_string(),
            rows: t.rows,
            bytes: t.bytes,
        })
        .collect())
}

/// Tables loaded at once, each on its own connection.
const PARALLEL_LOADS: usize = 2;

/// This restore's staging schema and the database sessions working in it, so that a restore
/// that fails or is stopped can end them and drop the schema.
#[derive(Default)]
struct Staging {
    name: Mutex<Option<String>>,
    /// (pid, backend start) of each session: a pid alone may have been reused since.
    sessions: Mutex<Vec<(i32, String)>>,
}

impl Staging {
    /// Records `client`'s session as one of this restore's.
    async fn enlist(
        &self,
        client: &tokio_postgres::Client,
        conn: &ConnInfo,
    ) -> Result<(), BackupError> {
        let row = client
            .query_one(
                "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .map_err(|e| PgError::query("identifying the restore session", conn, e))?;
        lock_ignoring_poison(&self.sessions).push((row.get(0), row.get(1)));
        Ok(())
    }

    /// Creates the staging schema (the caller holds the database's restore lock).
    async fn create(
        &self,
        client: &tokio_postgres::Client,
        conn: &ConnInfo,
    ) -> Result<String, BackupError> {
        let name = format!(
            "{STAGING_PREFIX}{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        // Recorded before it exists: abandoning drops it if it exists.
        *lock_ignoring_poison(&self.name) = Some(name.clone());
        client
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .await
            .map_err(|e| PgError::query("creating the staging schema", conn, e))?;
        Ok(name)
    }

    /// After `cause` ended the restore: terminates its sessions (a loader may be in the middle
    /// of a COPY or an index build, the swap may be queued for a lock), drops the staging
    /// schema, and returns the error to report.
    async fn abandon(&self, conn: &ConnInfo, cause: BackupError) -> BackupError {
        let Some(name) = lock_ignoring_poison(&self.name).clone() else {
            return match cause {
                BackupError::Interrupted(m) => {
                    BackupError::Interrupted(format!("{m}; nothing was restored"))
                }
                e => e,
            };
        };
        let sessions = lock_ignoring_poison(&self.sessions).clone();
        let dropped = drop_staging(conn, &name, sessions).await;
        if let Err(reason) = &dropped {
            tracing::warn!("cannot drop the staging schema {name}: {reason}; the next restore into this database drops it");
        }
        match (cause, dropped) {
            (BackupError::Interrupted(m), Ok(())) => BackupError::Interrupted(format!(
                "{m}; nothing was restored (its staging schema {name} was dropped)"
            )),
            (BackupError::Interrupted(m), Err(reason)) => BackupError::Interrupted(format!(
                "{m}; nothing was restored, but its staging schema {name} could not be dropped ({reason}); the next restore into this database drops it"
            )),
            (e, _) => e,
        }
    }
}

fn lock_ignoring_poison<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// On a connection of its own: ends `sessions`, drops the schema `name`, then the types and
/// schemas its restore created for its tables.
async fn drop_staging(
    conn: &ConnInfo,
    name: &str,
    sessions: Vec<(i32, String)>,
) -> Result<(), String> {
    let ctl = conn.connect().await.map_err(|e| e.to_string())?;
    let (pids, starts): (Vec<i32>, Vec<String>) = sessions.into_iter().unzip();
    let sql = format!(
        "SET client_min_messages = warning;
         SELECT pg_terminate_backend(a.pid) FROM pg_stat_activity a
           JOIN unnest('{{{}}}'::int4[], '{{{}}}'::text[]) AS o(pid, started)
             ON a.pid = o.pid AND a.backend_start::text = o.started;
         DROP SCHEMA IF EXISTS {} CASCADE",
        pids.iter()
            .map(i32::to_string)
            .collect::<Vec<_>>()
            .join(","),
        starts
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(","),
        quote_ident(name)
    );
    let created = record_of(&ctl, name)
        .await
        .map_err(|e| crate::pg::describe(&e))?;
    ctl.batch_execute(&sql)
        .await
        .map_err(|e| crate::pg::describe(&e))?;
    created.undo(&ctl).await;
    Ok(())
}

/// The schemas and types the restore that made staging schema `name` created for its tables
/// (see `pg::schema::create_prerequisites`): to drop with the schema.
async fn record_of(
    client: &tokio_postgres::Client,
    name: &str,
) -> Result<Created, tokio_postgres::Error> {
    let comment: Option<String> = client
        .query_one(
            "SELECT obj_description(to_regnamespace($1), 'pg_namespace')",
            &[&quote_ident(name)],
        )
        .await?
        .get(0);
    Ok(Created::recorded(comment.as_deref()))
}

/// Takes the database's restore lock on `client`'s session (held until it ends), or fails
/// naming the restore that holds it.
async fn lock_database(
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
) -> Result<(), BackupError> {
    let q = |e| PgError::query("taking the database's restore lock", conn, e);
    // A restore that has just ended may hold the lock a moment longer, until the server has
    // seen its session close.
    let deadline = Instant::now() + LOCK_RELEASE;
    loop {
        let got: bool = client
            .query_one("SELECT pg_try_advisory_lock($1, 0)", &[&RESTORE_LOCK_CLASS])
            .await
            .map_err(q)?
            .get(0);
        if got {
            return Ok(());
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let holder = client
        .query_opt(
            "SELECT a.pid, coalesce(a.application_name, ''),
                    coalesce(to_char(a.backend_start, 'YYYY-MM-DD HH24:MI:SS TZ'), '?')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND l.classid = ($1::int4)::oid AND l.objid = 0 AND l.objsubid = 2",
            &[&RESTORE_LOCK_CLASS],
        )
        .await
        .map_err(q)?
        .map(|r| {
            format!(
                " (pid {}, application_name '{}', connected since {})",
                r.get::<_, i32>(0),
                r.get::<_, String>(1),
                r.get::<_, String>(2)
            )
        })
        .unwrap_or_default();
    Err(BackupError::Restore(format!(
        "another restore into database {} is running{holder}; wait for it to finish and try again; nothing was restored",
        conn.dbname()
    )))
}

/// Drops staging schemas left by restores that ended without cleaning up (killed, or their
/// target stopped), and the types and schemas those restores created for their tables. Safe only while holding the database's restore lock: every restore holds
/// it from before creating its staging schema until the schema is gone, so no schema found
/// then belongs to a running restore. A schema still locked (a loader of the dead restore
/// finishing an index build) is left for the next restore.
async fn drop_leftovers(
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
) -> Result<(), BackupError> {
    let rows = client
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1) ORDER BY 1",
            &[&STAGING_PREFIX],
        )
        .await
        .map_err(|e| PgError::query("looking for leftover staging schemas", conn, e))?;
    for r in rows {
        let name: String = r.get(0);
        let created = record_of(client, &name)
            .await
            .map_err(|e| PgError::query("reading a leftover staging schema", conn, e))?;
        let dropped = client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = {}; DROP SCHEMA {} CASCADE; COMMIT",
                LOCK_ATTEMPT.as_millis(),
                quote_ident(&name)
            ))
            .await;
        match dropped {
            Ok(()) => {
                tracing::info!("dropped schema {name}, left behind by an interrupted restore");
                created.undo(client).await;
            }
            Err(e) => {
                client
                    .batch_execute("ROLLBACK")
                    .await
                    .map_err(|e| PgError::query("dropping a leftover staging schema", conn, e))?;
                tracing::warn!(
                    "cannot drop schema {name}, left behind by an interrupted restore, yet: {}; the next restore tries again",
                    crate::pg::describe(&e)
                );
            }
        }
    }
    Ok(())
}

/// Existing, non-empty tables among `tables` (none when `replace`).
async fn refused_tables(
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
    tables: &[&TableSnapshot],
    replace: bool,
) -> Result<Vec<String>, BackupError> {
    let mut refused = Vec::new();
    if replace {
        return Ok(refused);
    }
    for t in tables {
        let name = &t.schema.name;
        let check = |e| PgError::query(format!("checking {name}"), conn, e);
        let exists: bool = client
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name.quoted()])
            .await
            .map_err(check)?
            .get(0);
        let nonempty = exists
            && client
                .query_one(
                    &format!("SELECT EXISTS (SELECT 1 FROM {})", name.quoted()),
                    &[],
                )
                .await
                .map_err(check)?
                .get::<_, bool>(0);
        if nonempty {
            refused.push(name.to_string());
        }
    }
    Ok(refused)
}

fn refusal(refused: &[String]) -> BackupError {
    BackupError::Restore(format!(
        "table(s) {} exist and are not empty; pass --replace to overwrite them; nothing was restored",
        refused.join(", ")
    ))
}

/// Loads every table into the staging schema, [`PARALLEL_LOADS`] at a time, each committed on
/// its own connection with its constraints and indexes (when names cannot clash); then, in
/// one transaction on `client`, replaces the targets, moves the loaded tables into place and
/// completes them (see `pg::schema`'s phases: sequences, defaults, identity, functions,
/// triggers, policies, privileges, then foreign keys, validated against the loaded rows).
/// Until that commit the target schemas are untouched, so a failure or a crash never leaves a
/// table that looks restored but is not (a crash leaves the `invsync_restore_*` schema, which
/// the next restore drops).
#[allow(clippy::too_many_arguments)]
async fn load_and_swap(
    repo: &Repository,
    loc: &Locator,
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
    tables: &[&TableSnapshot],
    plan: &Plan<'_>,
    staging: &str,
    sessions: &Staging,
    opts: &RestoreDbOptions,
    created_schemas: &[String],
) -> Result<(), BackupError> {
    // Biggest first, so the two loaders finish close together.
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tables[i].bytes));
    // Index names are unique within a schema: only when no two clash can the tables have
    // theirs built side by side in the staging schema.
    let build_early = plan.can_build_in_staging();
    let mut indexed = vec![false; tables.len()];
    for (i, done) in futures::stream::iter(order.iter().map(|&i| async move {
        load_one(
            repo,
            loc,
            conn,
            sessions,
            tables[i],
            plan,
            i,
            staging,
            build_early,
        )
        .await
        .map(|done| (i, done))
    }))
    .buffer_unordered(PARALLEL_LOADS)
    .try_collect::<Vec<(usize, bool)>>()
    .await?
    {
        indexed[i] = done;
    }

    let swap = Swap {
        client,
        conn,
        tables,
        plan,
        staging,
        indexed: &indexed,
        replace: opts.replace,
        created_schemas,
    };
    let deadline = Instant::now() + opts.lock_wait;
    loop {
        match swap.attempt().await {
            Err(e) if lock_timed_out(&e) => {
                if Instant::now() >= deadline {
                    return Err(BackupError::Restore(format!(
                        "the tables to replace stayed locked for {}s; {}; try again when they are done or end them; nothing was restored",
                        opts.lock_wait.as_secs(),
                        lock_holders(client, conn, tables).await
                    )));
                }
                tracing::info!(
                    "a table to replace is in use; trying again (for up to {}s)",
                    opts.lock_wait.as_secs()
                );
                tokio::time::sleep(LOCK_PAUSE).await;
            }
            other => return other,
        }
    }
}

/// True for an error of a lock not granted within `lock_timeout`.
fn lock_timed_out(e: &BackupError) -> bool {
    matches!(e, BackupError::Db(PgError::Query { code: Some(c), .. })
        if c == SqlState::LOCK_NOT_AVAILABLE.code())
}

/// Who holds locks on `tables` now, for the message of a restore that gave up waiting.
async fn lock_holders(
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
    tables: &[&TableSnapshot],
) -> String {
    let names: Vec<String> = tables.iter().map(|t| t.schema.name.quoted()).collect();
    let rows = client
        .query(
            "SELECT DISTINCT l.relation::regclass::text, a.pid, coalesce(a.application_name, ''),
                    coalesce(a.state, ''), coalesce(to_char(a.query_start, 'YYYY-MM-DD HH24:MI:SS TZ'), '?')
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'relation' AND l.granted AND l.pid <> pg_backend_pid()
               AND l.relation IN (SELECT to_regclass(n) FROM unnest($1::text[]) n)
             ORDER BY 2 LIMIT 5",
            &[&names],
        )
        .await;
    match rows {
        Ok(rows) if !rows.is_empty() => rows
            .iter()
            .map(|r| {
                format!(
                    "{} is held by pid {} (application_name '{}', state {}, query started {})",
                    r.get::<_, String>(0),
                    r.get::<_, i32>(1),
                    r.get::<_, String>(2),
                    r.get::<_, String>(3),
                    r.get::<_, String>(4)
                )
            })
            .collect::<Vec<_>>()
            .join("; "),
        Ok(_) => "the sessions holding them have finished since".into(),
        Err(e) => format!(
            "the sessions holding them could not be listed ({})",
            PgError::query("reading pg_locks", conn, e)
        ),
    }
}

/// The final transaction of a database restore: what it moves into place and how.
struct Swap<'a> {
    client: &'a tokio_postgres::Client,
    conn: &'a ConnInfo,
    tables: &'a [&'a TableSnapshot],
    plan: &'a Plan<'a>,
    staging: &'a str,
    /// Per table, whether its constraints and indexes were built in the staging schema.
    indexed: &'a [bool],
    replace: bool,
    /// The schemas this restore created, which get the saved owners, privileges and comments.
    created_schemas: &'a [String],
}

impl Swap<'_> {
    /// One attempt at the swap transaction: replaces the targets by the staging tables, every
    /// lock waited for at most [`LOCK_ATTEMPT`]. On any error the transaction is rolled back.
    async fn attempt(&self) -> Result<(), BackupError> {
        let conn = self.conn;
        let q = |what: String, e| BackupError::Db(PgError::query(what, conn, e));
        self.client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = {}",
                LOCK_ATTEMPT.as_millis()
            ))
            .await
            .map_err(|e| q("starting the restore transaction".into(), e))?;
        let result = self.statements().await;
        let end = if result.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = self.client.batch_execute(end).await;
        result?;
        ended.map_err(|e| q("committing the restore".into(), e))
    }

    /// The transaction's statements, in pg_dump's order for what follows the data.
    async fn statements(&self) -> Result<(), BackupError> {
        let Swap {
            client,
            conn,
            tables,
            plan,
            staging,
            indexed,
            replace,
            created_schemas,
        } = *self;
        let q = |what: String, e| BackupError::Db(PgError::query(what, conn, e));
        let refused = refused_tables(client, conn, tables, replace).await?;
        if !refused.is_empty() {
            return Err(refusal(&refused));
        }
        // A lock not granted in time is returned as it is, for the caller to try again.
        let run = |label: String, statements: Vec<String>| async move {
            for s in statements {
                client.batch_execute(&s).await.map_err(|e| {
                    let e = q(s.clone(), e);
                    if lock_timed_out(&e) {
                        return e;
                    }
                    BackupError::Restore(format!("{label}: {e}; nothing was restored"))
                })?;
            }
            Ok::<(), BackupError>(())
        };
        // Views on the tables, other tables' foreign keys, policies and rules on them, and
        // functions of their row types would stop the drops: they are taken down here and
        // put back once the new tables are complete.
        let replaced: Vec<TableName> = plan
            .models()
            .iter()
            .flat_map(|m| m.relations.iter().map(|r| r.name.clone()))
            .collect();
        let dependents = schema::read_qualified(
            client,
            conn,
            "reading what depends on the tables to replace",
            Dependents::load(client, conn, &replaced),
        )
        .await?;
        run(
            "taking down the views, foreign keys, policies, rules and functions that depend on the \
             tables to replace"
                .into(),
            dependents.drop_statements(),
        )
        .await?;
        // In one statement, so that foreign keys among them do not hold any of them back.
        let quoted: Vec<String> = replaced.iter().map(TableName::quoted).collect();
        run(
            "replacing the tables".into(),
            vec![format!("DROP TABLE IF EXISTS {}", quoted.join(", "))],
        )
        .await?;
        for (i, t) in tables.iter().enumerate() {
            let model = &plan.models()[i];
            let mut statements = Vec::new();
            for (r, rel) in model.relations.iter().enumerate() {
                let name = &rel.name;
                statements.extend([
                    format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(&name.schema)),
                    format!(
                        "ALTER TABLE {} RENAME TO {}",
                        plan.relation_at(i, r, Placement::Staging(staging)),
                        quote_ident(&name.name)
                    ),
                    format!(
                        "ALTER TABLE {}.{} SET SCHEMA {}",
                        quote_ident(staging),
                        quote_ident(&name.name),
                        quote_ident(&name.schema)
                    ),
                ]);
            }
            if !indexed[i] {
                statements.extend(plan.build_statements(i, Placement::Final));
            }
            run(format!("table {}", t.schema.name), statements).await?;
        }
        run(
            "functions that take the row type of a restored table".into(),
            dependents.function_statements(),
        )
        .await?;
        run("functions".into(), plan.function_statements()).await?;
        for (i, t) in tables.iter().enumerate() {
            run(
                format!("table {}", t.schema.name),
                plan.finish_statements(i),
            )
            .await?;
        }
        run("foreign keys".into(), plan.foreign_key_statements()).await?;
        run("schemas".into(), plan.schema_statements(created_schemas)).await?;
        for k in &dependents.foreign_keys {
            run(
                format!(
                    "foreign key {} of {} (a table not restored) does not hold for the restored rows",
                    k.name, k.table
                ),
                k.add_statements(),
            )
            .await?;
        }
        for v in &dependents.views {
            run(
                format!(
                    "{} {}, built on the restored tables, cannot be created again on them",
                    v.kind().to_lowercase(),
                    v.name
                ),
                v.statements(),
            )
            .await?;
        }
        run(
            "policies and rules that read the restored tables".into(),
            dependents.policy_and_rule_statements(),
        )
        .await?;
        client
            .batch_execute(&format!("DROP SCHEMA {}", quote_ident(staging)))
            .await
            .map_err(|e| q("dropping the staging schema".into(), e))
    }
}

/// Creates and fills one staging table on a connection of its own; with `build_indexes`, also
/// adds its constraints and indexes there. Returns whether they were built.
#[allow(clippy::too_many_arguments)]
async fn load_one(
    repo: &Repository,
    loc: &Locator,
    conn: &ConnInfo,
    sessions: &Staging,
    t: &TableSnapshot,
    plan: &Plan<'_>,
    i: usize,
    staging: &str,
    build_indexes: bool,
) -> Result<bool, BackupError> {
    let name = &t.schema.name;
    let fail =
        |e: BackupError| BackupError::Restore(format!("table {name}: {e}; nothing was restored"));
    let q = |what: &str, e| {
        fail(BackupError::Db(PgError::query(
            format!("{what} {name}"),
            conn,
            e,
        )))
    };
    let client = conn.connect().await?;
    sessions.enlist(&client, conn).await?;
    let at = Placement::Staging(staging);
    // Rows are read in the text form they were dumped in.
    client
        .batch_execute(&format!(
            "{} BEGIN; {}",
            crate::pg::settings::set_text_form_sql(),
            plan.create_tables(i, at).join("; ")
        ))
        .await
        .map_err(|e| q("creating", e))?;
    let sink = client
        .copy_in::<_, Bytes>(&plan.copy_in_sql(i, at))
        .await
        .map_err(|e| q("loading", e))?;
    futures::pin_mut!(sink);
    let blobs = blob_stream(repo, loc, &t.chunks);
    futures::pin_mut!(blobs);
    while let Some(b) = blobs.next().await {
        let b = b.map_err(fail)?;
        sink.send(Bytes::from(b))
            .await
            .map_err(|e| q("loading", e))?;
    }
    sink.as_mut().finish().await.map_err(|e| q("loading", e))?;
    if build_indexes {
        for s in plan.build_statements(i, at) {
            client
                .batch_execute(&s)
                .await
                .map_err(|e| q(&format!("indexing ({s})"), e))?;
        }
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| q("loading", e))?;
    Ok(build_indexes)
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RestoreDirSummary {
    pub files: usize,
    pub dirs: usize,
    pub symlinks: usize,
    pub bytes: u64,
}

/// One entry to restore, with its checked destination.
struct Planned<'a> {
    rel: PathBuf,
    entry: &'a tree::TreeEntry,
}

/// Restores the trees of `snap` below `target` (only entries below one of `paths`, given as
/// absolute paths on the backed-up host, when not empty).
pub async fn restore_dir(
    repo: &Repository,
    snap: &Snapshot,
    target: &Path,
    paths: &[String],
) -> Result<RestoreDirSummary, BackupError> {
    repo.master("restore")?;
    let selected = |full: &str| {
        paths.is_empty()
            || paths.iter().any(|p| {
                let p = p.trim_end_matches('/');
                full == p
                    || full.starts_with(&format!("{p}/"))
                    || p.starts_with(&format!("{full}/"))
            })
    };
    // Check everything before writing anything.
    let mut plan = Vec::new();
    let mut hostile = Vec::new();
    for t in &snap.trees {
        let Some(root) = tree::root_below(&t.root) else {
            hostile.push(format!("tree root {:?}", t.root));
            continue;
        };
        for e in &t.entries {
            let full = if e.path.is_empty() {
                t.root.clone()
            } else {
                format!("{}/{}", t.root.trim_end_matches('/'), e.path)
            };
            if !selected(&full) {
                continue;
            }
            match tree::safe_relative(&e.path) {
                Some(rel) => plan.push(Planned {
                    rel: root.join(rel),
                    entry: e,
                }),
                None => hostile.push(format!("{:?} in {}", e.path, t.root)),
            }
        }
    }
    let links: HashSet<PathBuf> = plan
        .iter()
        .filter(|p| p.entry.kind == EntryKind::Symlink)
        .map(|p| p.rel.clone())
        .collect();
    for p in &plan {
        if p.entry.kind == EntryKind::Symlink {
            let target_text = p.entry.target.as_deref().unwrap_or("");
            if !tree::link_stays_inside(&p.rel, target_text, &|q: &Path| links.contains(q)) {
                hostile.push(format!(
                    "symlink {} -> {target_text:?} points outside the restore directory",
                    p.rel.display()
                ));
            }
        }
    }
    if !hostile.is_empty() {
        return Err(BackupError::Restore(format!(
            "the snapshot holds unsafe paths: {}; nothing was restored",
            hostile.join(", ")
        )));
    }
    if !paths.is_empty() && plan.is_empty() {
        return Err(BackupError::Invalid(format!(
            "no saved path matches {}",
            paths.join(", ")
        )));
    }
    let wanted: HashSet<BlobId> = plan
        .iter()
        .flat_map(|p| p.entry.chunks.iter().copied())
        .collect();
    let (loc, bad) = locate(repo, &wanted).await?;
    if !bad.is_empty() {
        let names: Vec<String> = plan
            .iter()
            .filter(|p| p.entry.chunks.iter().any(|c| bad.contains_key(c)))
            .map(|p| p.rel.display().to_string())
            .collect();
        let why = bad.values().next().cloned().unwrap_or_default();
        return Err(BackupError::Restore(format!(
            "file(s) {} cannot be read ({why}); nothing was restored",
            names.join(", ")
        )));
    }
    std::fs::create_dir_all(target).map_err(|e| BackupError::io(target.display(), e))?;
    let mut sum = RestoreDirSummary::default();
    let mut failed = Vec::new();
    // Directories and files first, symlinks last, so no write goes through a restored link.
    for p in plan.iter().filter(|p| p.entry.kind != EntryKind::Symlink) {
        let dest = target.join(&p.rel);
        no_symlink_below(target, &p.rel)?;
        match p.entry.kind {
            EntryKind::Dir => {
                std::fs::create_dir_all(&dest).map_err(|e| BackupError::io(dest.display(), e))?;
                sum.dirs += 1;
            }
            EntryKind::File => match write_file(repo, &loc, p.entry, &dest).await {
                Ok(n) => {
                    sum.files += 1;
                    sum.bytes += n;
                }
                Err(e) => failed.push(format!("{}: {e}", p.rel.display())),
            },
            EntryKind::Symlink => {}
        }
    }
    for p in plan.iter().filter(|p| p.entry.kind == EntryKind::Symlink) {
        let dest = target.join(&p.rel);
        no_symlink_below(target, &p.rel)?;
        let t = p.entry.target.as_deref().unwrap_or("");
        std::os::unix::fs::symlink(t, &dest).map_err(|e| BackupError::io(dest.display(), e))?;
        sum.symlinks += 1;
    }
    // Directory modes and times last: writing into a directory changes its mtime.
    for p in plan.iter().rev().filter(|p| p.entry.kind == EntryKind::Dir) {
        set_meta(&target.join(&p.rel), p.entry)?;
    }
    if !failed.is_empty() {
        return Err(BackupError::Restore(format!(
            "{} file(s) could not be restored and were not written: {}",
            failed.len(),
            failed.join("; ")
        )));
    }
    Ok(sum)
}

/// Refuses to write below an existing symlink (one placed in the target by someone else).
fn no_symlink_below(target: &Path, rel: &Path) -> Result<(), BackupError> {
    let mut at = target.to_path_buf();
    let parent = rel.parent().unwrap_or(Path::new(""));
    for c in parent.components() {
        at.push(c);
        if std::fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(BackupError::Restore(format!(
                "{} is a symlink; refusing to write through it",
                at.display()
            )));
        }
    }
    Ok(())
}

async fn write_file(
    repo: &Repository,
    loc: &Locator,
    entry: &tree::TreeEntry,
    dest: &Path,
) -> Result<u64, BackupError> {
    use std::io::Write;
    if std::fs::symlink_metadata(dest).is_ok() {
        return Err(BackupError::Restore(format!(
            "{} exists; restore into an empty directory",
            dest.display()
        )));
    }
    let tmp = dest.with_file_name(format!(
        ".{}.invsync-partial",
        dest.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    let result: Result<u64, BackupError> = async {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| BackupError::io(tmp.display(), e))?;
        let mut n = 0u64;
        let blobs = blob_stream(repo, loc, &entry.chunks);
        futures::pin_mut!(blobs);
        while let Some(b) = blobs.next().await {
            let b = b?;
            n += b.len() as u64;
            f.write_all(&b)
                .map_err(|e| BackupError::io(tmp.display(), e))?;
        }
        if n != entry.size {
            return Err(BackupError::Restore(format!(
                "{} bytes read, {} expected",
                n, entry.size
            )));
        }
        f.sync_all()
            .map_err(|e| BackupError::io(tmp.display(), e))?;
        drop(f);
        set_meta(&tmp, entry)?;
        std::fs::rename(&tmp, dest).map_err(|e| BackupError::io(dest.display(), e))?;
        Ok(n)
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn set_meta(path: &Path, e: &tree::TreeEntry) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(e.mode))
        .map_err(|err| BackupError::io(path.display(), err))?;
    let mtime =
        std::time::UNIX_EPOCH + std::time::Duration::new(e.mtime.max(0) as u64, e.mtime_nanos);
    let f = std::fs::File::open(path).map_err(|err| BackupError::io(path.display(), err))?;
    f.set_modified(mtime)
        .map_err(|err| BackupError::io(path.display(), err))
}
