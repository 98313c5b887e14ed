//! Append-only segment files. Events are written here rather than into sled because a sled
//! insert of an event costs more CPU than the rest of the webhook path together; an append is a
//! copy into one buffer, and one `fdatasync` makes a whole batch durable.
//!
//! A segment is `NNNNNNNN.log`, a run of frames `[len u32][crc32 u32][payload]`. Only the last
//! segment is ever written; a frame torn by a crash can only be at its end, and is cut off when
//! the journal is opened. A bad frame anywhere else is corruption and stops the open.
//!
//! Each batch ends with a marker frame carrying the batch's number and length, so that a bad
//! frame in the last segment can be told from a torn write: a batch is written only once
//! everything before it is durable, so the marker of a batch that starts after the bad frame
//! proves that the bad frame had been acknowledged. That is damage, and it stops the open as it
//! would in an earlier segment, instead of cutting off every batch written after it.
//! A marker's payload starts with [`MARKER_TAG`], a byte no record starts with; a build that
//! predates markers refuses to open such a journal (an unknown record) rather than cutting it.
//!
//! Segments are written into space zero-filled and synced beforehand (by a helper thread, off
//! the hot path): an `fdatasync` after an append must also commit the file's new size and
//! blocks through the filesystem journal, and measured here that doubles its latency and its
//! CPU. A zero header ends a segment's frames; when a segment is left for the next one, or the
//! journal is opened, whatever follows the last good frame is cut off, so zeros and torn
//! writes only ever sit at the end of the last segment.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;

use super::StoreError;

/// Where a frame starts: segment number in the high half, byte offset in the low half.
pub type Loc = u64;

pub(super) const FRAME_HEADER: usize = 8;
/// Offsets are u32; segments roll well before that.
const SEGMENT_MAX: u64 = 1 << 30;
/// No record comes near this; a larger length in a header is damage, not data.
pub(super) const FRAME_MAX: u32 = 16 << 20;
/// The first byte of a batch marker's payload; records start with their version (1).
pub const MARKER_TAG: u8 = 0xff;
/// Tag, batch number (u64), the batch's bytes before its marker (u32), its frames (u32). Start-up
/// reads the number and the bytes; the frame count is for whoever must account for the events
/// of a damaged batch.
const MARKER_PAYLOAD: usize = 17;
const MARKER_FRAME: usize = FRAME_HEADER + MARKER_PAYLOAD;

pub fn loc(segment: u32, offset: u64) -> Loc {
    (u64::from(segment) << 32) | offset
}

pub(super) fn split(l: Loc) -> (u32, u64) {
    ((l >> 32) as u32, l & 0xffff_ffff)
}

fn corrupt(detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt { tree: "journal", detail: detail.into() }
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Io { detail: e.to_string() }
}

/// Appends one frame holding what `fill` writes.
pub fn frame(buf: &mut Vec<u8>, fill: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0; FRAME_HEADER]);
    fill(buf);
    let len = (buf.len() - start - FRAME_HEADER) as u32;
    let crc = crc32fast::hash(&buf[start + FRAME_HEADER..]);
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// What a batch's closing marker says: the batch's number, and how many bytes of frames it
/// closes (its batch starts that far before the marker).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Marker {
    pub no: u64,
    pub bytes: u64,
    /// The batch's frames, the marker left out.
    pub frames: u32,
}

/// The marker a frame's `payload` is, if it is one.
pub(super) fn marker_of(payload: &[u8]) -> Option<Marker> {
    match payload {
        [MARKER_TAG, rest @ ..] if payload.len() == MARKER_PAYLOAD => Some(Marker {
            no: u64::from_le_bytes(rest[..8].try_into().ok()?),
            bytes: u64::from(u32::from_le_bytes(rest[8..12].try_into().ok()?)),
            frames: u32::from_le_bytes(rest[12..16].try_into().ok()?),
        }),
        _ => None,
    }
}

/// Closes the batch of frames in `buf` with its marker.
fn put_marker(buf: &mut Vec<u8>, no: u64) {
    let bytes = buf.len() as u32;
    let mut frames = 0u32;
    let mut at = 0;
    while at + FRAME_HEADER <= buf.len() {
        let len = u32::from_le_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]) as usize;
        at += FRAME_HEADER + len;
        frames += 1;
    }
    frame(buf, |b| {
        b.push(MARKER_TAG);
        b.extend_from_slice(&no.to_le_bytes());
        b.extend_from_slice(&bytes.to_le_bytes());
        b.extend_from_slice(&frames.to_le_bytes());
    });
}

/// How the journal lays out its files.
#[derive(Clone, Copy, Debug)]
pub struct JournalOptions {
    /// Size of the zero-filled space each new segment starts with; 0 appends instead.
    pub preallocate_bytes: u64,
}

impl Default for JournalOptions {
    fn default() -> Self {
        Self { preallocate_bytes: 64 << 20 }
    }
}

/// Why a journal is opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// To write: a torn tail is cut and the next segment is prepared.
    Serve,
    /// To look at while the server is stopped (`callgate check`): nothing on disk changes, and a
    /// torn tail is reported rather than cut. Writes fail.
    Inspect,
}

/// A write torn by a crash at the end of the last segment, never acknowledged: the next start
/// to serve cuts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TornTail {
    pub segment: u32,
    pub at: u64,
    /// Bytes from `at` to the end of the file, the torn write and the unused space after it.
    pub bytes: u64,
}

pub struct Journal {
    dir: PathBuf,
    active: File,
    active_no: u32,
    active_len: u64,
    /// Bytes of the active segment already allocated on disk (zeros past `active_len`).
    active_room: u64,
    readers: Arc<Segments>,
    spare: Spare,
    /// The number the next batch's marker carries. Taken by failed batches too, so that what
    /// a failed write may have left behind never carries a number a later batch has.
    next_batch: u64,
    /// What an inspection found and left in place.
    torn: Option<TornTail>,
    access: Access,
    /// A failed write could not be cut off: nothing more is written until a restart, whose
    /// open cuts it as the torn tail it then is.
    broken: bool,
}

/// Read access to every segment, shared with readers so they never wait for the writer. Only
/// the active segment and the [`OPEN_SEALED`] sealed ones read most recently keep a file open;
/// the others are opened again when read. So the journal's file descriptors do not grow with
/// its size, and the connections' share of the limit (`net::fds`) leaves them enough.
pub struct Segments {
    dir: PathBuf,
    slots: RwLock<Vec<Slot>>,
    /// Counts reads, to tell which open sealed file was read longest ago.
    reads: AtomicU64,
}

struct Slot {
    file: Option<Arc<File>>,
    last_read: AtomicU64,
}

impl Slot {
    fn new(file: Option<Arc<File>>) -> Self {
        Self { file, last_read: AtomicU64::new(0) }
    }
}

/// Sealed segments whose files stay open between reads: few, so that at the smallest open-file
/// limit `serve` accepts (`net::fds::MIN_LIMIT`) the journal, the store and a full share of
/// connections still fit. Opening a segment again costs one system call.
const OPEN_SEALED: usize = 16;

fn segment_path(dir: &Path, no: u32) -> PathBuf {
    dir.join(segment_file(no))
}

