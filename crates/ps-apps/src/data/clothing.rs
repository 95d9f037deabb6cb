//! Prepares the women's clothing reviews (../shared/notes/datasets.md) for
//! sparse logistic regression, exactly as the note's reference optimum was made:
//!
//! - text = `Title` (missing: "") + " " + `Review Text`; rows without a review
//!   text are dropped (22,641 remain); label +1 if `Recommended IND` is 1, else -1;
//! - tokens: ASCII letters lower-cased, a token is a maximal run of `[a-z0-9]`,
//!   every other byte separates;
//! - row i (0-based, after the filter) is test iff i % 5 == 4;
//! - features: binary presence of the train split's tokens, byte-sorted and
//!   numbered 1..V; feature V+1 is a constant 1 (the bias, regularised like
//!   the rest); test tokens outside the vocabulary are dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use parquet::file::reader::FileReader;
use parquet::record::Field;

use super::{libsvm, parquet_error, Rows};
use crate::error::DataError;

pub(crate) const FILE: &str = "WomensClothingE-CommerceReviews.parquet.brotli";

/// The reviews as (label, text), in file order, filtered as the note says.
pub fn load(path: &Path) -> Result<Vec<(f32, String)>, DataError> {
    let bad = |why: String| DataError::BadValue { path: path.into(), why };
    let (reader, [ct, cr, cl]) = super::parquet_columns(path, ["Title", "Review Text", "Recommended IND"])?;
    let mut out = Vec::with_capacity(23_486);
    for row in reader.get_row_iter(None).map_err(parquet_error(path))? {
        let row = row.map_err(parquet_error(path))?;
        let fields: Vec<&Field> = row.get_column_iter().map(|(_, f)| f).collect();
        let text = |i: usize| -> Result<Option<&str>, DataError> {
            match fields.get(i) {
                Some(Field::Str(s)) => Ok(Some(s.as_str())),
                Some(Field::Null) => Ok(None),
                other => Err(bad(format!("column {i} holds {other:?}, not text"))),
            }
        };
        let Some(review) = text(cr)? else { continue };
        let title = text(ct)?.unwrap_or("");
        let label = match fields.get(cl) {
            Some(Field::Long(v)) => *v,
            Some(Field::Int(v)) => *v as i64,
            other => return Err(bad(format!("Recommended IND holds {other:?}, not 0/1"))),
        };
        out.push((if label == 1 { 1.0 } else { -1.0 }, format!("{title} {review}")));
    }
    Ok(out)
}

/// The note's tokens of `text`, each once.
pub fn tokens(text: &str) -> BTreeSet<String> {
    text.as_bytes()
        .split(|b| !b.is_ascii_alphanumeric())
        .filter(|t| !t.is_empty())
        .map(|t| String::from_utf8(t.to_ascii_lowercase()).expect("ASCII"))
        .collect()
}

/// Train and test rows and the vocabulary (feature i+1 is `vocab[i]`; the bias is V+1).
pub fn prepare(reviews: &[(f32, String)]) -> (Rows, Rows, Vec<String>) {
    let toks: Vec<BTreeSet<String>> = reviews.iter().map(|(_, t)| tokens(t)).collect();
    let vocab: BTreeSet<&String> = toks.iter().enumerate().filter(|(i, _)| i % 5 != 4).flat_map(|(_, t)| t).collect();
    let index: BTreeMap<&String, u64> = vocab.iter().enumerate().map(|(i, t)| (*t, i as u64 + 1)).collect();
    let bias = vocab.len() as u64 + 1;
    let (mut train, mut test) = (Rows::new(), Rows::new());
    for (i, ((label, _), t)) in reviews.iter().zip(&toks).enumerate() {
        let rows = if i % 5 == 4 { &mut test } else { &mut train };
        let mut keys: Vec<u64> = t.iter().filter_map(|w| index.get(w).copied()).collect();
        keys.sort_unstable();
        keys.push(bias);
        rows.vals.extend(std::iter::repeat_n(1.0, keys.len()));
        rows.keys.extend(keys);
        rows.labels.push(*label);
        rows.start.push(rows.keys.len());
    }
    (train, test, vocab.into_iter().cloned().collect())
}

/// `pslab prepare clothing`: DIR/FILE -> DIR/{train,test}.libsvm, DIR/vocab.txt.
pub fn run(dir: &Path) -> Result<(), DataError> {
    let src = dir.join(FILE);
    if !src.exists() {
        return Err(DataError::Missing { path: src, script: "scripts/fetch-clothing.sh" });
    }
    let reviews = load(&src)?;
    let (train, test, vocab) = prepare(&reviews);
    let write = |name: &str, f: &dyn Fn(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>| {
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let io = |path: &Path, source| DataError::Io { path: path.into(), source };
        let mut w = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?);
        f(&mut w).and_then(|_| w.flush()).map_err(|e| io(&tmp, e))?;
        drop(w);
        // whole files or none: a reader never sees a half-written one
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))
    };
    write("train.libsvm", &|w| libsvm::write(&train, w))?;
    write("test.libsvm", &|w| libsvm::write(&test, w))?;
    write("vocab.txt", &|w| vocab.iter().try_for_each(|t| writeln!(w, "{t}")))?;
    println!(
        "clothing reviews: {} rows ({} train, {} test), {} tokens + bias = {} features, {} train non-zeros -> {}",
        reviews.len(),
        train.len(),
        test.len(),
        vocab.len(),
        vocab.len() + 1,
        train.nnz(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_follow_the_note() {
        let t: Vec<String> = tokens("Love it!! Size-4 fits; très CHIC, 100% x").into_iter().collect();
        assert_eq!(
            t,
            ["100", "4", "chic", "fits", "it", "love", "size", "tr", "s", "x"]
                .map(String::from)
                .iter()
                .cloned()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn vocabulary_comes_from_the_train_split() {
        let reviews: Vec<(f32, String)> =
            ["a b", "b c", "c", "a", "zzz a"].iter().enumerate().map(|(i, t)| (i as f32, t.to_string())).collect();
        let (train, test, vocab) = prepare(&reviews);
        assert_eq!(vocab, ["a", "b", "c"]);
        assert_eq!(train.len(), 4);
        assert_eq!(train.row(0).0, &[1, 2, 4]);
        // row 4 is test; "zzz" is not in the vocabulary
        assert_eq!(test.row(0).0, &[1, 4]);
    }
}
