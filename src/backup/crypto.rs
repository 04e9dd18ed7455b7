//! Keys and encryption of repository objects.
//!
//! Two kinds of secret exist. The **master key** belongs to the repository: an age X25519
//! identity (whose public half, the *repository recipient*, sits in the plaintext `config`)
//! and the 32-byte *id key* that keys the blake3 hash naming every blob. The master key is
//! stored only wrapped with age, once per reader (an X25519 recipient or a passphrase), in
//! `keys/` objects; adding or removing a reader rewrites one small object, never data.
//!
//! Every encrypted object (pack, index, snapshot, lock) has its own random 32-byte **object
//! key**, wrapped with age to the repository recipient and stored in the object's header.
//! Writing therefore needs only the public repository recipient: a write-only host (one
//! configured with recipients and no identity) can take backups it cannot read back. Reading
//! needs the master identity to unwrap object keys.
//!
//! Data is sealed with ChaCha20-Poly1305 under the object key. Because each key is used for
//! one object only, nonces need only be unique inside an object: a blob's nonce is its offset
//! in the pack, and the single body of other objects (or a pack's trailer) uses the all-ones
//! nonce, which no offset can take. The associated data binds a blob to its id and an object
//! body to its kind, so blobs cannot be swapped or objects passed off as another kind.
//!
//! Trust: a write-only host takes the repository recipient from the plaintext `config`.
//! Someone who can write to the store could replace it with their own and read backups made
//! afterwards by write-only hosts (hosts holding the master key check that the recipient
//! matches it). Pinning the repository recipient in the host's configuration would close this;
//! version 1 does not.

use std::fmt;
use std::str::FromStr;

use age::secrecy::{ExposeSecret, SecretString};
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// Starts every encrypted object; followed by a kind byte and the wrapped object key.
pub const MAGIC: &[u8; 8] = b"INVSYNC1";
/// Nonce of an object's single body (and of a pack's trailer).
const BODY_NONCE: [u8; 12] = [0xff; 12];

/// A failure to encrypt or decrypt; the caller adds which object.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("not an invsync object (bad magic or header)")]
    Header,
    #[error("authentication failed (the object was modified, truncated, or belongs to another repository)")]
    Authentication,
    #[error("its key cannot be unwrapped with the repository key: {0}")]
    Unwrap(String),
    #[error("{0}")]
    Other(String),
}

/// A blob's name: the blake3 hash of its plaintext keyed with the repository's id key, so
/// equal content gets the same id here and an unrecognisable one in another repository.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(blake3::Hash::from_bytes(self.0).to_hex().as_str())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({self})")
    }
}

impl FromStr for BlobId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        blake3::Hash::from_hex(s)
            .map(|h| BlobId(*h.as_bytes()))
            .map_err(|e| format!("bad id `{s}`: {e}"))
    }
}

impl Serialize for BlobId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn random32() -> [u8; 32] {
    let mut k = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut k);
    k
}

/// The key of the keyed hash that names blobs.
#[derive(Clone)]
pub struct IdKey([u8; 32]);

impl fmt::Debug for IdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IdKey(***)")
    }
}

impl IdKey {
    pub fn random() -> Self {
        IdKey(random32())
    }
    pub fn from_hex(s: &str) -> Result<Self, String> {
        let v = hex::decode(s).map_err(|e| e.to_string())?;
        Ok(IdKey(
            v.try_into()
                .map_err(|_| "id key must be 32 bytes".to_string())?,
        ))
    }
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn id(&self, data: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.0, data).as_bytes())
    }
}

/// The repository's secret: what a reader unwraps from a `keys/` object.
pub struct MasterKey {
    pub identity: age::x25519::Identity,
    pub id_key: IdKey,
}

#[derive(Serialize, Deserialize)]
struct MasterKeyFile {
    identity: String,
    id_key: String,
}

impl MasterKey {
    pub fn generate() -> Self {
        MasterKey {
            identity: age::x25519::Identity::generate(),
            id_key: IdKey::random(),
        }
    }

