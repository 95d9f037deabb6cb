//! LIBSVM format: one example per line, `label index:value index:value ...`,
//! indices from 1 (kept as they are: key = index). Blank lines and lines
//! starting with `#` are skipped; anything else that does not parse is an error
//! naming the line.

use std::path::Path;

use super::{lines, read_part, Rows};
use crate::error::{BadLine, DataError};

/// Reads part `rank` of `parts` of a LIBSVM file (see [`super::part_of`]),
/// parsing on `threads` threads.
pub fn read(path: &Path, rank: usize, parts: usize, threads: usize) -> Result<Rows, DataError> {
    read_part(path, rank, parts, threads, parse)
}

/// Parses whole LIBSVM lines; `first` is the line number of the first.
pub fn parse(text: &[u8], first: usize) -> Result<Rows, BadLine> {
    let mut rows = Rows::new();
    for (no, line) in lines(text, first) {
        let bad = |why: String| BadLine::new(no, why);
        let line = std::str::from_utf8(line).map_err(|_| bad("not UTF-8".into()))?;
        let mut it = line.split_ascii_whitespace();
        let label = it.next().ok_or_else(|| bad("no label".into()))?;
        let label: f32 = label.parse().map_err(|_| bad(format!("label {label:?} is not a number")))?;
        if !label.is_finite() {
            return Err(bad(format!("label {label} is not finite")));
        }
        for pair in it {
            let (k, v) = pair.split_once(':').ok_or_else(|| bad(format!("{pair:?} is not index:value")))?;
            let k: u64 = k.parse().map_err(|_| bad(format!("index {k:?} is not a whole number")))?;
            let v: f32 = v.parse().map_err(|_| bad(format!("value {v:?} is not a number")))?;
            if !v.is_finite() {
                return Err(bad(format!("value {v} of index {k} is not finite")));
            }
            rows.keys.push(k);
            rows.vals.push(v);
        }
        rows.labels.push(label);
        rows.start.push(rows.keys.len());
    }
    Ok(rows)
}

/// Writes rows in LIBSVM format (values printed exactly: `1` for binary features).
pub fn write(rows: &Rows, out: &mut impl std::io::Write) -> std::io::Result<()> {
    for i in 0..rows.len() {
        let (keys, vals) = rows.row(i);
        write!(out, "{}", rows.labels[i])?;
        for (k, v) in keys.iter().zip(vals) {
            write!(out, " {k}:{v}")?;
        }
        writeln!(out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_round_trips() {
        let text = b"+1 1:1 3:0.5\n\n# comment\n-1 2:2\r\n0\n";
        let rows = parse(text, 1).unwrap();
        assert_eq!(rows.labels, vec![1.0, -1.0, 0.0]);
        assert_eq!(rows.start, vec![0, 2, 3, 3]);
        assert_eq!(rows.keys, vec![1, 3, 2]);
        assert_eq!(rows.vals, vec![1.0, 0.5, 2.0]);
        let mut out = Vec::new();
        write(&rows, &mut out).unwrap();
        assert_eq!(parse(&out, 1).unwrap(), rows);
    }

    #[test]
    fn bad_lines_are_named() {
        for (text, want) in [
            (&b"1 1:1\nx 2:1\n"[..], "line 2: label"),
            (b"1 1:1\n1 2-1\n", "line 2: \"2-1\" is not index:value"),
            (b"1 a:1\n", "line 1: index"),
            (b"1 1:nan\n", "line 1: value NaN"),
            (b"1 1:zz\n", "line 1: value \"zz\""),
        ] {
            let e = parse(text, 1).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn parts_of_a_file_are_its_rows_in_order() {
        let dir = std::env::temp_dir().join(format!("pslab-libsvm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.libsvm");
        let mut rows = Rows::new();
        for i in 0..1000u64 {
            rows.labels.push(if i % 3 == 0 { 1.0 } else { -1.0 });
            for j in 0..(i % 7) {
                rows.keys.push(1 + i * 7 + j);
                rows.vals.push(j as f32 * 0.25);
            }
            rows.start.push(rows.keys.len());
        }
        let mut out = Vec::new();
        write(&rows, &mut out).unwrap();
        std::fs::write(&path, out).unwrap();
        for parts in [1, 2, 3, 7] {
            let mut all = Rows::new();
            for r in 0..parts {
                all.append(read(&path, r, parts, 3).unwrap());
            }
            assert_eq!(all, rows, "{parts} parts");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
