//! The repository check behind `invsync verify repo`: is every snapshot restorable?
//!
//! Without reading data it checks structure: every snapshot and index object decrypts and
//! parses; every blob a snapshot references is in the index; every pack the index lists
//! exists with the size the index says; every stored pack is indexed; every backup session
//! that wrote index objects has its snapshot. With `read_data`, packs (all, or a random
//! share) are downloaded, their names checked against their content hash, their trailers
//! against the index, and each blob decrypted, decompressed and hashed.
//!
//! Damage is data here, not an error: the check reports every finding with the object and
//! the snapshots, tables and files it affects, and carries on. A repository that cannot be
//! read (the store unreachable, access denied) is an error, never a finding: weather is not
//! damage. The check holds a read lock (see `lock`), so a prune beside it deletes nothing it
//! may still look at, and a pack it finds gone is really missing. Memory: the index is held
//! whole while checking.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use rand::Rng;
use serde::Serialize;

use super::archive::{self, SegmentManifest};
use super::crypto::{BlobId, IdKey};
use super::index::{IndexFile, KIND_INDEX};
use super::lock::{Lock, LockKind};
use super::pack::{self, pack_path, PackEntry};
use super::repository::Repository;
use super::snapshot::{Snapshot, KIND_SNAPSHOT};
use super::BackupError;

/// How much to read.
#[derive(Debug, Clone, Default)]
pub struct RepoCheckOptions {
    /// Read and check this percentage of packs (100 = all); `None` checks structure only.
    pub read_data: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A snapshot manifest cannot be read or decrypted.
    UnreadableSnapshot,
    /// An index object cannot be read, decrypted or parsed (truncated, modified).
    UnreadableIndex,
    /// A snapshot references a blob that no readable index lists.
    BlobNotIndexed,
    /// The index lists a pack that is not in the store.
    MissingPack,
    /// A stored pack's size differs from the index.
    PackSizeMismatch,
    /// A pack's content does not match its name, or its header/trailer is damaged.
    CorruptPack,
    /// A blob fails decryption, decompression or its hash.
    CorruptBlob,
    /// Index objects of a backup session exist, but its snapshot does not: the backup was
    /// interrupted, or its manifest was deleted.
    MissingSnapshot,
    /// A stored pack no index lists (left by an interrupted backup; prune removes it).
    UnindexedPack,
    /// An archive segment's manifest cannot be read, or its data is missing or damaged.
    CorruptSegment,
    /// A database's archive has a gap (see `archive`): changes there cannot be replayed.
    ArchiveGap,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Some data cannot be restored.
    Error,
    /// Space is wasted or something is odd, but every listed snapshot is restorable.
    Warning,
}

/// One problem found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub severity: Severity,
    /// The object concerned (`data/ab/...`, `index/...`, `snapshots/...`).
    pub object: String,
    /// What it breaks: `snapshot ID: table T` / `snapshot ID: file F`.
    pub affects: Vec<String>,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RepoReport {
    pub repository: String,
    pub snapshots: usize,
    pub index_objects: usize,
    pub packs: usize,
    pub packs_read: usize,
    pub blobs_checked: u64,
    /// Archive segments checked (their data read with `read_data`).
    #[serde(default)]
    pub segments: usize,
    pub findings: Vec<Finding>,
}

impl RepoReport {
    pub fn has_errors(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Error)
    }
}

/// Who uses each blob: `snapshot ID: table T` strings.
type Users = HashMap<BlobId, BTreeSet<String>>;

/// Checks `repo` (see the module documentation), holding off prune meanwhile.
pub async fn check_repo(
    repo: &Repository,
    opts: &RepoCheckOptions,
) -> Result<RepoReport, BackupError> {
    repo.master("verify repo")?;
    let lock = Lock::acquire(repo, LockKind::Read).await?;
    let report = check(repo, opts).await;
    lock.release(repo).await;
    report
}

