//! # ps-apps: the programs a worker can run
//!
//! Each app is a module with two halves: `tables(params)`, the tables it
//! needs (the manager builds the job spec from the app's name and parameters
//! and hands it to every node, so all of them agree on the tables), and
//! `run(ctx)`, the worker program, which sees the runtime only through the
//! worker handle `ps_node::WorkerCtx` (rank, view, the PS client, barriers).
//! [`lookup`] is the registry the binary hands to `ps_node::run_worker`:
//! the runtime names no app, and nothing here reaches into the runtime.
//!
//! - `train_lr` (the main job), `check` (invariant 1; with `filters`,
//!   through them), `torn` (invariant 3; with `hammer`, a client killed
//!   mid-push), `bench`, `ssp` (invariant 2 with a straggler), `mf` (SGD
//!   matrix factorisation on MovieLens 100k), `lr` (sparse logistic
//!   regression by delayed block proximal gradient with the KKT filter);
//! - [`data`]: the training data readers (LIBSVM, click logs, the clothing
//!   reviews' preparation);
//! - [`error`]: what the apps and the readers fail with ([`AppError`],
//!   [`DataError`]).

// the exception: `data::read_part` (memory-mapping a data file)
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod bench;
pub mod check;
pub mod data;
pub mod error;
pub mod lr;
pub mod mf;
pub mod ssp;
pub mod torn;
pub mod train_lr;

use ps_core::control::JobSpec;

use ps_node::AppMain;

pub use error::{AppError, BadLine, DataError};

/// The apps' names, as the job's `app` gives them.
pub const APPS: &[&str] = &["train-lr", "check", "bench", "torn", "ssp", "mf", "lr"];

/// The job spec for `app` with `params` (a JSON object; missing fields take
/// defaults), its shards in `copies` copies.
pub fn job_spec(app: &str, params: &serde_json::Value, servers: u32, copies: u32) -> Result<JobSpec, AppError> {
    let partitions = (ps_core::limits::RING_PARTITIONS).max((64 * servers).next_power_of_two());
    let (tables, params) = match app {
        "train-lr" => train_lr::tables(params)?,
        "check" => check::tables(params)?,
        "bench" => bench::tables(params, servers, partitions)?,
        "torn" => torn::tables(params)?,
        "ssp" => ssp::tables(params)?,
        "mf" => mf::tables(params)?,
        "lr" => lr::tables(params)?,
        other => return Err(AppError::UnknownApp { app: other.to_string(), known: APPS.join(", ") }),
    };
    let spec = JobSpec { tables, app: app.to_string(), params, limits: Default::default(), partitions, copies };
    // (ps-core's reason, whatever its type)
    spec.validate().map_err(|e| AppError::Spec(e.to_string()))?;
    Ok(spec)
}

/// The program of `app`, for the worker runtime (`ps_node::run_worker`),
/// which takes the app's [`AppError`] boxed.
pub fn lookup(app: &str) -> Option<AppMain> {
    let main: AppMain = match app {
        "train-lr" => |ctx| train_lr::run(ctx).map_err(Into::into),
        "check" => |ctx| check::run(ctx).map_err(Into::into),
        "bench" => |ctx| bench::run(ctx).map_err(Into::into),
        "torn" => |ctx| torn::run(ctx).map_err(Into::into),
        "ssp" => |ctx| ssp::run(ctx).map_err(Into::into),
        "mf" => |ctx| mf::run(ctx).map_err(Into::into),
        "lr" => |ctx| lr::run(ctx).map_err(Into::into),
        _ => return None,
    };
    Some(main)
}

/// Reads a parameter with a default.
pub fn param<T: serde::de::DeserializeOwned>(p: &serde_json::Value, key: &str, default: T) -> Result<T, AppError> {
    match p.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => serde_json::from_value(v.clone()).map_err(|source| AppError::Param { key: key.to_string(), source }),
    }
}