    /// The master key wrapped with age for one reader, ASCII-armored.
    pub fn wrap(&self, reader: &Reader) -> Result<String, CryptoError> {
        let plain = serde_json::to_vec(&MasterKeyFile {
            identity: self.identity.to_string().expose_secret().to_string(),
            id_key: self.id_key.to_hex(),
        })
        .map_err(|e| CryptoError::Other(e.to_string()))?;
        let enc = |e: age::EncryptError| CryptoError::Other(e.to_string());
        let armored = match reader {
            Reader::Recipient(r) => age::encrypt_and_armor(r, &plain).map_err(enc)?,
            Reader::Passphrase(p) => {
                age::encrypt_and_armor(&age::scrypt::Recipient::new(p.clone()), &plain)
                    .map_err(enc)?
            }
        };
        Ok(armored)
    }

    /// Unwraps an armored master key with one of `identities`.
    pub fn unwrap(
        armored: &str,
        identities: &[Box<dyn age::Identity>],
    ) -> Result<Self, CryptoError> {
        let reader = age::armor::ArmoredReader::new(armored.as_bytes());
        let decryptor =
            age::Decryptor::new(reader).map_err(|e| CryptoError::Unwrap(e.to_string()))?;
        let mut out = decryptor
            .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
            .map_err(|e| CryptoError::Unwrap(e.to_string()))?;
        let mut plain = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut plain)
            .map_err(|e| CryptoError::Unwrap(e.to_string()))?;
        let file: MasterKeyFile =
            serde_json::from_slice(&plain).map_err(|e| CryptoError::Other(e.to_string()))?;
        Ok(MasterKey {
            identity: age::x25519::Identity::from_str(&file.identity)
                .map_err(|e| CryptoError::Other(e.to_string()))?,
            id_key: IdKey::from_hex(&file.id_key).map_err(CryptoError::Other)?,
        })
    }
}

/// Someone who can read the repository: an age X25519 recipient or a passphrase.
pub enum Reader {
    Recipient(age::x25519::Recipient),
    Passphrase(SecretString),
}

/// A random key for one object.
pub struct ObjectKey(Key);

impl ObjectKey {
    fn random() -> Self {
        ObjectKey(Key::from(random32()))
    }

    fn seal(&self, nonce: [u8; 12], aad: &[u8], plain: &[u8]) -> Vec<u8> {
        // Encryption with a valid key and in-memory buffers cannot fail.
        ChaCha20Poly1305::new(&self.0)
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            .unwrap_or_default()
    }

    fn open(&self, nonce: [u8; 12], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        ChaCha20Poly1305::new(&self.0)
            .decrypt(Nonce::from_slice(&nonce), Payload { msg: sealed, aad })
            .map_err(|_| CryptoError::Authentication)
    }

    /// Seals a blob stored at `offset` of a pack.
    pub fn seal_blob(&self, offset: u64, id: &BlobId, plain: &[u8]) -> Vec<u8> {
        self.seal(offset_nonce(offset), &id.0, plain)
    }

    pub fn open_blob(
        &self,
        offset: u64,
        id: &BlobId,
        sealed: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        self.open(offset_nonce(offset), &id.0, sealed)
    }

    /// Seals the single body of an object of `kind`.
    pub fn seal_body(&self, kind: u8, plain: &[u8]) -> Vec<u8> {
        self.seal(BODY_NONCE, &body_aad(kind), plain)
    }

    pub fn open_body(&self, kind: u8, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open(BODY_NONCE, &body_aad(kind), sealed)
    }
}

fn offset_nonce(offset: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&offset.to_le_bytes());
    n
}

fn body_aad(kind: u8) -> [u8; 9] {
    let mut a = [0u8; 9];
    a[..8].copy_from_slice(MAGIC);
    a[8] = kind;
    a
}

/// What this host can do with a repository: always write (it knows the repository
/// recipient), and read only when it unwrapped the master key.
pub struct Keyring {
    pub recipient: age::x25519::Recipient,
    pub master: Option<MasterKey>,
}

impl Keyring {
    /// A fresh object key and its wrapped form for the object header.
    pub fn new_object_key(&self) -> Result<(ObjectKey, Vec<u8>), CryptoError> {
        let key = ObjectKey::random();
        let wrapped = age::encrypt(&self.recipient, key.0.as_slice())
            .map_err(|e| CryptoError::Other(e.to_string()))?;
        Ok((key, wrapped))
    }

