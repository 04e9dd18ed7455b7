//! Leases and fencing against real clusters: two holders racing for one lease, expiry and
//! take-over with a new epoch, the keeper's hand-over on a clean stop and on a crash, a stale
//! holder's pipeline batch, backup, forget and prune refused by the fence, and a new holder
//! ending the old holder's walsender and apply session.

mod backup_util;
mod support;
mod sync_common;

use std::time::Duration;

use invsync::agent::lease::{self, holder_id, Acquired, LeasePlace, LeaseStatus, LeaseStore};
use invsync::backup::repository::Repository;
use invsync::backup::retention::{self, Policy};
use invsync::backup::session::{self, BackupOptions, Quiet};
use invsync::backup::{fence, prune, snapshot, BackupError};
use invsync::config::LeaseTiming;
use invsync::pg::Fence;
use invsync::sync::SyncError;
use support::{wait_until, PgCluster};
use sync_common::*;
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_holders_race_for_one_lease_one_wins_the_other_sees_it() {
    let pg = PgCluster::start();
    let conn = pg.conn("einvoice");
    let (ca, cb) = (pg.client("einvoice").await, pg.client("einvoice").await);
    let a = LeaseStore {
        client: &ca,
        conn: &conn,
    };
    let b = LeaseStore {
        client: &cb,
        conn: &conn,
    };
    a.install().await.unwrap();
    b.install().await.unwrap();
    let lease = Duration::from_secs(30);
    for round in 0..10 {
        let name = format!("pipeline/race{round}");
        let (ra, rb) = tokio::join!(
            a.acquire(&name, "agent-a", lease),
            b.acquire(&name, "agent-b", lease)
        );
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let (winner, loser_saw) = match (&ra, &rb) {
            (Acquired::Won { epoch: 1 }, Acquired::Held { holder, epoch, .. }) => {
                ("agent-a", (holder.as_str(), *epoch))
            }
            (Acquired::Held { holder, epoch, .. }, Acquired::Won { epoch: 1 }) => {
                ("agent-b", (holder.as_str(), *epoch))
            }
            other => panic!("exactly one must win, with epoch 1: {other:?}"),
        };
        assert_eq!(
            loser_saw,
            (winner, 1),
            "the loser sees the winner and its epoch"
        );
        let loser = if winner == "agent-a" {
            "agent-b"
        } else {
            "agent-a"
        };
        assert!(!a.renew(&name, loser, 1, lease).await.unwrap());
        assert!(!a.renew(&name, winner, 2, lease).await.unwrap());
        assert!(b.renew(&name, winner, 1, lease).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_taken_over_with_the_next_epoch() {
    let pg = PgCluster::start();
    let conn = pg.conn("einvoice");
    let client = pg.client("einvoice").await;
    let s = LeaseStore {
        client: &client,
        conn: &conn,
    };
    s.install().await.unwrap();
    let short = Duration::from_millis(1500);
    assert_eq!(
        s.acquire("schedule/nightly", "a", short).await.unwrap(),
        Acquired::Won { epoch: 1 }
    );
    // Before expiry, b is refused; the expiry is the database's: now() + duration.
    let Acquired::Held {
        holder, expires_at, ..
    } = s.acquire("schedule/nightly", "b", short).await.unwrap()
    else {
        panic!("held by a")
    };
    assert_eq!(holder, "a");
    let row = s.read("schedule/nightly").await.unwrap().unwrap();
    assert_eq!(
        (row.expires_at - row.renewed_at).num_milliseconds(),
        1500,
        "{row:?}"
    );
    assert_eq!(expires_at, row.expires_at);
    wait_until(Duration::from_secs(10), "the lease to expire", || async {
        matches!(
            s.acquire("schedule/nightly", "b", short).await.unwrap(),
            Acquired::Won { .. }
        )
    })
    .await;
    let row = s.read("schedule/nightly").await.unwrap().unwrap();
    assert_eq!((row.holder.as_str(), row.epoch), ("b", 2));
    // The old holder can neither renew nor release b's lease.
    assert!(!s.renew("schedule/nightly", "a", 1, short).await.unwrap());
    s.release("schedule/nightly", "a", 1).await.unwrap();
    assert!(matches!(
        s.acquire("schedule/nightly", "a", short).await.unwrap(),
        Acquired::Held { epoch: 2, .. }
    ));
    // Released by b: free at once, and the next holder's epoch is higher still.
    s.release("schedule/nightly", "b", 2).await.unwrap();
    assert_eq!(
        s.acquire("schedule/nightly", "a", short).await.unwrap(),
        Acquired::Won { epoch: 3 }
    );
}

/// A keeper task for `place` with fast timing; returns its status, stop switch and task.
fn keeper(
    place: &LeasePlace,
    timing: LeaseTiming,
) -> (
    watch::Receiver<LeaseStatus>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (status_tx, status) = watch::channel(LeaseStatus {
        lease: place.name.clone(),
        held: false,
        epoch: 0,
        holder: None,
        known: false,
    });
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(lease::keep(
        place.clone(),
        holder_id(),
        timing,
        status_tx,
        stop_rx,
    ));
    (status, stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_keeper_takes_over_after_a_clean_stop_and_after_a_crash() {
    let pg = PgCluster::start();
    let place = LeasePlace {
        name: "pipeline/p".into(),
        database: "a".into(),
        conn: pg.conn("einvoice"),
    };
    let timing = LeaseTiming {
        duration: Duration::from_millis(1500),
        renew_interval: Duration::from_millis(300),
        renew_deadline: Duration::from_millis(1000),
    };
    let (mut first, stop_first, first_task) = keeper(&place, timing);
    let fence = tokio::time::timeout(Duration::from_secs(10), lease::until_held(&mut first))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fence.epoch, 1);
    let (mut second, stop_second, second_task) = keeper(&place, timing);
    // The standby sees the holder and never holds while the first renews.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(first.borrow().held, "renewed all along");
    assert_eq!(
        (second.borrow().held, second.borrow().epoch),
        (false, 1),
        "{:?}",
        *second.borrow()
    );

    // A clean stop releases: the standby takes over within a renew interval or so.
    stop_first.send(true).unwrap();
    first_task.await.unwrap();
    assert!(!first.borrow().held);
    let fence = tokio::time::timeout(Duration::from_secs(2), lease::until_held(&mut second))
        .await
        .expect("take-over after a release within 2 s")
        .unwrap();
    assert_eq!(fence.epoch, 2);

    // A crash (the task is gone without releasing): a new standby waits for expiry.
    let (mut third, stop_third, third_task) = keeper(&place, timing);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!third.borrow().held);
    second_task.abort();
    let started = std::time::Instant::now();
    let fence = tokio::time::timeout(Duration::from_secs(5), lease::until_held(&mut third))
        .await
        .expect("take-over after expiry")
        .unwrap();
    assert_eq!(fence.epoch, 3);
    // Not before the database expired the lease: at least the deadline after the last renewal.
    assert!(started.elapsed() >= Duration::from_millis(500));
    drop(stop_second);
    stop_third.send(true).unwrap();
    third_task.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keeper_cut_off_from_its_database_stops_holding_before_the_lease_expires() {
    let pg = PgCluster::start();
    let place = LeasePlace {
        name: "pipeline/p".into(),
        database: "a".into(),
        conn: pg.conn("einvoice"),
    };
    let timing = LeaseTiming {
        duration: Duration::from_secs(3),
        renew_interval: Duration::from_millis(500),
        renew_deadline: Duration::from_secs(2),
    };
    let (mut status, _stop, task) = keeper(&place, timing);
    lease::until_held(&mut status).await.unwrap();
    // The database stops answering this holder: its renewals wait on a lock that still lets
    // this session read the lease.
    let conn = pg.conn("einvoice");
    let client = pg.client("einvoice").await;
    let s = LeaseStore {
        client: &client,
        conn: &conn,
    };
    client
        .batch_execute("BEGIN; LOCK TABLE invsync.lease IN EXCLUSIVE MODE")
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), lease::until_lost(&mut status))
        .await
        .expect("the holder gives up");
    let lost_at = chrono::Utc::now();
    let row = s.read("pipeline/p").await.unwrap().unwrap();
    client.batch_execute("ROLLBACK").await.unwrap();
    // It stopped before the database's expiry of its last renewal, by about duration less
    // deadline (the time between sending a renewal and the database receiving it narrows it).
    let margin = row.expires_at - lost_at;
    assert!(
        margin > chrono::Duration::zero(),
        "gave up {margin} after the lease expired: {row:?}"
    );
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_batch_with_an_older_epoch_commits_nothing() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one')",
    );
    let (_dir, cfg) = set_up_pipeline(&src, &dst, &["public.t"]);
    let config = load(&cfg);
    let fence = |epoch| {
        Some(Fence {
            lease: "pipeline/p".into(),
            epoch,
        })
    };

    // The newer holder (epoch 5) applies a batch.
    let newer = Running::start_fenced(&config, "p", fence(5));
    src.psql("einvoice", "INSERT INTO t VALUES (2, 'two')");
    wait_same(&src, &dst, "SELECT * FROM t ORDER BY id").await;
    newer.stop().await;
    let before = dump(&dst, "SELECT * FROM t ORDER BY id");
    let lsn_before = applied_lsn(&dst, "p");
    assert_eq!(
        dst.psql(
            "einvoice",
            "SELECT fence_epoch FROM invsync.pipeline WHERE pipeline = 'p'"
        ),
        "5"
    );

    // A stale holder (epoch 4) wakes and streams the next transaction: refused, nothing lands.
    src.psql("einvoice", "INSERT INTO t VALUES (3, 'three')");
    let stale = Running::start_fenced(&config, "p", fence(4));
    let err = stale.finished().await.unwrap_err();
    assert!(
        matches!(
            err,
            SyncError::Fenced {
                epoch: 4,
                newer: 5,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().starts_with("pipeline `p` on b: fenced: this agent holds pipeline/p with epoch 4, but epoch 5 has written the target since"), "{err}");
    assert_eq!(dump(&dst, "SELECT * FROM t ORDER BY id"), before);
    assert_eq!(applied_lsn(&dst, "p"), lsn_before);

    // The holder of the newest epoch goes on from where the target stands: nothing lost.
    let next = Running::start_fenced(&config, "p", fence(6));
    wait_same(&src, &dst, "SELECT * FROM t ORDER BY id").await;
    next.stop().await;
    assert_eq!(dump(&dst, "SELECT count(*) FROM t"), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_with_an_older_epoch_publishes_no_snapshot() {
    let pg = PgCluster::start();
    backup_util::make_tables(&pg, "einvoice", 500);
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "k");
    let url = format!("file://{}", dir.path().join("repo").display());
    let repo = Repository::init(&backup_util::repo_config(&url, &key, &recipient))
        .await
        .unwrap();
    let opts = |epoch| BackupOptions {
        database: Some(backup_util::tables_of(&pg, "public.*")),
        config_dirs: vec![],
        tags: vec![],
        fence: Some(Fence {
            lease: "schedule/nightly".into(),
            epoch,
        }),
    };
    session::backup(&repo, &opts(2), &Quiet).await.unwrap();
    assert_eq!(snapshot::list(&repo).await.unwrap().len(), 1);

    // Epoch 3 took the lease over (an agent raises the fence when it does).
    let newer = Fence {
        lease: "schedule/nightly".into(),
        epoch: 3,
    };
    fence::raise(&repo, &newer).await.unwrap();
    let err = session::backup(&repo, &opts(2), &Quiet).await.unwrap_err();
    assert!(
        matches!(
            err,
            BackupError::Fenced {
                epoch: 2,
                newer: 3,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        snapshot::list(&repo).await.unwrap().len(),
        1,
        "nothing published"
    );
    // Other leases' epochs do not fence this one, and the newest holder backs up.
    let other = Fence {
        lease: "schedule/other".into(),
        epoch: 9,
    };
    fence::raise(&repo, &other).await.unwrap();
    session::backup(&repo, &opts(3), &Quiet).await.unwrap();
    assert_eq!(snapshot::list(&repo).await.unwrap().len(), 2);
    assert_eq!(
        fence::newest(&repo, "schedule/nightly").await.unwrap(),
        Some(3)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_or_prune_with_an_older_epoch_deletes_nothing() {
    let pg = PgCluster::start();
    backup_util::make_tables(&pg, "einvoice", 2000);
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "k");
    let url = format!("file://{}", dir.path().join("repo").display());
    let repo = Repository::init(&backup_util::repo_config(&url, &key, &recipient))
        .await
        .unwrap();
    let unfenced = |tables| BackupOptions {
        database: Some(backup_util::tables_of(&pg, tables)),
        config_dirs: vec![],
        tags: vec![],
        fence: None,
    };
    // Two snapshots of different tables: once the first is forgotten, its packs are unneeded.
    for tables in ["public.items", "public.tags"] {
        session::backup(&repo, &unfenced(tables), &Quiet)
            .await
            .unwrap();
    }
    let packs = || async { repo.list("data").await.unwrap().len() };
    let (packs_before, snapshots) = (packs().await, || async {
        snapshot::list(&repo).await.unwrap().len()
    });
    assert_eq!(snapshots().await, 2);

    let lease = |epoch| Fence {
        lease: "schedule/retention".into(),
        epoch,
    };
    fence::raise(&repo, &lease(3)).await.unwrap();
    let keep_one = Policy {
        keep_last: Some(1),
        ..Default::default()
    };
    let fenced = |e: &BackupError| {
        matches!(
            e,
            BackupError::Fenced {
                epoch: 2,
                newer: 3,
                ..
            }
        )
    };

    // A stale holder's forget (and the prune after it) deletes nothing.
    let err = retention::forget_and_prune(&repo, &keep_one, false, true, Some(&lease(2)))
        .await
        .unwrap_err();
    assert!(fenced(&err), "{err}");
    assert_eq!(snapshots().await, 2, "no snapshot forgotten");

    // A stale holder's prune deletes nothing, though there is something to delete.
    retention::forget(&repo, &keep_one, false).await.unwrap();
    assert_eq!(snapshots().await, 1);
    let err = prune::prune_fenced(&repo, false, Some(&lease(2)))
        .await
        .unwrap_err();
    assert!(fenced(&err), "{err}");
    assert_eq!(packs().await, packs_before, "no pack deleted");

    // The newest holder prunes.
    let report = prune::prune_fenced(&repo, false, Some(&lease(3)))
        .await
        .unwrap();
    assert!(report.packs_deleted > 0, "{report:?}");
    assert_eq!(packs().await, packs_before - report.packs_deleted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_overtaken_while_it_runs_writes_no_manifest() {
    let pg = PgCluster::start();
    backup_util::make_tables(&pg, "einvoice", 2000);
    let dir = tempfile::tempdir().unwrap();
    let (key, recipient) = backup_util::identity(dir.path(), "k");
    let url = format!("file://{}", dir.path().join("repo").display());
    let cfg = backup_util::repo_config(&url, &key, &recipient);
    let repo = Repository::init(&cfg).await.unwrap();
    let stale = BackupOptions {
        database: Some(backup_util::tables_of(&pg, "public.*")),
        config_dirs: vec![],
        tags: vec![],
        fence: Some(Fence {
            lease: "schedule/nightly".into(),
            epoch: 1,
        }),
    };
    // The newer holder raises its fence while the stale backup reads the tables: the
    // database session of the stale backup is held up by a lock until the fence is written.
    let blocker = pg.client("einvoice").await;
    blocker
        .batch_execute("BEGIN; LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let running = {
        let repo = Repository::open(&cfg).await.unwrap();
        tokio::spawn(async move { session::backup(&repo, &stale, &Quiet).await })
    };
    wait_until(
        Duration::from_secs(20),
        "the stale backup to start",
        || async { fence::newest(&repo, "schedule/nightly").await.unwrap() == Some(1) },
    )
    .await;
    fence::raise(
        &repo,
        &Fence {
            lease: "schedule/nightly".into(),
            epoch: 2,
        },
    )
    .await
    .unwrap();
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let err = running.await.unwrap().unwrap_err();
    assert!(matches!(err, BackupError::Fenced { .. }), "{err}");
    assert!(snapshot::list(&repo).await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_holder_ends_the_old_walsender_and_apply_session() {
    let src = PgCluster::start();
    let dst = PgCluster::start();
    src.psql(
        "einvoice",
        "CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'one')",
    );
    let (_dir, cfg) = set_up_pipeline(&src, &dst, &["public.t"]);
    let config = load(&cfg);
    let old = Running::start(&config, "p");
    src.psql("einvoice", "INSERT INTO t VALUES (2, 'two')");
    wait_same(&src, &dst, "SELECT * FROM t ORDER BY id").await;
    let walsender = src.psql(
        "einvoice",
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'invsync_p'",
    );
    let applier = dst.psql(
        "einvoice",
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'invsync_p_b'",
    );
    assert!(!walsender.is_empty() && !applier.is_empty());

    let ended = lease::take_over_pipeline(&config, "p").await.unwrap();
    assert_eq!(ended.walsender, Some(walsender.parse().unwrap()));
    assert_eq!(
        ended.apply_sessions,
        vec![("b".to_string(), vec![applier.parse::<i32>().unwrap()])]
    );
    wait_until(
        Duration::from_secs(10),
        "the old sessions to end",
        || async {
            dst.psql(
                "einvoice",
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {applier}"),
            ) == "0"
        },
    )
    .await;
    old.stop().await;
}
