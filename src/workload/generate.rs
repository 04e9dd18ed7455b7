//! The deterministic e-invoice model: what an invoice, its items, an allowance and a carrier
//! registration look like, generated from a seed.
//!
//! Invariants:
//! - The same seed, invoice count and item average give the same rows, whatever the number of
//!   workers: invoices come in fixed-size segments, and each segment draws from its own ChaCha
//!   stream, so any worker can generate any segment on its own.
//! - Invoice numbers (`AB12345678`: a two-letter track and eight digits) strictly increase with the
//!   invoice index, and so do the invoice timestamps: recent invoices sit at the recent end of
//!   the key order, as on the platform.
//! - An invoice's `sales_amount` is the sum of its items' amounts, `tax_amount` is 5% of it for
//!   taxable invoices (0 otherwise) and `total_amount` their sum.
//! - Carrier ids are a bijection of the carrier index, so distinct indexes give distinct keys.

use chrono::{DateTime, Duration, FixedOffset, NaiveDate, TimeZone};
use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// Invoices per segment: the unit of generation and of one COPY. Changing it changes the data
/// a seed produces.
pub const SEGMENT: u64 = 10_000;

/// Eight digits per two-letter track.
const TRACK_SIZE: u64 = 100_000_000;

/// The first serial used: `AB10000000`.
const FIRST_SERIAL: u64 = TRACK_SIZE + 10_000_000;

/// Serial numbers advance by 1 to 3 per invoice: numbers are increasing but not dense, as when
/// several tills draw from one allocation.
const SERIAL_STRIDE: u64 = 3;

/// Stream numbers: 0 for the seller pool, 1.. for invoice segments, from `CARRIER_STREAMS` for
/// carrier segments, from `LOAD_STREAMS` for the change stream.
const CARRIER_STREAMS: u64 = 1 << 40;
pub(crate) const LOAD_STREAMS: u64 = 1 << 41;

const SELLERS: usize = 2_000;

/// The business tax rate, 5%.
const TAX_PERCENT: i64 = 5;

pub const MOBILE_BARCODE: &str = "3J0002";
pub const CITIZEN_CERTIFICATE: &str = "CQ0001";

/// Taipei time: invoices carry local dates and times.
pub fn taipei() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).unwrap_or_else(|| unreachable!("+08:00 is a valid offset"))
}

/// Goods sold, with a price range in NTD (whole dollars, as B2C prices are).
const PRODUCTS: &[(&str, i64, i64)] = &[
    ("珍珠奶茶 大杯", 45, 75),
    ("御飯糰 鮪魚", 28, 39),
    ("茶葉蛋", 10, 15),
    ("鮮乳 936ml", 85, 105),
    ("排骨便當", 80, 120),
    ("衛生紙 12捲", 159, 259),
    ("礦泉水 600ml", 15, 25),
    ("美式咖啡 中杯", 45, 90),
    ("鳳梨酥 禮盒", 300, 680),
    ("高山烏龍茶 150g", 400, 1200),
    ("牛肉麵", 150, 280),
    ("小籠包 10入", 120, 260),
    ("悠遊卡加值", 100, 1000),
    ("USB-C cable 1m", 199, 490),
    ("AA batteries 4-pack", 89, 159),
    ("Notebook A5", 35, 120),
    ("Shampoo 750ml", 199, 399),
    ("Instant noodles 5-pack", 99, 169),
    ("Dish soap 1L", 59, 119),
    ("Umbrella", 199, 890),
];

const ALLOWANCE_REASONS: &[&str] = &[
    "退貨",
    "商品瑕疵",
    "價格調整",
    "return",
    "discount after sale",
];

/// What a fill generates: the seed and the sizes that, with [`SEGMENT`], fix every row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Plan {
    pub seed: u64,
    pub invoices: u64,
    /// The mean number of items per invoice (at least 1).
    pub items_per_invoice: f64,
}

impl Plan {
    /// How many invoice segments the plan has.
    pub fn invoice_segments(&self) -> u64 {
        self.invoices.div_ceil(SEGMENT)
    }

    /// Carrier registrations: about one per eight invoices, at least 16.
    pub fn carriers(&self) -> u64 {
        (self.invoices / 8).max(16)
    }

