//! Send streams: one snapshot's image as a self-verifying byte stream
//! (`ebsfs snapshot send` writes one, `ebsfs snapshot receive` reads one; the format
//! is docs/FORMAT.md section 7).
//!
//! A stream is a header, records and a trailer. The header carries its own hash, so
//! a receiver refuses a damaged header before it changes anything; every record
//! carries a hash over its place in the stream (index, offset, length, kind) and its
//! plain bytes, so a record is handed out only once it is known to be the sender's;
//! the trailer carries the record count and a hash of every byte before it, so a
//! stream cut short, or with a record dropped, is refused at its end. Records come in
//! increasing offset order without overlap and lie within the snapshot's size.
//!
//! A snapshot's [`Identity`] tells a base apart from another snapshot of the same
//! name: a receiver applies an incremental stream only onto the very snapshot the
//! sender diffed against.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::names::SnapshotName;
use crate::namespace::records::{decode_hex, encode_hex};

/// The first bytes of every stream.
pub const STREAM_MAGIC: &[u8; 8] = b"EBSFSSND";
/// The format version this build writes and reads.
pub const STREAM_VERSION: u32 = 1;
/// Most plain bytes one data record carries.
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Longest header accepted (its TOML text).
const MAX_HEADER_BYTES: u32 = 1 << 20;
/// Longest payload accepted for a data record: its plain bytes, or zstd's worst case.
const MAX_STORED_BYTES: u32 = 2 << 20;

const TAG_RECORD: u8 = b'R';
const TAG_TRAILER: u8 = b'E';
const KIND_ZEROS: u8 = 0;
const KIND_DATA: u8 = 1;
const KIND_DATA_ZSTD: u8 = 2;
/// zstd level of data records: fast; a record is stored compressed only if smaller.
const ZSTD_LEVEL: i32 = 1;

/// What names one snapshot across hosts (like a ZFS guid): kept as the
/// `user.ebsfs.origin` attribute of a received snapshot, derived for one taken here.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Identity(pub [u8; 32]);

impl Identity {
    /// The identity of a snapshot taken on `host` (its `host_id`): the facts that
    /// single it out there, hashed. Two data directories with one host id would
    /// need the same snapshot id, name and both times to the millisecond to collide.
    pub fn derive(host: &str, id: u64, name: &str, created: &str, completed: &str) -> Identity {
        let mut hasher = blake3::Hasher::new_derive_key("ebsfs 2026 snapshot identity v1");
        for part in [host, &id.to_string(), name, created, completed] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        Identity(*hasher.finalize().as_bytes())
    }

    /// Parses 64 hex digits.
    pub fn parse(text: &str) -> Option<Identity> {
        let bytes = decode_hex(text.trim()).filter(|_| text.trim().len() == 64)?;
        bytes.try_into().ok().map(Identity)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&encode_hex(&self.0))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

/// The snapshot an incremental stream applies onto.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamBase {
    pub snapshot: SnapshotName,
    pub identity: Identity,
}

/// What a stream says of the snapshot it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub snapshot: SnapshotName,
    pub size_bytes: u64,
    pub block_size: u32,
    pub identity: Identity,
    /// `None` for a full stream.
    pub base: Option<StreamBase>,
    /// The snapshot's `user.*` attributes (its description among them).
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

/// The header as written: TOML, binary values in hex.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeaderText {
    snapshot: String,
    size: u64,
    block_size: u32,
    identity: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<BaseText>,
    #[serde(default)]
    xattrs: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaseText {
    snapshot: String,
    identity: String,
}

impl StreamHeader {
    fn to_text(&self) -> String {
        let text = HeaderText {
            snapshot: self.snapshot.to_string(),
            size: self.size_bytes,
            block_size: self.block_size,
            identity: self.identity.to_string(),
            base: self.base.as_ref().map(|b| BaseText {
                snapshot: b.snapshot.to_string(),
                identity: b.identity.to_string(),
            }),
            xattrs: self
                .xattrs
                .iter()
                .map(|(k, v)| (k.clone(), encode_hex(v)))
                .collect(),
        };
        toml::to_string(&text).expect("a header always renders as TOML")
    }

