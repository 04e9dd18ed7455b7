//! Packs: many compressed, encrypted blobs in one object, so a large database is thousands of
//! objects rather than millions.
//!
//! Layout: `header (crypto::header, kind P) | blob ... | sealed trailer | u32 BE trailer
//! length`. Each blob is zstd-compressed and then sealed with the pack's object key, using its
//! offset as nonce and its id as associated data. The trailer lists the pack's blobs, so a
//! pack describes itself even if every index object were lost. A pack's name is the blake3
//! hash of its bytes: any change to a stored pack is visible without keys.

use serde::{Deserialize, Serialize};

use super::crypto::{self, BlobId, CryptoError, IdKey, Keyring, ObjectKey};

pub const KIND_PACK: u8 = b'P';
/// Packs are cut once they reach this size.
pub const TARGET_PACK_SIZE: usize = 16 * 1024 * 1024;
const ZSTD_LEVEL: i32 = 3;
/// No blob is longer: chunks are at most [`MAX_CHUNK`](super::chunker::MAX_CHUNK); the margin
/// leaves room for other chunker sizes in later versions.
pub const MAX_BLOB: usize = 16 * super::chunker::MAX_CHUNK;

/// Where a blob sits inside its pack.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobEntry {
    pub id: BlobId,
    pub offset: u64,
    /// Stored (compressed and sealed) length.
    pub length: u32,
    /// Plaintext length.
    pub raw_length: u32,
}

impl BlobEntry {
    /// The blob's bytes within its pack; `None` when the entry (read from the store, so
    /// untrusted) names a range no pack can have.
    pub fn range(&self) -> Option<std::ops::Range<u64>> {
        Some(self.offset..self.offset.checked_add(self.length as u64)?)
    }
}

/// The sealed bytes of blob `e` within `bytes`, which hold its pack from offset `base` on;
/// `None` when they are not all there.
pub fn sealed_in<'a>(bytes: &'a [u8], base: u64, e: &BlobEntry) -> Option<&'a [u8]> {
    let r = e.range()?;
    let start = usize::try_from(r.start.checked_sub(base)?).ok()?;
    let end = usize::try_from(r.end.checked_sub(base)?).ok()?;
    bytes.get(start..end)
}

/// A pack as the index knows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PackEntry {
    /// Name of the pack object (hex blake3 of its bytes).
    pub id: String,
    pub size: u64,
    /// The pack's object key wrapped to the repository recipient (hex), so reading a blob
    /// does not first need a read of the pack header.
    pub key: String,
    pub blobs: Vec<BlobEntry>,
}

/// Object path of pack `id`: `data/ab/abcd...`.
pub fn pack_path(id: &str) -> String {
    format!("data/{}/{id}", id.get(..2).unwrap_or(id))
}

/// A blob's plaintext as it is stored in a pack, before sealing.
pub fn compress(raw: &[u8]) -> Result<Vec<u8>, CryptoError> {
    zstd::bulk::compress(raw, ZSTD_LEVEL).map_err(|e| CryptoError::Other(e.to_string()))
}

/// Builds one pack in memory.
pub struct PackBuilder {
    key: ObjectKey,
    wrapped: Vec<u8>,
    buf: Vec<u8>,
    blobs: Vec<BlobEntry>,
}

impl PackBuilder {
    pub fn new(keys: &Keyring) -> Result<Self, CryptoError> {
        let (key, wrapped) = keys.new_object_key()?;
        let buf = crypto::header(KIND_PACK, &wrapped)?;
        Ok(PackBuilder {
            key,
            wrapped,
            buf,
            blobs: Vec::new(),
        })
    }

    /// Compresses, seals and appends a blob; returns its stored length.
    pub fn add(&mut self, id: BlobId, raw: &[u8]) -> Result<u64, CryptoError> {
        self.add_compressed(id, &compress(raw)?, raw.len())
    }

    /// Seals and appends a blob already compressed with [`compress`] (compression, the costly
    /// part, can then run on other threads); `raw_len` is its plaintext length.
    pub fn add_compressed(
        &mut self,
        id: BlobId,
        compressed: &[u8],
        raw_len: usize,
    ) -> Result<u64, CryptoError> {
        let offset = self.buf.len() as u64;
        let sealed = self.key.seal_blob(offset, &id, compressed);
        let too_big = |_| CryptoError::Other("blob larger than 4 GiB".into());
        self.blobs.push(BlobEntry {
            id,
            offset,
            length: u32::try_from(sealed.len()).map_err(too_big)?,
            raw_length: u32::try_from(raw_len).map_err(too_big)?,
        });
        self.buf.extend_from_slice(&sealed);
        Ok(sealed.len() as u64)
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blobs.is_empty()
    }

    /// The finished pack's bytes and its index entry.
    pub fn finish(mut self) -> Result<(Vec<u8>, PackEntry), CryptoError> {
        let trailer =
            serde_json::to_vec(&self.blobs).map_err(|e| CryptoError::Other(e.to_string()))?;
        let sealed = self.key.seal_body(KIND_PACK, &trailer);
        self.buf.extend_from_slice(&sealed);
        self.buf
            .extend_from_slice(&(sealed.len() as u32).to_be_bytes());
        let id = blake3::hash(&self.buf).to_hex().to_string();
        let entry = PackEntry {
            id,
            size: self.buf.len() as u64,
            key: hex::encode(&self.wrapped),
            blobs: self.blobs,
        };
        Ok((self.buf, entry))
    }
}

