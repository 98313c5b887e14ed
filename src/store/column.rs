//! An append-only array kept in fixed-size chunks, for the event index's per-event columns.
//!
//! A `Vec` that doubles frees its outgrown half at every step. Below jemalloc's oversize
//! threshold (8 MiB) that half stays resident in the allocator's dirty pool until decay runs,
//! and decay only runs while the process keeps allocating: an index that has just crossed a
//! power of two holds several megabytes it no longer uses. Chunks never move, so growing frees
//! nothing.

use std::ops::{Index, IndexMut};

const CHUNK_BITS: u32 = 16;
const CHUNK: usize = 1 << CHUNK_BITS;

#[derive(Clone, Debug, Default)]
pub struct Column<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

impl<T: Copy> Column<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The last chunk, with room for at least one more value.
    #[inline]
    fn open_chunk(&mut self) -> &mut Vec<T> {
        if self.chunks.last().is_none_or(|c| c.len() == CHUNK) {
            // The chunk's pages become resident as they are written, not when reserved.
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let last = self.chunks.len() - 1;
        &mut self.chunks[last]
    }

    #[inline]
    pub fn push(&mut self, value: T) {
        self.open_chunk().push(value);
        self.len += 1;
    }

    /// Appends every value of `values`, a chunk's room at a time.
    pub fn extend(&mut self, mut values: impl ExactSizeIterator<Item = T>) {
        while values.len() > 0 {
            let chunk = self.open_chunk();
            let n = (CHUNK - chunk.len()).min(values.len());
            chunk.extend(values.by_ref().take(n));
            self.len += n;
        }
    }

    pub fn last(&self) -> Option<&T> {
        self.chunks.last().and_then(|c| c.last())
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        self.chunks.iter().flatten()
    }
}

impl<T: Copy + Ord> Column<T> {
    /// For a column in ascending order, as `slice::binary_search`.
    pub fn binary_search(&self, x: &T) -> Result<usize, usize> {
        let chunk = self.chunks.partition_point(|c| c.last().is_some_and(|last| last < x));
        match self.chunks.get(chunk) {
            None => Err(self.len),
            Some(c) => c.binary_search(x).map(|i| (chunk << CHUNK_BITS) + i).map_err(|i| (chunk << CHUNK_BITS) + i),
        }
    }
}

impl<T> Index<usize> for Column<T> {
    type Output = T;

    fn index(&self, i: usize) -> &T {
        &self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

impl<T> IndexMut<usize> for Column<T> {
    fn index_mut(&mut self, i: usize) -> &mut T {
        &mut self.chunks[i >> CHUNK_BITS][i & (CHUNK - 1)]
    }
}

impl<T: Copy + PartialEq> PartialEq for Column<T> {
    fn eq(&self, other: &Self) -> bool {
        self.len == other.len && self.iter().eq(other.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_back_what_was_pushed_across_chunk_boundaries() {
        let mut c = Column::default();
        let n = 2 * CHUNK + 5;
        for i in 0..n as u64 {
            c.push(i * 3);
        }
        assert_eq!(c.len(), n);
        assert_eq!(c[0], 0);
        assert_eq!(c[CHUNK - 1], (CHUNK as u64 - 1) * 3);
        assert_eq!(c[CHUNK], CHUNK as u64 * 3);
        assert_eq!(c[n - 1], (n as u64 - 1) * 3);
        assert_eq!(c.last(), Some(&((n as u64 - 1) * 3)));
        assert!(c.iter().copied().eq((0..n as u64).map(|i| i * 3)));
        c[CHUNK + 1] = 7;
        assert_eq!(c[CHUNK + 1], 7);
        assert_eq!(c.chunks.len(), 3);
        assert!(c.chunks.iter().all(|chunk| chunk.capacity() == CHUNK));
    }

    #[test]
    fn extending_fills_each_chunk_before_the_next_as_pushing_does() {
        let (mut pushed, mut extended) = (Column::default(), Column::default());
        for (start, n) in [(0usize, 5usize), (5, CHUNK - 3), (CHUNK + 2, CHUNK + 7), (2 * CHUNK + 9, 0)] {
            (start..start + n).for_each(|v| pushed.push(v as u64));
            extended.extend((start..start + n).map(|v| v as u64));
        }
        assert_eq!(extended, pushed);
        assert_eq!(extended.len(), 2 * CHUNK + 9);
        assert_eq!(extended.chunks.len(), 3);
        assert!(extended.chunks.iter().all(|chunk| chunk.capacity() == CHUNK));
        assert!(extended.iter().copied().eq(0..(2 * CHUNK + 9) as u64));
    }

    #[test]
    fn binary_search_agrees_with_a_slice() {
        let values: Vec<u64> = (0..(CHUNK as u64 * 2 + 100)).map(|i| i * 2 + 1).collect();
        let mut c = Column::default();
        for v in &values {
            c.push(*v);
        }
        for probe in [0, 1, 2, 3, CHUNK as u64 * 2 - 1, CHUNK as u64 * 2, CHUNK as u64 * 2 + 1, u64::MAX]
            .into_iter()
            .chain((0..values.len() as u64 * 2 + 3).step_by(997))
        {
            assert_eq!(c.binary_search(&probe), values.binary_search(&probe), "probe {probe}");
        }
        let empty: Column<u64> = Column::default();
        assert_eq!(empty.binary_search(&5), Err(0));
        assert!(empty.len() == 0 && empty.last().is_none());
    }

    #[test]
    fn columns_are_equal_by_content() {
        let (mut a, mut b) = (Column::default(), Column::default());
        for i in 0..10u8 {
            a.push(i);
            b.push(i);
        }
        assert_eq!(a, b);
        b[3] = 0;
        assert_ne!(a, b);
        b[3] = 3;
        b.push(10);
        assert_ne!(a, b);
    }
}
