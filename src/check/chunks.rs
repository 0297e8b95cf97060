//! Packs and chunks: each pack file against its committed length, each chunk read
//! from its pack and its hash checked, and pack space that no chunk row covers.
//!
//! A chunk's extent is its payload widened to the page the next payload starts on
//! (see [`index::live_extents`]): exactly what freeing it punches, so space between
//! the header and the committed length is either some chunk's extent or garbage.

use std::collections::{BTreeMap, BTreeSet};

use crate::config::ByteSize;
use crate::namespace::tables::CHUNKS;
use crate::namespace::{Namespace, NamespaceError};
use crate::storage::Storage;
use crate::store::codec::{self, ChunkHash, CodecError};
use crate::store::index::{self, ChunkLocation};
use crate::store::pack::{self, HEADER_BYTES, PackFile};

use super::references::References;
use super::{CheckError, Checker, Outcome, Problem, Severity, counted, io_error};

/// What a pack the database records looks like on disk.
pub(super) enum PackState {
    Readable {
        file_len: u64,
    },
    /// Shorter than its committed length: what lay past `file_len` is lost.
    Truncated {
        file_len: u64,
    },
    /// Unreadable as a whole: the file is missing or its header is wrong.
    Damaged(String),
    /// Committed empty and never (fully) created: the next mount creates it again.
    Unused,
}

pub(super) struct PackInfo {
    pub committed: u64,
    pub state: PackState,
}

/// Why a chunk cannot be read.
pub(super) enum Damage {
    /// Its pack is damaged or cut short (reported once, for the pack).
    InPack(u32),
    Own(String),
}

pub(super) struct ChunkScan {
    pub damaged: BTreeMap<ChunkHash, (Option<ChunkLocation>, Damage)>,
    /// Packs whose chunk rows reach past the committed length: how far.
    pub past_committed: BTreeMap<u32, u64>,
}