    /// Unwraps an object key; needs the master key.
    pub fn unwrap_object_key(&self, wrapped: &[u8]) -> Result<ObjectKey, CryptoError> {
        let master = self
            .master
            .as_ref()
            .ok_or_else(|| CryptoError::Unwrap("this host holds no repository key".into()))?;
        let raw = age::decrypt(&master.identity, wrapped)
            .map_err(|e| CryptoError::Unwrap(e.to_string()))?;
        let raw: [u8; 32] = raw
            .try_into()
            .map_err(|_| CryptoError::Unwrap("object key has the wrong length".into()))?;
        Ok(ObjectKey(Key::from(raw)))
    }

    /// An object of `kind` holding `plain`: header, then the sealed body.
    pub fn seal_object(&self, kind: u8, plain: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (key, wrapped) = self.new_object_key()?;
        let mut out = header(kind, &wrapped)?;
        out.extend_from_slice(&key.seal_body(kind, plain));
        Ok(out)
    }

    /// The body of an object of `kind`.
    pub fn open_object(&self, kind: u8, bytes: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let (k, wrapped, body) = split_header(bytes)?;
        if k != kind {
            return Err(CryptoError::Header);
        }
        self.unwrap_object_key(wrapped)?
            .open_body(kind, &bytes[body..])
    }
}

/// `MAGIC | kind | u16 length of wrapped key | wrapped key`.
pub fn header(kind: u8, wrapped: &[u8]) -> Result<Vec<u8>, CryptoError> {
    let len = u16::try_from(wrapped.len())
        .map_err(|_| CryptoError::Other("wrapped key too long".into()))?;
    let mut out = Vec::with_capacity(11 + wrapped.len());
    out.extend_from_slice(MAGIC);
    out.push(kind);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(wrapped);
    Ok(out)
}

/// Parses a header: (kind, wrapped key, offset where the body starts).
pub fn split_header(bytes: &[u8]) -> Result<(u8, &[u8], usize), CryptoError> {
    if bytes.len() < 11 || &bytes[..8] != MAGIC {
        return Err(CryptoError::Header);
    }
    let len = u16::from_be_bytes([bytes[9], bytes[10]]) as usize;
    let end = 11 + len;
    if bytes.len() < end {
        return Err(CryptoError::Header);
    }
    Ok((bytes[8], &bytes[11..end], end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyring() -> Keyring {
        let master = MasterKey::generate();
        Keyring {
            recipient: master.identity.to_public(),
            master: Some(master),
        }
    }

    #[test]
    fn object_round_trip_and_tamper_detection() {
        let k = keyring();
        let sealed = k.seal_object(b'S', b"hello").unwrap();
        assert_eq!(k.open_object(b'S', &sealed).unwrap(), b"hello");
        assert!(
            k.open_object(b'I', &sealed).is_err(),
            "kind is authenticated"
        );
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(matches!(
            k.open_object(b'S', &bad),
            Err(CryptoError::Authentication)
        ));
        let other = keyring();
        assert!(matches!(
            other.open_object(b'S', &sealed),
            Err(CryptoError::Unwrap(_))
        ));
    }

    #[test]
    fn write_only_keyring_cannot_read() {
        let k = keyring();
        let w = Keyring {
            recipient: k.recipient.clone(),
            master: None,
        };
        let sealed = w.seal_object(b'S', b"secret").unwrap();
        assert!(w.open_object(b'S', &sealed).is_err());
        assert_eq!(k.open_object(b'S', &sealed).unwrap(), b"secret");
    }

    #[test]
    fn master_key_wraps_for_each_reader() {
        let m = MasterKey::generate();
        let reader = age::x25519::Identity::generate();
        let armored = m.wrap(&Reader::Recipient(reader.to_public())).unwrap();
        let ids: Vec<Box<dyn age::Identity>> = vec![Box::new(reader)];
        let back = MasterKey::unwrap(&armored, &ids).unwrap();
        assert_eq!(back.id_key.id(b"x"), m.id_key.id(b"x"));
        let wrong: Vec<Box<dyn age::Identity>> = vec![Box::new(age::x25519::Identity::generate())];
        assert!(MasterKey::unwrap(&armored, &wrong).is_err());
    }
}
