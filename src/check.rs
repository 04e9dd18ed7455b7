//! `invsync config check`: is everything the configuration names there and usable?
//!
//! Connects to every database (server version, `wal_level`, whether the role may replicate,
//! which pipeline tables are missing, and every privilege the configured role lacks for the
//! part it plays, a switchover's included, with the `GRANT` that gives it: see `pg::privilege`) and every repository
//! (reachable or not). Each problem says what to do; the check passes only when there are
//! none. What a restore into a database would lack is a note, since any database may become
//! a restore's target.

use serde::Serialize;

use crate::backup::store;
use crate::cdc::names;
use crate::config::{Config, PipelineConfig};
use crate::pg::privilege::{self, MissingPrivilege, Part};
use crate::pg::{self, ConnInfo, PgError, TableName, TablePattern};

/// What the check found, in the shape `--json` prints.
#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub config: String,
    pub databases: Vec<DatabaseCheck>,
    pub repositories: Vec<RepositoryCheck>,
}

impl CheckReport {
    /// True when no database or repository has a problem.
    pub fn ok(&self) -> bool {
        self.databases.iter().all(|d| d.problems.is_empty())
            && self.repositories.iter().all(|r| r.problems.is_empty())
    }
}

#[derive(Debug, Serialize)]
pub struct DatabaseCheck {
    pub name: String,
    /// The URL with its password hidden.
    pub url: String,
    pub reachable: bool,
    pub server_version: Option<String>,
    pub wal_level: Option<String>,
    pub can_replicate: Option<bool>,
    /// Pipeline tables absent here (as a source: an error; as a target: created by setup).
    pub missing_tables: Vec<String>,
    /// Privileges the role lacks, as a source, a target or a restore's target.
    pub missing_privileges: Vec<MissingPrivilege>,
    pub problems: Vec<String>,
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RepositoryCheck {
    pub name: String,
    pub url: String,
    pub reachable: bool,
    pub problems: Vec<String>,
}

/// Checks every database and repository of `config`.
pub async fn check(config: &Config) -> CheckReport {
    let mut databases = Vec::new();
    for (name, db) in &config.databases {
        let sourced: Vec<&TablePattern> = config
            .pipelines
            .values()
            .filter(|p| &p.source == name)
            .flat_map(|p| p.tables.iter())
            .collect();
        let publications: Vec<String> = config
            .pipelines
            .iter()
            .filter(|(_, p)| &p.source == name)
            .map(|(pipeline, _)| names::publication(pipeline))
            .collect();
        let targeted: Vec<&TablePattern> = config
            .pipelines
            .values()
            .filter(|p| p.targets.contains(name))
            .flat_map(|p| p.tables.iter())
            .collect();
        // The application roles a switchover pauses here (as a source) or lets write (as a
        // target).
        let roles = |here: &dyn Fn(&PipelineConfig) -> bool| {
            let mut roles: Vec<String> = config
                .pipelines
                .values()
                .filter(|p| here(p))
                .flat_map(|p| p.application_roles.iter().cloned())
                .collect();
            roles.sort();
            roles.dedup();
            roles
        };
        let switchover = Switchover {
            paused: roles(&|p| &p.source == name),
            released: roles(&|p| p.targets.contains(name)),
        };
        databases.push(match db {
            Ok(db) => {
                check_database(
                    name,
                    &db.conn,
                    &sourced,
                    &publications,
                    &targeted,
                    &switchover,
                )
                .await
            }
            Err(unset) => DatabaseCheck::unusable(
                name,
                unset.needed_for(format!("checking database `{name}`")),
            ),
        });
    }
    let mut repositories = Vec::new();
    for (name, repo) in &config.repositories {
        let repo = match repo {
            Ok(repo) => repo,
            Err(unset) => {
                repositories.push(RepositoryCheck {
                    name: name.clone(),
                    url: String::new(),
                    reachable: false,
                    problems: vec![unset
                        .needed_for(format!("checking repository `{name}`"))
                        .to_string()],
                });
                continue;
            }
        };
        let mut rc = RepositoryCheck {
            name: name.clone(),
            url: repo.url.to_string(),
            reachable: false,
            problems: Vec::new(),
        };
        match store::open(repo, false) {
            Err(e) => rc.problems.push(e.to_string()),
            Ok(loc) => {
                use futures::StreamExt;
                let mut listing = loc.store.list(Some(&loc.prefix));
                match listing.next().await {
                    Some(Err(e)) => rc.problems.push(format!(
                        "cannot list {}: {}",
                        loc.url,
                        one_line(&e.to_string())
                    )),
                    _ => rc.reachable = true,
                }
            }
        }
        repositories.push(rc);
    }
    CheckReport {
        config: config.path.display().to_string(),
        databases,
        repositories,
    }
}

impl DatabaseCheck {
    /// A database that was not tried, for the reason given.
    fn unusable(name: &str, why: impl ToString) -> DatabaseCheck {
        DatabaseCheck {
            name: name.to_string(),
            url: String::new(),
            reachable: false,
            server_version: None,
            wal_level: None,
            can_replicate: None,
            missing_tables: Vec::new(),
            missing_privileges: Vec::new(),
            problems: vec![why.to_string()],
            notes: Vec::new(),
        }
    }
}

/// The application roles of the pipelines a database is an end of, which a switchover pauses
/// (where the database is the source) or lets write (where it is a target).
struct Switchover {
    paused: Vec<String>,
    released: Vec<String>,
}

async fn check_database(
    name: &str,
    conn: &ConnInfo,
    sourced: &[&TablePattern],
    publications: &[String],
    targeted: &[&TablePattern],
    switchover: &Switchover,
) -> DatabaseCheck {
    let mut dc = DatabaseCheck {
        url: conn.to_string(),
        problems: Vec::new(),
        ..DatabaseCheck::unusable(name, "")
    };
    let client = match conn.connect().await {
        Ok(c) => c,
        Err(e) => {
            dc.problems
                .push(format!("{e}; is the server running and the URL right?"));
            return dc;
        }
    };
    dc.reachable = true;
    let facts = client
        .query_one(
            "SELECT current_setting('server_version'), current_setting('wal_level'), \
                    rolreplication OR rolsuper OR EXISTS (SELECT 1 FROM pg_roles g \
                      WHERE g.rolname = 'rds_replication' \
                        AND pg_has_role(current_user, g.oid, 'MEMBER')), \
                    current_user::text \
             FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await;
    let row = match facts {
        Ok(r) => r,
        Err(e) => {
            dc.problems
                .push(PgError::query("reading server settings", conn, e).to_string());
            return dc;
        }
    };
    dc.server_version = Some(row.get(0));
    let wal_level: String = row.get(1);
    let can_replicate: bool = row.get(2);
    let user: String = row.get(3);
    dc.wal_level = Some(wal_level.clone());
    dc.can_replicate = Some(can_replicate);

    if !sourced.is_empty() && wal_level != "logical" {
        dc.problems.push(format!(
            "wal_level is {wal_level}, but a pipeline reads from this database; \
             set wal_level = logical in postgresql.conf and restart the server"
        ));
    }
    // Tables as each part sees them: those that exist, and (for a target) those setup creates.
    let (mut source_tables, mut target_tables) = (Vec::<TableName>::new(), Vec::<TableName>::new());
    for (patterns, is_source) in [(sourced, true), (targeted, false)] {
        for p in patterns.iter() {
            let tables = if is_source {
                &mut source_tables
            } else {
                &mut target_tables
            };
            match pg::resolve_tables(&client, conn, std::slice::from_ref(*p)).await {
                Ok(found) => tables.extend(found),
                Err(PgError::MissingTable { table, .. }) => {
                    if let (false, Some(t)) = (is_source, &p.table) {
                        tables.push(TableName::new(p.schema.clone(), t.clone()));
                    }
                    if dc.missing_tables.contains(&table) {
                        continue;
                    }
                    if is_source {
                        dc.problems.push(format!(
                            "table {table} is missing; create it or remove it from the pipeline"
                        ));
                    } else {
                        dc.notes.push(format!(
                            "table {table} is missing; `invsync sync setup` creates it"
                        ));
                    }
                    dc.missing_tables.push(table);
                }
                Err(e) if is_source => dc.problems.push(e.to_string()),
                Err(e) => dc.notes.push(e.to_string()),
            }
        }
    }
    let mut parts = Vec::new();
    if !sourced.is_empty() {
        parts.push(Part::Source {
            tables: &source_tables,
            publications,
        });
    }
    if !targeted.is_empty() {
        parts.push(Part::Target {
            tables: &target_tables,
        });
    }
    if !switchover.paused.is_empty() {
        parts.push(Part::Switchover {
            roles: &switchover.paused,
            pauses: true,
        });
    }
    if !switchover.released.is_empty() {
        parts.push(Part::Switchover {
            roles: &switchover.released,
            pauses: false,
        });
    }
    parts.push(Part::Restore);
    for part in &parts {
        match privilege::missing(&client, conn, part).await {
            Ok(missing) => {
                for m in missing {
                    if dc.missing_privileges.iter().any(|n| n.grant == m.grant) {
                        continue;
                    }
                    let line = format!(
                        "role {user} lacks {}, which {} needs; run as an administrator: {}",
                        m.privilege, m.needed_for, m.grant
                    );
                    if matches!(part, Part::Restore) {
                        dc.notes.push(line);
                    } else {
                        dc.problems.push(line);
                    }
                    dc.missing_privileges.push(m);
                }
            }
            Err(e) => dc.problems.push(e.to_string()),
        }
    }
    dc
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
