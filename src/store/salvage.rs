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

use std::io::Read;
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
    let snapshot = Index::load(&from.join("index.snapshot")).ok().flatten();
    let covered = snapshot.as_ref().map(|ix| ix.covered);
    // The events the snapshot knew of, numbered from 0: those not kept are lost, whatever the
    // markers could tell (a segment or a journal's end gone whole takes its markers with it).
    let known = snapshot.map_or(0, |ix| ix.len());
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
        let path = from.join(super::journal::segment_file(no));
        // Start-up's rule for the last segment: a bad frame is damage only if a batch starts
        // after it (written once the bad one was durable); otherwise the write was torn there.
        let proof = if last { latest_batch_start(&path)? } else { None };
        // What the index snapshot covers was durable and acknowledged: never a torn write.
        let proof = proof.max(covered.map(split).filter(|(seg, _)| *seg == no).map(|(_, off)| off));
        let file = std::fs::File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        scan_segment(file, CHUNK, |piece| {
            match piece {
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
                Piece::Bad { at, end, zeros_to_end } => {
                    if last && proof.is_none_or(|p| at >= p) {
                        // Zeros alone are the segment's prepared space.
                        if !zeros_to_end {
                            found.torn = Some(Stretch { segment: no, at, bytes: len.saturating_sub(at) });
                        }
                        return Ok(false);
                    }
                    found.damaged.push(Stretch { segment: no, at, bytes: end - at });
                }
            }
            Ok(true)
        })?;
    }
    out.finish()?;
    found.events = out.events();
    let kept_known = out.kept.partition_point(|k| k.old_seq < known);
    found.lost = markers.lost.max(u64::from(known) - kept_known as u64);
    found.lost_unknown = markers.unknown && found.needed();
    Ok(found)
}

/// Where the last batch that a marker closes in the segment at `path` starts.
fn latest_batch_start(path: &Path) -> Result<Option<u64>, StoreError> {
    let mut latest = None;
    scan_segment(std::fs::File::open(path).map_err(io)?, CHUNK, |piece| {
        if let Piece::Frame { at, payload } = piece {
            latest = latest.max(marker_of(payload).map(|m| at.saturating_sub(m.bytes)));
        }
        Ok(true)
    })?;
    Ok(latest)
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
    /// No frame starts from `at` up to `end` (the next frame, or the end of the segment);
    /// `zeros_to_end`: nothing but zeros from `at` to the end of the segment.
    Bad {
        at: u64,
        end: u64,
        zeros_to_end: bool,
    },
}

/// How much of a segment is read at a time. A segment is read through a window rather than
/// whole, so a salvage holds about this much of it (more only for a frame longer than this),
/// not the tens of megabytes of a segment.
const CHUNK: usize = 1 << 20;

/// How far back the scan may step from the last place it asked for: a frame can start three
/// bytes before the first byte that is not zero.
const LOOKBEHIND: u64 = 3;

/// The bytes of a segment from `lo` on, read from `src` as they are needed.
struct Window<R> {
    src: R,
    buf: Vec<u8>,
    lo: u64,
    chunk: usize,
    eof: bool,
}

impl<R: Read> Window<R> {
    fn hi(&self) -> u64 {
        self.lo + self.buf.len() as u64
    }

    /// Whether the segment has `need` bytes from `at`, reading them in if not yet read. What
    /// lies more than `LOOKBEHIND` bytes before `at` is let go: no later `at` may be earlier.
    fn has(&mut self, at: u64, need: usize) -> Result<bool, StoreError> {
        let end = at + need as u64;
        if end <= self.hi() {
            return Ok(true);
        }
        if self.eof {
            return Ok(false);
        }
        let behind = (at.saturating_sub(LOOKBEHIND).clamp(self.lo, self.hi()) - self.lo) as usize;
        self.buf.drain(..behind);
        self.lo += behind as u64;
        while self.hi() < end && !self.eof {
            let want = (end - self.hi()).max(self.chunk as u64);
            let n = self.src.by_ref().take(want).read_to_end(&mut self.buf).map_err(io)?;
            self.eof = (n as u64) < want;
        }
        Ok(end <= self.hi())
    }

    fn bytes(&self, at: u64, len: usize) -> &[u8] {
        let from = (at - self.lo) as usize;
        &self.buf[from..from + len]
    }