    fn from_text(text: &str) -> Result<StreamHeader, String> {
        let text: HeaderText = toml::from_str(text).map_err(|e| e.to_string())?;
        let name = |s: &str| SnapshotName::parse(s).map_err(|e| e.to_string());
        let identity =
            |s: &str| Identity::parse(s).ok_or_else(|| format!("identity {s:?} is not 64 hex"));
        let xattrs = text
            .xattrs
            .iter()
            .map(|(k, v)| match decode_hex(v) {
                Some(bytes) if k.starts_with("user.") => Ok((k.clone(), bytes)),
                _ => Err(format!("attribute {k:?} is not user.* with a hex value")),
            })
            .collect::<Result<_, String>>()?;
        Ok(StreamHeader {
            snapshot: name(&text.snapshot)?,
            size_bytes: text.size,
            block_size: text.block_size,
            identity: identity(&text.identity)?,
            base: text
                .base
                .map(|b| -> Result<StreamBase, String> {
                    Ok(StreamBase {
                        snapshot: name(&b.snapshot)?,
                        identity: identity(&b.identity)?,
                    })
                })
                .transpose()?,
            xattrs,
        })
    }
}

/// One verified record: bytes at `offset` of the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its place in the stream, from 0.
    pub index: u64,
    pub offset: u64,
    pub content: Content,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Data(Vec<u8>),
    /// This many bytes of zeros.
    Zeros(u64),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Data(bytes) => bytes.len() as u64,
            Content::Zeros(len) => *len,
        }
    }
}

/// Totals of a stream, as its trailer states them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamTotals {
    pub records: u64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("reading the stream: {0}")]
    Io(#[source] io::Error),
    #[error(
        "not an ebsfs snapshot stream (its first bytes are not {:?})",
        String::from_utf8_lossy(STREAM_MAGIC)
    )]
    BadMagic,
    #[error(
        "stream format version {0} is not supported (this ebsfs reads version {STREAM_VERSION})"
    )]
    Version(u32),
    #[error("stream damaged: {0}")]
    Damaged(String),
    #[error("stream truncated: it ends in {0}")]
    Truncated(String),
}

/// The hash a record carries: of its place and its plain content.
fn record_hash(index: u64, offset: u64, content: &Content) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_derive_key("ebsfs 2026 send stream record v1");
    hasher.update(&index.to_le_bytes());
    hasher.update(&offset.to_le_bytes());
    hasher.update(&content.len().to_le_bytes());
    match content {
        Content::Data(bytes) => {
            hasher.update(&[KIND_DATA]);
            hasher.update(bytes);
        }
        Content::Zeros(_) => {
            hasher.update(&[KIND_ZEROS]);
        }
    }
    *hasher.finalize().as_bytes()
}

/// A writer that hashes everything passing through it.
struct Hashing<W> {
    inner: W,
    hasher: blake3::Hasher,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.hasher.update(bytes);
        self.inner.write_all(bytes)
    }
}

/// Writes a stream: [`StreamWriter::new`] (magic and header), records in increasing
/// offset order, then [`StreamWriter::finish`] (the trailer).
pub struct StreamWriter<W: Write> {
    out: Hashing<W>,
    size_bytes: u64,
    /// Where the next record may start.
    next_offset: u64,
    /// Zeros not written yet, so that neighbouring runs become one record.
    pending_zeros: Option<Range<u64>>,
    totals: StreamTotals,
}

impl<W: Write> StreamWriter<W> {
    pub fn new(out: W, header: &StreamHeader) -> io::Result<StreamWriter<W>> {
        let mut out = Hashing {
            inner: out,
            hasher: blake3::Hasher::new(),
        };
        let text = header.to_text();
        out.put(STREAM_MAGIC)?;
        out.put(&STREAM_VERSION.to_le_bytes())?;
        out.put(&(text.len() as u32).to_le_bytes())?;
        out.put(text.as_bytes())?;
        let header_hash = *out.hasher.clone().finalize().as_bytes();
        out.put(&header_hash)?;
        Ok(StreamWriter {
            out,
            size_bytes: header.size_bytes,
            next_offset: 0,
            pending_zeros: None,
            totals: StreamTotals::default(),
        })
    }

    /// Image bytes at `offset`, in records of at most [`MAX_RECORD_BYTES`].
    pub fn data(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.flush_zeros()?;
        for (i, piece) in bytes.chunks(MAX_RECORD_BYTES).enumerate() {
            let at = offset + (i * MAX_RECORD_BYTES) as u64;
            self.record(at, Content::Data(piece.to_vec()))?;
        }
        Ok(())
    }

