//! Key ranges, key hash buckets and the SQL that compares them: which rows of a table a range
//! and a set of buckets hold, and how a row is rendered for hashing.
//!
//! Invariants: a range is `lo <= key < hi` under the server's own ordering of the key, with an
//! absent bound meaning unbounded, so the ranges of one split cover their parent range exactly.
//! Key columns marked bytewise ([`Shape::order_bytewise`]) are bounded and ordered under
//! `COLLATE "C"` instead: two servers whose collations differ (a `C` database and an ICU
//! `en-US` one) then select the same rows for a range and list them in the same order, which
//! their own orderings would not. Equality never needs it: every deterministic collation
//! compares equal exactly the byte-equal strings.
//! A row's bucket depends on its key's text alone, computed the same way on both sides.
//! Keys travel as the text of each key column and come back into SQL as typed literals
//! (`'v'::type`), which round-trips every type a primary key can have, composite keys included.
//! Every row is rendered as `ROW(col, ...)::text` over the source's column order, under the
//! session settings the caller fixes (verification pins every rendering setting), so both sides
//! hash byte-identical text for equal rows.

use super::{quote_ident, quote_literal, TableInfo, TableName};

/// A key: the text of each key column, in key order.
pub(crate) type Key = Vec<String>;

/// One column as verification uses it.
#[derive(Debug, Clone)]
pub(crate) struct Col {
    pub name: String,
    pub quoted: String,
    pub type_name: String,
    /// Generated columns are compared but never written by repair SQL.
    pub generated: bool,
}

/// A table as both sides agree on it: the columns to compare, the key, the row filter.
#[derive(Debug, Clone)]
pub(crate) struct Shape {
    pub table: TableName,
    pub quoted: String,
    pub key: Vec<Col>,
    pub columns: Vec<Col>,
    filter: Option<String>,
    /// Per key column: bound and order it under `COLLATE "C"` (see the module doc).
    bytewise: Vec<bool>,
}

/// `lo <= key < hi`; `None` is unbounded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct KeyRange {
    pub lo: Option<Key>,
    pub hi: Option<Key>,
}

impl KeyRange {
    /// The ranges between consecutive `boundaries` (ascending) inside `self`.
    pub fn split(&self, boundaries: &[Key]) -> Vec<KeyRange> {
        let mut edges: Vec<Option<Key>> = vec![self.lo.clone()];
        edges.extend(boundaries.iter().cloned().map(Some));
        edges.push(self.hi.clone());
        edges
            .windows(2)
            .map(|w| KeyRange {
                lo: w[0].clone(),
                hi: w[1].clone(),
            })
            .collect()
    }
}

impl Shape {
    /// Compares the two descriptions; the source's column order is the rendering order.
    /// Returns a one-line description of the first mismatch.
    pub fn agree(
        source: &TableInfo,
        target: &TableInfo,
        filter: Option<String>,
    ) -> Result<Shape, String> {
        let col = |c: &super::Column| Col {
            name: c.name.clone(),
            quoted: quote_ident(&c.name),
            type_name: c.type_name.clone(),
            generated: c.generated.is_some(),
        };
        let mut problems = Vec::new();
        for s in &source.columns {
            match target.columns.iter().find(|t| t.name == s.name) {
                None => problems.push(format!("column {} is missing on the target", s.name)),
                Some(t) if t.type_name != s.type_name => problems.push(format!(
                    "column {} is {} on the source but {} on the target",
                    s.name, s.type_name, t.type_name
                )),
                Some(_) => {}
            }
        }
        for t in &target.columns {
            if !source.columns.iter().any(|s| s.name == t.name) {
                problems.push(format!("column {} exists only on the target", t.name));
            }
        }
        if source.primary_key != target.primary_key {
            problems.push(format!(
                "the primary key is ({}) on the source but ({}) on the target",
                source.primary_key.join(", "),
                target.primary_key.join(", ")
            ));
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        let columns: Vec<Col> = source.columns.iter().map(col).collect();
        Ok(Shape::new(
            &source.name,
            columns,
            &source.primary_key,
            filter,
        ))
    }

    /// The shape of `table` with `columns` and the key columns named by `primary_key`.
    pub fn new(
        table: &TableName,
        columns: Vec<Col>,
        primary_key: &[String],
        filter: Option<String>,
    ) -> Shape {
        let key = primary_key
            .iter()
            .filter_map(|k| columns.iter().find(|c| &c.name == k).cloned())
            .collect::<Vec<_>>();
        Shape {
            table: table.clone(),
            quoted: table.quoted(),
            bytewise: vec![false; key.len()],
            key,
            columns,
            filter,
        }
    }

    /// Bounds and orders the key columns flagged in `columns` (in key order) under
    /// `COLLATE "C"`: for collatable key columns whose collation is not the same on every
    /// server the ranges are evaluated on. Only then, as an index built under another
    /// collation cannot serve these comparisons.
    pub fn order_bytewise(&mut self, columns: &[bool]) {
        for (flag, set) in self.bytewise.iter_mut().zip(columns) {
            *flag = *set;
        }
    }

    /// `COLLATE "C"` for key column `i` when it is ordered bytewise, else nothing.
    fn collate(&self, i: usize) -> &'static str {
        if self.bytewise.get(i).copied().unwrap_or(false) {
            " COLLATE \"C\""
        } else {
            ""
        }
    }

