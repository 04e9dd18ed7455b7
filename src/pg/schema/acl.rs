//! Ownership and privileges of one object: its owner and its ACL as `aclexplode` lists it.
//!
//! An ACL of `None` means the object has never been granted or revoked anything (the
//! catalog's NULL): its privileges are the defaults and nothing is written. `Some` holds the
//! exact privileges, and the DDL first revokes the defaults so that the result is that list
//! and nothing more, as pg_dump does. Grantors are not kept: grants are issued by the
//! restoring role and recorded by PostgreSQL as the owner's.

use serde::{Deserialize, Serialize};

use crate::pg::quote_ident;

/// Privileges of one grantee; `None` is `PUBLIC`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub grantee: Option<String>,
    pub privilege: String,
    pub grantable: bool,
}

/// Who owns an object and who else may use it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// `None` when unknown (schemas saved by older versions): the object stays the restoring
    /// role's.
    pub owner: Option<String>,
    pub acl: Option<Vec<Grant>>,
}

/// A SQL expression turning an `aclitem[]` column into the JSON [`parse`] reads: NULL stays
/// NULL (defaults), an empty array stays empty (everything revoked).
pub(crate) fn select(column: &str) -> String {
    format!(
        "CASE WHEN {column} IS NULL THEN NULL ELSE coalesce((SELECT json_agg(json_build_array(\
         CASE WHEN a.grantee = 0 THEN NULL ELSE pg_get_userbyid(a.grantee)::text END, \
         a.privilege_type, a.is_grantable)) FROM aclexplode({column}) a), '[]'::json) END"
    )
}

/// Reads what [`select`] produced.
pub(crate) fn parse(value: Option<serde_json::Value>) -> Option<Vec<Grant>> {
    let items = value?;
    let list = items.as_array().cloned().unwrap_or_default();
    Some(
        list.iter()
            .filter_map(|g| {
                let g = g.as_array()?;
                Some(Grant {
                    grantee: g.first()?.as_str().map(str::to_string),
                    privilege: g.get(1)?.as_str()?.to_string(),
                    grantable: g.get(2)?.as_bool()?,
                })
            })
            .collect(),
    )
}

/// What of ownership and privileges a restore writes, as pg_dump's options of the same names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AccessOptions {
    /// Leave objects owned by the restoring role.
    pub no_owner: bool,
    /// Leave privileges at their defaults.
    pub no_acl: bool,
}

impl Access {
    /// Roles this object needs on the target under `opts` (PUBLIC is not a role).
    pub fn roles(&self, opts: AccessOptions) -> Vec<String> {
        let mut out = Vec::new();
        if !opts.no_owner {
            out.extend(self.owner.clone());
        }
        if !opts.no_acl {
            for g in self.acl.iter().flatten() {
                if let Some(r) = &g.grantee {
                    out.push(r.clone());
                }
            }
        }
        out
    }

    /// `ALTER ... OWNER TO` and the grants for the object `what` (e.g. `TABLE public.t`),
    /// ALTERed as `alter` (e.g. `TABLE`, `SEQUENCE`, `TYPE`, `FUNCTION`).
    pub fn statements(&self, alter: &str, what: &str, opts: AccessOptions) -> Vec<String> {
        let mut out = Vec::new();
        let owner = self.owner.as_ref().filter(|_| !opts.no_owner);
        if let Some(o) = owner {
            out.push(format!("ALTER {alter} {what} OWNER TO {}", quote_ident(o)));
        }
        let Some(acl) = self.acl.as_ref().filter(|_| !opts.no_acl) else {
            return out;
        };
        let on = format!("{} {what}", grant_kind(alter));
        out.push(format!("REVOKE ALL ON {on} FROM PUBLIC"));
        let owner_sql = owner.map_or("CURRENT_USER".to_string(), |o| quote_ident(o));
        out.push(format!("REVOKE ALL ON {on} FROM {owner_sql}"));
        // One GRANT per grantee and grant option, privileges in the catalog's order.
        let mut groups: Vec<(Option<&String>, bool, Vec<&str>)> = Vec::new();
        for g in acl {
            match groups
                .iter_mut()
                .find(|(who, opt, _)| *who == g.grantee.as_ref() && *opt == g.grantable)
            {
                Some((_, _, privs)) => privs.push(&g.privilege),
                None => groups.push((g.grantee.as_ref(), g.grantable, vec![&g.privilege])),
            }
        }
        for (who, grantable, privs) in groups {
            let to = match who {
                None => "PUBLIC".to_string(),
                Some(r) if owner.is_none() && Some(r) == self.owner.as_ref() => {
                    "CURRENT_USER".to_string()
                }
                Some(r) => quote_ident(r),
            };
            out.push(format!(
                "GRANT {} ON {on} TO {to}{}",
                privs.join(", "),
                if grantable { " WITH GRANT OPTION" } else { "" }
            ));
        }
        out
    }
}

/// The object kind as GRANT names it: a sequence's ALTER says SEQUENCE, its GRANT too; a
/// partitioned table is a TABLE for both.
fn grant_kind(alter: &str) -> &str {
    match alter {
        "TYPE" | "DOMAIN" => "TYPE",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_exact_and_grouped_by_grantee() {
        let a = Access {
            owner: Some("app".into()),
            acl: parse(Some(serde_json::json!([
                ["app", "SELECT", false],
                ["app", "INSERT", false],
                ["reader", "SELECT", true],
                [null, "SELECT", false]
            ]))),
        };
        assert_eq!(
            a.statements("TABLE", "public.t", AccessOptions::default()),
            vec![
                "ALTER TABLE public.t OWNER TO \"app\"",
                "REVOKE ALL ON TABLE public.t FROM PUBLIC",
                "REVOKE ALL ON TABLE public.t FROM \"app\"",
                "GRANT SELECT, INSERT ON TABLE public.t TO \"app\"",
                "GRANT SELECT ON TABLE public.t TO \"reader\" WITH GRANT OPTION",
                "GRANT SELECT ON TABLE public.t TO PUBLIC",
            ]
        );
        assert_eq!(
            a.roles(AccessOptions::default()),
            vec!["app", "app", "app", "reader"]
        );
        let none = AccessOptions {
            no_owner: true,
            no_acl: true,
        };
        assert!(a.statements("TABLE", "public.t", none).is_empty());
        assert!(a.roles(none).is_empty());
        // Default privileges (a NULL ACL) write nothing but the owner.
        assert_eq!(parse(None), None);
        assert_eq!(parse(Some(serde_json::json!([]))), Some(vec![]));
    }
}