    /// `len` bytes of zeros at `offset` (joined with zeros right before them).
    pub fn zeros(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match &mut self.pending_zeros {
            Some(run) if run.end == offset => run.end += len,
            _ => {
                self.flush_zeros()?;
                self.pending_zeros = Some(offset..offset + len);
            }
        }
        Ok(())
    }

    fn flush_zeros(&mut self) -> io::Result<()> {
        match self.pending_zeros.take() {
            Some(run) if !run.is_empty() => {
                self.record(run.start, Content::Zeros(run.end - run.start))
            }
            _ => Ok(()),
        }
    }

    fn record(&mut self, offset: u64, content: Content) -> io::Result<()> {
        let len = content.len();
        if offset < self.next_offset || offset.saturating_add(len) > self.size_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "record at {offset} (+{len}) is out of order or past the size {}",
                    self.size_bytes
                ),
            ));
        }
        let hash = record_hash(self.totals.records, offset, &content);
        let (kind, payload) = match &content {
            Content::Zeros(_) => (KIND_ZEROS, Vec::new()),
            Content::Data(bytes) => match zstd::bulk::compress(bytes, ZSTD_LEVEL) {
                Ok(packed) if packed.len() < bytes.len() => (KIND_DATA_ZSTD, packed),
                _ => (KIND_DATA, bytes.clone()),
            },
        };
        self.out.put(&[TAG_RECORD])?;
        self.out.put(&offset.to_le_bytes())?;
        self.out.put(&len.to_le_bytes())?;
        self.out.put(&[kind])?;
        self.out.put(&(payload.len() as u32).to_le_bytes())?;
        self.out.put(&hash)?;
        self.out.put(&payload)?;
        self.next_offset = offset + len;
        self.totals.records += 1;
        match content {
            Content::Data(_) => self.totals.data_bytes += len,
            Content::Zeros(_) => self.totals.zero_bytes += len,
        }
        Ok(())
    }

    /// Writes the trailer; returns the output and what the stream holds.
    pub fn finish(mut self) -> io::Result<(W, StreamTotals)> {
        self.flush_zeros()?;
        let t = self.totals;
        self.out.put(&[TAG_TRAILER])?;
        self.out.put(&t.records.to_le_bytes())?;
        self.out.put(&t.data_bytes.to_le_bytes())?;
        self.out.put(&t.zero_bytes.to_le_bytes())?;
        let stream_hash = *self.out.hasher.clone().finalize().as_bytes();
        self.out.put(&stream_hash)?;
        self.out.inner.flush()?;
        Ok((self.out.inner, t))
    }
}

/// Writes `ranges` of an image `size_bytes` long into `writer`, reading it with
/// `read_at(offset, buf)`: pieces of [`MAX_RECORD_BYTES`] that are all zeros become
/// zeros records, or nothing with `skip_zeros` (a full stream, received onto zeros).
pub fn write_ranges<W: Write>(
    writer: &mut StreamWriter<W>,
    ranges: &[Range<u64>],
    skip_zeros: bool,
    mut read_at: impl FnMut(u64, &mut [u8]) -> io::Result<()>,
) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_RECORD_BYTES];
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let len = (range.end - at).min(MAX_RECORD_BYTES as u64) as usize;
            let piece = &mut buf[..len];
            read_at(at, piece)?;
            if piece.iter().all(|&b| b == 0) {
                if !skip_zeros {
                    writer.zeros(at, len as u64)?;
                }
            } else {
                writer.data(at, piece)?;
            }
            at += len as u64;
        }
    }
    Ok(())
}

/// A reader that hashes everything read through it.
struct HashingReader<R> {
    inner: R,
    hasher: blake3::Hasher,
}

impl<R: Read> HashingReader<R> {
    /// Fills `buf`; the end of the stream here is truncation "in `what`".
    fn take(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<(), StreamError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => StreamError::Truncated(what()),
            _ => StreamError::Io(e),
        })?;
        self.hasher.update(buf);
        Ok(())
    }

    fn take_u64(&mut self, what: &dyn Fn() -> String) -> Result<u64, StreamError> {
        let mut b = [0u8; 8];
        self.take(&mut b, what)?;
        Ok(u64::from_le_bytes(b))
    }

    fn take_u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, StreamError> {
        let mut b = [0u8; 4];
        self.take(&mut b, what)?;
        Ok(u32::from_le_bytes(b))
    }
}