    pub fn carrier_segments(&self) -> u64 {
        self.carriers().div_ceil(SEGMENT)
    }
}

/// A uniform invoice (統一發票). Money is in cents.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoice {
    pub number: String,
    pub issued_at: DateTime<FixedOffset>,
    pub seller_id: String,
    pub buyer_id: Option<String>,
    pub sales_cents: i64,
    pub tax_cents: i64,
    pub total_cents: i64,
    /// 1 taxable, 2 zero-rated, 3 tax-exempt.
    pub tax_type: i16,
    pub carrier: Option<(&'static str, String)>,
    pub donation_code: Option<String>,
    pub random_number: String,
    pub voided: bool,
    pub created_at: DateTime<FixedOffset>,
    pub updated_at: DateTime<FixedOffset>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub seq: i32,
    pub description: &'static str,
    pub quantity: i64,
    pub unit_price_cents: i64,
    pub amount_cents: i64,
}

/// An allowance (折讓) issued against an invoice.
#[derive(Debug, Clone, PartialEq)]
pub struct Allowance {
    pub number: String,
    pub invoice_number: String,
    pub date: NaiveDate,
    pub amount_cents: i64,
    pub tax_cents: i64,
    pub reason: &'static str,
}

/// A carrier registered by a citizen (載具歸戶), keyed by (type, id).
#[derive(Debug, Clone, PartialEq)]
pub struct Carrier {
    pub carrier_type: &'static str,
    pub carrier_id: String,
    pub registered_at: DateTime<FixedOffset>,
    pub phone_hash: String,
    pub email_hash: Option<String>,
}

/// One segment's invoices with their items and allowances.
#[derive(Debug, Default)]
pub struct InvoiceSegment {
    pub invoices: Vec<(Invoice, Vec<Item>)>,
    pub allowances: Vec<Allowance>,
}

/// Generates rows for a [`Plan`]. Cheap to share between workers.
#[derive(Debug, Clone)]
pub struct Generator {
    plan: Plan,
    sellers: Vec<String>,
    /// The fill's invoices span one two-month filing period from here.
    period_start: DateTime<FixedOffset>,
}

