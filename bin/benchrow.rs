//! One row of `pslab bench`'s results: an operation at one size, with the raw
//! TCP baseline of the same shape beside it. What the table, the JSON file and
//! the plot all show; apart from the bench command so the plot can draw rows
//! without importing the command that made them.

use serde::{Deserialize, Serialize};

/// One operation (push, pull, push_pull, fused) of one layout at one size.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Row {
    pub layout: String,
    pub op: String,
    pub size: u64,
    pub keys: u64,
    pub ops: u64,
    pub ops_per_s: f64,
    pub gb_per_s: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// the raw-TCP exchange of the same shape (dense rows only)
    pub baseline: Option<String>,
    pub baseline_gb_per_s: Option<f64>,
    pub baseline_p50_us: Option<f64>,
    /// PS GB/s over raw GB/s, within one run (the median over runs when repeated)
    pub ratio_gb_per_s: Option<f64>,
    /// PS p50 over raw p50, within one run
    pub ratio_p50: Option<f64>,
}