/// Reads a stream, handing out only verified records; `Ok(None)` from
/// [`StreamReader::next_record`] means the trailer verified and nothing follows it.
pub struct StreamReader<R: Read> {
    input: HashingReader<R>,
    size_bytes: u64,
    next_offset: u64,
    totals: StreamTotals,
    ended: bool,
}

impl<R: Read> StreamReader<R> {
    /// Reads and verifies the magic, version and header.
    pub fn open(input: R) -> Result<(StreamReader<R>, StreamHeader), StreamError> {
        let mut input = HashingReader {
            inner: input,
            hasher: blake3::Hasher::new(),
        };
        let mut magic = [0u8; 8];
        input
            .take(&mut magic, &|| "its magic".into())
            .map_err(|e| match e {
                StreamError::Truncated(_) => StreamError::BadMagic,
                e => e,
            })?;
        if &magic != STREAM_MAGIC {
            return Err(StreamError::BadMagic);
        }
        let header_what = || "the header".to_string();
        let version = input.take_u32(&header_what)?;
        if version != STREAM_VERSION {
            return Err(StreamError::Version(version));
        }
        let len = input.take_u32(&header_what)?;
        if len > MAX_HEADER_BYTES {
            return Err(StreamError::Damaged(format!(
                "the header claims {len} bytes, over the limit of {MAX_HEADER_BYTES}"
            )));
        }
        let mut text = vec![0u8; len as usize];
        input.take(&mut text, &header_what)?;
        let expected = *input.hasher.clone().finalize().as_bytes();
        let mut hash = [0u8; 32];
        input.take(&mut hash, &header_what)?;
        if hash != expected {
            return Err(StreamError::Damaged("the header fails its hash".into()));
        }
        let header = std::str::from_utf8(&text)
            .map_err(|e| e.to_string())
            .and_then(StreamHeader::from_text)
            .map_err(|e| StreamError::Damaged(format!("the header is not valid: {e}")))?;
        let reader = StreamReader {
            input,
            size_bytes: header.size_bytes,
            next_offset: 0,
            totals: StreamTotals::default(),
            ended: false,
        };
        Ok((reader, header))
    }

