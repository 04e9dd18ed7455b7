//! Names of the objects a pipeline owns: its slot and publication on the source, and the
//! replication origin its apply sessions carry on each target.
//!
//! Names are derived from the pipeline (and target) names, so setup, run, status and teardown
//! agree without storing them. Slot names may hold only `a-z`, `0-9` and `_` and at most 63
//! bytes; other characters become `_`, and a name that had to be changed or shortened gets a
//! hash suffix so two different pipelines never share a slot.

const MAX_NAME: usize = 63;

fn derive(parts: &[&str]) -> String {
    let raw = format!("invsync_{}", parts.join("_"));
    let clean: String = raw
        .chars()
        .map(|c| match c {
            'a'..='z' | '0'..='9' | '_' => c,
            'A'..='Z' => c.to_ascii_lowercase(),
            _ => '_',
        })
        .collect();
    if clean == raw && clean.len() <= MAX_NAME {
        return clean;
    }
    let hash = blake3::hash(raw.as_bytes()).to_hex();
    let keep = clean.len().min(MAX_NAME - 9);
    format!("{}_{}", &clean[..keep], &hash[..8])
}

/// The logical replication slot of `pipeline` on its source.
pub fn slot(pipeline: &str) -> String {
    derive(&[pipeline])
}

/// The publication of `pipeline` on its source.
pub fn publication(pipeline: &str) -> String {
    derive(&[pipeline])
}

/// The prefix of the temporary slots `verify db` creates on `pipeline`'s source to cut it at a
/// stream position (each gets a random suffix).
pub fn verify_slot(pipeline: &str) -> String {
    derive(&[pipeline, "verify"])
}

/// The publication on a switchover's new primary through which the switchover of `pipeline`
/// follows the writes made there by anything but the pipeline, and the prefix of its
/// temporary slot.
pub fn switchover_stretch(pipeline: &str) -> String {
    derive(&[pipeline, "switchover"])
}

/// The replication origin that `pipeline`'s apply sessions carry on `target`. One per target,
/// because PostgreSQL lets one session at a time use an origin, and two targets of a pipeline
/// may live in one cluster. The apply session's `application_name` is the same name.
pub fn origin(pipeline: &str, target: &str) -> String {
    derive(&[pipeline, target])
}

/// The prefix of the slot and the name of the publication through which repository
/// `repo_id` archives database `db` (see `backup::archive`). The slot's full name adds a random
/// suffix chosen when it is created: that name is the slot's identity, so a slot dropped and
/// created again is told apart from the one it replaces.
pub fn archive(repo_id: &str, db: &str) -> String {
    let hash = blake3::hash(format!("{repo_id}\n{db}").as_bytes()).to_hex();
    format!("invsync_archive_{}", &hash[..16])
}

/// Most concurrent copy sessions per target (each needs its own origin).
pub const MAX_COPY_JOBS: usize = 32;

/// The replication origin of copy session `k` of `pipeline` on `target`.
pub fn copy_origin(pipeline: &str, target: &str, k: usize) -> String {
    derive(&[pipeline, target, &format!("copy{k}")])
}

/// Every origin `pipeline` may have left on `target`.
pub fn all_origins(pipeline: &str, target: &str) -> Vec<String> {
    let mut all = vec![origin(pipeline, target)];
    all.extend((0..MAX_COPY_JOBS).map(|k| copy_origin(pipeline, target, k)));
    all
}

/// A pipeline's name and one of its targets' names.
pub type PipelineTarget<'a> = (&'a str, &'a str);

/// Two (pipeline, target) pairs whose replication origins would have the same name, and that
/// name: `a_b` to `c` and `a` to `b_c` both derive `invsync_a_b_c`. Their apply sessions would
/// then share one origin (and block or fence each other), so such a configuration is refused.
pub fn origin_clash<'a>(
    pairs: impl IntoIterator<Item = PipelineTarget<'a>>,
) -> Option<(PipelineTarget<'a>, PipelineTarget<'a>, String)> {
    let mut seen: std::collections::HashMap<String, (&str, &str)> = Default::default();
    for pair in pairs {
        for name in all_origins(pair.0, pair.1) {
            match seen.get(&name) {
                Some(&other) if other != pair => return Some((other, pair, name)),
                Some(_) => {}
                None => {
                    seen.insert(name, pair);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_slot_names() {
        assert_eq!(slot("dc_to_cloud"), "invsync_dc_to_cloud");
        let odd = slot("DC-to-Cloud");
        assert!(odd.starts_with("invsync_dc_to_cloud_"));
        assert_ne!(odd, slot("dc_to_cloud"));
        let long = slot(&"x".repeat(200));
        assert!(long.len() <= MAX_NAME);
        assert!(long
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'));
        assert_ne!(origin("p", "a"), origin("p", "b"));
    }

    #[test]
    fn origins_that_would_share_a_name_are_found() {
        assert_eq!(origin_clash([("p", "a"), ("p", "b"), ("q", "a")]), None);
        let (first, second, name) = origin_clash([("a_b", "c"), ("x", "y"), ("a", "b_c")]).unwrap();
        assert_eq!((first, second), (("a_b", "c"), ("a", "b_c")));
        assert_eq!(name, "invsync_a_b_c");
        // A copy session's origin counts too.
        assert!(origin_clash([("p", "t_copy0"), ("p", "t")]).is_some());
    }
}
