//! Decoding of `pgoutput` (protocol version 1) messages: the bytes inside each XLogData.
//!
//! The transport (START_REPLICATION, keepalives, standby status updates) is the
//! `pgwire-replication` crate's; it hands over Begin and Commit already parsed and every other
//! message as raw bytes, which [`decode`] turns into a [`Message`]. The bytes come from the
//! network, so the decoder never panics and never allocates more than the input could describe:
//! every malformed input is a [`DecodeError`]. A fuzz target (`fuzz/`) holds it to that.

use bytes::Bytes;

/// What was wrong with a message. The offset is from the start of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("message `{tag}` truncated at byte {offset}")]
    Truncated { tag: char, offset: usize },
    #[error("unknown message type {0:#04x}")]
    UnknownTag(u8),
    #[error("message `{tag}`: {what} at byte {offset}")]
    Invalid {
        tag: char,
        what: &'static str,
        offset: usize,
    },
    #[error("message `{tag}` has {extra} trailing byte(s)")]
    Trailing { tag: char, extra: usize },
}

/// One column value in a row image.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value: the update did not touch it and its value was not sent.
    Unchanged,
    /// The value in the type's text output format.
    Text(Bytes),
    /// The value in the type's binary send format.
    Binary(Bytes),
}

/// One column as a Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (key) used for UPDATE and DELETE.
    pub key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// A table's shape as the stream knows it. Sent before the first change to the table in each
/// session and again after its definition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub schema: String,
    pub name: String,
    /// `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    pub columns: Vec<RelationColumn>,
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        commit_time: i64,
        xid: u32,
    },
    Commit {
        flags: u8,
        commit_lsn: u64,
        end_lsn: u64,
        commit_time: i64,
    },
    /// The transaction being sent was applied by a replicator that set a replication origin.
    Origin {
        commit_lsn: u64,
        name: String,
    },
    Relation(Relation),
    Type {
        oid: u32,
        schema: String,
        name: String,
    },
    Insert {
        relation: u32,
        new: Vec<Value>,
    },
    Update {
        relation: u32,
        /// The old key (`K`) or, with REPLICA IDENTITY FULL, the old row (`O`); absent when the
        /// key did not change.
        old: Option<Vec<Value>>,
        new: Vec<Value>,
    },
    Delete {
        relation: u32,
        old: Vec<Value>,
    },
    Truncate {
        /// Bit 1: CASCADE; bit 2: RESTART IDENTITY.
        options: u8,
        relations: Vec<u32>,
    },
    /// A logical decoding message (`pg_logical_emit_message`).
    LogicalMessage {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
}

/// TRUNCATE option bit: CASCADE.
pub const TRUNCATE_CASCADE: u8 = 1;
/// TRUNCATE option bit: RESTART IDENTITY.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

struct Reader<'a> {
    tag: char,
    data: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn truncated(&self) -> DecodeError {
        DecodeError::Truncated {
            tag: self.tag,
            offset: self.pos,
        }
    }

    fn invalid(&self, what: &'static str) -> DecodeError {
        DecodeError::Invalid {
            tag: self.tag,
            what,
            offset: self.pos,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let data: &'a [u8] = self.data.as_ref();
        let end = self.pos.checked_add(n).ok_or_else(|| self.truncated())?;
        let slice = data.get(self.pos..end).ok_or_else(|| self.truncated())?;
        self.pos = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(self.u32()? as i32)
    }

    fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.take(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(self.u64()? as i64)
    }

    fn bytes(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.data.slice(start..self.pos))
    }

    /// A NUL-terminated UTF-8 string.
    fn cstr(&mut self) -> Result<String, DecodeError> {
        let data: &'a [u8] = self.data.as_ref();
        let rest = data.get(self.pos..).ok_or_else(|| self.truncated())?;
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.truncated())?;
        let s =
            std::str::from_utf8(&rest[..len]).map_err(|_| self.invalid("string is not UTF-8"))?;
        self.pos += len + 1;
        Ok(s.to_string())
    }

    /// A count that sizes an allocation: never more than the bytes left could hold, given
    /// `min_size` bytes per element.
    fn count(&mut self, n: i64, min_size: usize) -> Result<usize, DecodeError> {
        if n < 0 {
            return Err(self.invalid("negative count"));
        }
        let left = self.data.len() - self.pos;
        let n = n as usize;
        if n.saturating_mul(min_size) > left {
            return Err(self.truncated());
        }
        Ok(n)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.i16()? as i64;
        let n = self.count(n, 1)?;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = self.u8()?;
            values.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' | b'b' => {
                    let len = self.i32()? as i64;
                    let len = self.count(len, 1)?;
                    let data = self.bytes(len)?;
                    if kind == b't' {
                        Value::Text(data)
                    } else {
                        Value::Binary(data)
                    }
                }
                _ => return Err(self.invalid("unknown column value kind")),
            });
        }
        Ok(values)
    }

    fn finish(self, message: Message) -> Result<Message, DecodeError> {
        let extra = self.data.len() - self.pos;
        if extra != 0 {
            return Err(DecodeError::Trailing {
                tag: self.tag,
                extra,
            });
        }
        Ok(message)
    }
}

