//! `invsync agent --check` as a user runs it: the real binary on configuration files. A bad
//! schedule or window is one line naming the file, line and key, with a non-zero exit; a good
//! one prints the exact next runs from a fixed `--from`, and what the windows do to them.

mod support;

use support::config_file::ConfigFile;
use support::invsync;

/// A configuration with two databases, a pipeline and a repository, then `agent`.
fn config(dir: &std::path::Path, agent: &str) -> String {
    let path = ConfigFile::new()
        .database(
            "maindc",
            "postgres://invsync:hunter2@127.0.0.1:5432/einvoice",
        )
        .database("cloud_a", "postgres://invsync@127.0.0.1:5433/einvoice")
        .pipeline("p", "maindc", &["cloud_a"], &["public.invoice"])
        .repository("offsite", "file:///var/backups/invsync", "")
        .toml(agent)
        .write(&dir.join("invsync.toml"));
    path.to_str().unwrap().to_string()
}

const GOOD: &str = r#"
[agent]
time_zone = "Asia/Taipei"

[[schedules]]
name = "nightly-backup"
cron = "0 30 2 * * *"
job = "backup"
repo = "offsite"
db = "maindc"

[[schedules]]
name = "verify-replica"
cron = "0 0 3 * * *"
job = "verify"
pipeline = "p"
during_blackout = "skip"

[[schedules]]
name = "small-verify"
cron = "0 0 12 * * *"
job = "verify"
source = "maindc"
target = "cloud_a"
tables = ["public.invoice"]
during_blackout = "ignore"

[[schedules]]
name = "weekly-forget"
cron = "0 0 4 * * Sun"
time_zone = "America/New_York"
job = "forget"
keep_daily = 7
prune = true

[[blackouts]]
name = "tax-deadline"
months = "odd"
start_day = 13
end_day = 15
databases = ["maindc"]

[[blackouts]]
name = "after-hours"
months = [3]
start_day = 15
start_time = "22:00"
end_day = 16
end_time = "06:00"

[[schedules]]
name = "daily-drill"
cron = "0 0 5 * * *"
job = "drill"
source = "maindc"
target = "cloud_a"

[archives.wal]
db = "maindc"
segment_seconds = 30
"#;