/// Opens one stored blob: decrypts, decompresses, and (given the id key) checks its hash.
pub fn open_blob(
    key: &ObjectKey,
    entry: &BlobEntry,
    sealed: &[u8],
    id_key: Option<&IdKey>,
) -> Result<Vec<u8>, CryptoError> {
    // The length comes from the store: bound the buffer it sizes.
    if entry.raw_length as usize > MAX_BLOB {
        return Err(CryptoError::Other(format!(
            "implausible blob length {}",
            entry.raw_length
        )));
    }
    let compressed = key.open_blob(entry.offset, &entry.id, sealed)?;
    let raw = zstd::bulk::decompress(&compressed, entry.raw_length as usize)
        .map_err(|e| CryptoError::Other(format!("cannot decompress: {e}")))?;
    if raw.len() != entry.raw_length as usize {
        return Err(CryptoError::Other(
            "decompressed length differs from the index".into(),
        ));
    }
    if let Some(k) = id_key {
        if k.id(&raw) != entry.id {
            return Err(CryptoError::Other("content does not match its id".into()));
        }
    }
    Ok(raw)
}

/// Reads a whole pack's own description (its trailer), checking header and trailer.
pub fn read_trailer(
    keys: &Keyring,
    bytes: &[u8],
) -> Result<(ObjectKey, Vec<BlobEntry>), CryptoError> {
    let (kind, wrapped, body) = crypto::split_header(bytes)?;
    if kind != KIND_PACK || bytes.len() < 4 {
        return Err(CryptoError::Header);
    }
    let key = keys.unwrap_object_key(wrapped)?;
    let n = bytes.len();
    let len = u32::from_be_bytes([bytes[n - 4], bytes[n - 3], bytes[n - 2], bytes[n - 1]]) as usize;
    let start = n.checked_sub(4 + len).ok_or(CryptoError::Header)?;
    let trailer = key.open_body(KIND_PACK, &bytes[start..n - 4])?;
    let blobs: Vec<BlobEntry> =
        serde_json::from_slice(&trailer).map_err(|e| CryptoError::Other(e.to_string()))?;
    // As written, blobs fill the space between header and trailer exactly, in order: anything
    // else (bytes inserted, a blob listed twice) is damage even if every blob still opens.
    let mut at = body as u64;
    for b in &blobs {
        match b.range() {
            Some(r) if r.start == at => at = r.end,
            _ => return Err(CryptoError::Other("its blobs do not fill the pack".into())),
        }
    }
    if at != start as u64 {
        return Err(CryptoError::Other("its blobs do not fill the pack".into()));
    }
    Ok((key, blobs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::crypto::MasterKey;

    #[test]
    fn pack_round_trip() {
        let master = MasterKey::generate();
        let keys = Keyring {
            recipient: master.identity.to_public(),
            master: Some(master),
        };
        let id_key = keys.master.as_ref().unwrap().id_key.clone();
        let mut b = PackBuilder::new(&keys).unwrap();
        let blobs: Vec<Vec<u8>> = vec![b"alpha".repeat(100), b"beta".to_vec()];
        for raw in &blobs {
            b.add(id_key.id(raw), raw).unwrap();
        }
        let (bytes, entry) = b.finish().unwrap();
        assert_eq!(entry.id, blake3::hash(&bytes).to_hex().as_str());
        let (key, listed) = read_trailer(&keys, &bytes).unwrap();
        assert_eq!(listed, entry.blobs);
        for (raw, e) in blobs.iter().zip(&listed) {
            let sealed = &bytes[e.offset as usize..(e.offset + e.length as u64) as usize];
            assert_eq!(&open_blob(&key, e, sealed, Some(&id_key)).unwrap(), raw);
        }
        let mut bad = bytes.clone();
        bad[listed[0].offset as usize + 3] ^= 1;
        let e = &listed[0];
        let sealed = &bad[e.offset as usize..(e.offset + e.length as u64) as usize];
        assert!(open_blob(&key, e, sealed, Some(&id_key)).is_err());
    }

    #[test]
    fn damaged_packs_are_errors_never_panics() {
        let master = MasterKey::generate();
        let keys = Keyring {
            recipient: master.identity.to_public(),
            master: Some(master),
        };
        let id_key = keys.master.as_ref().unwrap().id_key.clone();
        let mut b = PackBuilder::new(&keys).unwrap();
        for raw in [&b"some data"[..], b"more data"] {
            b.add(id_key.id(raw), raw).unwrap();
        }
        let (bytes, _) = b.finish().unwrap();
        // Reads the pack as `verify repo --read-data` does: its trailer, then every blob listed.
        let read_all = |bytes: &[u8]| -> Result<(), CryptoError> {
            let (key, listed) = read_trailer(&keys, bytes)?;
            for e in &listed {
                let sealed = sealed_in(bytes, 0, e).ok_or(CryptoError::Header)?;
                open_blob(&key, e, sealed, Some(&id_key))?;
            }
            Ok(())
        };
        read_all(&bytes).unwrap();
        // Every truncation, and a flipped byte at every position, is an error.
        for n in 0..bytes.len() {
            assert!(
                read_trailer(&keys, &bytes[..n]).is_err(),
                "truncated to {n}"
            );
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x80;
            assert!(read_all(&bad).is_err(), "byte {i} flipped went unnoticed");
        }
    }
}