    /// The length of the payload of a frame at `at` that passes its checksum and starts as a
    /// record or a marker.
    fn frame_at(&mut self, at: u64) -> Result<Option<usize>, StoreError> {
        if !self.has(at, FRAME_HEADER + 1)? {
            return Ok(None);
        }
        let head: &[u8; FRAME_HEADER] = self.bytes(at, FRAME_HEADER).try_into().expect("a header's length");
        let (len, crc) = parse_header(head);
        // The first byte first: past damage most places are no frame, and this is cheaper
        // than reading in and checking up to `FRAME_MAX` bytes.
        if len == 0 || len > FRAME_MAX || !matches!(self.bytes(at + FRAME_HEADER as u64, 1)[0], VERSION | MARKER_TAG) {
            return Ok(None);
        }
        let len = len as usize;
        if !self.has(at, FRAME_HEADER + len)? || crc32fast::hash(self.bytes(at + FRAME_HEADER as u64, len)) != crc {
            return Ok(None);
        }
        Ok(Some(len))
    }

    /// The first byte from `at` on that is not zero, if any.
    fn next_nonzero(&mut self, mut at: u64) -> Result<Option<u64>, StoreError> {
        while self.has(at, 1)? {
            let from = (at - self.lo) as usize;
            if let Some(n) = self.buf[from..].iter().position(|b| *b != 0) {
                return Ok(Some(at + n as u64));
            }
            at = self.hi();
        }
        Ok(None)
    }
}

