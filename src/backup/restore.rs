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

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::{SinkExt, Stream, StreamExt, TryStreamExt};

use super::crypto::BlobId;
use super::index::{Location, Locator, PackRef};
use super::pack::{self, pack_path};
use super::repository::Repository;
use super::snapshot::{Snapshot, TableSnapshot};
use super::tree::{self, EntryKind};
use super::BackupError;
use crate::config::TablePattern;
use crate::pg::schema::{self, AccessOptions, Placement, Plan, TableModel};
use crate::pg::{quote_ident, ConnInfo, PgError};

/// Largest single read from a pack: neighbouring blobs are fetched together up to this.
const MAX_READ: u64 = 8 * 1024 * 1024;
/// Reads in flight at once.
const PARALLEL_READS: usize = 4;

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
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoredTable {
    pub table: String,
    pub rows: u64,
    pub bytes: u64,
}

fn matches(p: &TablePattern, schema: &str, name: &str) -> bool {
    p.schema == schema && p.table.as_deref().is_none_or(|t| t == name)
}

/// Restores tables of `snap` into the database at `conn`: all of them, or none.
pub async fn restore_db(
    repo: &Repository,
    snap: &Snapshot,
    conn: &ConnInfo,
    opts: &RestoreDbOptions,
) -> Result<Vec<RestoredTable>, BackupError> {
    repo.master("restore")?;
    for p in &opts.tables {
        if !snap
            .tables
            .iter()
            .any(|t| matches(p, &t.schema.name.schema, &t.schema.name.name))
        {
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
        .filter(|t| {
            opts.tables.is_empty()
                || opts
                    .tables
                    .iter()
                    .any(|p| matches(p, &t.schema.name.schema, &t.schema.name.name))
        })
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
    let staging = format!(
        "invsync_restore_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let q = |what: String, e| BackupError::Db(PgError::query(what, conn, e));
    client
        .batch_execute(&format!("CREATE SCHEMA {staging}"))
        .await
        .map_err(|e| q("creating the staging schema".into(), e))?;
    let result = load_and_swap(
        repo,
        &loc,
        &client,
        conn,
        &tables,
        &plan,
        &staging,
        opts.replace,
    )
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
        if let Err(e) = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {staging} CASCADE"))
            .await
        {
            tracing::warn!(
                "cannot drop staging schema {staging}: {}",
                crate::pg::describe(&e)
            );
        }
    }
    result?;
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
/// triggers, policies, privileges, then foreign keys, validated against the loaded rows). Until that commit
/// the target schemas are untouched, so a failure or a crash never leaves a table that looks
/// restored but is not (a crash leaves the `invsync_restore_*` schema, which can be dropped).
/// The types the tables need are created first, committed, and dropped again if this fails
/// (a crash can leave them, as it leaves the staging schema).
#[allow(clippy::too_many_arguments)]
async fn load_and_swap(
    repo: &Repository,
    loc: &Locator,
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
    tables: &[&TableSnapshot],
    plan: &Plan<'_>,
    staging: &str,
    replace: bool,
) -> Result<(), BackupError> {
    let created = schema::create_prerequisites(client, conn, plan).await?;
    let result =
        load_and_swap_tables(repo, loc, client, conn, tables, plan, staging, replace).await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
        created.undo(client).await;
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn load_and_swap_tables(
    repo: &Repository,
    loc: &Locator,
    client: &tokio_postgres::Client,
    conn: &ConnInfo,
    tables: &[&TableSnapshot],
    plan: &Plan<'_>,
    staging: &str,
    replace: bool,
) -> Result<(), BackupError> {
    let q = |what: String, e| BackupError::Db(PgError::query(what, conn, e));
    // Biggest first, so the two loaders finish close together.
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tables[i].bytes));
    // Index names are unique within a schema: only when no two clash can the tables have
    // theirs built side by side in the staging schema.
    let build_early = plan.can_build_in_staging();
    let mut indexed = vec![false; tables.len()];
    for (i, done) in futures::stream::iter(order.iter().map(|&i| async move {
        load_one(repo, loc, conn, tables[i], plan, i, staging, build_early)
            .await
            .map(|done| (i, done))
    }))
    .buffer_unordered(PARALLEL_LOADS)
    .try_collect::<Vec<(usize, bool)>>()
    .await?
    {
        indexed[i] = done;
    }

    client
        .batch_execute("BEGIN")
        .await
        .map_err(|e| q("starting the restore transaction".into(), e))?;
    let refused = refused_tables(client, conn, tables, replace).await?;
    if !refused.is_empty() {
        return Err(refusal(&refused));
    }
    let run = |label: String, statements: Vec<String>| async move {
        for s in statements {
            client.batch_execute(&s).await.map_err(|e| {
                BackupError::Restore(format!(
                    "{label}: {}; nothing was restored",
                    q(s.clone(), e)
                ))
            })?;
        }
        Ok::<(), BackupError>(())
    };
    for (i, t) in tables.iter().enumerate() {
        let model = &plan.models()[i];
        let mut statements = Vec::new();
        for (r, rel) in model.relations.iter().enumerate() {
            let name = &rel.name;
            statements.extend([
                format!("DROP TABLE IF EXISTS {}", name.quoted()),
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
    run("functions".into(), plan.function_statements()).await?;
    for (i, t) in tables.iter().enumerate() {
        run(
            format!("table {}", t.schema.name),
            plan.finish_statements(i),
        )
        .await?;
    }
    run("foreign keys".into(), plan.foreign_key_statements()).await?;
    client
        .batch_execute(&format!("DROP SCHEMA {staging}"))
        .await
        .map_err(|e| q("dropping the staging schema".into(), e))?;
    client
        .batch_execute("COMMIT")
        .await
        .map_err(|e| q("committing the restore".into(), e))
}

/// Creates and fills one staging table on a connection of its own; with `build_indexes`, also
/// adds its constraints and indexes there. Returns whether they were built.
#[allow(clippy::too_many_arguments)]
async fn load_one(
    repo: &Repository,
    loc: &Locator,
    conn: &ConnInfo,
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
