//! Append-only segment files. Events are written here rather than into sled because a sled
//! insert of an event costs more CPU than the rest of the webhook path together; an append is a
//! copy into one buffer, and one `fdatasync` makes a whole batch durable.
//!
//! A segment is `NNNNNNNN.log`, a run of frames `[len u32][crc32 u32][payload]`. Only the last
//! segment is ever written; a frame torn by a crash can only be at its end, and is cut off when
//! the journal is opened. A bad frame anywhere else is corruption and stops the open.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::StoreError;

/// Where a frame starts: segment number in the high half, byte offset in the low half.
pub type Loc = u64;

const FRAME_HEADER: usize = 8;
/// Offsets are u32; segments roll well before that.
const SEGMENT_MAX: u64 = 1 << 30;
/// No record comes near this; a larger length in a header is damage, not data.
const FRAME_MAX: u32 = 16 << 20;

pub fn loc(segment: u32, offset: u64) -> Loc {
    (u64::from(segment) << 32) | offset
}

fn split(l: Loc) -> (u32, u64) {
    ((l >> 32) as u32, l & 0xffff_ffff)
}

fn corrupt(detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt { tree: "journal", detail: detail.into() }
}

fn io(e: std::io::Error) -> StoreError {
    corrupt(format!("i/o: {e}"))
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

pub struct Journal {
    dir: PathBuf,
    active: File,
    active_no: u32,
    active_len: u64,
    readers: Arc<Segments>,
}

/// Read access to every segment, shared with readers so they never wait for the writer.
pub struct Segments(RwLock<Vec<Arc<File>>>);

fn segment_path(dir: &Path, no: u32) -> PathBuf {
    dir.join(format!("{no:08}.log"))
}

impl Journal {
    /// Opens the journal under `dir` and hands every frame from `from` onwards to `visit`, in
    /// order. A torn tail of the last segment is truncated away.
    pub fn open(
        dir: &Path,
        from: Loc,
        mut visit: impl FnMut(Loc, &[u8]) -> Result<(), StoreError>,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(io)?;
        let mut numbers: Vec<u32> = std::fs::read_dir(dir)
            .map_err(io)?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
            .collect();
        numbers.sort_unstable();
        if numbers.is_empty() {
            File::create(segment_path(dir, 0)).map_err(io)?;
            sync_dir(dir)?;
            numbers.push(0);
        }
        if numbers.iter().enumerate().any(|(i, n)| *n as usize != i) {
            return Err(corrupt("journal segments are not numbered 0, 1, 2, ... without gaps"));
        }
        let last = *numbers.last().unwrap_or(&0);
        let (from_seg, from_off) = split(from);
        if from_seg > last {
            return Err(corrupt("the index snapshot is ahead of the journal"));
        }
        let mut readers = Vec::with_capacity(numbers.len());
        let mut active_len = 0;
        for &no in &numbers {
            let path = segment_path(dir, no);
            let file = File::open(&path).map_err(io)?;
            let size = file.metadata().map_err(io)?.len();
            if no >= from_seg {
                let start = if no == from_seg { from_off } else { 0 };
                let good = scan(&file, no, start, size, &mut visit)?;
                if good < size {
                    if no != last {
                        return Err(corrupt(format!("segment {no} is damaged at byte {good}")));
                    }
                    tracing::warn!(segment = no, at = good, dropped = size - good, "cut a torn write off the journal");
                    let f = OpenOptions::new().write(true).open(&path).map_err(io)?;
                    f.set_len(good).map_err(io)?;
                    f.sync_all().map_err(io)?;
                }
                if no == last {
                    active_len = good;
                }
            } else if no == last {
                active_len = size;
            }
            readers.push(Arc::new(file));
        }
        let active = OpenOptions::new().append(true).open(segment_path(dir, last)).map_err(io)?;
        Ok(Self {
            dir: dir.to_owned(),
            active,
            active_no: last,
            active_len,
            readers: Arc::new(Segments(RwLock::new(readers))),
        })
    }

    /// Where the next frame will go.
    pub fn end(&self) -> Loc {
        loc(self.active_no, self.active_len)
    }

    /// Where a batch of `len` bytes will start; starts a new segment first if it would not fit.
    pub fn place(&mut self, len: usize) -> Result<Loc, StoreError> {
        if self.active_len > 0 && self.active_len + len as u64 > SEGMENT_MAX {
            let no = self.active_no + 1;
            let path = segment_path(&self.dir, no);
            let file = OpenOptions::new().create_new(true).append(true).open(&path).map_err(io)?;
            sync_dir(&self.dir)?;
            let reader = File::open(&path).map_err(io)?;
            self.readers.0.write().unwrap_or_else(|e| e.into_inner()).push(Arc::new(reader));
            self.active = file;
            self.active_no = no;
            self.active_len = 0;
        }
        Ok(self.end())
    }

    /// Writes a batch placed by `place` and makes it durable. On failure the segment is cut
    /// back, so a half-written batch never sits in front of the next one.
    pub fn write_durably(&mut self, buf: &[u8]) -> Result<(), StoreError> {
        let result = self.active.write_all(buf).and_then(|()| self.active.sync_data());
        match result {
            Ok(()) => {
                self.active_len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                if let Err(cut) = self.active.set_len(self.active_len) {
                    tracing::error!(error = %cut, "could not cut a failed write off the journal");
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
        let readers: Vec<Arc<File>> = self.readers.0.read().unwrap_or_else(|e| e.into_inner()).clone();
        for (no, file) in readers.iter().enumerate() {
            let size = if no as u32 == self.active_no { self.active_len } else { file.metadata().map_err(io)?.len() };
            let good = scan(file, no as u32, 0, size, &mut visit)?;
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
        let file = {
            let readers = self.0.read().unwrap_or_else(|e| e.into_inner());
            Arc::clone(readers.get(seg as usize).ok_or_else(|| corrupt(format!("no segment {seg}")))?)
        };
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
}

fn parse_header(head: &[u8; FRAME_HEADER]) -> (u32, u32) {
    let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
    let crc = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    (len, crc)
}

/// Visits the good frames of one segment between `start` and `size`; returns where the good
/// frames end.
fn scan(
    file: &File,
    no: u32,
    start: u64,
    size: u64,
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
        if len > FRAME_MAX || end > size {
            break;
        }
        payload.resize(len as usize, 0);
        reader.read_exact(&mut payload).map_err(io)?;
        if crc32fast::hash(&payload) != crc {
            break;
        }
        visit(loc(no, at), &payload)?;
        at = end;
    }
    Ok(at)
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect(dir: &Path, from: Loc) -> (Journal, Vec<(Loc, Vec<u8>)>) {
        let mut seen = Vec::new();
        let j = Journal::open(dir, from, |l, p| {
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
        j.write_durably(&buf).unwrap();
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
        assert_eq!(j.end(), 27);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 27);
        // Scanning from a later point sees only what follows it.
        drop(j);
        let (_, seen) = collect(dir.path(), 13);
        assert_eq!(seen, vec![(13, b"second".to_vec())]);
    }

    #[test]
    fn damage_before_the_tail_is_an_error_not_a_silent_loss() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = collect(dir.path(), 0);
        let mut buf = Vec::new();
        frame(&mut buf, |b| b.extend_from_slice(b"one"));
        j.place(buf.len()).unwrap();
        j.write_durably(&buf).unwrap();
        drop(j);
        // A later segment exists, so segment 0 is not the tail.
        File::create(segment_path(dir.path(), 1)).unwrap();
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[9] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let err = Journal::open(dir.path(), 0, |_, _| Ok(())).err().expect("damage is reported");
        assert!(err.to_string().contains("segment 0 is damaged"), "{err}");
    }
}
