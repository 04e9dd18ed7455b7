//! The session settings that fix how values are written and read as text, pinned on every
//! session that turns rows into text or text back into rows: sync's walsender, copy and apply
//! sessions, backup's table readers and restore's loaders, verify's scans.
//!
//! Invariant: with these settings a value's text form depends on the value only, never on
//! the server's or the role's defaults, so text written on one server reads back as the same
//! value on another: dates and timestamps in ISO form, timestamptz in UTC, intervals in
//! PostgreSQL's form, floats in their shortest exact form, `money` with the C locale's two
//! decimals (the stored amount is the same whatever the server's `lc_monetary`), byte strings
//! in hex, string literals standard and XML read as content.

/// `(name, value)` of each setting, as `SET` and a startup packet's `-c name=value` take them.
pub const TEXT_FORM: &[(&str, &str)] = &[
    ("DateStyle", "ISO, YMD"),
    ("IntervalStyle", "postgres"),
    ("TimeZone", "UTC"),
    ("extra_float_digits", "3"),
    ("lc_monetary", "C"),
    ("bytea_output", "hex"),
    ("standard_conforming_strings", "on"),
    ("xmloption", "content"),
];

/// `SET` statements for [`TEXT_FORM`], to run as one batch.
pub fn set_text_form_sql() -> String {
    TEXT_FORM
        .iter()
        .map(|(k, v)| format!("SET {k} = '{v}';"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`TEXT_FORM`] as the `options` of a connection's startup packet (spaces in a value
/// escaped, as libpq reads them).
pub fn text_form_options() -> String {
    TEXT_FORM
        .iter()
        .map(|(k, v)| format!("-c {k}={}", v.replace(' ', "\\ ")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_form_for_sql_and_startup() {
        assert!(set_text_form_sql().starts_with("SET DateStyle = 'ISO, YMD'; SET IntervalStyle"));
        assert!(
            text_form_options().starts_with("-c DateStyle=ISO,\\ YMD -c IntervalStyle=postgres")
        );
    }
}