pub(super) fn segment_file(no: u32) -> String {
    format!("{no:08}.log")
}

/// The numbers of the segments in `dir`, in order. Only names the journal gives count: `0.log`
/// beside `00000000.log` is not a second segment 0.
pub(super) fn segment_numbers(dir: &Path) -> Result<Vec<u32>, StoreError> {
    let mut numbers: Vec<u32> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name();
            let name = name.to_str()?;
            let no: u32 = name.strip_suffix(".log")?.parse().ok()?;
            (segment_file(no) == name).then_some(no)
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

impl Journal {
    /// Opens the journal under `dir` and hands every frame from `from` onwards to `visit`, in
    /// order. To serve, a torn tail of the last segment is truncated away; to inspect, it is
    /// left and reported by [`Self::torn_tail`].
    pub fn open(
        dir: &Path,
        from: Loc,
        options: JournalOptions,
        access: Access,
        mut visit: impl FnMut(Loc, &[u8]) -> Result<(), StoreError>,
    ) -> Result<Self, StoreError> {
        let serve = access == Access::Serve;
        if serve {
            std::fs::create_dir_all(dir).map_err(io)?;
            let _ = std::fs::remove_file(dir.join(SPARE_TMP));
        }
        let mut numbers = segment_numbers(dir)?;
        if numbers.is_empty() && !serve {
            return Err(corrupt(format!("no journal segments in {}", dir.display())));
        }
        if numbers.is_empty() {
            File::create(segment_path(dir, 0)).map_err(io)?;
            sync_dir(dir).map_err(io)?;
            numbers.push(0);
        }
        if let Some((missing, _)) = numbers.iter().enumerate().find(|(i, n)| **n as usize != *i) {
            return Err(corrupt(format!(
                "journal segment {missing} ({}) is missing: segments are numbered 0, 1, 2, ... without gaps",
                segment_file(missing as u32)
            )));
        }
        let last = *numbers.last().unwrap_or(&0);
        let (from_seg, from_off) = split(from);
        if from_seg > last {
            return Err(corrupt("the index snapshot is ahead of the journal"));
        }
        let mut slots = Vec::with_capacity(numbers.len());
        let mut active_len = 0;
        // The batch that ends where the scan starts (a snapshot covers whole batches).
        let mut last_batch = None;
        let mut torn = None;
        for &no in &numbers {
            let path = segment_path(dir, no);
            let file = File::open(&path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            if no == from_seg && from_off > size {
                // The segment was cut back by hand past where the snapshot ends.
                return Err(corrupt("the index snapshot is ahead of the journal"));
            }
            if no == from_seg && from_off >= MARKER_FRAME as u64 {
                last_batch = marker_at(&file, from_off - MARKER_FRAME as u64)?;
            }
            if no >= from_seg {
                let start = if no == from_seg { from_off } else { 0 };
                let good = scan(&file, no, start, size, &mut last_batch, &mut visit)?;
                if good < size {
                    if no != last {
                        return Err(corrupt(format!("segment {no} is damaged at byte {good}")));
                    }
                    if let Some((at, later)) = later_batch(&file, good, size)? {
                        return Err(corrupt(format!(
                            "segment {no} is damaged at byte {good}: batch {later}, at byte {at}, was written \
                             after the damaged one was durable, so this is not a torn write; nothing was cut"
                        )));
                    }
                    let written = torn_at(&file, good, size)?;
                    if !serve {
                        // Unused prepared zeros are no tear: a segment is prepared that way.
                        torn = written.then_some(TornTail { segment: no, at: good, bytes: size - good });
                    } else {
                        if written {
                            tracing::warn!(segment = no, at = good, "cut a torn write off the journal");
                        }
                        // The unused zeros go too: the next segment brings its own.
                        let f = OpenOptions::new().write(true).open(&path).map_err(io)?;
                        f.set_len(good).map_err(io)?;
                        f.sync_all().map_err(io)?;
                    }
                }
                if no == last {
                    active_len = good;
                }
            } else if no == last {
                active_len = size;
            }
            // A sealed segment's file is opened again when it is read.
            slots.push(Slot::new((no == last).then(|| Arc::new(file))));
        }
        let active = OpenOptions::new().write(serve).read(!serve).open(segment_path(dir, last)).map_err(io)?;
        Ok(Self {
            dir: dir.to_owned(),
            active,
            active_no: last,
            active_len,
            active_room: active_len,
            readers: Arc::new(Segments { dir: dir.to_owned(), slots: RwLock::new(slots), reads: AtomicU64::new(0) }),
            spare: if serve { Spare::new(dir, options.preallocate_bytes) } else { Spare::none(dir) },
            next_batch: last_batch.map_or(0, |n| n + 1),
            torn,
            broken: false,
            access,
        })
    }

    /// The torn write an inspection found at the end of the journal, if any.
    pub fn torn_tail(&self) -> Option<TornTail> {
        self.torn
    }

    /// Where the next frame will go.
    pub fn end(&self) -> Loc {
        loc(self.active_no, self.active_len)
    }

    /// Where a batch of `len` bytes will start. Moves to a prepared segment when the batch
    /// (and its marker) would outgrow the active one's zeroed space; without one ready it
    /// appends (slower, still durable), up to a hard size where it must start a new segment
    /// anyway.
    pub fn place(&mut self, len: usize) -> Result<Loc, StoreError> {
        // Placing can make a segment: an inspection must leave the journal as it found it.
        if self.access == Access::Inspect {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the journal is open to inspect only",
            )));
        }
        self.writable()?;
        let end = self.active_len + (len + MARKER_FRAME) as u64;
        if end <= self.active_room {
            return Ok(self.end());
        }
        if let Some(spare) = self.spare.take() {
            self.roll(Some(spare))?;
            self.spare.ask();
        } else if self.active_len > 0 && end > SEGMENT_MAX {
            self.roll(None)?;
        }
        Ok(self.end())
    }

    pub fn writable(&self) -> Result<(), StoreError> {
        if self.broken {
            return Err(io(std::io::Error::other("the journal could not cut off a failed write; restart to recover")));
        }
        Ok(())
    }

    /// Seals the active segment and makes the next one active: the prepared `spare`, or a new
    /// empty file. An empty active segment is replaced rather than left behind.
    fn roll(&mut self, spare: Option<PathBuf>) -> Result<(), StoreError> {
        let no = if self.active_len == 0 { self.active_no } else { self.active_no + 1 };
        if self.active_len > 0 && self.active_room > self.active_len {
            self.active.set_len(self.active_len).map_err(io)?;
            self.active.sync_all().map_err(io)?;
        }
        let path = segment_path(&self.dir, no);
        match spare {
            Some(spare) => std::fs::rename(spare, &path).map_err(io)?,
            None if no == self.active_no => {}
            None => {
                OpenOptions::new().create_new(true).write(true).open(&path).map_err(io)?;
            }
        }
        sync_dir(&self.dir).map_err(io)?;
        let file = OpenOptions::new().write(true).open(&path).map_err(io)?;
        let room = file.metadata().map_err(io)?.len();
        let reader = Arc::new(File::open(&path).map_err(io)?);
        {
            let mut slots = self.readers.slots.write().unwrap_or_else(|e| e.into_inner());
            match slots.get_mut(no as usize) {
                Some(slot) => slot.file = Some(reader),
                None => slots.push(Slot::new(Some(reader))),
            }
            // The segment just sealed keeps its file until others are read after it.
            close_oldest(&mut slots);
        }
        self.active = file;
        self.active_no = no;
        self.active_len = 0;
        self.active_room = room;
        Ok(())
    }

    /// Writes a batch of frames placed by `place`, closed by its marker, and makes it durable.
    /// On failure the segment is cut back, so a half-written batch never sits in front of the
    /// next one. `buf` comes back as it was given.
    pub fn write_durably(&mut self, buf: &mut Vec<u8>) -> Result<(), StoreError> {
        self.writable()?;
        let given = buf.len();
        put_marker(buf, self.next_batch);
        self.next_batch += 1;
        let len = buf.len();
        // The write runs on to the end of its last page when that page is prepared zeros: a
        // write ending inside a page the cache does not hold (the spare was zeroed past the
        // cache) makes the kernel read that page from disk first, inside the batch. The next
        // batch then starts in a page the cache holds. The padding is the zeros already there.
        let end = self.active_len + len as u64;
        let padded = end.next_multiple_of(PAGE).min(self.active_room);
        if padded > end {
            buf.resize(len + (padded - end) as usize, 0);
        }
        let result = self.active.write_all_at(buf, self.active_len).and_then(|()| self.active.sync_data());
        buf.truncate(given);
        match result {
            Ok(()) => {
                self.active_len += len as u64;
                self.active_room = self.active_room.max(self.active_len);
                Ok(())
            }
            Err(e) => {
                // What the failed write left past the end, whole or in part, goes before anything
                // else is written, and durably: left there, the next batch would land in front of
                // it, or a roll would seal it inside a segment, which every start then refuses
                // as damaged.
                match self.active.set_len(self.active_len).and_then(|()| self.active.sync_all()) {
                    Ok(()) => self.active_room = self.active_len,
                    Err(cut) => {
                        tracing::error!(error = %cut, "could not cut a failed write off the journal; nothing more is written until a restart");
                        self.broken = true;
                    }
                }
                Err(io(e))
            }
        }
    }

    pub fn segments(&self) -> Arc<Segments> {
        Arc::clone(&self.readers)
    }

    /// Every frame from the start, for `callgate check`.
    pub fn scan_all(&self, mut visit: impl FnMut(Loc, &[u8]) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let mut last_batch = None;
        for no in 0..=self.active_no {
            let file = self.readers.file(no)?;
            let size = if no == self.active_no { self.active_len } else { file.metadata().map_err(io)?.len() };
            let good = scan(&file, no, 0, size, &mut last_batch, &mut visit)?;
            if good < size {
                return Err(corrupt(format!("segment {no} is damaged at byte {good}")));
            }
        }
        Ok(())
    }
}

