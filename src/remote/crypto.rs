//! Client-side encryption of everything ebsfs puts in a bucket (optional).
//!
//! One 32-byte key, from the key file named in `[store] key_file` (raw bytes or 64 hex
//! digits). Two keys are derived from it with BLAKE3's key derivation:
//! - a *content* key for XChaCha20-Poly1305: every object (and every chunk inside a
//!   pack, so that one chunk can be fetched and opened alone) is sealed as
//!   `nonce (24 random bytes) ‖ ciphertext ‖ tag (16 bytes)`;
//! - a *name* key for BLAKE3's keyed hash: object names are the keyed hash of what
//!   they would be called in the clear (a host, a snapshot id, a page's contents),
//!   so names reveal nothing, and identical pages still share one object.
//!
//! A wrong key cannot open the store's format object (see `super::format`), which
//! says so plainly, before anything else is read.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::namespace::records::decode_hex;

/// Bytes added to every sealed object or chunk: nonce and tag.
pub const OVERHEAD: usize = NONCE_BYTES + TAG_BYTES;
const NONCE_BYTES: usize = 24;
const TAG_BYTES: usize = 16;

pub struct Crypto {
    cipher: XChaCha20Poly1305,
    name_key: [u8; 32],
}

impl std::fmt::Debug for Crypto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Crypto(..)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("key file {path} must hold 32 bytes (raw) or 64 hex digits, not {len} bytes")]
    Size { path: String, len: usize },
}

fn random_bytes(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: getrandom writes at most `len` bytes into the buffer it is given.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            panic!("getrandom failed: {}", std::io::Error::last_os_error());
        }
    }
}

impl Crypto {
    pub fn new(key: [u8; 32]) -> Crypto {
        let content = blake3::derive_key("ebsfs 1 object contents", &key);
        let name_key = blake3::derive_key("ebsfs 1 object names", &key);
        Crypto {
            cipher: XChaCha20Poly1305::new(&content.into()),
            name_key,
        }
    }

    /// Reads a key file: 32 raw bytes, or 64 hex digits (surrounding space ignored).
    pub fn from_key_file(path: &Path) -> Result<Crypto, KeyError> {
        let shown = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
            path: shown.clone(),
            source,
        })?;
        let key = if bytes.len() == 32 {
            bytes
        } else {
            let text = String::from_utf8_lossy(&bytes);
            decode_hex(text.trim())
                .filter(|k| k.len() == 32)
                .ok_or(KeyError::Size {
                    path: shown,
                    len: bytes.len(),
                })?
        };
        let mut fixed = [0u8; 32];
        fixed.copy_from_slice(&key);
        Ok(Crypto::new(fixed))
    }

    /// Encrypts `plain` under a fresh random nonce.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        random_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(XNonce::from_slice(&nonce), plain)
            .unwrap_or_else(|_| panic!("XChaCha20-Poly1305 cannot fail to encrypt"));
        let mut out = Vec::with_capacity(NONCE_BYTES + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts what [`Crypto::seal`] made; `None` if it was not made with this key or
    /// was changed since.
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < OVERHEAD {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        self.cipher.decrypt(XNonce::from_slice(nonce), body).ok()
    }

    /// The keyed hash of `what`, in hex: an object name that reveals nothing.
    pub fn name(&self, what: &[u8]) -> String {
        blake3::keyed_hash(&self.name_key, what)
            .to_hex()
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_bytes_open_with_the_key_only() {
        let a = Crypto::new([1; 32]);
        let b = Crypto::new([2; 32]);
        let sealed = a.seal(b"snapshot data");
        assert_eq!(sealed.len(), 13 + OVERHEAD);
        assert_eq!(a.open(&sealed).unwrap(), b"snapshot data");
        assert!(b.open(&sealed).is_none(), "wrong key");
        let mut flipped = sealed.clone();
        flipped[30] ^= 1;
        assert!(a.open(&flipped).is_none(), "damaged");
        assert_ne!(a.seal(b"x"), a.seal(b"x"), "fresh nonce each time");
        assert_eq!(a.name(b"page"), a.name(b"page"));
        assert_ne!(a.name(b"page"), b.name(b"page"));
    }

    #[test]
    fn key_files_are_raw_or_hex() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [7u8; 32]).unwrap();
        let hex = dir.path().join("hex");
        std::fs::write(&hex, format!("{}\n", "07".repeat(32))).unwrap();
        let sealed = Crypto::from_key_file(&raw).unwrap().seal(b"x");
        assert!(Crypto::from_key_file(&hex).unwrap().open(&sealed).is_some());
        std::fs::write(&raw, b"short").unwrap();
        assert!(matches!(
            Crypto::from_key_file(&raw),
            Err(KeyError::Size { len: 5, .. })
        ));
    }
}