#[test]
fn good_config_prints_the_next_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), GOOD);
    let (code, out, err) = invsync(&[
        "--config",
        &cfg,
        "agent",
        "--check",
        "--json",
        "--from",
        "2026-03-12 12:00",
        "--count",
        "5",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let plan: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(plan["from"], "2026-03-12T12:00:00+08:00");
    // What runs whatever the calendar says.
    assert_eq!(
        plan["pipelines"],
        serde_json::json!([{"name": "p", "source": "maindc", "targets": ["cloud_a"]}])
    );
    assert_eq!(
        plan["archives"],
        serde_json::json!([{"name": "wal", "db": "maindc", "repo": "offsite", "tables": [],
            "segment_seconds": 30, "segment_mib": 64}])
    );
    let schedule = |name: &str| {
        plan["schedules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no schedule {name}: {plan}"))
            .clone()
    };
    let runs = |name: &str| -> Vec<(String, String, String, String)> {
        schedule(name)["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["at"].as_str().unwrap().to_string(),
                    r["action"].as_str().unwrap().to_string(),
                    r["until"].as_str().unwrap_or("").to_string(),
                    r["windows"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|w| w.as_str().unwrap())
                        .collect::<Vec<_>>()
                        .join(","),
                )
            })
            .collect()
    };
    let row = |at: &str, action: &str, until: &str, windows: &str| {
        (at.into(), action.into(), until.into(), windows.into())
    };

    // The tax-deadline window (13th to 15th of March, all day in Taipei) defers the backup of
    // maindc to its end; the after-hours window covers every database and starts on the 15th
    // at 22:00, so the run of the 16th at 02:30 waits until 06:00.
    assert_eq!(
        runs("nightly-backup"),
        vec![
            row(
                "2026-03-13T02:30:00+08:00",
                "defer",
                "2026-03-16T06:00:00+08:00",
                "tax-deadline,after-hours"
            ),
            row(
                "2026-03-14T02:30:00+08:00",
                "defer",
                "2026-03-16T06:00:00+08:00",
                "tax-deadline,after-hours"
            ),
            row(
                "2026-03-15T02:30:00+08:00",
                "defer",
                "2026-03-16T06:00:00+08:00",
                "tax-deadline,after-hours"
            ),
            row(
                "2026-03-16T02:30:00+08:00",
                "defer",
                "2026-03-16T06:00:00+08:00",
                "after-hours"
            ),
            row("2026-03-17T02:30:00+08:00", "run", "", ""),
        ]
    );
    // Skipped instead of deferred, naming the windows open when it falls due; the pipeline's
    // source is maindc.
    assert_eq!(
        runs("verify-replica"),
        vec![
            row("2026-03-13T03:00:00+08:00", "skip", "", "tax-deadline"),
            row("2026-03-14T03:00:00+08:00", "skip", "", "tax-deadline"),
            row("2026-03-15T03:00:00+08:00", "skip", "", "tax-deadline"),
            row("2026-03-16T03:00:00+08:00", "skip", "", "after-hours"),
            row("2026-03-17T03:00:00+08:00", "run", "", ""),
        ]
    );
    assert_eq!(
        schedule("verify-replica")["databases"],
        serde_json::json!(["maindc", "cloud_a"])
    );
    // Ignoring windows: it runs, and says which window it ignores.
    assert_eq!(
        runs("small-verify")[..2],
        [
            row(
                "2026-03-13T12:00:00+08:00",
                "run-in-window",
                "",
                "tax-deadline"
            ),
            row(
                "2026-03-14T12:00:00+08:00",
                "run-in-window",
                "",
                "tax-deadline"
            ),
        ]
    );
    // A forget reads no database, so no window concerns it; in New York, 8 March 2026 was the
    // first day of daylight saving time.
    assert_eq!(
        runs("weekly-forget"),
        vec![
            row("2026-03-15T04:00:00-04:00", "run", "", ""),
            row("2026-03-22T04:00:00-04:00", "run", "", ""),
            row("2026-03-29T04:00:00-04:00", "run", "", ""),
            row("2026-04-05T04:00:00-04:00", "run", "", ""),
            row("2026-04-12T04:00:00-04:00", "run", "", ""),
        ]
    );
    // A drill reads its source and writes its standby: a heavy job the peak calendar defers.
    assert_eq!(
        runs("daily-drill")[0],
        row(
            "2026-03-13T05:00:00+08:00",
            "defer",
            "2026-03-16T06:00:00+08:00",
            "tax-deadline,after-hours"
        )
    );
    assert_eq!(
        schedule("daily-drill")["databases"],
        serde_json::json!(["maindc", "cloud_a"])
    );
    let window = &plan["blackouts"][0];
    assert_eq!(window["name"], "tax-deadline");
    assert_eq!(window["next"][0]["start"], "2026-03-13T00:00:00+08:00");
    assert_eq!(window["next"][0]["end"], "2026-03-16T00:00:00+08:00");
    assert_eq!(window["next"][1]["start"], "2026-05-13T00:00:00+08:00");

    // The same plan for people: one line a run.
    let (code, out, err) = invsync(&[
        "--config",
        &cfg,
        "agent",
        "--check",
        "--from",
        "2026-03-12T04:00:00Z",
        "--count",
        "2",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(
            "  2026-03-13 02:30:00 +08:00  defer to 2026-03-16 06:00:00 +08:00 (tax-deadline, after-hours)\n"
        ),
        "{out}"
    );
    assert!(
        out.contains("  2026-03-13 03:00:00 +08:00  skip (tax-deadline)\n"),
        "{out}"
    );
    assert!(out.contains("  pipeline p: maindc -> cloud_a\n"), "{out}");
    assert!(
        out.contains("  archive wal: maindc into offsite (the tables of maindc's pipelines), a segment every 30 s or 64 MiB\n"),
        "{out}"
    );
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));
}