    /// `"a"` or `("a", "b")`: the key as one comparable SQL value.
    fn key_expr(&self) -> String {
        let cols: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}{}", c.quoted, self.collate(i)))
            .collect();
        if cols.len() == 1 {
            cols[0].to_string()
        } else {
            format!("({})", cols.join(", "))
        }
    }

    /// A key as a typed SQL value comparable with [`Shape::key_expr`].
    fn key_value(&self, key: &Key) -> String {
        let vals: Vec<String> = self
            .key
            .iter()
            .zip(key)
            .enumerate()
            .map(|(i, (c, v))| format!("{}{}", typed_literal(v, &c.type_name), self.collate(i)))
            .collect();
        if vals.len() == 1 {
            vals[0].clone()
        } else {
            format!("({})", vals.join(", "))
        }
    }

    /// The WHERE clause selecting `range` and the user's filter. A composite key's bounds also
    /// bound its first column (implied, so the rows are the same): the planner estimates row
    /// comparisons poorly (a third of the table) and would scan the whole table for a small
    /// range, but estimates a single column from its statistics.
    pub fn range_where(&self, range: &KeyRange) -> String {
        let mut parts = Vec::new();
        let first = |key: &Key, op: &str| match (self.key.first(), key.first()) {
            (Some(c), Some(v)) if self.key.len() > 1 => Some(format!(
                "{}{collate} {op} {}{collate}",
                c.quoted,
                typed_literal(v, &c.type_name),
                collate = self.collate(0)
            )),
            _ => None,
        };
        if let Some(lo) = &range.lo {
            parts.push(format!("{} >= {}", self.key_expr(), self.key_value(lo)));
            parts.extend(first(lo, ">="));
        }
        if let Some(hi) = &range.hi {
            parts.push(format!("{} < {}", self.key_expr(), self.key_value(hi)));
            parts.extend(first(hi, "<="));
        }
        if let Some(f) = &self.filter {
            parts.push(format!("({f})"));
        }
        if parts.is_empty() {
            "TRUE".into()
        } else {
            parts.join(" AND ")
        }
    }

    /// The user's filter alone (for lookups by key).
    pub fn filter_and(&self) -> String {
        match &self.filter {
            Some(f) => format!(" AND ({f})"),
            None => String::new(),
        }
    }

    /// A 64-bit hash of the row's canonical text: each column's text (as re-checks compare
    /// it) hashed with its position as seed, NULL as a constant of its own, combined by XOR
    /// (cheaper than rendering the row as one record). Summed per bucket (as numeric, so
    /// exact) it is independent of row order; the key is hashed too, so values moving between
    /// rows change the sum.
    pub fn row_hash(&self) -> String {
        let cols: Vec<String> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "coalesce(hashtextextended({}::text, {i}), {})",
                    c.quoted,
                    -1 - i as i64
                )
            })
            .collect();
        format!("({})", cols.join(" # "))
    }

    /// The key columns as text, for SELECT lists. Each gets a name of its own: left with the
    /// column's name, an `ORDER BY` of that name in the same query would sort by the text
    /// (`'100000' < '99999'`) instead of the key.
    pub fn key_text(&self) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}::text AS invsync_key_{i}", c.quoted))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The key columns, for ORDER BY.
    pub fn key_order(&self) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{}{}", c.quoted, self.collate(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Every `step`-th key of `range` in key order (the keys of rows `step + 1`, `2 step + 1`, ...),
    /// read from the primary key index: boundaries cutting `range` into pieces of `step` rows.
    pub fn boundaries_sql(&self, range: &KeyRange, step: u64) -> String {
        let step = step.max(1);
        format!(
            "SELECT {} FROM (SELECT {}, row_number() OVER (ORDER BY {}) AS rn FROM {} WHERE {}) s \
             WHERE rn > 1 AND rn % {step} = 1 ORDER BY rn",
            self.key_text(),
            self.key_order(),
            self.key_order(),
            self.quoted,
            self.range_where(range)
        )
    }

    /// A query returning whether `keys` are strictly ascending under the server's ordering of
    /// the key (true for fewer than two).
    pub fn ascending_sql(&self, keys: &[Key]) -> String {
        let values: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| format!("({i}, {})", self.key_value(k)))
            .collect();
        if values.len() < 2 {
            return "SELECT true".into();
        }
        format!(
            "SELECT coalesce(bool_and(k < n), true) FROM (SELECT k, lead(k) OVER (ORDER BY i) AS n \
             FROM (VALUES {}) v(i, k)) s WHERE n IS NOT NULL",
            values.join(", ")
        )
    }

    /// The hash bucket (`0..count`, `count` a power of two) of a row's key: each key column
    /// hashed by its type's own hash function where it has a common one (equal values hash
    /// equal, so numeric 1.0 and 1.00 share a bucket), else by its text, so each row costs a
    /// hash and no key comparisons. Rows equal on both sides fall in the same bucket on both
    /// (their key text is the same too, the sessions fixing every rendering setting); a row
    /// that does not has a differing row in each of its buckets, which are then compared
    /// together.
    pub fn bucket_of(&self, count: u32) -> String {
        let hashes: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(seed, c)| match native_hash(&c.type_name) {
                Some(function) => format!("{function}({}, {seed})", c.quoted),
                None => format!("hashtextextended({}::text COLLATE \"C\", {seed})", c.quoted),
            })
            .collect();
        format!("(({}) & {})::int4", hashes.join(" # "), count - 1)
    }

    /// The WHERE clause selecting `range`, the rows whose key falls in one of `buckets`, and
    /// the user's filter. The shorter of the bucket list and its complement is written out.
    pub fn slice_where(&self, range: &KeyRange, buckets: &BucketSet) -> String {
        let mut clause = self.range_where(range);
        let chosen = buckets.members.len();
        let total = buckets.count as usize;
        if chosen < total {
            let (op, list): (&str, Vec<u32>) = if chosen * 2 <= total {
                ("IN", buckets.members.clone())
            } else {
                let mut others: Vec<u32> = Vec::with_capacity(total - chosen);
                let mut chosen = buckets.members.iter().peekable();
                for b in 0..buckets.count {
                    if chosen.next_if_eq(&&b).is_none() {
                        others.push(b);
                    }
                }
                ("NOT IN", others)
            };
            let list: Vec<String> = list.iter().map(u32::to_string).collect();
            clause.push_str(&format!(
                " AND {} {op} ({})",
                self.bucket_of(buckets.count),
                list.join(", ")
            ));
        }
        clause
    }

    /// The keys as [`Shape::keys_join`] was asked for them, for SELECT lists: rows come back
    /// under the key as asked, so a key that is equal but written differently on a side
    /// (numeric 1.0 vs 1.00) still finds its row.
    pub fn lookup_key_text(&self) -> String {
        (0..self.key.len())
            .map(|i| format!("v.{}::text", lookup_column(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The lookup keys as their types' output functions render them (as the change stream
    /// sends them), for SELECT lists: a cast to text may differ (`character(n)` drops its
    /// padding).
    pub fn lookup_key_output(&self) -> String {
        (0..self.key.len())
            .map(|i| format!("format('%s', v.{})", lookup_column(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The lookup keys, for ORDER BY: the order of the table's key.
    pub fn lookup_key_order(&self) -> String {
        (0..self.key.len())
            .map(|i| format!("v.{}{}", lookup_column(i), self.collate(i)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `(VALUES ...) AS v(...)`: a list of keys as typed values, each with its position in the
    /// list (column `invsync_n`).
    pub fn keys_values(&self, keys: &[Key]) -> String {
        let rows: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(n, k)| {
                let vals: Vec<String> = self
                    .key
                    .iter()
                    .zip(k)
                    .map(|(c, v)| typed_literal(v, &c.type_name))
                    .collect();
                format!("({}, {n})", vals.join(", "))
            })
            .collect();
        let mut names: Vec<String> = (0..self.key.len()).map(lookup_column).collect();
        names.push("invsync_n".into());
        format!("(VALUES {}) AS v({})", rows.join(", "), names.join(", "))
    }

    /// A join clause matching rows to a list of keys ([`Shape::keys_values`]), which the
    /// planner turns into index lookups.
    pub fn keys_join(&self, keys: &[Key]) -> String {
        let on: Vec<String> = self
            .key
            .iter()
            .enumerate()
            .map(|(i, c)| format!("t.{} = v.{}", c.quoted, lookup_column(i)))
            .collect();
        format!("JOIN {} ON {}", self.keys_values(keys), on.join(" AND "))
    }
}

/// Rows whose key falls in some of the hash buckets a table is cut into ([`Shape::bucket_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BucketSet {
    /// How many buckets the table is cut into: a power of two.
    pub count: u32,
    /// The buckets selected, ascending.
    pub members: Vec<u32>,
}

/// The extended (seeded, 64-bit) hash function of a type's default hash operator class, for
/// the key types tables commonly have; None for others, which are hashed by their text.
fn native_hash(type_name: &str) -> Option<&'static str> {
    // `format_type` spells a type modifier inside the name: `timestamp(3) with time zone`.
    let base = match type_name.find('(') {
        Some(open) => {
            let close = type_name[open..]
                .find(')')
                .map_or(type_name.len(), |c| open + c + 1);
            format!("{}{}", &type_name[..open], &type_name[close..])
        }
        None => type_name.to_string(),
    };
    Some(match base.as_str() {
        "smallint" => "hashint2extended",
        "integer" => "hashint4extended",
        "bigint" => "hashint8extended",
        "numeric" => "hash_numeric_extended",
        "character" => "hashbpcharextended",
        "text" | "character varying" => "hashtextextended",
        "uuid" => "uuid_hash_extended",
        _ => return None,
    })
}

/// The VALUES column holding key column `i` in [`Shape::keys_join`]; named so that it cannot
/// collide with a table's column.
fn lookup_column(i: usize) -> String {
    format!("invsync_k{i}")
}

/// `'text'::type`.
pub(crate) fn typed_literal(value: &str, type_name: &str) -> String {
    format!("{}::{type_name}", quote_literal(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(key: &[&str]) -> Shape {
        let col = |n: &str| Col {
            name: n.into(),
            quoted: quote_ident(n),
            type_name: "integer".into(),
            generated: false,
        };
        Shape {
            table: TableName::new("public", "t"),
            quoted: "\"public\".\"t\"".into(),
            key: key.iter().map(|k| col(k)).collect(),
            columns: vec![col("a"), col("b")],
            filter: None,
            bytewise: vec![false; key.len()],
        }
    }

    #[test]
    fn bytewise_key_columns_are_bounded_and_ordered_under_c() {
        let mut s = shape(&["a", "b"]);
        s.key[0].type_name = "text".into();
        s.order_bytewise(&[true, false]);
        let w = s.range_where(&KeyRange {
            lo: Some(vec!["É".into(), "1".into()]),
            hi: Some(vec!["z".into(), "2".into()]),
        });
        assert_eq!(
            w,
            "(\"a\" COLLATE \"C\", \"b\") >= ('É'::text COLLATE \"C\", '1'::integer) \
             AND \"a\" COLLATE \"C\" >= 'É'::text COLLATE \"C\" \
             AND (\"a\" COLLATE \"C\", \"b\") < ('z'::text COLLATE \"C\", '2'::integer) \
             AND \"a\" COLLATE \"C\" <= 'z'::text COLLATE \"C\""
        );
        assert_eq!(s.key_order(), "\"a\" COLLATE \"C\", \"b\"");
        assert_eq!(
            s.lookup_key_order(),
            "v.invsync_k0 COLLATE \"C\", v.invsync_k1"
        );
        // Equality keeps the column's collation, so its index still serves lookups.
        assert_eq!(
            s.keys_join(&[vec!["x".into(), "1".into()]]),
            "JOIN (VALUES ('x'::text, '1'::integer, 0)) AS v(invsync_k0, invsync_k1, invsync_n) \
             ON t.\"a\" = v.invsync_k0 AND t.\"b\" = v.invsync_k1"
        );
    }

    #[test]
    fn split_covers_the_parent_range() {
        let r = KeyRange {
            lo: Some(vec!["1".into()]),
            hi: None,
        };
        let parts = r.split(&[vec!["5".into()], vec!["9".into()]]);
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].lo, r.lo);
        assert_eq!(parts[0].hi, Some(vec!["5".to_string()]));
        assert_eq!(parts[2].lo, Some(vec!["9".to_string()]));
        assert_eq!(parts[2].hi, None);
    }

    #[test]
    fn buckets_hash_keys_by_type_and_ranges_compare_composites() {
        let s = shape(&["a"]);
        assert_eq!(
            s.bucket_of(1024),
            "((hashint4extended(\"a\", 0)) & 1023)::int4"
        );
        let some = BucketSet {
            count: 4,
            members: vec![1, 3],
        };
        assert_eq!(
            s.slice_where(&KeyRange::default(), &some),
            "TRUE AND ((hashint4extended(\"a\", 0)) & 3)::int4 IN (1, 3)"
        );
        let most = BucketSet {
            count: 4,
            members: vec![0, 1, 3],
        };
        assert_eq!(
            s.slice_where(&KeyRange::default(), &most),
            "TRUE AND ((hashint4extended(\"a\", 0)) & 3)::int4 NOT IN (2)"
        );
        let all = BucketSet {
            count: 4,
            members: vec![0, 1, 2, 3],
        };
        assert_eq!(s.slice_where(&KeyRange::default(), &all), "TRUE");
        let c = shape(&["a", "b"]);
        let w = c.range_where(&KeyRange {
            lo: Some(vec!["1".into(), "x'y".into()]),
            hi: None,
        });
        assert_eq!(
            w,
            "(\"a\", \"b\") >= ('1'::integer, 'x''y'::integer) AND \"a\" >= '1'::integer"
        );
        assert_eq!(
            c.bucket_of(2),
            "((hashint4extended(\"a\", 0) # hashint4extended(\"b\", 1)) & 1)::int4"
        );
        assert_eq!(
            c.row_hash(),
            "(coalesce(hashtextextended(\"a\"::text, 0), -1) # coalesce(hashtextextended(\"b\"::text, 1), -2))"
        );
        let mut odd = shape(&["t", "n"]);
        odd.key[0].type_name = "timestamp(3) with time zone".into();
        odd.key[1].type_name = "numeric(12,2)".into();
        assert_eq!(
            odd.bucket_of(2),
            "((hashtextextended(\"t\"::text COLLATE \"C\", 0) # hash_numeric_extended(\"n\", 1)) & 1)::int4"
        );
    }
}