impl Segments {
    /// The payload of the frame at `at`.
    pub fn read(&self, at: Loc) -> Result<Vec<u8>, StoreError> {
        let (seg, off) = split(at);
        let file = self.file(seg)?;
        let mut head = [0u8; FRAME_HEADER];
        file.read_exact_at(&mut head, off).map_err(io)?;
        let (len, crc) = parse_header(&head);
        if len > FRAME_MAX {
            return Err(corrupt(format!("frame at {seg}:{off} claims {len} bytes")));
        }
        let mut payload = vec![0u8; len as usize];
        file.read_exact_at(&mut payload, off + FRAME_HEADER as u64).map_err(io)?;
        if crc32fast::hash(&payload) != crc {
            return Err(corrupt(format!("frame at {seg}:{off} fails its checksum")));
        }
        Ok(payload)
    }

    /// Segment `seg`'s file, opened again if it was closed; opening one closes the sealed file
    /// read longest ago once more than [`OPEN_SEALED`] are open. A reader still holding a
    /// closed one keeps it until done.
    fn file(&self, seg: u32) -> Result<Arc<File>, StoreError> {
        let tick = self.reads.fetch_add(1, Ordering::Relaxed);
        {
            let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
            let slot = slots.get(seg as usize).ok_or_else(|| corrupt(format!("no segment {seg}")))?;
            if let Some(file) = &slot.file {
                slot.last_read.store(tick, Ordering::Relaxed);
                return Ok(Arc::clone(file));
            }
        }
        let opened = Arc::new(File::open(segment_path(&self.dir, seg)).map_err(io)?);
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        let slot = &mut slots[seg as usize];
        slot.last_read.store(tick, Ordering::Relaxed);
        let file = Arc::clone(slot.file.get_or_insert(opened));
        close_oldest(&mut slots);
        Ok(file)
    }
}

/// Closes the file of the sealed segment read longest ago while more than [`OPEN_SEALED`] are
/// open. The last slot is the active segment's, always open.
fn close_oldest(slots: &mut [Slot]) {
    let sealed = slots.len().saturating_sub(1);
    let open: Vec<usize> = (0..sealed).filter(|i| slots[*i].file.is_some()).collect();
    if open.len() > OPEN_SEALED {
        if let Some(oldest) = open.into_iter().min_by_key(|i| slots[*i].last_read.load(Ordering::Relaxed)) {
            slots[oldest].file = None;
        }
    }
}

pub(super) fn parse_header(head: &[u8; FRAME_HEADER]) -> (u32, u32) {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (len, crc)
}

/// Visits the good frames of one segment between `start` and `size`, and notes the number of
/// the last batch marker passed in `last_batch`; returns where the good frames end.
fn scan(
    file: &File,
    no: u32,
    start: u64,
    size: u64,
    last_batch: &mut Option<u64>,
    visit: &mut impl FnMut(Loc, &[u8]) -> Result<(), StoreError>,
) -> Result<u64, StoreError> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    std::io::Seek::seek(&mut reader, std::io::SeekFrom::Start(start)).map_err(io)?;
    let mut at = start;
    let mut payload = Vec::new();
    while at + FRAME_HEADER as u64 <= size {
        let mut head = [0u8; FRAME_HEADER];
        reader.read_exact(&mut head).map_err(io)?;
        let (len, crc) = parse_header(&head);
        let end = at + FRAME_HEADER as u64 + u64::from(len);
        // No frame is empty: a zero header is prepared space, not data.
        if len == 0 || len > FRAME_MAX || end > size {
            break;
        }
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload).map_err(io)?;
        if crc32fast::hash(&payload) != crc {
            break;
        }
        match marker_of(&payload) {
            Some(m) => *last_batch = Some(m.no),
            None => visit(loc(no, at), &payload)?,
        }
        at = end;
    }
    Ok(at)
}

/// The batch number of a good marker frame at `at`, if one is there.
fn marker_at(file: &File, at: u64) -> Result<Option<u64>, StoreError> {
    let mut bytes = [0u8; MARKER_FRAME];
    file.read_exact_at(&mut bytes, at).map_err(io)?;
    Ok(parse_marker_frame(&bytes).map(|m| m.no))
}

