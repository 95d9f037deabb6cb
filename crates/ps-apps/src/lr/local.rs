//! One worker's rows arranged for block steps ([`Local`]): the data of each
//! block by column, the margins `w·x_i` moved by every fresh read, the block's
//! gradient and curvature bound, and the KKT filter's test ([`kkt_drops`]).

use super::{logloss, sigmoid};
use crate::data::Rows;

/// One worker's rows, arranged for block steps.
pub struct Local {
    /// each row's label, as the data file gives it
    pub labels: Vec<f32>,
    /// w·x_i at the weights this worker last read
    pub margins: Vec<f64>,
    /// the rows' data split by feature block
    pub blocks: Vec<Block>,
    /// Σ|x_ij| over the block's features of each row, for the block being worked on
    scale: Vec<f64>,
}

/// One block's part of a worker's data, by column.
pub struct Block {
    /// the block's keys that occur in this worker's rows, ascending
    pub keys: Vec<u64>,
    /// column j is `rows[col[j]..col[j + 1]]` with values `vals[..]`
    col: Vec<usize>,
    rows: Vec<u32>,
    vals: Vec<f32>,
    /// `[w, G]` per key as last read
    pub read: Vec<f32>,
}

impl Local {
    /// `rows` arranged by `blocks` feature blocks, margins at zero weights.
    pub fn new(rows: &Rows, blocks: u64) -> Local {
        let mut cols: Vec<std::collections::BTreeMap<u64, Vec<(u32, f32)>>> =
            (0..blocks).map(|_| Default::default()).collect();
        for i in 0..rows.len() {
            let (keys, vals) = rows.row(i);
            for (&k, &v) in keys.iter().zip(vals) {
                cols[(k % blocks) as usize].entry(k).or_default().push((i as u32, v));
            }
        }
        let blocks = cols
            .into_iter()
            .map(|c| {
                let mut b =
                    Block { keys: Vec::new(), col: vec![0], rows: Vec::new(), vals: Vec::new(), read: Vec::new() };
                for (k, entries) in c {
                    b.keys.push(k);
                    for (i, v) in entries {
                        b.rows.push(i);
                        b.vals.push(v);
                    }
                    b.col.push(b.rows.len());
                }
                b.read = vec![0.0; 2 * b.keys.len()];
                b
            })
            .collect();
        Local { labels: rows.labels.clone(), margins: vec![0.0; rows.len()], blocks, scale: vec![0.0; rows.len()] }
    }

    /// Takes a fresh read of block `b` (`[w, G]` per key of `blocks[b].keys`)
    /// and moves the margins by the change of w.
    pub fn take(&mut self, b: usize, fresh: &[f32]) {
        let blk = &mut self.blocks[b];
        for j in 0..blk.keys.len() {
            let dw = fresh[2 * j] as f64 - blk.read[2 * j] as f64;
            if dw != 0.0 {
                for e in blk.col[j]..blk.col[j + 1] {
                    self.margins[blk.rows[e] as usize] += dw * blk.vals[e] as f64;
                }
            }
        }
        blk.read.copy_from_slice(fresh);
    }

    /// The block's keys and `[g, u]` per key into `keys` and `out`;
    /// `skip(w, G)` drops a key by what was last read of it (the KKT filter).
    pub fn gradient(&mut self, b: usize, skip: impl Fn(f32, f32) -> bool, keys: &mut Vec<u64>, out: &mut Vec<f32>) {
        let blk = &self.blocks[b];
        for e in 0..blk.rows.len() {
            self.scale[blk.rows[e] as usize] = 0.0;
        }
        for e in 0..blk.rows.len() {
            self.scale[blk.rows[e] as usize] += blk.vals[e].abs() as f64;
        }
        keys.clear();
        out.clear();
        for j in 0..blk.keys.len() {
            if skip(blk.read[2 * j], blk.read[2 * j + 1]) {
                continue;
            }
            let (mut g, mut u) = (0f64, 0f64);
            for e in blk.col[j]..blk.col[j + 1] {
                let i = blk.rows[e] as usize;
                let (x, y) = (blk.vals[e] as f64, self.labels[i] as f64);
                let s = sigmoid(y * self.margins[i]);
                g += -y * (1.0 - s) * x;
                u += s * (1.0 - s) * x.abs() * self.scale[i];
            }
            keys.push(blk.keys[j]);
            out.push(g as f32);
            out.push(u as f32);
        }
    }

    /// The logistic loss of the rows at the margins last read.
    pub fn loss(&self) -> f64 {
        self.margins.iter().zip(&self.labels).map(|(&m, &y)| logloss(m, y)).sum()
    }
}

/// Whether the KKT filter drops a key read as `[w, G]`.
pub fn kkt_drops(w: f32, g: f32, l1: f32, delta: f32) -> bool {
    l1 > 0.0 && w == 0.0 && g.abs() <= l1 - delta
}
