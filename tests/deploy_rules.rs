//! The deployment files: Prometheus's own tool checks the alert rules and runs their unit
//! tests (the lag, stale-backup and lease alerts fire when they should and not when healthy),
//! and every metric the rules and the Grafana dashboard use is one the agent exports (this list;
//! `tests/agent_ha.rs` checks them against a live agent's `/metrics`).

mod agent_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metrics the agent exports, by name (labels in the comments).
const EXPORTED: &[&str] = &[
    "invsync_build_info",                            // version
    "invsync_pipeline_up",                           // pipeline
    "invsync_pipeline_target_up",                    // pipeline, target
    "invsync_pipeline_lag_seconds",                  // pipeline, target
    "invsync_pipeline_lag_bytes",                    // pipeline, target
    "invsync_pipeline_slot_retained_wal_bytes",      // pipeline
    "invsync_pipeline_applied_transactions_total",   // pipeline, target
    "invsync_pipeline_restarts_total",               // pipeline
    "invsync_pipeline_missing_rows",                 // pipeline, target
    "invsync_pipeline_target_cut_loose",             // pipeline, target
    "invsync_pipeline_tables",                       // pipeline, target, phase
    "invsync_job_runs_total",                        // schedule, job, result
    "invsync_job_skipped_total",                     // schedule, reason
    "invsync_job_deferred_total",                    // schedule
    "invsync_job_running",                           // schedule
    "invsync_job_last_start_timestamp_seconds",      // schedule
    "invsync_job_last_success_timestamp_seconds",    // schedule
    "invsync_job_last_duration_seconds",             // schedule
    "invsync_job_read_bytes_total",                  // schedule
    "invsync_job_stored_bytes_total",                // schedule
    "invsync_backup_last_success_timestamp_seconds", // repo, db
    "invsync_verify_differences",                    // schedule
    "invsync_blackout_active",                       // window
    "invsync_lease_held",                            // lease
    "invsync_lease_epoch",                           // lease
    "invsync_archive_up",                            // archive
    "invsync_archive_restarts_total",                // archive
    "invsync_archive_segments_total",                // archive
    "invsync_archive_transactions_total",            // archive
    "invsync_archive_lag_bytes",                     // archive
    "invsync_archive_recovery_point_age_seconds",    // archive
];

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn promtool(args: &[&str]) -> (bool, String) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy("prometheus"))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}); install it: bash -c 'source scripts/lib.sh; ensure_prometheus'")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let (ok, out) = promtool(&["check", "rules", "alerts.yml"]);
    assert!(ok, "promtool check rules:\n{out}");
    let (ok, out) = promtool(&["test", "rules", "alerts.test.yml"]);
    assert!(ok, "promtool test rules:\n{out}");
    // The unit tests cover the alerts the operators rely on.
    let tests = std::fs::read_to_string(deploy("prometheus/alerts.test.yml")).unwrap();
    for alert in [
        "InvsyncPipelineLagHigh",
        "InvsyncBackupStale",
        "InvsyncLeaseNoHolder",
        "InvsyncSlotRetainsTooMuchWal",
        "InvsyncTargetCutLoose",
        "InvsyncJobFailing",
        "InvsyncVerifyFoundDifferences",
        "InvsyncAgentDown",
    ] {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "no unit test for {alert}"
        );
    }
}

#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    let (rules, dashboard) = agent_common::deploy_metric_names();
    let exported: BTreeSet<String> = EXPORTED.iter().map(|s| s.to_string()).collect();
    for (what, used) in [("alerts.yml", &rules), ("invsync.json", &dashboard)] {
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{what} uses metrics the agent does not export: {unknown:?}"
        );
    }
    // The rules watch lag, backups, slots, jobs, verify and leases.
    let watched = &rules;
    for metric in [
        "invsync_pipeline_lag_seconds",
        "invsync_backup_last_success_timestamp_seconds",
        "invsync_pipeline_slot_retained_wal_bytes",
        "invsync_job_runs_total",
        "invsync_verify_differences",
        "invsync_lease_held",
        "invsync_archive_recovery_point_age_seconds",
    ] {
        assert!(watched.contains(metric), "no alert on {metric}");
    }
    // The dashboard shows every exported metric.
    let shown = &dashboard;
    let missing: Vec<_> = exported.difference(shown).collect();
    assert!(
        missing.is_empty(),
        "the dashboard does not show {missing:?}"
    );
}

#[test]
fn the_kubernetes_configmap_holds_a_valid_configuration() {
    let manifest = std::fs::read_to_string(deploy("kubernetes/invsync-agent.yaml")).unwrap();
    // The block scalar after `invsync.toml: |`, indented four spaces, up to the next document.
    let start = manifest
        .find("invsync.toml: |\n")
        .expect("the ConfigMap holds invsync.toml");
    let toml: String = manifest[start..]
        .lines()
        .skip(1)
        .take_while(|l| !l.starts_with("---"))
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let secrets = ["MAINDC_PASSWORD", "CLOUD_PASSWORD", "INVSYNC_PASSPHRASE"];
    let config = invsync::config::Config::parse(Path::new("invsync.toml"), &toml, &|var: &str| {
        secrets.contains(&var).then(|| "s3cret".to_string())
    })
    .unwrap_or_else(|e| panic!("the ConfigMap's invsync.toml: {e}"));
    assert_eq!(config.agent.listen.to_string(), "0.0.0.0:9187");
    assert_eq!(config.schedules.len(), 2);
    // Every variable it uses is one the Secret's instructions create.
    let used: BTreeSet<&str> = toml
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once('}').map(|(var, _)| var))
        .collect();
    assert_eq!(used, secrets.into_iter().collect());
    for var in secrets {
        assert!(
            manifest.contains(&format!("--from-literal={var}=")),
            "{var} is not in the Secret"
        );
    }
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    // The unit as installed, with the binary where this build put it.
    let unit = std::fs::read_to_string(deploy("systemd/invsync-agent.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/invsync "));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("invsync-agent.service");
    std::fs::write(
        &path,
        unit.replace("/usr/local/bin/invsync", env!("CARGO_BIN_EXE_invsync")),
    )
    .unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run systemd-analyze ({e}); install it: bash -c 'source scripts/lib.sh; ensure_systemd_analyze'")
        });
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
}