/// Hands `visit` the frames of one segment in order, and each stretch between them that holds
/// none once its end is known, reading the segment `chunk` bytes at a time. `visit` returns
/// whether to go on.
fn scan_segment(
    src: impl Read,
    chunk: usize,
    mut visit: impl FnMut(Piece<'_>) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let mut w = Window { src, buf: Vec::new(), lo: 0, chunk, eof: false };
    let mut at = 0u64;
    // Where the stretch being passed over started, and whether a byte in it was not zero.
    let mut bad: Option<(u64, bool)> = None;
    while w.has(at, 1)? {
        if let Some(len) = w.frame_at(at)? {
            if let Some((start, _)) = bad.take() {
                if !visit(Piece::Bad { at: start, end: at, zeros_to_end: false })? {
                    return Ok(());
                }
            }
            if !visit(Piece::Frame { at, payload: w.bytes(at + FRAME_HEADER as u64, len) })? {
                return Ok(());
            }
            at += (FRAME_HEADER + len) as u64;
            continue;
        }
        let (_, nonzero) = bad.get_or_insert((at, false));
        // A frame's length has a byte that is not zero among its first four: past a run of
        // zeros, the next frame cannot start earlier than three bytes before its end.
        at = match w.next_nonzero(at)? {
            Some(n) => {
                *nonzero = true;
                n.saturating_sub(3).max(at + 1)
            }
            None => w.hi(),
        };
    }
    if let Some((start, nonzero)) = bad {
        visit(Piece::Bad { at: start, end: w.hi(), zeros_to_end: !nonzero })?;
    }
    Ok(())
}

/// A batch is written once its records reach this many bytes.
const BATCH_BYTES: usize = 1 << 20;

/// The new journal, and what it needs to renumber the records it takes.
struct Rebuild {
    journal: Option<Journal>,
    /// Each event kept, by its new sequence number. Their old sequence numbers ascend too (the
    /// first version of each is kept only after the last), so a later version finds its event
    /// by binary search: a few tens of bytes an event, where maps keyed by the old numbers and
    /// places took four times as much at a million events.
    kept: Vec<Kept>,
    /// Records kept and not yet written: new sequence number, whether it holds its event's JSON,
    /// payload.
    pending: Vec<(u32, bool, Vec<u8>)>,
    pending_bytes: usize,
    buf: Vec<u8>,
}

struct Kept {
    old_seq: u32,
    /// Bytes, not `u128`, so that an entry is aligned to 8 and takes 40 bytes, not 48.
    id: [u8; 16],
    /// Old place of its latest version kept that holds its JSON.
    json: Loc,
    /// New place of its latest version written that holds its JSON (`NOT_WRITTEN` before the
    /// first). Records are written in the order they are taken, so a later version is written
    /// after the version it points at, and this is that version's new place when the later one
    /// is written.
    written: Loc,
}

/// No place a frame can start: offsets stay below `SEGMENT_MAX`.
const NOT_WRITTEN: Loc = Loc::MAX;

// What a million events cost while salvaging: keep it so.
const _: () = assert!(std::mem::size_of::<Kept>() == 40);

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
        Ok(Self { journal, kept: Vec::new(), pending: Vec::new(), pending_bytes: 0, buf: Vec::new() })
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
        let id = e.id.to_le_bytes();
        let (seq, older_json) = match self.kept.binary_search_by_key(&e.seq, |k| k.old_seq) {
            Ok(i) if self.kept[i].id == id => {
                let k = &mut self.kept[i];
                let older = !here && r.event_loc != k.json;
                if here {
                    k.json = at;
                }
                (i as u32, older)
            }
            Ok(_) => return Ok(Taken::Dropped),
            // The first version kept of an event must hold its JSON, and come after the last.
            Err(_) => {
                let ascends =
                    self.kept.last().is_none_or(|k| e.seq > k.old_seq && e.id >> 64 > u128::from_le_bytes(k.id) >> 64);
                if !here || !ascends {
                    return Ok(Taken::Dropped);
                }
                self.kept.push(Kept { old_seq: e.seq, id, json: at, written: NOT_WRITTEN });
                (self.kept.len() as u32 - 1, false)
            }
        };
        if self.journal.is_some() {
            self.pending_bytes += FRAME_HEADER + payload.len();
            self.pending.push((seq, here, payload.to_vec()));
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
        for (seq, here, payload) in self.pending.drain(..) {
            let r = decode_record(&payload)?;
            let new_at = base + self.buf.len() as u64;
            let k = &mut self.kept[seq as usize];
            let event_loc = if here {
                k.written = new_at;
                HERE
            } else if k.written == NOT_WRITTEN {
                return Err(StoreError::Corrupt {
                    tree: "journal",
                    detail: "a version kept points at a version not written".into(),
                });
            } else {
                k.written
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

    /// ('F', at, payload length, 0) and ('B', at, end, zeros to the end), read `chunk` bytes
    /// at a time.
    fn pieces_by(buf: &[u8], chunk: usize) -> Vec<(char, u64, u64, u64)> {
        let mut out = Vec::new();
        scan_segment(buf, chunk, |p| {
            out.push(match p {
                Piece::Frame { at, payload } => ('F', at, payload.len() as u64, 0),
                Piece::Bad { at, end, zeros_to_end } => ('B', at, end, u64::from(zeros_to_end)),
            });
            Ok(true)
        })
        .unwrap();
        out
    }

    /// The same, read whole and then a few bytes at a time: where the reads end must not
    /// change what is found.
    fn pieces(buf: &[u8]) -> Vec<(char, u64, u64, u64)> {
        let whole = pieces_by(buf, buf.len().max(1));
        for chunk in [1, 2, 3, 5, 8, 13] {
            assert_eq!(pieces_by(buf, chunk), whole, "read {chunk} bytes at a time");
        }
        whole
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
        assert_eq!(
            pieces(&buf),
            vec![('F', 0, 4, 0), ('B', second, third, 0), ('F', third, 4, 0), ('B', end, end + 100, 1)]
        );
    }

    #[test]
    fn a_frame_whose_length_starts_with_zero_bytes_is_found_after_zeros() {
        // 256 bytes: the length's first byte is zero, so a run of zeros can end inside it.
        let mut big = vec![VERSION];
        big.resize(256, 7);
        let mut buf = vec![0u8; 37];
        buf.extend_from_slice(&framed(&[&big]));
        assert_eq!(pieces(&buf), vec![('B', 0, 37, 0), ('F', 37, 256, 0)]);
    }

    #[test]
    fn garbage_at_the_end_is_not_taken_for_prepared_zeros() {
        let a: &[u8] = &[VERSION, 1];
        let mut buf = framed(&[a]);
        buf.extend_from_slice(&[0xde, 0xad, 0, 0, 0, 0, 0, 0, 0xbe, 0xef]);
        buf.extend_from_slice(&[0; 64]);
        assert_eq!(pieces(&buf), vec![('F', 0, 2, 0), ('B', 10, buf.len() as u64, 0)]);
    }

    proptest::proptest! {
        /// Frames, damage and zeros in any mix read the same however the segment is split
        /// into reads, and every frame laid down that no damage touched is found.
        #[test]
        fn reads_of_any_size_find_the_same(
            payloads in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 1..40), 0..12),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), 1u8..=255), 0..4),
            zeros in 0usize..40,
        ) {
            let payloads: Vec<Vec<u8>> = payloads.into_iter().map(|mut p| { p[0] = VERSION; p }).collect();
            let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            let mut buf = framed(&refs);
            let framed_len = buf.len();
            buf.extend(std::iter::repeat_n(0, zeros));
            let mut touched = Vec::new();
            for (at, bits) in &flips {
                if !buf.is_empty() {
                    let at = at % buf.len();
                    buf[at] ^= bits;
                    touched.push(at);
                }
            }
            let found = pieces(&buf);
            let mut start = 0;
            for p in &payloads {
                let end = start + FRAME_HEADER + p.len();
                if !touched.iter().any(|t| (start..end).contains(t)) {
                    proptest::prop_assert!(found.contains(&('F', start as u64, p.len() as u64, 0)), "frame at {start}");
                }
                start = end;
            }
            proptest::prop_assert_eq!(start, framed_len);
        }
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