async fn check(repo: &Repository, opts: &RepoCheckOptions) -> Result<RepoReport, BackupError> {
    let mut report = RepoReport {
        repository: repo.name.clone(),
        ..Default::default()
    };
    let mut findings = Vec::new();

    // Snapshots and who uses which blob.
    let mut snaps: Vec<(String, Snapshot)> = Vec::new();
    for name in repo.list_names("snapshots").await? {
        let object = format!("snapshots/{name}");
        match repo.read_object::<Snapshot>(KIND_SNAPSHOT, &object).await {
            Ok(s) => snaps.push((name, s)),
            Err(BackupError::Corrupt { reason, .. }) => findings.push(Finding {
                kind: FindingKind::UnreadableSnapshot,
                severity: Severity::Error,
                affects: vec![format!("snapshot {}", short(&name))],
                message: format!("snapshot manifest {object} cannot be read: {reason}"),
                object,
            }),
            Err(e) => return Err(e),
        }
    }
    report.snapshots = snaps.len();
    let mut users: Users = HashMap::new();
    for (id, s) in &snaps {
        for t in &s.tables {
            let who = format!("snapshot {}: table {}", short(id), t.schema.name);
            for c in &t.chunks {
                users.entry(*c).or_default().insert(who.clone());
            }
        }
        for tree in &s.trees {
            for e in &tree.entries {
                let who = format!(
                    "snapshot {}: file {}/{}",
                    short(id),
                    tree.root.trim_end_matches('/'),
                    e.path
                );
                for c in &e.chunks {
                    users.entry(*c).or_default().insert(who.clone());
                }
            }
        }
    }

    // The index.
    let mut packs: HashMap<String, (PackEntry, Option<IdKey>)> = HashMap::new();
    let mut sessions: BTreeMap<String, String> = BTreeMap::new();
    let index_names = repo.list_names("index").await?;
    report.index_objects = index_names.len();
    for name in &index_names {
        let object = format!("index/{name}");
        match repo.read_object::<IndexFile>(KIND_INDEX, &object).await {
            Ok(file) => {
                if let Some(s) = &file.session {
                    sessions.entry(s.clone()).or_insert_with(|| object.clone());
                }
                let id_key = file.id_key.as_deref().and_then(|h| IdKey::from_hex(h).ok());
                for p in file.packs {
                    packs.entry(p.id.clone()).or_insert((p, id_key.clone()));
                }
            }
            Err(BackupError::Corrupt { reason, .. }) => findings.push(Finding {
                kind: FindingKind::UnreadableIndex,
                severity: Severity::Error,
                object,
                affects: Vec::new(),
                message: format!("index object cannot be read: {reason}"),
            }),
            Err(e) => return Err(e),
        }
    }
    let snapshot_sessions: HashSet<&str> = snaps.iter().map(|(_, s)| s.session.as_str()).collect();
    for (session, object) in &sessions {
        if !snapshot_sessions.contains(session.as_str()) {
            findings.push(Finding {
                kind: FindingKind::MissingSnapshot,
                severity: Severity::Warning,
                object: object.clone(),
                affects: vec![format!("backup session {session}")],
                message: format!(
                    "backup session {session} stored data but no snapshot of it exists: the backup was interrupted, forgotten, or its manifest was deleted; its data is unreachable until a prune removes it"
                ),
            });
        }
    }
    let mut blob_pack: HashMap<BlobId, String> = HashMap::new();
    for (id, (p, _)) in &packs {
        for b in &p.blobs {
            blob_pack.entry(b.id).or_insert_with(|| id.clone());
        }
    }
    let mut not_indexed: BTreeMap<String, usize> = BTreeMap::new();
    for (blob, who) in &users {
        if !blob_pack.contains_key(blob) {
            for w in who {
                *not_indexed.entry(w.clone()).or_default() += 1;
            }
        }
    }
    if !not_indexed.is_empty() {
        findings.push(Finding {
            kind: FindingKind::BlobNotIndexed,
            severity: Severity::Error,
            object: "index".into(),
            affects: not_indexed.keys().cloned().collect(),
            message: format!(
                "{} blob(s) referenced by snapshots are in no readable index",
                users.keys().filter(|b| !blob_pack.contains_key(b)).count()
            ),
        });
    }

    // Stored packs against the index.
    let stored: HashMap<String, u64> = repo
        .list("data")
        .await?
        .into_iter()
        .map(|(rel, m)| (rel.rsplit('/').next().unwrap_or(&rel).to_string(), m.size))
        .collect();
    report.packs = stored.len();
    let affected = |p: &PackEntry| -> Vec<String> {
        let mut s: BTreeSet<String> = BTreeSet::new();
        for b in &p.blobs {
            if let Some(w) = users.get(&b.id) {
                s.extend(w.iter().cloned());
            }
        }
        s.into_iter().collect()
    };
    let severity_for = |aff: &[String]| {
        if aff.is_empty() {
            Severity::Warning
        } else {
            Severity::Error
        }
    };
    let mut sorted_packs: Vec<&String> = packs.keys().collect();
    sorted_packs.sort();
    let mut readable = Vec::new();
    for id in sorted_packs {
        let (p, _) = &packs[id];
        let object = pack_path(id);
        match stored.get(id) {
            None => {
                let aff = affected(p);
                findings.push(Finding {
                    kind: FindingKind::MissingPack,
                    severity: severity_for(&aff),
                    object,
                    message: format!(
                        "pack is listed in the index but missing from the store ({} blob(s) lost)",
                        p.blobs.len()
                    ),
                    affects: aff,
                });
            }
            Some(&size) if size != p.size => {
                let aff = affected(p);
                findings.push(Finding {
                    kind: FindingKind::PackSizeMismatch,
                    severity: severity_for(&aff),
                    object,
                    message: format!("pack has {size} bytes, the index says {}", p.size),
                    affects: aff,
                });
            }
            Some(_) => readable.push(id.clone()),
        }
    }
    let mut unindexed: Vec<&String> = stored
        .keys()
        .filter(|id| !packs.contains_key(*id))
        .collect();
    unindexed.sort();
    for id in unindexed {
        findings.push(Finding {
            kind: FindingKind::UnindexedPack,
            severity: Severity::Warning,
            object: pack_path(id),
            affects: Vec::new(),
            message: "pack is in no index (left by an interrupted backup or prune); `invsync prune` removes it".into(),
        });
    }

    // Contents.
    if let Some(percent) = opts.read_data {
        let share = (percent / 100.0).clamp(0.0, 1.0);
        let mut rng = rand::thread_rng();
        for id in readable {
            if share < 1.0 && rng.gen::<f64>() >= share {
                continue;
            }
            let (p, id_key) = &packs[&id];
            let id_key = id_key
                .as_ref()
                .or(repo.keys.master.as_ref().map(|m| &m.id_key));
            report.packs_read += 1;
            let object = pack_path(&id);
            let bytes = match repo.get(&object).await {
                Ok(b) => b,
                Err(BackupError::Corrupt { reason, .. }) => {
                    let aff = affected(p);
                    findings.push(Finding {
                        kind: FindingKind::MissingPack,
                        severity: severity_for(&aff),
                        object,
                        message: reason,
                        affects: aff,
                    });
                    continue;
                }
                Err(e) => return Err(e),
            };
            let mut damaged: Vec<String> = Vec::new();
            if blake3::hash(&bytes).to_hex().as_str() != id {
                damaged.push("its content does not match its name (modified in the store)".into());
            }
            let key = match pack::read_trailer(&repo.keys, &bytes) {
                Ok((key, listed)) => {
                    if listed != p.blobs {
                        damaged.push("its trailer disagrees with the index".into());
                    }
                    Some(key)
                }
                Err(e) => {
                    damaged.push(format!("header or trailer: {e}"));
                    repo.keys
                        .unwrap_object_key(&hex::decode(&p.key).unwrap_or_default())
                        .ok()
                }
            };
            let mut bad_blobs: BTreeSet<String> = BTreeSet::new();
            let mut n_bad = 0;
            if let Some(key) = key {
                for b in &p.blobs {
                    report.blobs_checked += 1;
                    let ok = pack::sealed_in(&bytes, 0, b)
                        .is_some_and(|sealed| pack::open_blob(&key, b, sealed, id_key).is_ok());
                    if !ok {
                        n_bad += 1;
                        if let Some(w) = users.get(&b.id) {
                            bad_blobs.extend(w.iter().cloned());
                        }
                    }
                }
            }
            if n_bad > 0 {
                let aff: Vec<String> = bad_blobs.into_iter().collect();
                findings.push(Finding {
                    kind: FindingKind::CorruptBlob,
                    severity: severity_for(&aff),
                    object: object.clone(),
                    message: std::iter::once(format!(
                        "{n_bad} blob(s) fail decryption or their hash"
                    ))
                    .chain(damaged)
                    .collect::<Vec<_>>()
                    .join("; "),
                    affects: aff,
                });
            } else if !damaged.is_empty() {
                let aff = affected(p);
                findings.push(Finding {
                    kind: FindingKind::CorruptPack,
                    severity: severity_for(&aff),
                    object,
                    message: damaged.join("; "),
                    affects: aff,
                });
            }
        }
    }
    check_archive(repo, opts, &mut report, &mut findings).await?;
    findings.sort_by(|a, b| a.kind.cmp(&b.kind).then(a.object.cmp(&b.object)));
    report.findings = findings;
    Ok(report)
}