impl<S: Storage> Checker<'_, S> {
    /// Looks at every pack the database records.
    pub(super) fn inspect_packs(
        &mut self,
        ns: &Namespace,
    ) -> Result<BTreeMap<u32, PackInfo>, CheckError> {
        let mut packs = BTreeMap::new();
        for (id, committed) in ns.packs()? {
            let path = self.layout.pack(id);
            let file_len = self
                .storage
                .file_len(&path)
                .map_err(io_error(format!("reading {}", path.display())))?;
            let state = match file_len {
                None if committed == 0 => PackState::Unused,
                None => PackState::Damaged("the pack file is missing".into()),
                Some(len) => {
                    let pack = PackFile::<S>::open(self.storage, path.clone(), id)
                        .map_err(io_error(format!("opening {}", path.display())))?;
                    let header = pack
                        .verify_header()
                        .map_err(io_error(format!("reading {}", path.display())))?;
                    match header {
                        Err(_) if committed == 0 => PackState::Unused,
                        Err(reason) => PackState::Damaged(format!("its header is wrong: {reason}")),
                        Ok(()) if len < committed => PackState::Truncated { file_len: len },
                        Ok(()) => PackState::Readable { file_len: len },
                    }
                }
            };
            packs.insert(id, PackInfo { committed, state });
        }
        self.report.totals.packs = packs.len();
        Ok(packs)
    }

    /// Reads every chunk the index records, in pack order, and checks its hash.
    pub(super) fn verify_chunks(
        &mut self,
        ns: &Namespace,
        packs: &BTreeMap<u32, PackInfo>,
    ) -> Result<ChunkScan, CheckError> {
        let mut rows = Vec::new();
        {
            let txn = ns.read()?;
            let table = txn.open_table(CHUNKS).map_err(NamespaceError::from)?;
            for row in table.range::<&[u8; 32]>(..).map_err(NamespaceError::from)? {
                let (hash, row) = row.map_err(NamespaceError::from)?;
                let hash = ChunkHash(*hash.value());
                rows.push((row.value().0, row.value().1, hash, row.value()));
            }
        }
        rows.sort_unstable_by_key(|&(pack, offset, ..)| (pack, offset));
        let mut scan = ChunkScan {
            damaged: BTreeMap::new(),
            past_committed: BTreeMap::new(),
        };
        let mut open: Option<PackFile<S>> = None;
        let mut payload = Vec::new();
        for (_, _, hash, row) in rows {
            let loc = match index::decode_row(&hash, row) {
                Ok((loc, _)) => loc,
                Err(e) => {
                    scan.damaged
                        .insert(hash, (None, Damage::Own(e.to_string())));
                    continue;
                }
            };
            let end = loc.offset + u64::from(loc.stored_len);
            let damage = match packs.get(&loc.pack).map(|p| (p.committed, &p.state)) {
                None => Some(Damage::Own(format!(
                    "pack {} is not recorded in the database",
                    loc.pack
                ))),
                Some((_, PackState::Unused)) => {
                    Some(Damage::Own(format!("pack {} was never written", loc.pack)))
                }
                Some((_, PackState::Damaged(_))) => Some(Damage::InPack(loc.pack)),
                Some((_, PackState::Truncated { file_len })) if end > *file_len => {
                    Some(Damage::InPack(loc.pack))
                }
                Some((committed, _)) => {
                    if end > committed {
                        let reach = scan.past_committed.entry(loc.pack).or_default();
                        *reach = (*reach).max(pack::align_up(end));
                    }
                    if open.as_ref().is_none_or(|p| p.id != loc.pack) {
                        let path = self.layout.pack(loc.pack);
                        open = Some(
                            PackFile::open(self.storage, path.clone(), loc.pack)
                                .map_err(io_error(format!("opening {}", path.display())))?,
                        );
                    }
                    let pack = open.as_ref().expect("opened above");
                    verify_chunk(pack, hash, loc, &mut payload)
                        .err()
                        .map(Damage::Own)
                }
            };
            match damage {
                Some(damage) => {
                    scan.damaged.insert(hash, (Some(loc), damage));
                }
                None => {
                    let totals = &mut self.report.totals;
                    totals.chunks += 1;
                    totals.stored_bytes += u64::from(loc.stored_len);
                    totals.plain_bytes += u64::from(loc.plain_len);
                }
            }
        }
        Ok(scan)
    }

    /// Reports damaged packs and chunks with the snapshots that read them, and chunk
    /// rows past their pack's committed length (which a mount would cut off).
    pub(super) fn report_damaged_chunks(
        &mut self,
        ns: &Namespace,
        packs: &mut BTreeMap<u32, PackInfo>,
        scan: &ChunkScan,
        refs: &References,
    ) {
        let readers = |hashes: &mut dyn Iterator<Item = &ChunkHash>| -> Vec<String> {
            let mut names = BTreeSet::new();
            for hash in hashes {
                names.extend(refs.readers.get(hash).into_iter().flatten().cloned());
            }
            names.into_iter().collect()
        };
        for (&id, info) in packs.iter() {
            let lost: Vec<(&ChunkHash, u64)> = scan
                .damaged
                .iter()
                .filter(|(_, (_, d))| matches!(d, Damage::InPack(p) if *p == id))
                .map(|(h, (loc, _))| (h, loc.map_or(0, |l| u64::from(l.stored_len))))
                .collect();
            let what = match &info.state {
                PackState::Damaged(reason) => reason.clone(),
                PackState::Truncated { file_len } => format!(
                    "it is {file_len} bytes but {} were committed",
                    info.committed
                ),
                PackState::Readable { .. } | PackState::Unused => continue,
            };
            let bytes: u64 = lost.iter().map(|(_, b)| b).sum();
            let problem = Problem::new(
                Severity::Corruption,
                format!("pack {id} ({})", self.shown(&self.layout.pack(id))),
                format!(
                    "{what}: {} ({}) in it cannot be read",
                    counted(lost.len() as u64, "chunk"),
                    ByteSize(bytes)
                ),
            )
            .affecting(readers(&mut lost.iter().map(|(h, _)| *h)))
            .with(self.cannot_fix(
                "chunks have no second copy; the snapshot blocks that name them read as errors (EIO)",
            ));
            self.push(problem);
        }
        for (hash, (loc, damage)) in &scan.damaged {
            let Damage::Own(reason) = damage else {
                continue;
            };
            let subject = match loc {
                Some(l) => format!("chunk {hash} (pack {}, offset {})", l.pack, l.offset),
                None => format!("chunk {hash}"),
            };
            let problem = Problem::new(Severity::Corruption, subject, reason.clone())
                .affecting(readers(&mut std::iter::once(hash)))
                .with(self.cannot_fix(
                    "the chunk has no second copy; the snapshot blocks that name it read as errors (EIO)",
                ));
            self.push(problem);
        }
        for (&id, &reach) in &scan.past_committed {
            let Some(info) = packs.get_mut(&id) else {
                continue;
            };
            let detail = format!(
                "chunk rows reach byte {reach}, past its committed length {}: a mount would \
                 cut them off",
                info.committed
            );
            let outcome = self.fix(|| -> Result<String, NamespaceError> {
                ns.change_data(|d| d.set_pack_len(id, reach))?;
                Ok(format!("committed length raised to {reach}"))
            });
            if matches!(outcome, Some(Outcome::Repaired(_))) {
                info.committed = reach;
            }
            self.push(
                Problem::new(Severity::Corruption, format!("pack {id}"), detail).with(outcome),
            );
        }
    }

    /// Reports (and punches, when repairing) pack space no chunk row covers: bytes past
    /// the committed length, and allocated ranges below it that no extent covers.
    pub(super) fn check_pack_space(
        &mut self,
        ns: &Namespace,
        packs: &BTreeMap<u32, PackInfo>,
        scan: &ChunkScan,
    ) -> Result<(), CheckError> {
        let mut live = {
            let txn = ns.read()?;
            let table = txn.open_table(CHUNKS).map_err(NamespaceError::from)?;
            index::live_extents(&table)?
        };
        for (&id, info) in packs {
            let PackState::Readable { file_len } = info.state else {
                continue;
            };
            let path = self.layout.pack(id);
            let pack = PackFile::<S>::open(self.storage, path.clone(), id)
                .map_err(io_error(format!("opening {}", path.display())))?;
            let keep = info
                .committed
                .max(HEADER_BYTES)
                .max(scan.past_committed.get(&id).copied().unwrap_or(0));
            if file_len > keep {
                self.check_tail(&pack, id, info.committed, keep, file_len)
                    .map_err(io_error(format!("reading {}", path.display())))?;
            }
            let extents = live.remove(&id).unwrap_or_default();
            let gaps = pack::unreferenced_ranges(&extents, info.committed.min(file_len));
            let leaked = allocated_within(&pack, &gaps)
                .map_err(io_error(format!("reading {}", path.display())))?;
            if leaked.is_empty() {
                continue;
            }
            let bytes: u64 = leaked.iter().map(|(s, e)| e - s).sum();
            let outcome = self.fix(|| -> std::io::Result<String> {
                for &(start, end) in &leaked {
                    pack.punch(start, end - start)?;
                }
                Ok(format!(
                    "punched out ({})",
                    counted(leaked.len() as u64, "range")
                ))
            });
            self.push(
                Problem::new(
                    Severity::Leak,
                    format!("pack {id}"),
                    format!(
                        "{} in {} (the first at offset {}) hold no chunk the index records",
                        ByteSize(bytes),
                        counted(leaked.len() as u64, "range"),
                        leaked[0].0
                    ),
                )
                .with(outcome),
            );
        }
        Ok(())
    }
}

