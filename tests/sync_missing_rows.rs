//! The `missing_rows` policy of a pipeline, between real clusters: rows are deleted on the
//! target behind the pipeline's back, then updated or deleted on the source. `warn` counts and
//! skips, `stop` stops before the batch commits (and again at the same place after a restart),
//! `apply` inserts what an update carries whole and lets a delete do nothing; `sync status`
//! shows the count per target.

mod support;
mod sync_common;

use std::path::Path;

use support::{invsync, PgCluster};
use sync_common::*;

/// Sets the pipeline's policy (the pipeline's section is the last of the file).
fn set_policy(cfg: &Path, policy: &str) {
    let text = std::fs::read_to_string(cfg).unwrap();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("missing_rows"))
        .collect();
    std::fs::write(
        cfg,
        format!("{}\nmissing_rows = \"{policy}\"\n", kept.join("\n")),
    )
    .unwrap();
}

/// `sync status --json`'s count of missing rows for the only target.
fn missing_count(cfg: &Path) -> i64 {
    let (code, out, err) = invsync(&[
        "--config",
        cfg.to_str().unwrap(),
        "sync",
        "status",
        "p",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v[0]["targets"][0]["missing_rows"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_rows_are_counted_stopped_at_or_applied_as_the_policy_says() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE account (id int PRIMARY KEY, balance numeric NOT NULL);
         INSERT INTO account SELECT g, 100 FROM generate_series(1, 50) g;
         CREATE TABLE doc (id int PRIMARY KEY, title text, body text);
         INSERT INTO doc SELECT g, 't', (SELECT string_agg(md5(g::text || i::text), '')
                                          FROM generate_series(1, 400) i)
           FROM generate_series(1, 2) g;",
    );
    let (_dir, cfg) = set_up_pipeline(&src, &dst, &["public.account", "public.doc"]);
    assert_eq!(missing_count(&cfg), 0);

    // warn (the default): three changes find no row; they are counted and skipped.
    dst.psql("einvoice", "DELETE FROM account WHERE id IN (1, 2, 3)");
    let run = Running::start(&load(&cfg), "p");
    src.psql(
        "einvoice",
        "UPDATE account SET balance = 1 WHERE id IN (1, 2);
         DELETE FROM account WHERE id = 3;
         UPDATE account SET balance = 1 WHERE id = 10;",
    );
    wait_for("the update of row 10 to arrive", || {
        dump(&dst, "SELECT balance FROM account WHERE id = 10") == "1"
    })
    .await;
    run.stop().await;
    assert_eq!(missing_count(&cfg), 3);
    assert_eq!(
        dump(&dst, "SELECT count(*) FROM account WHERE id <= 3"),
        "0"
    );

    // stop: the pipeline stops on row 4 and commits nothing of its batch, again after a restart.
    set_policy(&cfg, "stop");
    dst.psql("einvoice", "DELETE FROM account WHERE id = 4");
    let before = applied_lsn(&dst, "p");
    src.psql(
        "einvoice",
        "BEGIN; UPDATE account SET balance = 3 WHERE id = 21;
                UPDATE account SET balance = 3 WHERE id = 4; COMMIT;",
    );
    for attempt in 0..2 {
        let err = Running::start(&load(&cfg), "p")
            .finished()
            .await
            .expect_err("the pipeline stops on the missing row")
            .to_string();
        assert!(
            err.contains("UPDATE of public.account (\"id\") = ('4') finds no row there")
                && err.contains("missing_rows = \"stop\"")
                && !err.contains('\n'),
            "attempt {attempt}: {err}"
        );
        assert_eq!(applied_lsn(&dst, "p"), before, "attempt {attempt}");
        assert_eq!(
            dump(&dst, "SELECT balance FROM account WHERE id = 21"),
            "100",
            "attempt {attempt}: the same source transaction's other row was not committed"
        );
    }
    assert_eq!(missing_count(&cfg), 3);

    // apply: the update of row 4 carries the whole row and inserts it; a delete of a missing
    // row does nothing; both count.
    set_policy(&cfg, "apply");
    dst.psql("einvoice", "DELETE FROM account WHERE id = 5");
    let run = Running::start(&load(&cfg), "p");
    src.psql(
        "einvoice",
        "DELETE FROM account WHERE id = 5; UPDATE account SET balance = 5 WHERE id = 11;",
    );
    wait_for("the update of row 11 to arrive", || {
        dump(&dst, "SELECT balance FROM account WHERE id = 11") == "5"
    })
    .await;
    run.stop().await;
    assert_eq!(missing_count(&cfg), 5);
    let rows_1_to_3_were_skipped = "SELECT id, balance FROM account WHERE id > 3 ORDER BY id";
    assert_eq!(
        dump(&src, rows_1_to_3_were_skipped),
        dump(&dst, rows_1_to_3_were_skipped)
    );
    let (code, out, err) = invsync(&["--config", cfg.to_str().unwrap(), "sync", "status", "p"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("5 missing rows (apply)"), "{out}");

    // An update that leaves a TOASTed column out cannot be inserted whole: it stops.
    dst.psql("einvoice", "DELETE FROM doc WHERE id = 1");
    src.psql("einvoice", "UPDATE doc SET title = 'new' WHERE id = 1");
    let err = Running::start(&load(&cfg), "p")
        .finished()
        .await
        .expect_err("the pipeline stops on the partial row")
        .to_string();
    assert!(
        err.contains("UPDATE of public.doc (\"id\") = ('1') finds no row there")
            && err.contains("unchanged TOAST"),
        "{err}"
    );
    assert_eq!(missing_count(&cfg), 5);
}