/// Archive segments: each manifest reads, its data object exists (and, with `read_data`,
/// matches its name and manifest), and each database's segments chain without gaps.
async fn check_archive(
    repo: &Repository,
    opts: &RepoCheckOptions,
    report: &mut RepoReport,
    findings: &mut Vec<Finding>,
) -> Result<(), BackupError> {
    let data: HashSet<String> = repo
        .list_names(archive::DATA_DIR)
        .await?
        .into_iter()
        .collect();
    let mut manifests = Vec::new();
    for name in repo.list_names(archive::SEGMENTS_DIR).await? {
        let object = format!("{}/{name}", archive::SEGMENTS_DIR);
        let bad = |message: String, object: String| Finding {
            kind: FindingKind::CorruptSegment,
            severity: Severity::Error,
            affects: Vec::new(),
            message,
            object,
        };
        let m: SegmentManifest = match repo.read_object(archive::KIND_SEGMENT, &object).await {
            Ok(m) => m,
            Err(BackupError::Corrupt { reason, .. }) => {
                findings.push(bad(
                    format!("archive segment manifest {object} cannot be read: {reason}"),
                    object,
                ));
                continue;
            }
            Err(e) => return Err(e),
        };
        report.segments += 1;
        let data_object = format!("{}/{}", archive::DATA_DIR, m.data);
        let what = format!("archive segment {} {}..{}", m.db, m.start, m.end);
        if !data.contains(&m.data) {
            findings.push(bad(
                format!("{what}: its data {data_object} is missing"),
                data_object,
            ));
        } else if opts.read_data.is_some() {
            let bytes = repo.get(&data_object).await?;
            if blake3::hash(&bytes).to_hex().as_str() != m.data {
                findings.push(bad(
                    format!("{what}: its data {data_object} does not match its name"),
                    data_object,
                ));
            } else if let Err(e) = archive::read_segment(repo, &m).await {
                findings.push(bad(format!("{what}: {e}"), data_object));
            }
        }
        manifests.push(m);
    }
    for db in archive::status(&manifests, &[]) {
        for gap in db.gaps {
            findings.push(Finding {
                kind: FindingKind::ArchiveGap,
                severity: Severity::Warning,
                object: archive::SEGMENTS_DIR.to_string(),
                affects: vec![format!("archive of {}", db.db)],
                message: format!(
                    "archive of {}: gap after {}: {}",
                    db.db, gap.after, gap.reason
                ),
            });
        }
    }
    Ok(())
}

fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}
