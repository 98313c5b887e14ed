//! `callgate salvage`: a new journal from every record of a damaged one that still reads back.
//!
//! Start-up refuses a journal with a bad frame that acknowledged batches follow (damage, not a
//! torn write), and one with a segment missing. Truncating at the damage would throw away every
//! event after it. Here the frames past the damage are found again by their checksums, and
//! whatever decodes is written, in its order, into a fresh journal; the damaged one is left as
//! it was for whoever wants to look further.
//!
//! Events keep their ids. Only their sequence numbers, which are the index's own and must run
//! without gaps, are given out again, and a later version of an event points at the new place
//! of the version holding its JSON. A version whose event lost that version (or its first one)
//! cannot be read on its own, and is dropped and counted; so are the records the batch markers
//! say were written but that no longer read back.

use std::collections::HashMap;
use std::path::Path;

use super::event_index::Index;
use super::event_log::{decode_record, delivery_readable, encode_record, EventLog, Record, HERE, VERSION};
use super::journal::{
    frame, loc, marker_of, parse_header, segment_numbers, split, Access, Journal, JournalOptions, Loc, FRAME_HEADER,
    FRAME_MAX, MARKER_TAG,
};
use super::{decode_event, StoreError};
use crate::domain::OrgId;

/// A stretch of a segment that holds no frame passing its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stretch {
    pub segment: u32,
    pub at: u64,
    pub bytes: u64,
}

/// What a salvage found, and kept or would keep.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Salvage {
    /// Bad stretches that acknowledged batches follow, or anywhere in a sealed segment (zeros
    /// at a sealed segment's end too: a segment is cut to its last frame when sealed).
    pub damaged: Vec<Stretch>,
    /// Runs of segment numbers missing before the last one found, first and last.
    pub missing_segments: Vec<(u32, u32)>,
    /// What follows the first bad byte of the last segment when no batch starts after it: a
    /// write torn by a crash, never acknowledged, which start-up cuts too. Not damage, and
    /// nothing in it is kept.
    pub torn: Option<Stretch>,
    /// Records kept, and how many of them are events (the rest are later versions).
    pub records: u64,
    pub events: u64,
    /// Later versions kept whose own event JSON was lost: they point at the event's latest
    /// JSON kept, so their delivery state stands and what the lost version added (an answer)
    /// is gone.
    pub older_json: u64,
    /// Records that passed their checksum but could not be kept: unreadable, or a version of
    /// an event whose first version was lost.
    pub dropped: u64,
    /// Records the batch markers account for that did not read back.
    pub lost: u64,
    /// Whole batches went with their markers, so `lost` is a lower bound.
    pub lost_unknown: bool,
}

impl Salvage {
    /// Whether anything needs salvaging: a torn tail alone does not.
    pub fn needed(&self) -> bool {
        !self.damaged.is_empty() || !self.missing_segments.is_empty() || self.dropped > 0 || self.lost > 0
    }
}

