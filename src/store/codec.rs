//! Chunk codec: content hash (BLAKE3) and compression (zstd).
//!
//! A chunk is named by the hash of its *plain* bytes, so identical blocks share one
//! chunk whatever their compression. Decoding always re-hashes the plain bytes and
//! refuses a mismatch: damaged storage yields an error, never wrong data.

use std::borrow::Cow;
use std::fmt;

/// BLAKE3 hash of a block's plain contents.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(plain: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(plain).as_bytes())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for byte in &self.0[..8] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkHash({self})")
    }
}

/// How a chunk's payload is stored on disk. The numbers are part of the format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Raw = 0,
    Zstd = 1,
}

impl Codec {
    pub fn from_u8(value: u8) -> Option<Codec> {
        match value {
            0 => Some(Codec::Raw),
            1 => Some(Codec::Zstd),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("chunk {expected} is damaged: its contents hash to {actual}")]
    HashMismatch {
        expected: ChunkHash,
        actual: ChunkHash,
    },
    #[error("chunk {hash} is damaged: {reason}")]
    Undecodable { hash: ChunkHash, reason: String },
}

/// A reusable zstd context: creating one per chunk costs more than compressing
/// incompressible data.
pub struct Compressor(zstd::bulk::Compressor<'static>);

impl Compressor {
    pub fn new(level: i32) -> std::io::Result<Compressor> {
        Ok(Compressor(zstd::bulk::Compressor::new(level)?))
    }

    /// The compressed form of `plain`, unless that saves less than one 4 KiB page:
    /// then `None`, and the raw bytes are stored, so reads of incompressible data
    /// skip decompression entirely.
    pub fn compress(&mut self, plain: &[u8]) -> Option<Vec<u8>> {
        const MIN_SAVING: usize = 4096;
        self.0
            .compress(plain)
            .ok()
            .filter(|compressed| compressed.len() + MIN_SAVING <= plain.len())
    }
}

/// Turns a stored payload back into plain bytes, verifying them against `hash`. Raw
/// payloads are checked in place and returned borrowed.
pub fn decode(
    payload: &[u8],
    codec: Codec,
    plain_len: usize,
    hash: ChunkHash,
) -> Result<Cow<'_, [u8]>, CodecError> {
    let plain = match codec {
        Codec::Raw => Cow::Borrowed(payload),
        Codec::Zstd => Cow::Owned(zstd::bulk::decompress(payload, plain_len).map_err(|e| {
            CodecError::Undecodable {
                hash,
                reason: e.to_string(),
            }
        })?),
    };
    if plain.len() != plain_len {
        return Err(CodecError::Undecodable {
            hash,
            reason: format!("{} bytes where {plain_len} were stored", plain.len()),
        });
    }
    let actual = ChunkHash::of(&plain);
    if actual != hash {
        return Err(CodecError::HashMismatch {
            expected: hash,
            actual,
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn compressible_data_round_trips_compressed() {
        let plain = b"ebsfs ".repeat(10_000);
        let hash = ChunkHash::of(&plain);
        let compressed = Compressor::new(3).unwrap().compress(&plain).unwrap();
        assert!(compressed.len() < plain.len() / 10);
        assert_eq!(
            decode(&compressed, Codec::Zstd, plain.len(), hash)
                .unwrap()
                .as_ref(),
            plain
        );
    }

    #[test]
    fn random_data_is_stored_raw() {
        let plain = pseudo_random(65536, 7);
        assert!(Compressor::new(1).unwrap().compress(&plain).is_none());
    }

    #[test]
    fn damage_is_detected_not_returned() {
        let plain = pseudo_random(65536, 9);
        let hash = ChunkHash::of(&plain);
        let mut payload = plain.clone();
        payload[100] ^= 1;
        assert!(matches!(
            decode(&payload, Codec::Raw, plain.len(), hash),
            Err(CodecError::HashMismatch { .. })
        ));

        let text = b"abc".repeat(30_000);
        let hash = ChunkHash::of(&text);
        let mut compressed = Compressor::new(3).unwrap().compress(&text).unwrap();
        let last = compressed.len() - 1;
        compressed[last / 2] ^= 0xff;
        assert!(decode(&compressed, Codec::Zstd, text.len(), hash).is_err());
    }
}