    /// The next verified record; `None` once the trailer verified.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        if self.ended {
            return Ok(None);
        }
        let index = self.totals.records;
        let mut tag = [0u8; 1];
        self.input.take(&mut tag, &|| format!("record {index}"))?;
        match tag[0] {
            TAG_RECORD => self.record(index).map(Some),
            TAG_TRAILER => {
                self.trailer()?;
                Ok(None)
            }
            other => Err(StreamError::Damaged(format!(
                "record {index} starts with {other:#04x}, neither a record nor the trailer"
            ))),
        }
    }

    fn record(&mut self, index: u64) -> Result<Record, StreamError> {
        let what = || format!("record {index}");
        let offset = self.input.take_u64(&what)?;
        let len = self.input.take_u64(&what)?;
        let mut kind = [0u8; 1];
        self.input.take(&mut kind, &what)?;
        let stored = self.input.take_u32(&what)?;
        let mut hash = [0u8; 32];
        self.input.take(&mut hash, &what)?;
        let damaged =
            |why: String| StreamError::Damaged(format!("record {index} at offset {offset}: {why}"));
        let end = offset.checked_add(len).filter(|&e| e <= self.size_bytes);
        if offset < self.next_offset || end.is_none() || len == 0 {
            return Err(damaged(format!(
                "length {len} is out of order, empty or past the size {}",
                self.size_bytes
            )));
        }
        let shape_ok = match kind[0] {
            KIND_ZEROS => stored == 0,
            KIND_DATA => u64::from(stored) == len && len <= MAX_RECORD_BYTES as u64,
            KIND_DATA_ZSTD => stored <= MAX_STORED_BYTES && len <= MAX_RECORD_BYTES as u64,
            _ => false,
        };
        if !shape_ok {
            return Err(damaged(format!(
                "kind {} with {stored} stored bytes for {len} is not a valid record",
                kind[0]
            )));
        }
        let mut payload = vec![0u8; stored as usize];
        self.input.take(&mut payload, &what)?;
        let content = match kind[0] {
            KIND_ZEROS => Content::Zeros(len),
            KIND_DATA => Content::Data(payload),
            _ => match zstd::bulk::decompress(&payload, len as usize) {
                Ok(plain) if plain.len() as u64 == len => Content::Data(plain),
                _ => return Err(damaged("its compressed bytes do not decompress".into())),
            },
        };
        if record_hash(index, offset, &content) != hash {
            return Err(damaged("fails its hash".into()));
        }
        self.next_offset = offset + len;
        self.totals.records += 1;
        match content {
            Content::Data(_) => self.totals.data_bytes += len,
            Content::Zeros(_) => self.totals.zero_bytes += len,
        }
        Ok(Record {
            index,
            offset,
            content,
        })
    }

    fn trailer(&mut self) -> Result<(), StreamError> {
        let what = || "the trailer".to_string();
        let stated = StreamTotals {
            records: self.input.take_u64(&what)?,
            data_bytes: self.input.take_u64(&what)?,
            zero_bytes: self.input.take_u64(&what)?,
        };
        let expected = *self.input.hasher.clone().finalize().as_bytes();
        let mut hash = [0u8; 32];
        self.input.take(&mut hash, &what)?;
        if hash != expected {
            return Err(StreamError::Damaged(
                "the trailer's hash of the whole stream does not match".into(),
            ));
        }
        if stated != self.totals {
            return Err(StreamError::Damaged(format!(
                "the trailer states {stated:?}, the stream held {:?}",
                self.totals
            )));
        }
        let mut extra = [0u8; 1];
        match self.input.inner.read(&mut extra) {
            Ok(0) => {}
            Ok(_) => {
                return Err(StreamError::Damaged("bytes follow the trailer".to_string()));
            }
            Err(e) => return Err(StreamError::Io(e)),
        }
        self.ended = true;
        Ok(())
    }

    /// What the records read so far held.
    pub fn totals(&self) -> StreamTotals {
        self.totals
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header(base: bool) -> StreamHeader {
        let mut xattrs = BTreeMap::new();
        xattrs.insert("user.description".to_string(), b"nightly".to_vec());
        xattrs.insert("user.tag".to_string(), vec![0, 255, 7]);
        StreamHeader {
            snapshot: SnapshotName::parse("db@b").unwrap(),
            size_bytes: 8 << 20,
            block_size: 65536,
            identity: Identity::derive("hosta", 7, "db@b", "t1", "t2"),
            base: base.then(|| StreamBase {
                snapshot: SnapshotName::parse("db@a").unwrap(),
                identity: Identity::derive("hosta", 3, "db@a", "t0", "t0"),
            }),
            xattrs,
        }
    }

    /// An image with data, a zero run and incompressible bytes.
    fn image() -> Vec<u8> {
        let mut image = vec![0u8; 8 << 20];
        for (i, b) in image[..3 << 20].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let mut x: u64 = 1;
        for b in image[5 << 20..(6 << 20) + 100].iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        image
    }

    fn encode(header: &StreamHeader, ranges: &[Range<u64>], image: &[u8]) -> Vec<u8> {
        let mut writer = StreamWriter::new(Vec::new(), header).unwrap();
        write_ranges(&mut writer, ranges, header.base.is_none(), |at, buf| {
            buf.copy_from_slice(&image[at as usize..at as usize + buf.len()]);
            Ok(())
        })
        .unwrap();
        writer.finish().unwrap().0
    }

    /// Applies a stream onto `image`: the header, or the first error.
    fn apply(stream: &[u8], image: &mut [u8]) -> Result<StreamHeader, StreamError> {
        let (mut reader, header) = StreamReader::open(stream)?;
        while let Some(record) = reader.next_record()? {
            let at = record.offset as usize;
            match record.content {
                Content::Data(bytes) => image[at..at + bytes.len()].copy_from_slice(&bytes),
                Content::Zeros(len) => image[at..at + len as usize].fill(0),
            }
        }
        Ok(header)
    }

    #[test]
    fn full_stream_round_trips_and_skips_zeros() {
        let image = image();
        let stream = encode(
            &header(false),
            std::slice::from_ref(&(0..image.len() as u64)),
            &image,
        );
        // Zeros cost nothing; the repeating pattern compresses.
        assert!(stream.len() < (2 << 20), "{} bytes", stream.len());
        let mut received = vec![0u8; image.len()];
        assert_eq!(apply(&stream, &mut received).unwrap(), header(false));
        assert!(received == image);
    }

    #[test]
    fn incremental_stream_writes_zeros_records() {
        let before = image();
        let mut after = before.clone();
        after[100..200].fill(9);
        after[(1 << 20)..(3 << 20)].fill(0);
        let changed = [0..4096, (1 << 20)..(3 << 20)];
        let stream = encode(&header(true), &changed, &after);
        let mut received = before.clone();
        let (mut reader, _) = StreamReader::open(&stream[..]).unwrap();
        let mut kinds = Vec::new();
        while let Some(r) = reader.next_record().unwrap() {
            kinds.push(matches!(r.content, Content::Zeros(_)));
        }
        // One data record, then the two zero pieces joined into one record.
        assert_eq!(kinds, [false, true]);
        assert_eq!(reader.totals().zero_bytes, 2 << 20);
        apply(&stream, &mut received).unwrap();
        assert!(received == after);
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        let image = image();
        let ranges = [0..(1 << 20) + 10, (5 << 20)..(5 << 20) + 3000];
        let stream = encode(&header(true), &ranges, &image);
        // Every byte of a small stream: header, record headers, payloads, trailer.
        for at in 0..stream.len() {
            for bit in [0x01u8, 0x80] {
                let mut bad = stream.clone();
                bad[at] ^= bit;
                let mut scratch = vec![0u8; image.len()];
                assert!(
                    apply(&bad, &mut scratch).is_err(),
                    "flipping bit {bit:#x} of byte {at} of {} went unnoticed",
                    stream.len()
                );
            }
        }
    }

    #[test]
    fn truncation_anywhere_is_refused() {
        let image = image();
        let stream = encode(
            &header(false),
            std::slice::from_ref(&(0..(3 << 20))),
            &image,
        );
        let mut scratch = vec![0u8; image.len()];
        for len in (0..stream.len()).step_by(997).chain([stream.len() - 1]) {
            let err = apply(&stream[..len], &mut scratch).unwrap_err();
            assert!(
                matches!(err, StreamError::Truncated(_) | StreamError::BadMagic),
                "cut at {len}: {err}"
            );
        }
        let mut longer = stream.clone();
        longer.push(0);
        assert!(matches!(
            apply(&longer, &mut scratch),
            Err(StreamError::Damaged(_))
        ));
    }

    #[test]
    fn damage_is_named() {
        let image = image();
        let stream = encode(
            &header(false),
            std::slice::from_ref(&(0..(2 << 20))),
            &image,
        );
        let mut bad = stream.clone();
        bad[0] = b'X';
        assert!(matches!(apply(&bad, &mut []), Err(StreamError::BadMagic)));
        // The last byte of the first record's payload.
        let header_len = u32::from_le_bytes(stream[12..16].try_into().unwrap()) as usize;
        let first = 16 + header_len + 32;
        let stored = u32::from_le_bytes(stream[first + 18..first + 22].try_into().unwrap());
        let mut bad = stream.clone();
        bad[first + 54 + stored as usize - 1] ^= 1;
        let err = apply(&bad, &mut vec![0u8; image.len()]).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("stream damaged: record 0 at offset 0"),
            "{err}"
        );
    }

    #[test]
    fn identities_parse_back_and_differ() {
        let a = Identity::derive("h", 1, "db@a", "t", "u");
        assert_eq!(Identity::parse(&a.to_string()), Some(a));
        assert_ne!(a, Identity::derive("h", 1, "db@a", "t", "v"));
        assert_ne!(a, Identity::derive("h", 2, "db@a", "t", "u"));
        assert_eq!(Identity::parse("abc"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any set of writes round-trips, and any single flipped byte is refused.
        #[test]
        fn random_images_round_trip_and_flips_are_refused(
            writes in proptest::collection::vec((0u64..(3 << 20), 1usize..300_000, any::<u8>()), 1..6),
            flip in any::<proptest::sample::Index>(),
            incremental in any::<bool>(),
        ) {
            let size = 4u64 << 20;
            let before = vec![0u8; size as usize];
            let mut after = before.clone();
            let mut ranges = Vec::new();
            for (offset, len, byte) in writes {
                let end = (offset + len as u64).min(size);
                after[offset as usize..end as usize].fill(byte);
                crate::snapshot::diff::push_merged(&mut ranges, offset..end);
            }
            let mut head = header(incremental);
            head.size_bytes = size;
            let stream = encode(&head, &ranges, &after);
            let mut received = before.clone();
            prop_assert_eq!(apply(&stream, &mut received).unwrap(), head);
            prop_assert!(received == after);
            let mut bad = stream.clone();
            let at = flip.index(bad.len());
            bad[at] ^= 0x10;
            let mut scratch = before.clone();
            prop_assert!(apply(&bad, &mut scratch).is_err(), "byte {} flipped", at);
        }
    }
}
