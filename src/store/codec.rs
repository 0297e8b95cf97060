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

/// Blocks of these sizes are probed before zstd runs on them. In larger ones
/// entropy coding could save 4 KiB even at the entropy a sample of uniform bytes
/// shows (about 7.9 bits a byte), so a probe could not refuse them.
const PROBE_SIZES: std::ops::RangeInclusive<usize> = 32 * 1024..=256 * 1024;
/// The probe counts the bytes of this many slices of [`PROBE_SLICE`] bytes, spread
/// evenly over the block (one at its start, one at each eighth).
const PROBE_SLICES: usize = 8;
const PROBE_SLICE: usize = 512;

impl Compressor {
    pub fn new(level: i32) -> std::io::Result<Compressor> {
        Ok(Compressor(zstd::bulk::Compressor::new(level)?))
    }

    /// The compressed form of `plain`, unless that saves less than one 4 KiB page:
    /// then `None`, and the raw bytes are stored, so reads of incompressible data
    /// skip decompression entirely.
    ///
    /// Random, encrypted or already compressed data would cost a zstd pass only to
    /// be stored raw, so a large block is probed first (see [`looks_incompressible`]).
    pub fn compress(&mut self, plain: &[u8]) -> Option<Vec<u8>> {
        const MIN_SAVING: usize = 4096;
        if PROBE_SIZES.contains(&plain.len()) && looks_incompressible(plain, MIN_SAVING) {
            return None;
        }
        self.0
            .compress(plain)
            .ok()
            .filter(|compressed| compressed.len() + MIN_SAVING <= plain.len())
    }
}

/// Whether a sample of `plain` (4 KiB from all over it) has so much entropy per
/// byte that entropy coding could not save `min_saving` bytes of the block: at
/// `h` bits a byte it saves at most `(8 - h) / 8` of it (7.5 bits for 4 KiB of a
/// 64 KiB block). The measure is the collision entropy `-log2(sum p^2)`, which
/// never exceeds the Shannon entropy, so the probe errs towards compressing. What
/// it cannot see is repetition of high-entropy bytes (a random stretch occurring
/// twice) and a compressible part that no slice touches: such a block is stored
/// raw, which costs space, never correctness.
fn looks_incompressible(plain: &[u8], min_saving: usize) -> bool {
    let stride = plain.len() / PROBE_SLICES;
    // Four tables, so that neighbouring equal bytes do not wait on each other.
    let mut counts = [[0u32; 256]; 4];
    for slice in 0..PROBE_SLICES {
        let at = slice * stride;
        for quad in plain[at..at + PROBE_SLICE].chunks_exact(4) {
            for (table, &byte) in counts.iter_mut().zip(quad) {
                table[byte as usize] += 1;
            }
        }
    }
    let n = (PROBE_SLICES * PROBE_SLICE) as f64;
    let squares: f64 = (0..256)
        .map(|byte| f64::from(counts.iter().map(|table| table[byte]).sum::<u32>()).powi(2))
        .sum();
    let needed_bits = 8.0 * (1.0 - min_saving as f64 / plain.len() as f64);
    (n * n / squares).log2() >= needed_bits
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

    fn round_trips(plain: &[u8], compressed: &[u8]) {
        let hash = ChunkHash::of(plain);
        let decoded = decode(compressed, Codec::Zstd, plain.len(), hash).unwrap();
        assert_eq!(decoded.as_ref(), plain);
    }

    #[test]
    fn a_block_compressible_in_a_part_the_probe_samples_is_compressed() {
        let mut compressor = Compressor::new(1).unwrap();
        // Random, except a quarter of zeros: two of the probe's slices fall in it.
        let mut plain = pseudo_random(65536, 11);
        plain[32768..49152].fill(0);
        let compressed = compressor.compress(&plain).unwrap();
        assert!(compressed.len() <= 65536 - 16384 + 1024);
        round_trips(&plain, &compressed);
    }

    #[test]
    fn a_compressible_stretch_between_the_probes_slices_is_stored_raw() {
        // The trade-off the probe makes, kept in view.
        // 6 KiB of zeros between the first two slices: zstd alone would save them.
        let mut plain = pseudo_random(65536, 13);
        plain[1536..7680].fill(0);
        assert!(zstd::bulk::compress(&plain, 1).unwrap().len() + 4096 <= plain.len());
        assert!(Compressor::new(1).unwrap().compress(&plain).is_none());
    }

    #[test]
    fn random_bytes_of_a_small_alphabet_are_compressed() {
        // No repeats to find, but 6 bits of entropy a byte: entropy coding alone
        // saves about a quarter, and the probe must let zstd do it.
        let plain: Vec<u8> = pseudo_random(65536, 17)
            .iter()
            .map(|b| b'0' + (b & 63))
            .collect();
        let compressed = Compressor::new(1).unwrap().compress(&plain).unwrap();
        assert!(compressed.len() < 65536 * 7 / 8, "{}", compressed.len());
        round_trips(&plain, &compressed);
    }

    #[test]
    fn the_probe_refuses_only_blocks_too_small_to_save_a_page_by_entropy() {
        // Random bytes with a 16 KiB stretch occurring twice: only the repeat
        // compresses, and the probe's sample looks random either way.
        let repeated = |len| {
            let mut plain = pseudo_random(len, 19);
            plain.copy_within(4096..20480, 32768 + 4096);
            plain
        };
        let mut compressor = Compressor::new(1).unwrap();
        // 64 KiB: 7.5 bits a byte is enough to refuse; the repeat is not seen.
        assert!(compressor.compress(&repeated(65536)).is_none());
        // 1 MiB: entropy coding could save 4 KiB even at 7.97 bits, so there is no
        // probe, and zstd finds the repeat.
        let large = repeated(1 << 20);
        let compressed = compressor.compress(&large).unwrap();
        assert!(
            compressed.len() + 16000 < large.len(),
            "{}",
            compressed.len()
        );
        round_trips(&large, &compressed);
    }

    #[test]
    fn small_blocks_are_compressed_without_a_probe() {
        // 16 KiB is below the probe's sizes: random bytes, whose sample a probe
        // would refuse, then the same 8 KiB again, which zstd finds.
        let mut plain = pseudo_random(16384, 23);
        plain.copy_within(..8192, 8192);
        let compressed = Compressor::new(1).unwrap().compress(&plain).unwrap();
        assert!(
            compressed.len() + 4096 <= plain.len(),
            "{}",
            compressed.len()
        );
        round_trips(&plain, &compressed);
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
