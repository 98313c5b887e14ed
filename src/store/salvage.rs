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

use std::collections::{HashMap, HashSet};
use std::path::Path;

use super::event_log::{decode_record, encode_record, EventLog, Record, HERE, VERSION};
use super::journal::{
    frame, loc, marker_of, parse_header, segment_numbers, Access, Journal, JournalOptions, Loc, FRAME_HEADER,
    FRAME_MAX, MARKER_TAG,
};
use super::StoreError;

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
    /// Bad stretches with good frames after them, or at the end of a sealed segment.
    pub damaged: Vec<Stretch>,
    /// Segment numbers missing between the first and the last one found.
    pub missing_segments: Vec<u32>,
    /// Bytes at the end of the last segment that are not zeros and not frames: a write torn by
    /// a crash, never acknowledged. Start-up cuts it anyway; it is not damage.
    pub torn: Option<Stretch>,
    /// Records kept, and how many of them are events (the rest are later versions).
    pub records: u64,
    pub events: u64,
    /// Records that passed their checksum but could not be kept: unreadable, or a version
    /// whose event's first version or JSON was lost.
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
    let mut out = Rebuild::new(into, options)?;
    let mut found = Salvage::default();
    let mut expected = numbers.first().copied().unwrap_or(0);
    let mut markers = Markers::default();
    let last = numbers.last().copied();
    if numbers.first().is_some_and(|first| *first != 0) {
        found.missing_segments.extend(0..numbers[0]);
        markers.unknown = true;
    }
    for no in numbers.iter().copied() {
        if no != expected {
            found.missing_segments.extend(expected..no);
            markers.unknown = true;
        }
        expected = no + 1;
        let bytes = std::fs::read(from.join(super::journal::segment_file(no))).map_err(io)?;
        read_segment(&bytes, |piece| {
            match piece {
                Piece::Frame { at, payload } => match marker_of(payload) {
                    Some(m) => markers.close(m.no, m.frames),
                    None => {
                        markers.seen += 1;
                        if out.take(loc(no, at), payload)? {
                            found.records += 1;
                        } else {
                            found.dropped += 1;
                        }
                    }
                },
                Piece::Bad { at, bytes, at_end } => {
                    let stretch = Stretch { segment: no, at, bytes };
                    if at_end && Some(no) == last {
                        found.torn = Some(stretch);
                    } else {
                        found.damaged.push(stretch);
                    }
                }
            }
            Ok(())
        })?;
    }
    out.finish()?;
    found.events = out.events();
    found.lost = markers.lost;
    found.lost_unknown = markers.unknown && found.needed();
    Ok(found)
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
        match self.last {
            Some(prev) if no == prev + 1 => self.lost += records.saturating_sub(self.seen),
            None if no == 0 => self.lost += records.saturating_sub(self.seen),
            // Batches in between went whole, markers and all.
            _ => {
                self.lost += records.saturating_sub(self.seen);
                self.unknown = true;
            }
        }
        self.last = Some(no);
        self.seen = 0;
    }
}

