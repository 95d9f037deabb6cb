//! Training data for the apps: sparse rows in CSR form, read from LIBSVM files
//! or click logs, each worker reading only its own part of the file.
//!
//! Both readers memory-map the file, cut the worker's byte range at line
//! boundaries ([`part_of`]: worker r of W gets the lines that *start* in bytes
//! [r·L/W, (r+1)·L/W)), split that part again into one piece per thread, and
//! parse the pieces in parallel. Every worker therefore reads about 1/W of the
//! file, and the union of all parts is every line exactly once.

pub mod clicklog;
pub mod clothing;
pub mod libsvm;

use std::path::Path;

use crate::error::{BadLine, DataError};

/// A parquet file's row reader and the positions of `columns` in its rows;
/// errors name the file.
pub fn parquet_columns<const N: usize>(
    path: &Path,
    columns: [&str; N],
) -> Result<(parquet::file::reader::SerializedFileReader<std::fs::File>, [usize; N]), DataError> {
    use parquet::file::reader::FileReader;
    let f = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    let reader = parquet::file::reader::SerializedFileReader::new(f).map_err(parquet_error(path))?;
    let schema = reader.metadata().file_metadata().schema_descr_ptr();
    let mut at = [0; N];
    for (slot, name) in at.iter_mut().zip(columns) {
        *slot = schema
            .columns()
            .iter()
            .position(|c| c.name() == name)
            .ok_or_else(|| DataError::NoColumn { path: path.into(), column: name.into() })?;
    }
    Ok((reader, at))
}

/// A parquet reader's error on the file at `path`.
pub(crate) fn parquet_error(path: &Path) -> impl Fn(parquet::errors::ParquetError) -> DataError + '_ {
    move |source| DataError::Parquet { path: path.into(), source }
}

/// Rows of a sparse matrix with a label each, in CSR form.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rows {
    /// one label per row (LIBSVM: as written; binary tasks use ±1)
    pub labels: Vec<f32>,
    /// row i is `keys[start[i]..start[i + 1]]`; `start.len() == labels.len() + 1`
    pub start: Vec<usize>,
    /// every row's feature keys, one row after the other
    pub keys: Vec<u64>,
    /// the value of each key in `keys`, at the same position
    pub vals: Vec<f32>,
}

impl Rows {
    /// No rows (`start` already holds the leading 0).
    pub fn new() -> Rows {
        Rows { start: vec![0], ..Default::default() }
    }

    /// The number of rows.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there is no row.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Row `i`'s keys and values (panics if `i >= len()`).
    pub fn row(&self, i: usize) -> (&[u64], &[f32]) {
        let r = self.start[i]..self.start[i + 1];
        (&self.keys[r.clone()], &self.vals[r])
    }

    /// The number of non-zeros: keys over all rows.
    pub fn nnz(&self) -> usize {
        self.keys.len()
    }

    /// Appends `other`'s rows after these.
    pub fn append(&mut self, other: Rows) {
        let base = self.keys.len();
        self.labels.extend_from_slice(&other.labels);
        self.start.extend(other.start[1..].iter().map(|s| s + base));
        self.keys.extend_from_slice(&other.keys);
        self.vals.extend_from_slice(&other.vals);
    }

    /// The largest key + 1 (0 when empty; `u64::MAX` when the largest key is
    /// `u64::MAX`, which no table can hold and which its creation refuses).
    pub fn key_bound(&self) -> u64 {
        self.keys.iter().max().map_or(0, |k| k.saturating_add(1))
    }
}

/// The byte range of part `rank` of `parts` of `text`, moved to line
/// boundaries: it starts at the first line that begins at or after
/// `rank·len/parts` and ends where the next part starts.
pub fn part_of(text: &[u8], rank: usize, parts: usize) -> std::ops::Range<usize> {
    let parts = parts.max(1);
    let cut = |i: usize| -> usize {
        if i == 0 {
            return 0;
        }
        if i >= parts {
            return text.len();
        }
        let at = (text.len() as u128 * i as u128 / parts as u128) as usize;
        // a line starts at `at` if the byte before it ends a line
        if at == 0 || text[at - 1] == b'\n' {
            return at;
        }
        match text[at..].iter().position(|&b| b == b'\n') {
            Some(p) => at + p + 1,
            None => text.len(),
        }
    };
    cut(rank)..cut(rank + 1).max(cut(rank))
}

/// Parses part `rank` of `parts` of the memory-mapped file at `path` with
/// `parse` (one call per piece, run on up to `threads` threads), and returns
/// the rows in file order. `parse` gets a piece of whole lines and the line
/// number of its first line (for error messages).
#[allow(unsafe_code)]
pub fn read_part(
    path: &Path,
    rank: usize,
    parts: usize,
    threads: usize,
    parse: impl Fn(&[u8], usize) -> Result<Rows, BadLine> + Sync,
) -> Result<Rows, DataError> {
    let io = |source| DataError::Io { path: path.into(), source };
    let f = std::fs::File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    if len == 0 {
        return Ok(Rows::new());
    }
    // SAFETY: the map is read-only and private to this process; the data files
    // are written once by `prepare` (or by the user) before a job reads them.
    // A file truncated under us would raise SIGBUS, as for any reader of a
    // mapped file; nothing here writes through the map.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|source| DataError::Mmap { path: path.into(), source })?;
    let text = &map[..];
    let mine = part_of(text, rank, parts);
    let body = &text[mine.clone()];
    let first_line = 1 + text[..mine.start].iter().filter(|&&b| b == b'\n').count();
    let threads = threads.clamp(1, 64);
    let pieces: Vec<std::ops::Range<usize>> = (0..threads).map(|t| part_of(body, t, threads)).collect();
    // a thread's parse, or None when it panicked
    let results: Vec<Option<Result<Rows, BadLine>>> = std::thread::scope(|s| {
        let handles: Vec<_> = pieces
            .iter()
            .map(|r| {
                let piece = &body[r.clone()];
                let parse = &parse;
                s.spawn(move || {
                    let lines_before = body[..r.start].iter().filter(|&&b| b == b'\n').count();
                    parse(piece, first_line + lines_before)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    });
    let mut all = Rows::new();
    for r in results {
        let r = r.ok_or_else(|| DataError::ParserPanicked { path: path.into() })?;
        all.append(r.map_err(|source| DataError::Line { path: path.into(), source })?);
    }
    Ok(all)
}

/// The lines of `piece` with their line numbers, skipping blank lines and `#` comments.
pub fn lines(piece: &[u8], first: usize) -> impl Iterator<Item = (usize, &[u8])> {
    piece
        .split(|&b| b == b'\n')
        .enumerate()
        .map(move |(i, l)| (first + i, l.strip_suffix(b"\r").unwrap_or(l)))
        .filter(|(_, l)| !l.iter().all(|b| b.is_ascii_whitespace()) && !l.starts_with(b"#"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_cover_every_line_once() {
        let text = b"a\nbb\n\nccc\nd\neeeee\nf";
        for parts in 1..9 {
            let mut got = Vec::new();
            let mut end = 0;
            for r in 0..parts {
                let p = part_of(text, r, parts);
                assert_eq!(p.start, end, "parts {parts}: a gap or an overlap");
                end = p.end;
                got.extend_from_slice(&text[p]);
            }
            assert_eq!(&got[..], &text[..], "{parts} parts");
        }
    }
}