/// Reads the journal in `from` and, given `into` (a directory that does not exist yet), writes
/// what it keeps there as a new journal, which is synced before this returns. `from` is only
/// read.
pub fn salvage(from: &Path, into: Option<&Path>, options: JournalOptions) -> Result<Salvage, StoreError> {
    let numbers = segment_numbers(from)?;
    let covered = Index::load(&from.join("index.snapshot")).ok().flatten().map(|ix| ix.covered);
    let mut out = Rebuild::new(into, options)?;
    let mut found = Salvage::default();
    let mut markers = Markers::default();
    let mut expected = 0u32;
    for (i, no) in numbers.iter().copied().enumerate() {
        if no != expected {
            found.missing_segments.push((expected, no - 1));
            markers.unknown = true;
        }
        expected = no.saturating_add(1);
        let last = i + 1 == numbers.len();
        let bytes = std::fs::read(from.join(super::journal::segment_file(no))).map_err(io)?;
        let pieces = read_segment(&bytes);
        // Start-up's rule for the last segment: a bad frame is damage only if a batch starts
        // after it (written once the bad one was durable); otherwise the write was torn there.
        let proof = if last { latest_batch_start(&pieces) } else { None };
        // What the index snapshot covers was durable and acknowledged: never a torn write.
        let proof = proof.max(covered.map(split).filter(|(seg, _)| *seg == no).map(|(_, off)| off));
        for (k, piece) in pieces.iter().enumerate() {
            match *piece {
                Piece::Frame { at, payload } => match marker_of(payload) {
                    Some(m) => markers.close(m.no, m.frames),
                    None => {
                        markers.seen += 1;
                        match out.take(loc(no, at), payload)? {
                            Taken::Kept { older_json } => {
                                found.records += 1;
                                found.older_json += u64::from(older_json);
                            }
                            Taken::Dropped => found.dropped += 1,
                        }
                    }
                },
                Piece::Bad { at, zeros_to_end } => {
                    let torn = last && proof.is_none_or(|p| at >= p);
                    if torn {
                        let bytes = bytes.len() as u64 - at;
                        // Zeros alone are the segment's prepared space.
                        if !zeros_to_end {
                            found.torn = Some(Stretch { segment: no, at, bytes });
                        }
                        break;
                    }
                    let end = pieces[k + 1..]
                        .iter()
                        .find_map(|p| match p {
                            Piece::Frame { at, .. } => Some(*at),
                            Piece::Bad { .. } => None,
                        })
                        .unwrap_or(bytes.len() as u64);
                    found.damaged.push(Stretch { segment: no, at, bytes: end - at });
                }
            }
        }
    }
    out.finish()?;
    found.events = out.events();
    found.lost = markers.lost;
    found.lost_unknown = markers.unknown && found.needed();
    Ok(found)
}

/// Where the last batch that a marker closes in `pieces` starts.
fn latest_batch_start(pieces: &[Piece<'_>]) -> Option<u64> {
    pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Frame { at, payload } => marker_of(payload).map(|m| at.saturating_sub(m.bytes)),
            Piece::Bad { .. } => None,
        })
        .max()
}

/// Opens the journal in `dir` as a start would, and reads every record back against the index
/// that builds: `Err` if anything is wrong.
pub fn check(dir: &Path) -> Result<(), StoreError> {
    let log = EventLog::open(dir, JournalOptions::default(), Access::Inspect)?;
    match log.verify()?.into_iter().next() {
        Some(problem) => Err(StoreError::Corrupt { tree: "journal", detail: problem }),
        None => Ok(()),
    }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io { detail: e.to_string() }
}

/// The batch markers read so far, to count the records of theirs that did not read back.
#[derive(Default)]
struct Markers {
    last: Option<u64>,
    /// Records read since the last marker.
    seen: u64,
    lost: u64,
    unknown: bool,
}

impl Markers {
    fn close(&mut self, no: u64, frames: u32) {
        let records = u64::from(frames);
        let follows = match self.last {
            Some(prev) => prev.checked_add(1) == Some(no),
            None => no == 0,
        };
        self.lost += records.saturating_sub(self.seen);
        // Otherwise batches in between went whole, markers and all.
        self.unknown |= !follows;
        self.last = Some(no);
        self.seen = 0;
    }
}

enum Piece<'a> {
    Frame {
        at: u64,
        payload: &'a [u8],
    },
    /// No frame starts at `at`, nor after it up to the next `Frame`; `zeros_to_end`: zeros
    /// from `at` to the end of the segment.
    Bad {
        at: u64,
        zeros_to_end: bool,
    },
}

/// The payload of a frame at `at` that passes its checksum and starts as a record or a marker.
fn frame_at(buf: &[u8], at: usize) -> Option<&[u8]> {
    let head: &[u8; FRAME_HEADER] = buf.get(at..at + FRAME_HEADER)?.try_into().ok()?;
    let (len, crc) = parse_header(head);
    if len == 0 || len > FRAME_MAX {
        return None;
    }
    let payload = buf.get(at + FRAME_HEADER..at + FRAME_HEADER + len as usize)?;
    // The first byte first: past damage most places are no frame, and this is cheaper than a
    // checksum over up to `FRAME_MAX` bytes.
    if !matches!(payload[0], VERSION | MARKER_TAG) || crc32fast::hash(payload) != crc {
        return None;
    }
    Some(payload)
}

