//! The apps' errors: [`AppError`], what a worker program, a job's parameters
//! or the job spec built from them fail with, and [`DataError`], what the
//! data readers fail with (the file, and for a line that does not parse its
//! number, [`BadLine`]). Each message says what went wrong, with the file,
//! parameter or value involved, and what to do where a user can do something.
//!
//! Messages the tests and scripts match on (`invariant 1 broken`, `tau N must
//! be below blocks N`, `of the workers: bounded:1 needs`, `unknown app`) are
//! kept word for word.

use std::path::PathBuf;

/// A line of a data file that does not parse: its number and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {why}")]
pub struct BadLine {
    /// the line's number in the file, from 1
    pub line: usize,
    /// what is wrong with it
    pub why: String,
}

impl BadLine {
    /// Line `line` is wrong: `why`.
    pub fn new(line: usize, why: impl Into<String>) -> BadLine {
        BadLine { line, why: why.into() }
    }
}

/// Reading a data file (LIBSVM, click log, parquet) failed.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened, read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// the file
        path: PathBuf,
        /// the OS's error
        source: std::io::Error,
    },
    /// The file could not be memory-mapped.
    #[error("{}: mmap: {source}", path.display())]
    Mmap {
        /// the file
        path: PathBuf,
        /// the OS's error
        source: std::io::Error,
    },
    /// A line of the file does not parse.
    #[error("{}: {source} (fix or delete that line)", path.display())]
    Line {
        /// the file
        path: PathBuf,
        /// the line and what is wrong with it
        source: BadLine,
    },
    /// A thread parsing part of the file panicked (a bug: please report it).
    #[error("{}: a parser thread panicked", path.display())]
    ParserPanicked {
        /// the file
        path: PathBuf,
    },
    /// The parquet reader failed: not a parquet file, or a damaged one.
    #[error("{}: {source}", path.display())]
    Parquet {
        /// the file
        path: PathBuf,
        /// the reader's error
        source: parquet::errors::ParquetError,
    },
    /// A parquet file lacks a column the reader needs (another dataset, or another version of it).
    #[error("{}: no column {column:?}", path.display())]
    NoColumn {
        /// the file
        path: PathBuf,
        /// the column's name
        column: String,
    },
    /// A value in the file is not what the dataset holds.
    #[error("{}: {why}", path.display())]
    BadValue {
        /// the file
        path: PathBuf,
        /// which value, and what it should be
        why: String,
    },
    /// A click log's key space holds no key (`params.features` is 0).
    #[error("click log: the key space must hold at least one key")]
    NoKeySpace,
    /// A dataset file is not there: the script that fetches it.
    #[error("{} is missing: run {script}", path.display())]
    Missing {
        /// the file looked for
        path: PathBuf,
        /// the script that fetches it
        script: &'static str,
    },
}

/// What an app, its parameters or the job spec built from them fail with.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The job names an app this binary does not have.
    #[error("unknown app {app:?}; known: {known}")]
    UnknownApp {
        /// the name given
        app: String,
        /// the apps there are, comma-separated
        known: String,
    },
    /// A parameter does not read as the type the app wants.
    #[error("parameter {key}: {source}")]
    Param {
        /// the parameter's name in the job's `params`
        key: String,
        /// why it does not read
        source: serde_json::Error,
    },
    /// A parameter holds a value the app refuses (the message says which and why).
    #[error("{app}: {why}")]
    BadParams {
        /// the app
        app: &'static str,
        /// which parameter, what it holds and what it must be
        why: String,
    },
    /// A consistency model parameter does not parse.
    #[error("parameter {key}: {why}")]
    Consistency {
        /// the parameter's name
        key: &'static str,
        /// the parser's reason
        why: String,
    },
    /// The job spec the parameters make does not hold together (ps-core's reason).
    #[error("{0}")]
    Spec(String),
    /// The job's workers or servers do not suit the app.
    #[error("{app}: {why}")]
    Shape {
        /// the app
        app: &'static str,
        /// what the app needs
        why: String,
    },
    /// Reading a data file failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The lr app could not read its train file for the key space.
    #[error("lr: {0} (run scripts/fetch-clothing.sh, or give params.features)")]
    Features(DataError),
    /// The mf app could not read its ratings.
    #[error("mf: {0}")]
    Ratings(DataError),
    /// The mf app's ratings file is not there.
    #[error(
        "mf: no ratings file at {path}: run scripts/fetch-movielens.sh (it puts MovieLens 100k at {default}), \
         or pass {{\"data\": PATH}}"
    )]
    NoRatings {
        /// the `data` parameter
        path: String,
        /// where the fetch script puts the file
        default: &'static str,
    },
    /// A file the app reads could not be resolved to an absolute path.
    #[error("{app}: {path}: {source}")]
    Path {
        /// the app
        app: &'static str,
        /// the path as given
        path: String,
        /// the OS's error
        source: std::io::Error,
    },
    /// Writing the model file failed.
    #[error("lr: model {path}: {source} (is its directory there, and writable?)")]
    Model {
        /// the model file (`params.model`)
        path: String,
        /// the OS's error
        source: std::io::Error,
    },
    /// A check the app makes failed: an invariant broken, training that did not
    /// converge, a value that is wrong (the message says which and by how much).
    #[error("{0}")]
    Check(String),
    /// The torn app's extra client (`pslab hammer`) could not be started or stopped.
    #[error("{what}: {source}")]
    Hammer {
        /// the step that failed
        what: &'static str,
        /// the OS's error
        source: std::io::Error,
    },
    /// `pslab hammer` was given a view that does not decode.
    #[error("hammer: bad view: {0} (pslab hammer takes the job's view as JSON; the torn app starts it)")]
    HammerView(serde_json::Error),
    /// A PS operation failed, with the step it was part of.
    #[error("{what}: {source}")]
    PsAt {
        /// the operation (`push round 3 table 1`, `final pull`)
        what: std::borrow::Cow<'static, str>,
        /// the client's error
        source: ps_core::PsError,
    },
    /// A PS operation failed.
    #[error(transparent)]
    Ps(#[from] ps_core::PsError),
    /// The key ring of the view does not hold together.
    #[error(transparent)]
    Ring(#[from] ps_core::ring::RingError),
    /// A barrier or the link to the manager failed.
    #[error(transparent)]
    Control(#[from] ps_node::error::ControlError),
    /// The node runtime failed (connecting the shards).
    #[error(transparent)]
    Node(#[from] ps_node::NodeError),
}

impl AppError {
    /// A refused parameter value of `app`.
    pub(crate) fn params(app: &'static str, why: impl Into<String>) -> AppError {
        AppError::BadParams { app, why: why.into() }
    }

    /// A check of the app that failed.
    pub(crate) fn check(why: impl Into<String>) -> AppError {
        AppError::Check(why.into())
    }

    /// A PS operation `what` failed with `source`.
    pub(crate) fn ps_at(what: &'static str) -> impl FnOnce(ps_core::PsError) -> AppError {
        move |source| AppError::PsAt { what: what.into(), source }
    }

    /// A consistency model in parameter `key` that does not parse (ps-core's
    /// reason, whatever its type).
    pub(crate) fn consistency(key: &'static str, why: impl std::fmt::Display) -> AppError {
        AppError::Consistency { key, why: why.to_string() }
    }
}