fn parse_marker_frame(bytes: &[u8]) -> Option<Marker> {
    let head: &[u8; FRAME_HEADER] = bytes.get(..FRAME_HEADER)?.try_into().ok()?;
    let (len, crc) = parse_header(head);
    let payload = bytes.get(FRAME_HEADER..MARKER_FRAME)?;
    (len as usize == MARKER_PAYLOAD && crc32fast::hash(payload) == crc).then(|| marker_of(payload)).flatten()
}

/// Looks past a bad frame at `good` for proof that its batch had been made durable: the
/// marker of a batch that starts after `good`. The writer starts a batch only once everything
/// before it is durable, so such a batch means the bad frame was acknowledged. The marker of
/// the bad frame's own batch proves nothing: it went out in the same write as the bad frame,
/// and a crash may have kept one page of that write and lost another.
///
/// The search reads to the end of the segment: a record may hold any bytes (a form body of
/// zeros, say), so no run of zeros says that no batch lies beyond it. After a crash that is the
/// segment's unused prepared space, read once at start-up (64 MiB at most by default), and
/// only the places holding a marker's length are looked at closely.
/// Returns the proving marker's offset and batch number.
fn later_batch(file: &File, good: u64, size: u64) -> Result<Option<(u64, u64)>, StoreError> {
    const WINDOW: u64 = 1 << 20;
    let header = (MARKER_PAYLOAD as u32).to_le_bytes();
    let finder = memchr::memmem::Finder::new(&header);
    let mut pos = good;
    let mut buf = Vec::new();
    while pos < size {
        // Each window reads on by a marker's length, so that a marker across its end is whole.
        let own_end = (pos + WINDOW).min(size);
        let end = (own_end + MARKER_FRAME as u64).min(size);
        buf.resize((end - pos) as usize, 0);
        file.read_exact_at(&mut buf, pos).map_err(io)?;
        let own = (own_end - pos) as usize;
        for i in finder.find_iter(&buf).take_while(|i| *i < own) {
            if let Some(m) = buf.get(i..i + MARKER_FRAME).and_then(parse_marker_frame) {
                let at = pos + i as u64;
                if at.checked_sub(m.bytes).is_some_and(|starts| starts > good) {
                    return Ok(Some((at, m.no)));
                }
            }
        }
        pos = own_end;
    }
    Ok(None)
}

/// Whether anything but zeros follows the good frames (in the part a torn write can reach).
fn torn_at(file: &File, good: u64, size: u64) -> Result<bool, StoreError> {
    let mut probe = vec![0u8; (size - good).min(1 << 20) as usize];
    file.read_exact_at(&mut probe, good).map_err(io)?;
    Ok(probe.iter().any(|b| *b != 0))
}

/// The page size the padding of a batch aims at (the common one; a larger page only means
/// some reads come back).
const PAGE: u64 = 4096;
const PREPARE_FLUSH_BYTES: u64 = 4 << 20;
const SPARE_TMP: &str = "next.tmp";
const SPARE_READY: &str = "next.prep";

/// The next segment, zero-filled and synced by a helper thread while the active one fills.
/// `next.prep` exists only once complete, so one found at open is ready to use.
struct Spare {
    dir: PathBuf,
    bytes: u64,
    shared: Arc<SpareShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct SpareShared {
    state: Mutex<SpareState>,
    wake: Condvar,
}

#[derive(Default)]
struct SpareState {
    /// `next.prep` is complete and of the configured size.
    ready: bool,
    wanted: bool,
    stop: bool,
    /// When preparing last failed: not tried again for [`SPARE_RETRY`], so that a full disk
    /// is not filled again (and logged again) by every batch while the journal appends.
    failed_at: Option<std::time::Instant>,
}

const SPARE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

impl Spare {
    /// Takes over a spare prepared before a restart; one of another size (the setting
    /// changed) is removed.
    fn new(dir: &Path, bytes: u64) -> Self {
        let path = dir.join(SPARE_READY);
        let ready = match std::fs::metadata(&path) {
            Ok(m) if bytes > 0 && m.len() == bytes => true,
            Ok(_) => {
                let _ = std::fs::remove_file(&path);
                false
            }
            Err(_) => false,
        };
        let shared =
            SpareShared { state: Mutex::new(SpareState { ready, ..Default::default() }), ..Default::default() };
        Self { dir: dir.to_owned(), bytes, shared: Arc::new(shared), thread: None }
    }

    /// No spare, and the one on disk (if any) left alone: for a journal only looked at.
    fn none(dir: &Path) -> Self {
        Self { dir: dir.to_owned(), bytes: 0, shared: Arc::default(), thread: None }
    }

    /// The prepared file, if one is ready; else asks for one (once). Whoever takes it calls
    /// `ask` once it has been moved into place.
    fn take(&mut self) -> Option<PathBuf> {
        if self.bytes == 0 {
            return None;
        }
        let mut st = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if std::mem::take(&mut st.ready) {
            return Some(self.dir.join(SPARE_READY));
        }
        if st.failed_at.is_some_and(|at| at.elapsed() < SPARE_RETRY) {
            return None;
        }
        let asked = st.wanted;
        drop(st);
        if !asked {
            self.ask();
        }
        None
    }