/// The frames of one segment's bytes in order, and where each stretch between them that holds
/// none starts.
fn read_segment(buf: &[u8]) -> Vec<Piece<'_>> {
    let mut pieces = Vec::new();
    let mut at = 0;
    let mut in_bad = false;
    while at < buf.len() {
        if let Some(payload) = frame_at(buf, at) {
            pieces.push(Piece::Frame { at: at as u64, payload });
            in_bad = false;
            at += FRAME_HEADER + payload.len();
            continue;
        }
        if !in_bad {
            let zeros_to_end = buf[at..].iter().all(|b| *b == 0);
            pieces.push(Piece::Bad { at: at as u64, zeros_to_end });
            if zeros_to_end {
                break;
            }
            in_bad = true;
        }
        // A frame's length has a byte that is not zero among its first four: past a run of
        // zeros, the next frame cannot start earlier than three bytes before its end.
        at = match buf[at..].iter().position(|b| *b != 0) {
            Some(0) => at + 1,
            Some(n) => (at + n).saturating_sub(3).max(at + 1),
            None => buf.len(),
        };
    }
    pieces
}

/// A batch is written once its records reach this many bytes.
const BATCH_BYTES: usize = 1 << 20;

/// The new journal, and what it needs to renumber the records it takes.
struct Rebuild {
    journal: Option<Journal>,
    /// By old sequence number, each event kept.
    kept: HashMap<u32, Kept>,
    /// The old sequence number and id of the last event kept: both ascend.
    last: Option<(u32, u128)>,
    /// New places of the versions written that hold their event's JSON, by their old ones.
    moved: HashMap<Loc, Loc>,
    /// Records kept and not yet written: old place, new sequence number, where its JSON is
    /// (old place, or `HERE`), payload.
    pending: Vec<(Loc, u32, Loc, Vec<u8>)>,
    pending_bytes: usize,
    buf: Vec<u8>,
}

struct Kept {
    seq: u32,
    id: u128,
    /// Old place of its latest version kept that holds its JSON.
    json: Loc,
}

enum Taken {
    /// `older_json`: its own JSON was lost, and it points at the latest kept instead.
    Kept {
        older_json: bool,
    },
    Dropped,
}

impl Rebuild {
    fn new(into: Option<&Path>, options: JournalOptions) -> Result<Self, StoreError> {
        let journal = match into {
            Some(dir) => {
                std::fs::create_dir(dir).map_err(io)?;
                Some(Journal::open(dir, 0, options, Access::Serve, |_, _| Ok(()))?)
            }
            None => None,
        };
        Ok(Self {
            journal,
            kept: HashMap::new(),
            last: None,
            moved: HashMap::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            buf: Vec::new(),
        })
    }

    fn events(&self) -> u64 {
        self.kept.len() as u64
    }

    /// Takes the record found at `at` if it can be read with what was kept before it.
    fn take(&mut self, at: Loc, payload: &[u8]) -> Result<Taken, StoreError> {
        let Ok(r) = decode_record(payload) else { return Ok(Taken::Dropped) };
        let e = &r.entry;
        // What the index and the readers would refuse is not carried over: a frame that
        // passed its checksum by chance inside the damage must not stop what follows.
        let here = r.event_loc == HERE;
        if OrgId::parse(e.org).is_err() || (here && decode_event(r.event).is_err()) || !delivery_readable(r.delivery) {
            return Ok(Taken::Dropped);
        }
        let (seq, json, older_json) = match self.kept.get_mut(&e.seq) {
            Some(k) if k.id == e.id => {
                let older = !here && r.event_loc != k.json;
                if here {
                    k.json = at;
                }
                (k.seq, if here { HERE } else { k.json }, older)
            }
            Some(_) => return Ok(Taken::Dropped),
            // The first version kept of an event must hold its JSON, and come after the last.
            None => {
                let ascends = self.last.is_none_or(|(seq, id)| e.seq > seq && e.id >> 64 > id >> 64);
                if !here || !ascends {
                    return Ok(Taken::Dropped);
                }
                let seq = self.kept.len() as u32;
                self.kept.insert(e.seq, Kept { seq, id: e.id, json: at });
                self.last = Some((e.seq, e.id));
                (seq, HERE, false)
            }
        };
        if self.journal.is_some() {
            self.pending_bytes += FRAME_HEADER + payload.len();
            self.pending.push((at, seq, json, payload.to_vec()));
            if self.pending_bytes >= BATCH_BYTES {
                self.write()?;
            }
        }
        Ok(Taken::Kept { older_json })
    }