enum Piece<'a> {
    Frame {
        at: u64,
        payload: &'a [u8],
    },
    /// No frame starts anywhere in `bytes` bytes from `at`; `at_end`: nothing good follows in
    /// the segment.
    Bad {
        at: u64,
        bytes: u64,
        at_end: bool,
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

/// Hands the frames of one segment's bytes to `each` in order, and every stretch between them
/// that holds none. Zeros at the end are prepared space, not a stretch.
fn read_segment(buf: &[u8], mut each: impl FnMut(Piece<'_>) -> Result<(), StoreError>) -> Result<(), StoreError> {
    let mut at = 0;
    let mut bad: Option<usize> = None;
    while at < buf.len() {
        if let Some(payload) = frame_at(buf, at) {
            if let Some(from) = bad.take() {
                each(Piece::Bad { at: from as u64, bytes: (at - from) as u64, at_end: false })?;
            }
            each(Piece::Frame { at: at as u64, payload })?;
            at += FRAME_HEADER + payload.len();
            continue;
        }
        bad.get_or_insert(at);
        // A frame's length has a byte that is not zero among its first four: past a run of
        // zeros, the next frame cannot start earlier than three bytes before its end.
        at = match buf[at..].iter().position(|b| *b != 0) {
            Some(0) => at + 1,
            Some(n) => (at + n).saturating_sub(3).max(at + 1),
            None => buf.len(),
        };
    }
    if let Some(from) = bad {
        if buf[from..].iter().any(|b| *b != 0) {
            each(Piece::Bad { at: from as u64, bytes: (buf.len() - from) as u64, at_end: true })?;
        }
    }
    Ok(())
}

/// A batch is written once its records reach this many bytes.
const BATCH_BYTES: usize = 1 << 20;

/// The new journal, and what it needs to renumber the records it takes.
struct Rebuild {
    journal: Option<Journal>,
    /// Old sequence number to new, with the event's id.
    seqs: HashMap<u32, (u32, u128)>,
    /// Old places of the versions kept that hold their event's JSON.
    holding: HashSet<Loc>,
    /// Their new places, once written.
    moved: HashMap<Loc, Loc>,
    last_id: Option<u128>,
    /// Records kept and not yet written: old place, new sequence number, payload.
    pending: Vec<(Loc, u32, Vec<u8>)>,
    pending_bytes: usize,
    buf: Vec<u8>,
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
            seqs: HashMap::new(),
            holding: HashSet::new(),
            moved: HashMap::new(),
            last_id: None,
            pending: Vec::new(),
            pending_bytes: 0,
            buf: Vec::new(),
        })
    }

    fn events(&self) -> u64 {
        self.seqs.len() as u64
    }

    /// Takes the record found at `at` if it can be read on its own; false if it is dropped.
    fn take(&mut self, at: Loc, payload: &[u8]) -> Result<bool, StoreError> {
        let Ok(r) = decode_record(payload) else { return Ok(false) };
        let seq = match self.seqs.get(&r.entry.seq) {
            // A later version: of the same event, and its JSON here or in a version kept.
            Some(&(seq, id)) => {
                if id != r.entry.id || (r.event_loc != HERE && !self.holding.contains(&r.event_loc)) {
                    return Ok(false);
                }
                seq
            }
            // The first version kept of an event: it must hold its JSON, and ids ascend.
            None => {
                if r.event_loc != HERE || self.last_id.is_some_and(|last| last >> 64 >= r.entry.id >> 64) {
                    return Ok(false);
                }
                let seq = self.seqs.len() as u32;
                self.seqs.insert(r.entry.seq, (seq, r.entry.id));
                self.last_id = Some(r.entry.id);
                seq
            }
        };
        if r.event_loc == HERE {
            self.holding.insert(at);
        }
        if self.journal.is_some() {
            self.pending_bytes += FRAME_HEADER + payload.len();
            self.pending.push((at, seq, payload.to_vec()));
            if self.pending_bytes >= BATCH_BYTES {
                self.write()?;
            }
        }
        Ok(true)
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
        for (old, seq, payload) in self.pending.drain(..) {
            let r = decode_record(&payload)?;
            let new_at = base + self.buf.len() as u64;
            let event_loc = if r.event_loc == HERE {
                self.moved.insert(old, new_at);
                HERE
            } else {
                *self.moved.get(&r.event_loc).ok_or_else(|| StoreError::Corrupt {
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

    fn pieces(buf: &[u8]) -> Vec<(char, u64, u64, bool)> {
        let mut out = Vec::new();
        read_segment(buf, |p| {
            out.push(match p {
                Piece::Frame { at, payload } => ('F', at, payload.len() as u64, false),
                Piece::Bad { at, bytes, at_end } => ('B', at, bytes, at_end),
            });
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn frames_are_found_again_past_damage_and_trailing_zeros_are_no_damage() {
        let a: &[u8] = &[VERSION, 1, 2, 3];
        let b: &[u8] = &[VERSION, 0, 0, 0, 0, 9];
        let mut buf = framed(&[a, b, a]);
        let second = FRAME_HEADER + a.len();
        // Damage inside the second frame's payload: it fails its checksum.
        buf[second + FRAME_HEADER + 2] ^= 0x40;
        buf.extend_from_slice(&[0; 100]);
        let third = second + FRAME_HEADER + b.len();
        assert_eq!(
            pieces(&buf),
            vec![
                ('F', 0, 4, false),
                ('B', second as u64, (third - second) as u64, false),
                ('F', third as u64, 4, false),
            ]
        );
    }

    #[test]
    fn a_frame_whose_length_starts_with_zero_bytes_is_found_after_zeros() {
        // 256 bytes: the length's first byte is zero, so a run of zeros can end inside it.
        let mut big = vec![VERSION];
        big.resize(256, 7);
        let mut buf = vec![0u8; 37];
        buf.extend_from_slice(&framed(&[&big]));
        assert_eq!(pieces(&buf), vec![('B', 0, 37, false), ('F', 37, 256, false)]);
    }

    #[test]
    fn garbage_at_the_end_is_reported_as_ending_the_segment() {
        let a: &[u8] = &[VERSION, 1];
        let mut buf = framed(&[a]);
        buf.extend_from_slice(&[0xde, 0xad, 0, 0, 0, 0, 0, 0, 0xbe, 0xef]);
        buf.extend_from_slice(&[0; 64]);
        assert_eq!(pieces(&buf), vec![('F', 0, 2, false), ('B', 10, 74, true)]);
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
    }
}