/// Decodes one pgoutput message.
pub fn decode(data: &Bytes) -> Result<Message, DecodeError> {
    let tag = *data.first().ok_or(DecodeError::Empty)?;
    let mut r = Reader {
        tag: tag as char,
        data,
        pos: 1,
    };
    let message = match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64()?,
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => Message::Commit {
            flags: r.u8()?,
            commit_lsn: r.u64()?,
            end_lsn: r.u64()?,
            commit_time: r.i64()?,
        },
        b'O' => Message::Origin {
            commit_lsn: r.u64()?,
            name: r.cstr()?,
        },
        b'R' => {
            let id = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let n = r.i16()? as i64;
            // flags(1) + name(>= 1) + type(4) + typmod(4)
            let n = r.count(n, 10)?;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let flags = r.u8()?;
                columns.push(RelationColumn {
                    key: flags & 1 != 0,
                    name: r.cstr()?,
                    type_oid: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                name,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32()?,
            schema: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => {
            let relation = r.u32()?;
            if r.u8()? != b'N' {
                return Err(r.invalid("expected new tuple `N`"));
            }
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut old = None;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8()?;
            }
            if kind != b'N' {
                return Err(r.invalid("expected new tuple `N`"));
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            if kind != b'K' && kind != b'O' {
                return Err(r.invalid("expected old key `K` or old tuple `O`"));
            }
            Message::Delete {
                relation,
                old: r.tuple()?,
            }
        }
        b'T' => {
            let n = r.i32()? as i64;
            let options = r.u8()?;
            let n = r.count(n, 4)?;
            let mut relations = Vec::with_capacity(n);
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { options, relations }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = r.u64()?;
            let prefix = r.cstr()?;
            let len = r.i32()? as i64;
            let len = r.count(len, 1)?;
            Message::LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len)?,
            }
        }
        other => return Err(DecodeError::UnknownTag(other)),
    };
    r.finish(message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16384u32.to_be_bytes());
        b.extend(b"public\0invoice\0");
        b.push(b'd');
        b.extend(2i16.to_be_bytes());
        b.push(1);
        b.extend(b"invoice_number\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"note\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b
    }

    fn update_bytes() -> Vec<u8> {
        let mut b = vec![b'U'];
        b.extend(16384u32.to_be_bytes());
        b.push(b'K');
        b.extend(2i16.to_be_bytes());
        b.push(b't');
        b.extend(10i32.to_be_bytes());
        b.extend(b"AB12345678");
        b.push(b'n');
        b.push(b'N');
        b.extend(2i16.to_be_bytes());
        b.push(b't');
        b.extend(10i32.to_be_bytes());
        b.extend(b"AB12345679");
        b.push(b'u');
        b
    }

    #[test]
    fn decodes_relation_and_update() {
        let m = decode(&Bytes::from(relation_bytes())).unwrap();
        let Message::Relation(rel) = m else {
            panic!("not a relation: {m:?}")
        };
        assert_eq!(
            (rel.schema.as_str(), rel.name.as_str()),
            ("public", "invoice")
        );
        assert!(rel.columns[0].key && !rel.columns[1].key);
        assert_eq!(rel.columns[1].name, "note");

        let m = decode(&Bytes::from(update_bytes())).unwrap();
        assert_eq!(
            m,
            Message::Update {
                relation: 16384,
                old: Some(vec![
                    Value::Text(Bytes::from_static(b"AB12345678")),
                    Value::Null
                ]),
                new: vec![
                    Value::Text(Bytes::from_static(b"AB12345679")),
                    Value::Unchanged
                ],
            }
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            decode(&Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownTag(b'Z'))
        );
        // A column count far beyond the message is refused before allocating.
        let mut huge = vec![b'I'];
        huge.extend(1u32.to_be_bytes());
        huge.push(b'N');
        huge.extend(i16::MAX.to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(huge)),
            Err(DecodeError::Truncated { .. })
        ));
        // A negative value length.
        let mut neg = vec![b'I'];
        neg.extend(1u32.to_be_bytes());
        neg.push(b'N');
        neg.extend(1i16.to_be_bytes());
        neg.push(b't');
        neg.extend((-5i32).to_be_bytes());
        assert!(matches!(
            decode(&Bytes::from(neg)),
            Err(DecodeError::Invalid { .. })
        ));

        // Every truncation of valid messages, and random corruptions, fail cleanly.
        let valid = [relation_bytes(), update_bytes()];
        for msg in &valid {
            for cut in 0..msg.len() {
                assert!(
                    decode(&Bytes::copy_from_slice(&msg[..cut])).is_err(),
                    "cut {cut}"
                );
            }
            let mut longer = msg.clone();
            longer.push(0);
            assert!(matches!(
                decode(&Bytes::from(longer)),
                Err(DecodeError::Trailing { extra: 1, .. })
            ));
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for i in 0..20_000 {
            let mut msg = valid[i % 2].clone();
            for _ in 0..rng.gen_range(1..4) {
                let at = rng.gen_range(0..msg.len());
                msg[at] = rng.gen();
            }
            let _ = decode(&Bytes::from(msg));
            let len = rng.gen_range(0..64);
            let noise: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            let _ = decode(&Bytes::from(noise));
        }
    }
}