    /// Writes the pending records as one durable batch.
    fn write(&mut self) -> Result<(), StoreError> {
        let Some(journal) = self.journal.as_mut() else { return Ok(()) };
        if self.pending.is_empty() {
            return Ok(());
        }
        // A record keeps its length when renumbered: the fixed part holds both numbers.
        let base = journal.place(self.pending_bytes)?;
        self.buf.clear();
        for (old, seq, json, payload) in self.pending.drain(..) {
            let r = decode_record(&payload)?;
            let new_at = base + self.buf.len() as u64;
            let event_loc = if json == HERE {
                self.moved.insert(old, new_at);
                HERE
            } else {
                *self.moved.get(&json).ok_or_else(|| StoreError::Corrupt {
                    tree: "journal",
                    detail: "a version kept points at a version not written".into(),
                })?
            };
            let renumbered = Record { entry: super::event_index::Entry { seq, ..r.entry }, event_loc, ..r };
            frame(&mut self.buf, |b| encode_record(b, &renumbered));
        }
        debug_assert_eq!(self.buf.len(), self.pending_bytes);
        self.pending_bytes = 0;
        journal.write_durably(&mut self.buf)
    }

    fn finish(&mut self) -> Result<(), StoreError> {
        self.write()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(payloads: &[&[u8]]) -> Vec<u8> {
        let mut buf = Vec::new();
        for p in payloads {
            frame(&mut buf, |b| b.extend_from_slice(p));
        }
        buf
    }

    /// ('F', at, payload length) and ('B', at, zeros to the end).
    fn pieces(buf: &[u8]) -> Vec<(char, u64, u64)> {
        read_segment(buf)
            .into_iter()
            .map(|p| match p {
                Piece::Frame { at, payload } => ('F', at, payload.len() as u64),
                Piece::Bad { at, zeros_to_end } => ('B', at, u64::from(zeros_to_end)),
            })
            .collect()
    }

    #[test]
    fn frames_are_found_again_past_damage() {
        let a: &[u8] = &[VERSION, 1, 2, 3];
        let b: &[u8] = &[VERSION, 0, 0, 0, 0, 9];
        let mut buf = framed(&[a, b, a]);
        let second = (FRAME_HEADER + a.len()) as u64;
        // Damage inside the second frame's payload: it fails its checksum.
        buf[second as usize + FRAME_HEADER + 2] ^= 0x40;
        buf.extend_from_slice(&[0; 100]);
        let third = second + (FRAME_HEADER + b.len()) as u64;
        let end = third + (FRAME_HEADER + a.len()) as u64;
        assert_eq!(pieces(&buf), vec![('F', 0, 4), ('B', second, 0), ('F', third, 4), ('B', end, 1)]);
    }

    #[test]
    fn a_frame_whose_length_starts_with_zero_bytes_is_found_after_zeros() {
        // 256 bytes: the length's first byte is zero, so a run of zeros can end inside it.
        let mut big = vec![VERSION];
        big.resize(256, 7);
        let mut buf = vec![0u8; 37];
        buf.extend_from_slice(&framed(&[&big]));
        assert_eq!(pieces(&buf), vec![('B', 0, 0), ('F', 37, 256)]);
    }

    #[test]
    fn garbage_at_the_end_is_not_taken_for_prepared_zeros() {
        let a: &[u8] = &[VERSION, 1];
        let mut buf = framed(&[a]);
        buf.extend_from_slice(&[0xde, 0xad, 0, 0, 0, 0, 0, 0, 0xbe, 0xef]);
        buf.extend_from_slice(&[0; 64]);
        assert_eq!(pieces(&buf), vec![('F', 0, 2), ('B', 10, 0)]);
    }

    #[test]
    fn lost_records_are_counted_from_the_markers() {
        let mut m = Markers { seen: 3, ..Default::default() };
        m.close(0, 3);
        assert_eq!((m.lost, m.unknown), (0, false));
        m.seen = 1;
        m.close(1, 3);
        assert_eq!((m.lost, m.unknown), (2, false));
        // Batch 2 is gone with its marker.
        m.seen = 2;
        m.close(3, 2);
        assert_eq!((m.lost, m.unknown), (2, true));
        // A marker of a hostile number neither overflows nor counts as following.
        m.close(u64::MAX, 0);
        m.close(0, 0);
        assert!(m.unknown);
    }
}
