//! Configuration trees: directories saved with their files' contents, modes and modification
//! times, and symlinks saved as links (never followed).
//!
//! Entry paths are relative to the tree's root, `/`-separated, and consist of plain names
//! only; [`safe_relative`] is the one check every restore applies before writing.

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::crypto::BlobId;
use super::BackupError;

/// One saved tree.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeSnapshot {
    /// The directory as given to `backup --config-dir`, made absolute.
    pub root: String,
    /// Parents before children, names sorted.
    pub entries: Vec<TreeEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    Dir,
    File,
    Symlink,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TreeEntry {
    /// Relative to the root; empty for the root itself.
    pub path: String,
    pub kind: EntryKind,
    /// Permission bits.
    pub mode: u32,
    /// Modification time, seconds and nanoseconds since the epoch.
    pub mtime: i64,
    pub mtime_nanos: u32,
    pub size: u64,
    /// A symlink's target, as stored in the link.
    pub target: Option<String>,
    pub chunks: Vec<BlobId>,
}

/// Lists a tree (without contents): entries and their absolute paths on this host.
pub fn walk(root: &Path) -> Result<(String, Vec<(PathBuf, TreeEntry)>), BackupError> {
    let abs = std::path::absolute(root).map_err(|e| BackupError::io(root.display(), e))?;
    let meta = std::fs::symlink_metadata(&abs).map_err(|e| BackupError::io(abs.display(), e))?;
    if !meta.is_dir() {
        return Err(BackupError::Invalid(format!(
            "--config-dir {} is not a directory",
            root.display()
        )));
    }
    let root_name = abs
        .to_str()
        .ok_or_else(|| BackupError::Invalid(format!("{} is not valid UTF-8", abs.display())))?
        .to_string();
    let mut out = Vec::new();
    out.push((abs.clone(), entry_of(&abs, String::new(), &meta)?));
    visit(&abs, "", &mut out)?;
    Ok((root_name, out))
}

fn visit(dir: &Path, rel: &str, out: &mut Vec<(PathBuf, TreeEntry)>) -> Result<(), BackupError> {
    let mut names = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(|e| BackupError::io(dir.display(), e))? {
        let ent = ent.map_err(|e| BackupError::io(dir.display(), e))?;
        let name = ent.file_name().into_string().map_err(|n| {
            BackupError::Invalid(format!("{}: name {n:?} is not valid UTF-8", dir.display()))
        })?;
        names.push(name);
    }
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let meta =
            std::fs::symlink_metadata(&path).map_err(|e| BackupError::io(path.display(), e))?;
        let child = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        let ft = meta.file_type();
        if !(ft.is_dir() || ft.is_file() || ft.is_symlink()) {
            tracing::warn!(path = %path.display(), "skipping special file (not a file, directory or symlink)");
            continue;
        }
        out.push((path.clone(), entry_of(&path, child.clone(), &meta)?));
        if ft.is_dir() {
            visit(&path, &child, out)?;
        }
    }
    Ok(())
}

fn entry_of(path: &Path, rel: String, meta: &std::fs::Metadata) -> Result<TreeEntry, BackupError> {
    use std::os::unix::fs::MetadataExt;
    let ft = meta.file_type();
    let (kind, target) = if ft.is_symlink() {
        let t = std::fs::read_link(path).map_err(|e| BackupError::io(path.display(), e))?;
        let t = t
            .to_str()
            .ok_or_else(|| {
                BackupError::Invalid(format!("{}: link target is not UTF-8", path.display()))
            })?
            .to_string();
        (EntryKind::Symlink, Some(t))
    } else if ft.is_dir() {
        (EntryKind::Dir, None)
    } else {
        (EntryKind::File, None)
    };
    Ok(TreeEntry {
        path: rel,
        kind,
        mode: meta.mode() & 0o7777,
        mtime: meta.mtime(),
        mtime_nanos: meta.mtime_nsec().clamp(0, 999_999_999) as u32,
        size: if kind == EntryKind::File {
            meta.len()
        } else {
            0
        },
        target,
        chunks: Vec::new(),
    })
}

/// `rel` as a path of plain names, or `None` if it has `..`, a root, or anything else that
/// could leave the directory it is joined to.
pub fn safe_relative(rel: &str) -> Option<PathBuf> {
    if rel.is_empty() {
        return Some(PathBuf::new());
    }
    let p = Path::new(rel);
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            _ => return None,
        }
    }
    Some(out)
}

/// Where tree `root` goes below a restore directory: its absolute path without the leading
/// `/` (so `/etc/invsync` restores to `DIR/etc/invsync`).
pub fn root_below(root: &str) -> Option<PathBuf> {
    safe_relative(root.trim_start_matches('/'))
}

/// Whether a symlink at `link_rel` (relative to the restore directory) pointing to `target`
/// stays inside the restore directory. Resolution is lexical, so a target that passes
/// *through* another link of the snapshot (`is_link`) before further components is refused
/// too: its real destination depends on that link's target (`a -> .`, `b -> a/..`).
pub fn link_stays_inside(link_rel: &Path, target: &str, is_link: &dyn Fn(&Path) -> bool) -> bool {
    let t = Path::new(target);
    if t.is_absolute() {
        return false;
    }
    let mut at: PathBuf = link_rel.parent().map(Path::to_path_buf).unwrap_or_default();
    let comps: Vec<Component> = t.components().collect();
    for (i, c) in comps.iter().enumerate() {
        match c {
            Component::Normal(n) => {
                at.push(n);
                if i + 1 < comps.len() && is_link(&at) {
                    return false;
                }
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if !at.pop() {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        assert!(safe_relative("a/b").is_some());
        assert!(safe_relative("../x").is_none());
        assert!(safe_relative("a/../../x").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(root_below("/etc/invsync").is_some());
        assert!(root_below("/etc/../..").is_none());
        let none = |_: &Path| false;
        assert!(link_stays_inside(
            Path::new("etc/app/l"),
            "../other/f",
            &none
        ));
        assert!(!link_stays_inside(Path::new("etc/l"), "../../x", &none));
        assert!(!link_stays_inside(Path::new("l"), "/etc/passwd", &none));
        let a_is_link = |p: &Path| p == Path::new("a");
        assert!(!link_stays_inside(Path::new("b"), "a/..", &a_is_link));
    }
}