impl<S: Storage> Checker<'_, S> {
    /// Bytes past the committed length (`keep` with rows reaching past it) belong to
    /// a capture that never committed. Once its space was punched (a cancelled or
    /// failed capture frees what it wrote) only the length remains, which the next
    /// mount cuts: not worth a problem.
    fn check_tail(
        &mut self,
        pack: &PackFile<S>,
        id: u32,
        committed: u64,
        keep: u64,
        file_len: u64,
    ) -> std::io::Result<()> {
        let allocated: u64 = allocated_within(pack, &[(keep, file_len)])?
            .iter()
            .map(|(start, end)| end - start)
            .sum();
        let tail = ByteSize(file_len - keep);
        if allocated == 0 {
            self.note(format!(
                "pack {id}: its file runs {tail} past its committed length, all holes (what a \
                 cancelled capture leaves); the next mount cuts it"
            ));
            return Ok(());
        }
        let outcome = self.fix(|| {
            pack.truncate(keep)
                .and_then(|()| pack.sync_data())
                .map(|()| format!("cut back to {keep} bytes"))
        });
        self.push(
            Problem::new(
                Severity::Leak,
                format!("pack {id}"),
                format!(
                    "{tail} past its committed length {committed} ({} of it allocated), written \
                     by a capture that never committed",
                    ByteSize(allocated)
                ),
            )
            .with(outcome),
        );
        Ok(())
    }
}

/// Reads chunk `hash` at `loc` from `pack` (into `payload`) and checks it decodes to
/// its hash; `Err` says what is wrong.
fn verify_chunk<S: Storage>(
    pack: &PackFile<S>,
    hash: ChunkHash,
    loc: ChunkLocation,
    payload: &mut Vec<u8>,
) -> Result<(), String> {
    payload.resize(loc.stored_len as usize, 0);
    pack.read_into(payload, loc.offset)
        .map_err(|e| e.to_string())?;
    codec::decode(payload, loc.codec, loc.plain_len as usize, hash)
        .map(|_| ())
        .map_err(|e| match e {
            CodecError::HashMismatch { actual, .. } => {
                format!("fails its hash check: its contents hash to {actual}")
            }
            CodecError::Undecodable { reason, .. } => format!("does not decode: {reason}"),
        })
}

/// The parts of `ranges` where `pack` has storage allocated (not holes).
fn allocated_within<S: Storage>(
    pack: &PackFile<S>,
    ranges: &[(u64, u64)],
) -> std::io::Result<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    for &(start, end) in ranges {
        let mut pos = start;
        while pos < end {
            let Some(data) = pack.seek_data(pos)? else {
                break;
            };
            if data >= end {
                break;
            }
            let hole = pack.seek_hole(data)?.min(end);
            out.push((data, hole));
            pos = hole;
        }
    }
    Ok(out)
}