/// Runs `agent --check` on GOOD with `from` replaced by `to`; returns stderr, asserting it is
/// one line and the exit is not 0.
fn refused(dir: &std::path::Path, from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    let cfg = config(dir, &GOOD.replace(from, to));
    let (code, out, err) = invsync(&["--config", &cfg, "agent", "--check"]);
    assert_ne!(code, 0, "{out}{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(err.contains(&cfg), "names the file: {err}");
    err
}

#[test]
fn each_mistake_is_one_clear_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dated = "[[blackouts]]\nname = \"move\"\nstart = \"2026-04-02 06:00\"\nend = \"2026-04-01 22:00\"\n";
    let after_hours = "[[blackouts]]\nname = \"after-hours\"";
    // (text in GOOD, replaced by, what the error line holds after the file name)
    let cases: &[(&str, &str, &str)] = &[
        (
            "job = \"drill\"\nsource = \"maindc\"\ntarget = \"cloud_a\"",
            "job = \"drill\"\nsource = \"maindc\"",
            "a drill job needs `source` (the archived database) and `target`",
        ),
        (
            "cron = \"0 30 2 * * *\"",
            "cron = \"30 2 * *\"",
            ":19: schedules[0].cron: `30 2 * *` is not a cron expression; write six fields",
        ),
        (
            "time_zone = \"Asia/Taipei\"",
            "time_zone = \"Asia/Taipie\"",
            ":15: agent.time_zone: unknown time zone `Asia/Taipie`",
        ),
        (
            "\"America/New_York\"",
            "\"Mars/Olympus\"",
            ":43: schedules[3].time_zone: unknown time zone `Mars/Olympus`",
        ),
        (
            "end_day = 16",
            "end_day = 15",
            ":61: blackouts[1].end_time: the window ends at or before it starts",
        ),
        (
            after_hours,
            &format!("{dated}{after_hours}"),
            ":58: blackouts[1].end: the window ends (2026-04-01 22:00) at or before it starts",
        ),
        (
            "repo = \"offsite\"",
            "repo = \"offiste\"",
            ":21: schedules[0].repo: no repository named `offiste`",
        ),
        (
            "db = \"maindc\"",
            "db = \"maindk\"",
            ":22: schedules[0].db: no database named `maindk`",
        ),
        (
            "pipeline = \"p\"",
            "pipeline = \"q\"",
            ":28: schedules[1].pipeline: no pipeline named `q`",
        ),
        (
            "databases = [\"maindc\"]",
            "databases = [\"main\"]",
            ":53: blackouts[0].databases: no database named `main`",
        ),
        // Options that do not belong to the job, and choices that do not exist.
        (
            "keep_daily = 7",
            "keep_daily = 7\ndb = \"maindc\"",
            ":46: schedules[3].db: a forget job takes no `db`",
        ),
        (
            "job = \"backup\"",
            "job = \"bakup\"",
            ":20: schedules[0].job: unknown job `bakup`",
        ),
        (
            "during_blackout = \"skip\"",
            "during_blackout = \"later\"",
            ":29: schedules[1].during_blackout: `later` is not a choice",
        ),
        (
            "months = \"odd\"",
            "months = [13]",
            ":50: blackouts[0].months: 13 is not a month",
        ),
    ];
    for (from, to, want) in cases {
        let e = refused(d, from, to);
        assert!(e.contains(want), "{to}: {e}");
    }

    // The plan's options belong to --check (without it, `invsync agent` runs the agent).
    let cfg = config(d, GOOD);
    let (code, _, err) = invsync(&["--config", &cfg, "agent", "--from", "2026-01-01 00:00"]);
    assert_ne!(code, 0);
    assert!(err.contains("--check"), "{err}");
    // A bad --from is named too.
    let (code, _, err) = invsync(&["--config", &cfg, "agent", "--check", "--from", "tomorrow"]);
    assert_ne!(code, 0);
    assert!(err.contains("--from: `tomorrow` is not a time"), "{err}");
}