    fn ask(&mut self) {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).wanted = true;
        self.shared.wake.notify_one();
        if self.thread.is_none() {
            let (dir, bytes, shared) = (self.dir.clone(), self.bytes, Arc::clone(&self.shared));
            self.thread = std::thread::Builder::new()
                .name("callgate-prealloc".into())
                .spawn(move || prepare_loop(&dir, bytes, &shared))
                .map_err(|e| tracing::warn!(error = %e, "no segment preparer; the journal will append"))
                .ok();
        }
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner()).stop = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn prepare_loop(dir: &Path, bytes: u64, shared: &SpareShared) {
    loop {
        {
            let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            while !st.wanted && !st.stop {
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            if st.stop {
                return;
            }
            if st.ready {
                st.wanted = false;
                continue;
            }
        }
        let prepared = prepare(dir, bytes, shared);
        let mut st = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        // Asked again only by the next batch that finds no spare.
        st.wanted = false;
        match prepared {
            Ok(true) => {
                st.ready = true;
                st.failed_at = None;
            }
            Ok(false) => return,
            Err(e) => {
                // The half-made spare would hold space the journal itself needs.
                let _ = std::fs::remove_file(dir.join(SPARE_TMP));
                st.failed_at = Some(std::time::Instant::now());
                tracing::warn!(error = %e, retry_in_s = SPARE_RETRY.as_secs(), "could not prepare the next journal segment; appending meanwhile");
            }
        }
    }
}

/// What direct writes must be aligned to (offset, length and memory): the largest logical block
/// size in common use.
const DIRECT_ALIGN: usize = 4096;
const ZERO_CHUNK: usize = 1 << 20;
#[cfg(target_os = "linux")]
const DIRECT_WRITES: Option<i32> = Some(libc::O_DIRECT);
#[cfg(not(target_os = "linux"))]
const DIRECT_WRITES: Option<i32> = None;

/// Zero-fills and syncs the spare, then puts it in place; false if asked to stop half-way.
fn prepare(dir: &Path, bytes: u64, shared: &SpareShared) -> std::io::Result<bool> {
    let tmp = dir.join(SPARE_TMP);
    // The zeros go straight to the disk where the filesystem allows it: through the page cache
    // every MiB was a kernel copy on the cores that serve webhooks (9 % of one under load), and
    // its flushes queued ahead of the batches' syncs. Any system, filesystem or size that
    // refuses direct writes gets the buffered ones.
    if let Some(flag) = DIRECT_WRITES.filter(|_| bytes.is_multiple_of(DIRECT_ALIGN as u64)) {
        let mut direct = OpenOptions::new();
        direct.create(true).write(true).truncate(true).custom_flags(flag);
        if let Ok(f) = direct.open(&tmp) {
            match zero_fill(f, &tmp, bytes, shared) {
                Ok(done) => return finish(dir, &tmp, done),
                Err(e) => tracing::debug!(error = %e, "direct writes refused; zeroing through the page cache"),
            }
        }
    }
    let f = OpenOptions::new().create(true).write(true).truncate(true).open(&tmp)?;
    let done = zero_fill(f, &tmp, bytes, shared)?;
    finish(dir, &tmp, done)
}

fn finish(dir: &Path, tmp: &Path, done: bool) -> std::io::Result<bool> {
    if done {
        std::fs::rename(tmp, dir.join(SPARE_READY))?;
        sync_dir(dir)?;
    }
    Ok(done)
}

/// Writes `bytes` zeros to `f` and syncs it; false (and the file removed) if asked to stop.
fn zero_fill(mut f: File, tmp: &Path, bytes: u64, shared: &SpareShared) -> std::io::Result<bool> {
    // Aligned for direct writes without unsafe code: a window of a slightly larger buffer.
    let buf = vec![0u8; ZERO_CHUNK + DIRECT_ALIGN];
    let start = buf.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
    let zeros = &buf[start..start + ZERO_CHUNK];
    let mut left = bytes;
    while left > 0 {
        if shared.state.lock().unwrap_or_else(|e| e.into_inner()).stop {
            drop(f);
            let _ = std::fs::remove_file(tmp);
            return Ok(false);
        }
        let n = left.min(zeros.len() as u64) as usize;
        f.write_all(&zeros[..n])?;
        left -= n as u64;
        // Flushed a few MiB at a time: one flush of the whole segment held the writer's
        // fdatasync behind it for tens of milliseconds.
        if (bytes - left).is_multiple_of(PREPARE_FLUSH_BYTES) {
            f.sync_data()?;
        }
        // Paced: zeroing runs on the cores that serve webhooks, and done in one go it stalled
        // them for as long.
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    f.sync_all()?;
    Ok(true)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: JournalOptions = JournalOptions { preallocate_bytes: 4096 };

    #[test]
    fn a_spare_that_cannot_be_made_is_not_asked_for_again_by_every_batch() {
        let dir = tempfile::tempdir().unwrap();
        // Where the spare is zero-filled stands a directory: preparing fails, as on a full disk.
        std::fs::create_dir(dir.path().join(SPARE_TMP)).unwrap();
        let mut spare = Spare::new(dir.path(), 4096);
        assert_eq!(spare.take(), None);
        let failed = || spare.shared.state.lock().unwrap().failed_at.is_some();
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !failed() {
            assert!(std::time::Instant::now() < until, "the preparer never failed");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(spare.take(), None);
        let st = spare.shared.state.lock().unwrap();
        assert!(!st.wanted && !st.ready, "not asked again within the retry interval");
    }

    fn collect(dir: &Path, from: Loc) -> (Journal, Vec<(Loc, Vec<u8>)>) {
        collect_with(dir, from, SMALL)
    }

    fn collect_with(dir: &Path, from: Loc, options: JournalOptions) -> (Journal, Vec<(Loc, Vec<u8>)>) {
        let mut seen = Vec::new();
        let j = Journal::open(dir, from, options, Access::Serve, |l, p| {
            seen.push((l, p.to_vec()));
            Ok(())
        })
        .unwrap();
        (j, seen)
    }

    #[test]
    fn frames_survive_a_reopen_and_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, seen) = collect(dir.path(), 0);
        assert!(seen.is_empty());
        let mut buf = Vec::new();
        frame(&mut buf, |b| b.extend_from_slice(b"first"));
        frame(&mut buf, |b| b.extend_from_slice(b"second"));
        let at = j.place(buf.len()).unwrap();
        assert_eq!(at, 0);
        j.write_durably(&mut buf).unwrap();
        assert_eq!(j.segments().read(13).unwrap(), b"second");
        drop(j);

        // A crash in the middle of the next write leaves half a frame.
        let path = segment_path(dir.path(), 0);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut torn = Vec::new();
        frame(&mut torn, |b| b.extend_from_slice(b"third, never acknowledged"));
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);

        let (j, seen) = collect(dir.path(), 0);
        assert_eq!(seen, vec![(0, b"first".to_vec()), (13, b"second".to_vec())]);
        let batch = (27 + MARKER_FRAME) as u64;
        assert_eq!(j.end(), batch);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), batch);
        // Scanning from a later point sees only what follows it.
        drop(j);
        let (_, seen) = collect(dir.path(), 13);
        assert_eq!(seen, vec![(13, b"second".to_vec())]);
    }

    #[test]
    fn a_failed_write_that_cannot_be_cut_off_stops_writes_until_a_restart_cuts_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = collect(dir.path(), 0);
        let mut buf = Vec::new();
        frame(&mut buf, |b| b.extend_from_slice(b"kept"));
        j.place(buf.len()).unwrap();
        j.write_durably(&mut buf).unwrap();
        let end = j.end();
        // The next write fails after part of it landed, and the file cannot be cut back (a
        // descriptor that refuses both, as a failing disk would).
        let path = segment_path(dir.path(), 0);
        let writable = std::mem::replace(&mut j.active, File::open(&path).unwrap());
        writable.write_all_at(b"half a batch", end).unwrap();
        let mut next = Vec::new();
        frame(&mut next, |b| b.extend_from_slice(b"refused"));
        j.place(next.len()).unwrap();
        assert!(j.write_durably(&mut next).is_err());
        // The disk takes writes again; the journal does not, until a restart.
        j.active = writable;
        assert!(j.place(next.len()).is_err(), "placed over what the failed write left");
        assert!(j.write_durably(&mut next).is_err(), "written over what the failed write left");
        drop(j);
        let (mut j, seen) = collect(dir.path(), 0);
        assert_eq!(seen, vec![(0, b"kept".to_vec())]);
        assert_eq!(j.end(), end);
        j.place(next.len()).unwrap();
        j.write_durably(&mut next).unwrap();
    }

    #[test]
    fn damage_before_the_tail_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = collect(dir.path(), 0);
        let mut buf = Vec::new();
        frame(&mut buf, |b| b.extend_from_slice(b"one"));
        j.place(buf.len()).unwrap();
        j.write_durably(&mut buf).unwrap();
        drop(j);
        // A later segment exists, so segment 0 is not the tail.
        File::create(segment_path(dir.path(), 1)).unwrap();
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = Journal::open(dir.path(), 0, SMALL, Access::Serve, |_, _| Ok(())).err().expect("damage is reported");
        assert!(err.to_string().contains("segment 0 is damaged"), "{err}");
    }

    fn one(j: &mut Journal, payload: &[u8]) -> Loc {
        let mut buf = Vec::new();
        frame(&mut buf, |b| b.extend_from_slice(payload));
        let at = j.place(buf.len()).unwrap();
        j.write_durably(&mut buf).unwrap();
        at
    }

    fn wait_for_spare(j: &Journal) {
        for _ in 0..500 {
            if j.spare.shared.state.lock().unwrap().ready {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("the spare segment was never prepared");
    }

    #[test]
    fn batches_move_into_prepared_segments_and_their_zeros_are_not_frames() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = collect(dir.path(), 0);
        // No spare yet: the first batch appends, and asks for one.
        assert_eq!(one(&mut j, b"first"), loc(0, 0));
        wait_for_spare(&j);
        let b = one(&mut j, b"second");
        assert_eq!(b, loc(1, 0), "the batch went into the prepared segment");
        let seg1 = segment_path(dir.path(), 1);
        assert_eq!(std::fs::metadata(&seg1).unwrap().len(), 4096, "written inside the zeroed space");
        let m = MARKER_FRAME as u64;
        assert_eq!(std::fs::metadata(segment_path(dir.path(), 0)).unwrap().len(), 13 + m, "segment 0 sealed");
        let c = one(&mut j, b"third");
        assert_eq!(c, loc(1, 14 + m));
        assert_eq!(j.segments().read(c).unwrap(), b"third");
        drop(j);

        let (j, seen) = collect(dir.path(), 0);
        assert_eq!(seen, vec![(loc(0, 0), b"first".to_vec()), (loc(1, 0), b"second".to_vec()), (c, b"third".to_vec())]);
        assert_eq!(j.end(), loc(1, 27 + 2 * m));
        assert_eq!(std::fs::metadata(&seg1).unwrap().len(), 27 + 2 * m, "unused zeros released at open");
    }

    #[test]
    fn a_batch_in_prepared_space_runs_on_to_its_page_end_with_zeros_and_the_next_follows_its_frames() {
        let dir = tempfile::tempdir().unwrap();
        let opts = JournalOptions { preallocate_bytes: 3 * PAGE };
        let mut j = Journal::open(dir.path(), 0, opts, Access::Serve, |_, _| Ok(())).unwrap();
        one(&mut j, b"first");
        wait_for_spare(&j);
        let mut buf = Vec::new();
        frame(&mut buf, |b| b.extend_from_slice(&[7u8; 5000]));
        let frames = buf.clone();
        assert_eq!(j.place(buf.len()).unwrap(), loc(1, 0));
        j.write_durably(&mut buf).unwrap();
        assert_eq!(buf, frames, "the caller's frames come back without the padding");
        let seg1 = segment_path(dir.path(), 1);
        let bytes = std::fs::read(&seg1).unwrap();
        assert_eq!(bytes.len() as u64, 3 * PAGE, "the padding stays inside the prepared space");
        assert_eq!(&bytes[..frames.len()], &frames[..]);
        let marked = frames.len() + MARKER_FRAME;
        let marker = parse_marker_frame(&bytes[frames.len()..marked]);
        assert_eq!(
            marker,
            Some(Marker { no: 1, bytes: frames.len() as u64, frames: 1 }),
            "the batch's marker follows it"
        );
        assert!(bytes[marked..].iter().all(|b| *b == 0));
        let next = one(&mut j, b"next");
        assert_eq!(next, loc(1, marked as u64), "the next batch starts after the marker, not the padding");
        drop(j);
        let mut seen = Vec::new();
        Journal::open(dir.path(), 0, opts, Access::Serve, |l, p| {
            seen.push((l, p.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(loc(0, 0), 5), (loc(1, 0), 5000), (next, 4)]);
    }

    #[test]
    fn a_torn_write_inside_prepared_space_is_cut_and_never_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = collect(dir.path(), 0);
        one(&mut j, b"first");
        wait_for_spare(&j);
        let b = one(&mut j, b"second");
        wait_for_spare(&j);
        drop(j);
        // A crash mid-batch: the first frame of the batch torn, a later one fully on disk.
        let seg1 = segment_path(dir.path(), 1);
        let mut batch = Vec::new();
        frame(&mut batch, |b| b.extend_from_slice(b"torn, never acknowledged"));
        frame(&mut batch, |b| b.extend_from_slice(b"whole, never acknowledged"));
        batch[10] ^= 0xff;
        let f = OpenOptions::new().write(true).open(&seg1).unwrap();
        f.write_all_at(&batch, 14).unwrap();
        drop(f);

        // Inspected, the tear is reported and left, and so is everything else on disk.
        let files = |d: &Path| {
            let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| e.unwrap().path())
                .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
                .collect();
            v.sort();
            v
        };
        let before = files(dir.path());
        assert!(dir.path().join(SPARE_READY).exists(), "a prepared segment waits");
        let mut seen = Vec::new();
        let mut inspected = Journal::open(dir.path(), 0, SMALL, Access::Inspect, |l, p| {
            seen.push((l, p.to_vec()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(loc(0, 0), b"first".to_vec()), (b, b"second".to_vec())]);
        let size = std::fs::metadata(&seg1).unwrap().len();
        assert_eq!(inspected.torn_tail(), Some(TornTail { segment: 1, at: 14, bytes: size - 14 }));
        let mut buf = Vec::new();
        frame(&mut buf, |b| b.extend_from_slice(b"refused"));
        assert!(inspected.place(buf.len()).is_err(), "an inspection places nothing");
        assert!(inspected.write_durably(&mut buf).is_err(), "an inspection writes nothing");
        drop(inspected);
        assert_eq!(files(dir.path()), before);

        let (mut j, seen) = collect(dir.path(), 0);
        assert_eq!(seen, vec![(loc(0, 0), b"first".to_vec()), (b, b"second".to_vec())]);
        assert_eq!(j.torn_tail(), None, "served, the tear is cut");
        assert_eq!(std::fs::metadata(&seg1).unwrap().len(), 14);
        let e = one(&mut j, b"after");
        drop(j);
        let (_, seen) = collect(dir.path(), 0);
        assert_eq!(
            seen,
            vec![(loc(0, 0), b"first".to_vec()), (b, b"second".to_vec()), (e, b"after".to_vec())],
            "nothing of the torn batch is read back"
        );
    }

    const APPEND: JournalOptions = JournalOptions { preallocate_bytes: 0 };

    /// Writes one batch per entry of `batches` (each a list of payloads); their locations.
    fn batches(j: &mut Journal, batches: &[&[&[u8]]]) -> Vec<Vec<Loc>> {
        let mut locs = Vec::new();
        for payloads in batches {
            let mut buf = Vec::new();
            let mut offs = Vec::new();
            for p in *payloads {
                offs.push(buf.len() as u64);
                frame(&mut buf, |b| b.extend_from_slice(p));
            }
            let at = j.place(buf.len()).unwrap();
            j.write_durably(&mut buf).unwrap();
            locs.push(offs.iter().map(|o| at + o).collect());
        }
        locs
    }

    fn flip(path: &Path, at: u64) {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at as usize] ^= 0x20;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn damage_in_an_acknowledged_batch_of_the_last_segment_stops_the_open_and_cuts_nothing() {
        // In the first batch (no marker before it), in a middle one, and in the one before last.
        for (batch, frame_no) in [(0usize, 0usize), (1, 1), (2, 0)] {
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::open(dir.path(), 0, APPEND, Access::Serve, |_, _| Ok(())).unwrap();
            let locs = batches(&mut j, &[&[b"a0"], &[b"b0", b"b1", b"b2"], &[b"c0"], &[b"d0"]]);
            drop(j);
            let path = segment_path(dir.path(), 0);
            let damaged = locs[batch][frame_no];
            flip(&path, damaged + FRAME_HEADER as u64);
            let before = std::fs::read(&path).unwrap();
            let err =
                Journal::open(dir.path(), 0, APPEND, Access::Serve, |_, _| Ok(())).err().expect("damage is reported");
            let msg = err.to_string();
            assert!(msg.contains(&format!("segment 0 is damaged at byte {damaged}")), "{msg}");
            assert!(msg.contains("not a torn write; nothing was cut"), "{msg}");
            assert_eq!(std::fs::read(&path).unwrap(), before, "batch {batch}: the journal was changed");
        }
    }

    #[test]
    fn a_snapshot_past_the_end_of_a_segment_cut_back_by_hand_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 0, APPEND, Access::Serve, |_, _| Ok(())).unwrap();
        let locs = batches(&mut j, &[&[b"a0"], &[b"b0"]]);
        let covered = j.end();
        drop(j);
        OpenOptions::new().write(true).open(segment_path(dir.path(), 0)).unwrap().set_len(locs[1][0]).unwrap();
        let err = Journal::open(dir.path(), covered, APPEND, Access::Serve, |_, _| Ok(())).err().expect("refused");
        assert!(err.to_string().contains("ahead of the journal"), "{err}");
        // Read from the start instead (as the event log does then), what is left is whole.
        let (j, seen) = collect_with(dir.path(), 0, APPEND);
        assert_eq!(seen, vec![(locs[0][0], b"a0".to_vec())]);
        assert_eq!(j.end(), locs[1][0]);
    }

    /// A record may hold a long run of zeros (a form body of NULs is stored as received): the
    /// search for a later batch must not take it for the end of what was written.
    #[test]
    fn damage_before_a_record_of_zeros_is_still_told_from_a_torn_write() {
        // Appended, and in prepared space with its unused zeros after the last batch.
        for prepared in [false, true] {
            let opts = if prepared { JournalOptions { preallocate_bytes: 1 << 20 } } else { APPEND };
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::open(dir.path(), 0, opts, Access::Serve, |_, _| Ok(())).unwrap();
            batches(&mut j, &[&[b"a0"]]);
            if prepared {
                wait_for_spare(&j);
            }
            let zeros = vec![0u8; 200_000];
            let locs = batches(&mut j, &[&[b"b0", &zeros], &[b"c0"]]);
            drop(j);
            let (seg, at) = split(locs[0][0]);
            assert_eq!(split(locs[1][0]).0, seg, "both batches in the last segment");
            let path = segment_path(dir.path(), seg);
            // In b0, the frame before the zeros: c0's batch, after them, proves it.
            flip(&path, at + FRAME_HEADER as u64);
            let before = std::fs::read(&path).unwrap();
            let err =
                Journal::open(dir.path(), 0, opts, Access::Serve, |_, _| Ok(())).err().expect("damage is reported");
            assert!(err.to_string().contains("not a torn write"), "{err}");
            assert_eq!(std::fs::read(&path).unwrap(), before);
        }
    }

    #[test]
    fn a_torn_last_batch_is_cut_even_when_its_own_marker_reached_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 0, APPEND, Access::Serve, |_, _| Ok(())).unwrap();
        let locs = batches(&mut j, &[&[b"a0"], &[b"b0"]]);
        let end = j.end();
        drop(j);
        // The next batch, number 2, reached the disk but for a page in its middle: its first
        // frame and its marker are whole, the frame between them is not.
        let mut torn = Vec::new();
        frame(&mut torn, |b| b.extend_from_slice(b"c0, never acknowledged"));
        let lost = torn.len();
        frame(&mut torn, |b| b.extend_from_slice(b"c1, never acknowledged"));
        put_marker(&mut torn, 2);
        torn[lost + FRAME_HEADER + 3] = 0;
        let path = segment_path(dir.path(), 0);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&torn, end).unwrap();
        drop(f);

        let (j, seen) = collect_with(dir.path(), 0, APPEND);
        let good = end + lost as u64;
        assert_eq!(
            seen,
            vec![(locs[0][0], b"a0".to_vec()), (locs[1][0], b"b0".to_vec()), (end, b"c0, never acknowledged".to_vec())]
        );
        assert_eq!(j.end(), good);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good, "cut at the torn frame");
    }

    #[test]
    fn batch_numbers_go_on_after_a_reopen_from_the_start_or_from_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path(), 0, APPEND, Access::Serve, |_, _| Ok(())).unwrap();
        batches(&mut j, &[&[b"a0"], &[b"b0"]]);
        drop(j);
        let path = segment_path(dir.path(), 0);
        let last_marker = || {
            let bytes = std::fs::read(&path).unwrap();
            parse_marker_frame(&bytes[bytes.len() - MARKER_FRAME..]).map(|m| m.no)
        };
        assert_eq!(last_marker(), Some(1));
        let (mut j, seen) = collect_with(dir.path(), 0, APPEND);
        assert_eq!(seen.len(), 2);
        batches(&mut j, &[&[b"c0"]]);
        let covered = j.end();
        drop(j);
        assert_eq!(last_marker(), Some(2));
        // From where a snapshot ends: nothing is scanned, the marker before it is read.
        let (mut j, seen) = collect_with(dir.path(), covered, APPEND);
        assert!(seen.is_empty());
        batches(&mut j, &[&[b"d0"]]);
        drop(j);
        assert_eq!(last_marker(), Some(3));
    }

    use proptest::prelude::*;

    /// Batches of frames: payloads of 1 to 300 bytes, none starting with the marker's tag.
    fn some_batches() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
        let payload = proptest::collection::vec(any::<u8>(), 1..300).prop_map(|mut p| {
            if p[0] == MARKER_TAG {
                p[0] = 1;
            }
            p
        });
        proptest::collection::vec(proptest::collection::vec(payload, 1..5), 2..7)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Any damaged byte in a batch with another after it stops the open and changes
        /// nothing; in the last batch it is a torn write, cut off at the first bad frame with
        /// everything before it kept.
        #[test]
        fn damage_is_refused_unless_it_can_be_a_torn_last_batch(
            written in some_batches(),
            pick in any::<prop::sample::Index>(),
            xor in 1u8..,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::open(dir.path(), 0, APPEND, Access::Serve, |_, _| Ok(())).unwrap();
            let mut frames = Vec::new();
            let mut starts = Vec::new();
            for batch in &written {
                let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                starts.push(j.end());
                let locs = batches(&mut j, &[&refs]).remove(0);
                frames.extend(locs.into_iter().zip(batch.iter().cloned()));
            }
            let size = j.end();
            drop(j);
            let path = segment_path(dir.path(), 0);
            let at = pick.index(size as usize) as u64;
            let mut bytes = std::fs::read(&path).unwrap();
            bytes[at as usize] ^= xor;
            std::fs::write(&path, &bytes).unwrap();

            let last_starts = *starts.last().unwrap();
            let mut seen = Vec::new();
            let opened = Journal::open(dir.path(), 0, APPEND, Access::Serve, |l, p| {
                seen.push((l, p.to_vec()));
                Ok(())
            });
            if at < last_starts {
                let err = opened.err().map(|e| e.to_string()).unwrap_or_default();
                prop_assert!(err.contains("not a torn write"), "byte {} of {}: {}", at, size, err);
                prop_assert_eq!(std::fs::read(&path).unwrap(), bytes);
            } else {
                let j = opened.unwrap();
                // Frames are kept up to the one holding the damaged byte.
                let kept: Vec<(Loc, Vec<u8>)> =
                    frames.iter().filter(|(l, p)| l + (FRAME_HEADER + p.len()) as u64 <= at).cloned().collect();
                prop_assert_eq!(&seen, &kept);
                let cut = kept.last().map_or(last_starts, |(l, p)| (l + (FRAME_HEADER + p.len()) as u64).max(last_starts));
                prop_assert_eq!(j.end(), cut);
                prop_assert_eq!(std::fs::metadata(&path).unwrap().len(), cut);
            }
        }

        /// Whatever follows the last batch (a torn write of any bytes) is cut, and every
        /// acknowledged frame is read back.
        #[test]
        fn any_tail_after_the_last_batch_is_cut_and_nothing_before_it_is_lost(
            written in some_batches(),
            tail in proptest::collection::vec(any::<u8>(), 1..2000),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut j = Journal::open(dir.path(), 0, APPEND, Access::Serve, |_, _| Ok(())).unwrap();
            let mut frames = Vec::new();
            for batch in &written {
                let refs: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
                let locs = batches(&mut j, &[&refs]).remove(0);
                frames.extend(locs.into_iter().zip(batch.iter().cloned()));
            }
            let end = j.end();
            drop(j);
            let f = OpenOptions::new().write(true).open(segment_path(dir.path(), 0)).unwrap();
            f.write_all_at(&tail, end).unwrap();
            drop(f);
            let (j, seen) = collect_with(dir.path(), 0, APPEND);
            // A tail of random bytes may happen to hold whole frames; none of those is lost
            // either, and everything acknowledged comes first.
            prop_assert!(seen.len() >= frames.len());
            prop_assert_eq!(&seen[..frames.len()], &frames[..]);
            prop_assert!(j.end() >= end);
        }
    }

    #[test]
    fn only_so_many_sealed_segments_keep_a_file_open_and_every_one_still_reads() {
        let dir = tempfile::tempdir().unwrap();
        let open_here = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|target| target.starts_with(dir.path()))
                .count()
        };
        let (mut j, _) = collect(dir.path(), 0);
        // Each batch outgrows a 4 KiB segment's room, so each goes into a segment of its own.
        let mut locs = Vec::new();
        for i in 0..(OPEN_SEALED + 10) {
            // The first batch appends and asks for a spare; each later one moves into it.
            if i > 0 {
                wait_for_spare(&j);
            }
            locs.push(one(&mut j, &[i as u8 + 1; 3000]));
        }
        assert_eq!(split(*locs.last().unwrap()).0 as usize, OPEN_SEALED + 9);
        let segments = j.segments();
        for (i, at) in locs.iter().enumerate() {
            assert_eq!(segments.read(*at).unwrap(), vec![i as u8 + 1; 3000]);
        }
        // The sealed ones read last, the active one (writer and reader), and a spare.
        assert!(open_here() <= OPEN_SEALED + 3, "{} files open", open_here());
        drop((j, segments));
        let (j, seen) = collect(dir.path(), 0);
        assert_eq!(seen.len(), locs.len());
        assert!(open_here() <= 3, "{} files open after a reopen", open_here());
        for (i, at) in locs.iter().enumerate().rev() {
            assert_eq!(j.segments().read(*at).unwrap(), vec![i as u8 + 1; 3000]);
        }
        assert!(open_here() <= OPEN_SEALED + 3, "{} files open", open_here());
    }

    #[test]
    fn a_spare_of_another_size_is_not_used_and_a_right_one_is_prepared() {
        let dir = tempfile::tempdir().unwrap();
        // Left by a run with another CALLGATE_JOURNAL_PREALLOCATE_MB.
        std::fs::write(dir.path().join(SPARE_READY), vec![0u8; 8192]).unwrap();
        let (mut j, _) = collect(dir.path(), 0);
        assert!(!dir.path().join(SPARE_READY).exists());
        assert_eq!(one(&mut j, b"first"), loc(0, 0));
        wait_for_spare(&j);
        assert_eq!(one(&mut j, b"second"), loc(1, 0));
        assert_eq!(std::fs::metadata(segment_path(dir.path(), 1)).unwrap().len(), 4096);
    }

    #[test]
    fn a_spare_is_all_zeros_whether_written_directly_or_through_the_cache() {
        // A multiple of the block size may go direct; 5000 bytes cannot, and is buffered.
        for bytes in [3 * DIRECT_ALIGN as u64 + ZERO_CHUNK as u64, 5000] {
            let dir = tempfile::tempdir().unwrap();
            let shared = SpareShared { state: Mutex::default(), wake: Condvar::new() };
            assert!(prepare(dir.path(), bytes, &shared).unwrap());
            let got = std::fs::read(dir.path().join(SPARE_READY)).unwrap();
            assert_eq!(got.len() as u64, bytes);
            assert!(got.iter().all(|&b| b == 0), "{bytes}: not all zeros");
            assert!(!dir.path().join(SPARE_TMP).exists());
        }
    }

    #[test]
    fn a_spare_asked_to_stop_is_removed_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let shared = SpareShared { state: Mutex::default(), wake: Condvar::new() };
        shared.state.lock().unwrap().stop = true;
        assert!(!prepare(dir.path(), 2 * ZERO_CHUNK as u64, &shared).unwrap());
        assert!(!dir.path().join(SPARE_READY).exists() && !dir.path().join(SPARE_TMP).exists());
    }

    #[test]
    fn without_preallocation_the_journal_appends() {
        let dir = tempfile::tempdir().unwrap();
        let opts = JournalOptions { preallocate_bytes: 0 };
        let mut j = Journal::open(dir.path(), 0, opts, Access::Serve, |_, _| Ok(())).unwrap();
        one(&mut j, b"first");
        one(&mut j, b"second");
        assert_eq!(j.end(), loc(0, 27 + 2 * MARKER_FRAME as u64));
        assert!(!dir.path().join(SPARE_READY).exists());
        assert!(!dir.path().join(SPARE_TMP).exists());
    }
}
