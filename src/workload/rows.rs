//! The model's rows as PostgreSQL text values, in each table's column order, written either as
//! COPY text (the fill) or as SQL `VALUES` lists (the change stream), so both paths store the
//! same text for the same row.

use std::fmt::{Display, Write};

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, Timelike};

use super::generate::{Allowance, Carrier, Invoice, Item};
use crate::pg::quote_literal;

pub const INVOICE_COLUMNS: &str = "invoice_number, invoice_date, invoice_time, seller_id, \
     buyer_id, sales_amount, tax_amount, total_amount, tax_type, carrier_type, carrier_id, \
     donation_code, random_number, status, created_at, updated_at";
pub const ITEM_COLUMNS: &str = "invoice_number, seq, description, quantity, unit_price, amount";
pub const ALLOWANCE_COLUMNS: &str =
    "allowance_number, invoice_number, allowance_date, amount, tax_amount, reason";
pub const CARRIER_COLUMNS: &str = "carrier_type, carrier_id, registered_at, phone_hash, email_hash";

/// Receives one row's values in column order. Values are PostgreSQL text input.
pub trait RowSink {
    fn value(&mut self, v: &dyn Display);
    fn null(&mut self);
    fn end_row(&mut self);

    fn opt(&mut self, v: Option<&str>) {
        match v {
            Some(v) => self.value(&v),
            None => self.null(),
        }
    }
}

/// COPY ... FROM STDIN text format: tab-separated, `\N` for NULL, one line per row.
#[derive(Default)]
pub struct CopyText {
    pub buf: String,
    scratch: String,
    in_row: bool,
}

impl CopyText {
    fn sep(&mut self) {
        if self.in_row {
            self.buf.push('\t');
        }
        self.in_row = true;
    }
}

impl RowSink for CopyText {
    fn value(&mut self, v: &dyn Display) {
        self.sep();
        self.scratch.clear();
        let _ = write!(self.scratch, "{v}");
        if self
            .scratch
            .bytes()
            .any(|b| matches!(b, b'\\' | b'\t' | b'\n' | b'\r'))
        {
            for c in self.scratch.chars() {
                match c {
                    '\\' => self.buf.push_str("\\\\"),
                    '\t' => self.buf.push_str("\\t"),
                    '\n' => self.buf.push_str("\\n"),
                    '\r' => self.buf.push_str("\\r"),
                    c => self.buf.push(c),
                }
            }
        } else {
            self.buf.push_str(&self.scratch);
        }
    }
    fn null(&mut self) {
        self.sep();
        self.buf.push_str("\\N");
    }
    fn end_row(&mut self) {
        self.buf.push('\n');
        self.in_row = false;
    }
}

/// `(v1, v2, ...), (...)` for `INSERT ... VALUES`.
#[derive(Default)]
pub struct SqlValues {
    pub buf: String,
    row: Vec<String>,
}

impl RowSink for SqlValues {
    fn value(&mut self, v: &dyn Display) {
        self.row.push(quote_literal(&v.to_string()));
    }
    fn null(&mut self) {
        self.row.push("NULL".into());
    }
    fn end_row(&mut self) {
        if !self.buf.is_empty() {
            self.buf.push_str(", ");
        }
        let _ = write!(self.buf, "({})", self.row.join(", "));
        self.row.clear();
    }
}

/// Cents as `123.45`.
struct Money(i64);

impl Display for Money {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        write!(f, "{sign}{}.{:02}", self.0.abs() / 100, self.0.abs() % 100)
    }
}

/// `2026-01-01 08:00:00+08:00`; written by hand because chrono's format strings are slow
/// enough to show in a million-row fill.
struct Timestamp<'a>(&'a DateTime<FixedOffset>);

impl Display for Timestamp<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.0;
        let off = t.offset().local_minus_utc();
        let sign = if off < 0 { '-' } else { '+' };
        write!(
            f,
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}{sign}{:02}:{:02}",
            t.year(),
            t.month(),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            off.abs() / 3600,
            off.abs() % 3600 / 60
        )
    }
}

struct Date(NaiveDate);

impl Display for Date {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}",
            self.0.year(),
            self.0.month(),
            self.0.day()
        )
    }
}

pub fn invoice(sink: &mut impl RowSink, inv: &Invoice) {
    sink.value(&inv.number);
    sink.value(&Date(inv.issued_at.date_naive()));
    let t = inv.issued_at;
    sink.value(&format_args!(
        "{:02}:{:02}:{:02}",
        t.hour(),
        t.minute(),
        t.second()
    ));
    sink.value(&inv.seller_id);
    sink.opt(inv.buyer_id.as_deref());
    sink.value(&Money(inv.sales_cents));
    sink.value(&Money(inv.tax_cents));
    sink.value(&Money(inv.total_cents));
    sink.value(&inv.tax_type);
    sink.opt(inv.carrier.as_ref().map(|c| c.0));
    sink.opt(inv.carrier.as_ref().map(|c| c.1.as_str()));
    sink.opt(inv.donation_code.as_deref());
    sink.value(&inv.random_number);
    sink.value(&if inv.voided { "voided" } else { "issued" });
    sink.value(&Timestamp(&inv.created_at));
    sink.value(&Timestamp(&inv.updated_at));
    sink.end_row();
}

pub fn item(sink: &mut impl RowSink, invoice_number: &str, item: &Item) {
    sink.value(&invoice_number);
    sink.value(&item.seq);
    sink.value(&item.description);
    sink.value(&Money(item.quantity * 100));
    sink.value(&Money(item.unit_price_cents));
    sink.value(&Money(item.amount_cents));
    sink.end_row();
}

pub fn allowance(sink: &mut impl RowSink, a: &Allowance) {
    sink.value(&a.number);
    sink.value(&a.invoice_number);
    sink.value(&Date(a.date));
    sink.value(&Money(a.amount_cents));
    sink.value(&Money(a.tax_cents));
    sink.value(&a.reason);
    sink.end_row();
}

pub fn carrier(sink: &mut impl RowSink, c: &Carrier) {
    sink.value(&c.carrier_type);
    sink.value(&c.carrier_id);
    sink.value(&Timestamp(&c.registered_at));
    sink.value(&c.phone_hash);
    sink.opt(c.email_hash.as_deref());
    sink.end_row();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_text_escapes_and_nulls() {
        let mut c = CopyText::default();
        c.value(&"a\tb\\c");
        c.null();
        c.value(&Money(12345));
        c.end_row();
        assert_eq!(c.buf, "a\\tb\\\\c\t\\N\t123.45\n");
    }

    #[test]
    fn sql_values_quote() {
        let mut s = SqlValues::default();
        s.value(&"it's");
        s.null();
        s.end_row();
        s.value(&Money(5));
        s.end_row();
        assert_eq!(s.buf, "('it''s', NULL), ('0.05')");
    }
}