impl Generator {
    pub fn new(plan: Plan) -> Generator {
        let mut rng = stream(plan.seed, 0);
        let sellers = (0..SELLERS).map(|_| business_id(&mut rng)).collect();
        let period_start = taipei()
            .with_ymd_and_hms(2026, 1, 1, 0, 0, 0)
            .single()
            .unwrap_or_else(|| unreachable!("a fixed-offset time is unambiguous"));
        Generator {
            plan,
            sellers,
            period_start,
        }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The invoices of segment `segment` (0-based), with their items and allowances.
    pub fn invoice_segment(&self, segment: u64) -> InvoiceSegment {
        let mut rng = stream(self.plan.seed, 1 + segment);
        let first = segment * SEGMENT;
        let last = (first + SEGMENT).min(self.plan.invoices);
        let period = Duration::days(59).num_seconds() as u128;
        let mut out = InvoiceSegment::default();
        for index in first..last {
            let serial = FIRST_SERIAL + index * SERIAL_STRIDE + rng.gen_range(0..SERIAL_STRIDE);
            // Spread evenly over the period, so time order is number order.
            let offset = (index as u128 * period / self.plan.invoices.max(1) as u128) as i64;
            let at = self.period_start + Duration::seconds(offset);
            let (mut invoice, items) = self.invoice(&mut rng, serial, at);
            if rng.gen_bool(0.01) {
                invoice.voided = true;
                invoice.updated_at = at + Duration::minutes(rng.gen_range(5..3 * 24 * 60));
            } else if rng.gen_bool(0.02) {
                out.allowances
                    .push(allowance(&mut rng, &invoice, 1, at.date_naive()));
            }
            out.invoices.push((invoice, items));
        }
        out
    }

    /// One invoice with items, numbered `serial`, issued at `at`.
    pub fn invoice(
        &self,
        rng: &mut ChaCha8Rng,
        serial: u64,
        at: DateTime<FixedOffset>,
    ) -> (Invoice, Vec<Item>) {
        // A few big chains issue most invoices.
        let u: f64 = rng.gen();
        let seller_id = self.sellers[((u * u * u) * SELLERS as f64) as usize % SELLERS].clone();
        let b2b = rng.gen_bool(0.15);
        let spread = 2.0 * (self.plan.items_per_invoice - 1.0).max(0.0) + 1.0;
        let count = 1 + (rng.gen::<f64>() * spread) as usize;
        let items: Vec<Item> = (0..count)
            .map(|i| {
                let (description, low, high) = PRODUCTS[rng.gen_range(0..PRODUCTS.len())];
                let quantity = if rng.gen_bool(0.8) {
                    1
                } else {
                    rng.gen_range(2..=6)
                };
                let unit_price_cents = rng.gen_range(low..=high) * 100;
                Item {
                    seq: i as i32 + 1,
                    description,
                    quantity,
                    unit_price_cents,
                    amount_cents: quantity * unit_price_cents,
                }
            })
            .collect();
        let tax_type = match rng.gen_range(0..100) {
            0..=94 => 1,
            95..=97 => 2,
            _ => 3,
        };
        let sales_cents = items.iter().map(|i| i.amount_cents).sum();
        let tax_cents = tax_for(tax_type, sales_cents);
        let (buyer_id, carrier, donation_code) = if b2b {
            (Some(business_id(rng)), None, None)
        } else {
            match rng.gen_range(0..100) {
                0..=64 => {
                    let k = rng.gen_range(0..self.plan.carriers());
                    (
                        Some(B2C_BUYER.to_string()),
                        Some(carrier_key(self.plan.seed, k)),
                        None,
                    )
                }
                65..=74 => {
                    let digits = rng.gen_range(3..=7);
                    let code: String = (0..digits).map(|_| digit(rng)).collect();
                    (Some(B2C_BUYER.to_string()), None, Some(code))
                }
                75..=94 => (Some(B2C_BUYER.to_string()), None, None),
                // Older till software leaves the buyer empty.
                _ => (None, None, None),
            }
        };
        let random_number: String = (0..4).map(|_| digit(rng)).collect();
        let invoice = Invoice {
            number: invoice_number(serial),
            issued_at: at,
            seller_id,
            buyer_id,
            sales_cents,
            tax_cents,
            total_cents: sales_cents + tax_cents,
            tax_type,
            carrier,
            donation_code,
            random_number,
            voided: false,
            created_at: at,
            updated_at: at,
        };
        (invoice, items)
    }

    /// The carrier registrations of carrier segment `segment` (0-based).
    pub fn carrier_segment(&self, segment: u64) -> Vec<Carrier> {
        let mut rng = stream(self.plan.seed, CARRIER_STREAMS + segment);
        let first = segment * SEGMENT;
        let last = (first + SEGMENT).min(self.plan.carriers());
        (first..last)
            .map(|k| {
                // Registrations from 2020 on, before the invoices that use them.
                let at = self.period_start - Duration::days(6 * 365)
                    + Duration::seconds(rng.gen_range(0..6 * 365 * 86_400));
                carrier(&mut rng, self.plan.seed, k, at)
            })
            .collect()
    }
}

/// The buyer id on business-to-consumer invoices.
pub const B2C_BUYER: &str = "00000000";

/// A ChaCha stream of `seed`: independent of every other stream of the same seed.
pub(crate) fn stream(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

pub(crate) fn tax_for(tax_type: i16, sales_cents: i64) -> i64 {
    if tax_type == 1 {
        // Rounded to whole dollars, half up.
        (sales_cents * TAX_PERCENT / 100 + 50) / 100 * 100
    } else {
        0
    }
}

/// A carrier registration for carrier index `k`, registered at `at`.
pub(crate) fn carrier(
    rng: &mut ChaCha8Rng,
    seed: u64,
    k: u64,
    at: DateTime<FixedOffset>,
) -> Carrier {
    let (carrier_type, carrier_id) = carrier_key(seed, k);
    let phone: String = format!("09{:08}", rng.gen_range(0..100_000_000u32));
    let email_hash = rng.gen_bool(0.4).then(|| {
        blake3::hash(format!("citizen{}@example.tw", rng.gen::<u32>()).as_bytes())
            .to_hex()
            .to_string()
    });
    Carrier {
        carrier_type,
        carrier_id,
        registered_at: at,
        phone_hash: blake3::hash(phone.as_bytes()).to_hex().to_string(),
        email_hash,
    }
}

/// The (type, id) of carrier index `k`: one in seven is a citizen certificate (`AB12345678901234`),
/// the others mobile barcodes (`/` and seven of `0-9A-Z+-.`). Both are bijections of `k` within
/// their type, offset by the seed.
pub(crate) fn carrier_key(seed: u64, k: u64) -> (&'static str, String) {
    const BARCODE_CHARS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ+-.";
    // Multipliers coprime to the id space make `k -> k * M + offset` a bijection.
    if k % 7 == 6 {
        let space: u128 = 676 * 100_000_000_000_000;
        let v = ((k / 7) as u128 * 1_000_003 + seed as u128) % space;
        let letters = v / 100_000_000_000_000;
        let id = format!(
            "{}{}{:014}",
            (b'A' + (letters / 26) as u8) as char,
            (b'A' + (letters % 26) as u8) as char,
            v % 100_000_000_000_000
        );
        (CITIZEN_CERTIFICATE, id)
    } else {
        let space: u128 = 39u128.pow(7);
        let mut v = ((k - k / 7) as u128 * 2_654_435_761 + seed as u128) % space;
        let mut id = vec![b'/'; 8];
        for slot in id[1..].iter_mut().rev() {
            *slot = BARCODE_CHARS[(v % 39) as usize];
            v /= 39;
        }
        (MOBILE_BARCODE, String::from_utf8_lossy(&id).into_owned())
    }
}

pub(crate) fn allowance(
    rng: &mut ChaCha8Rng,
    invoice: &Invoice,
    n: u32,
    date: NaiveDate,
) -> Allowance {
    // Whole dollars, at least one, at most the sales amount.
    let dollars = (invoice.sales_cents / 100).max(1);
    let amount_cents = rng.gen_range(1..=dollars) * 100;
    Allowance {
        number: allowance_number(&invoice.number, n),
        invoice_number: invoice.number.clone(),
        date: date + Duration::days(rng.gen_range(0..10)),
        amount_cents,
        tax_cents: tax_for(invoice.tax_type, amount_cents),
        reason: ALLOWANCE_REASONS[rng.gen_range(0..ALLOWANCE_REASONS.len())],
    }
}

/// The `n`th allowance against an invoice: `AB12345678-1`.
pub fn allowance_number(invoice_number: &str, n: u32) -> String {
    format!("{invoice_number}-{n}")
}

/// `AB12345678` for a serial: the track letters from `serial / 10^8`, then eight digits.
pub fn invoice_number(serial: u64) -> String {
    let track = (serial / TRACK_SIZE) % 676;
    format!(
        "{}{}{:08}",
        (b'A' + (track / 26) as u8) as char,
        (b'A' + (track % 26) as u8) as char,
        serial % TRACK_SIZE
    )
}

/// The serial of an invoice number, or None when it is not two capitals and eight digits.
pub fn invoice_serial(number: &str) -> Option<u64> {
    let b = number.as_bytes();
    if b.len() != 10
        || !b[..2].iter().all(u8::is_ascii_uppercase)
        || !b[2..].iter().all(u8::is_ascii_digit)
    {
        return None;
    }
    let track = (b[0] - b'A') as u64 * 26 + (b[1] - b'A') as u64;
    Some(track * TRACK_SIZE + number[2..].parse::<u64>().ok()?)
}

/// The serial after which the fill's numbers start (the load continues after the greatest).
pub fn first_serial() -> u64 {
    FIRST_SERIAL
}

/// The next serial after `serial`, with the fill's gaps.
pub(crate) fn next_serial(rng: &mut ChaCha8Rng, serial: u64) -> u64 {
    serial + 1 + rng.gen_range(0..SERIAL_STRIDE)
}

fn digit(rng: &mut ChaCha8Rng) -> char {
    (b'0' + rng.gen_range(0..10u8)) as char
}

/// A valid business id (統一編號): seven random digits and the check digit that makes the
/// weighted digit sum divisible by 5 (the rule since 2023).
pub fn business_id(rng: &mut ChaCha8Rng) -> String {
    let mut digits: Vec<u8> = (0..7).map(|_| rng.gen_range(0..10u8)).collect();
    let last = (0..10u8)
        .find(|&d| {
            digits.push(d);
            let ok = business_id_valid(&digits);
            digits.pop();
            ok
        })
        .unwrap_or_else(|| unreachable!("one of ten check digits always fits"));
    digits.push(last);
    digits.iter().map(|d| (b'0' + d) as char).collect()
}

/// Checks a business id's digits against the weights 1,2,1,2,1,2,4,1.
pub fn business_id_valid(digits: &[u8]) -> bool {
    const WEIGHTS: [u8; 8] = [1, 2, 1, 2, 1, 2, 4, 1];
    if digits.len() != 8 {
        return false;
    }
    let sum: u32 = digits
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| {
            let p = (d * w) as u32;
            p / 10 + p % 10
        })
        .sum();
    // When the seventh digit is 7, its product 28 may count as 1 or 0.
    sum.is_multiple_of(5) || (digits[6] == 7 && (sum + 1).is_multiple_of(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(seed: u64) -> Plan {
        Plan {
            seed,
            invoices: 25_000,
            items_per_invoice: 3.0,
        }
    }

    #[test]
    fn numbers_round_trip_and_increase() {
        assert_eq!(invoice_number(FIRST_SERIAL), "AB10000000");
        assert_eq!(invoice_serial("AB10000000"), Some(FIRST_SERIAL));
        assert_eq!(invoice_serial("ab10000000"), None);
        assert_eq!(invoice_serial("AB1000000"), None);
        let g = Generator::new(plan(1));
        let mut last = String::new();
        for s in 0..plan(1).invoice_segments() {
            for (inv, _) in g.invoice_segment(s).invoices {
                assert!(inv.number > last, "{} after {last}", inv.number);
                last = inv.number;
            }
        }
    }

    #[test]
    fn same_seed_same_rows_other_seed_other_rows() {
        let a = Generator::new(plan(7)).invoice_segment(2);
        let b = Generator::new(plan(7)).invoice_segment(2);
        let c = Generator::new(plan(8)).invoice_segment(2);
        assert_eq!(a.invoices, b.invoices);
        assert_eq!(a.allowances, b.allowances);
        assert_ne!(a.invoices, c.invoices);
    }

    #[test]
    fn amounts_add_up_and_ids_are_valid() {
        let g = Generator::new(plan(3));
        let seg = g.invoice_segment(0);
        let mut items = 0;
        for (inv, its) in &seg.invoices {
            assert_eq!(
                inv.sales_cents,
                its.iter().map(|i| i.amount_cents).sum::<i64>()
            );
            assert_eq!(inv.total_cents, inv.sales_cents + inv.tax_cents);
            let digits: Vec<u8> = inv.seller_id.bytes().map(|b| b - b'0').collect();
            assert!(business_id_valid(&digits), "{}", inv.seller_id);
            items += its.len();
        }
        let avg = items as f64 / seg.invoices.len() as f64;
        assert!((2.8..3.2).contains(&avg), "average items {avg}");
    }

    #[test]
    fn carrier_keys_are_distinct() {
        let mut keys: Vec<_> = (0..50_000).map(|k| carrier_key(9, k)).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 50_000);
        assert!(keys
            .iter()
            .any(|(t, id)| *t == MOBILE_BARCODE && id.starts_with('/')));
        assert!(keys
            .iter()
            .any(|(t, id)| *t == CITIZEN_CERTIFICATE && id.len() == 16));
    }

    #[test]
    fn known_business_ids() {
        // Worked by hand: 04595257 sums to 40; 10458575 sums to 20 when its 7*4=28 counts 0.
        for id in ["04595257", "10458575"] {
            let d: Vec<u8> = id.bytes().map(|b| b - b'0').collect();
            assert!(business_id_valid(&d), "{id}");
        }
        let d: Vec<u8> = "04595258".bytes().map(|b| b - b'0').collect();
        assert!(!business_id_valid(&d));
    }
}
