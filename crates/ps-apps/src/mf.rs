//! Matrix factorisation by SGD on MovieLens 100k, the consistency issue's
//! application (and the workload of the SSP vs ESSP experiment).
//!
//! Model and split as `../shared/notes/datasets.md` fixes them: ratings sorted
//! by (user, movie), every fifth (i % 5 == 4) is test; r ≈ μ + p_u·q_i with μ
//! the train mean; objective Σ_train (r − μ − p_u·q_i)² + λ(Σ_u n_u‖p_u‖² +
//! Σ_i n_i‖q_i‖²), which is what per-rating SGD with weight decay λ minimises.
//!
//! Tables: `users` (p_u) and `items` (q_i), dense, `rank` values per key, the
//! sum rule, and the consistency model asked for (`bounded:1` by default); a
//! `metrics` table (eventual) sums each clock's objective over workers.
//! Worker r owns the users u with u % W == r. Each clock it reads both tables
//! (from its process cache when fresh enough), adds its ratings' part of the
//! objective at what it read, makes one SGD pass over its ratings in a seeded
//! order with step lr / (1 + c / decay), pushes the change of every row, and
//! calls `clock()`. At the end worker 0 reads the tables bypassing the cache
//! and reports the test RMSE (predictions clipped to [1, 5]).
//!
//! The data file is fetched by `scripts/fetch-movielens.sh` (never committed).

use std::time::{Duration, Instant};

use parquet::file::reader::FileReader;
use parquet::record::RowAccessor;
use ps_core::clock::Consistency;
use ps_core::keys::{KeyRange, TableId};
use ps_core::rng::{mix64, SplitMix64};
use ps_core::rules::RuleSpec;
use ps_core::table::TableSpec;
use serde_json::json;

use super::param;
use ps_node::WorkerCtx;

use crate::data::parquet_error;
use crate::error::{AppError, DataError};

const USERS: TableId = TableId(0);
const ITEMS: TableId = TableId(1);
const METRICS: TableId = TableId(2);
/// MovieLens 100k: user ids 1..=943, movie ids 1..=1682 (key 0 unused)
const USER_KEYS: u64 = 944;
const ITEM_KEYS: u64 = 1683;

pub(crate) const DEFAULT_DATA: &str = "data/movielens/MovieLens100k_data.parquet.brotli";

#[derive(Clone, Debug)]
struct Params {
    data: String,
    rank: u32,
    lambda: f32,
    lr: f32,
    decay: f32,
    clocks: u64,
    init: f32,
    seed: u64,
    model: Consistency,
    cache: bool,
    slow_ms: u64,
}

fn params(p: &serde_json::Value) -> Result<Params, AppError> {
    let r = Params {
        data: param(p, "data", DEFAULT_DATA.to_string())?,
        rank: param(p, "rank", 10)?,
        lambda: param(p, "lambda", 0.1)?,
        lr: param(p, "lr", 0.02)?,
        decay: param(p, "decay", 300.0)?,
        clocks: param(p, "clocks", 400)?,
        init: param(p, "init", 0.1)?,
        seed: param(p, "seed", 42)?,
        model: param::<String>(p, "model", "bounded:1".into())?
            .parse()
            .map_err(|e| AppError::consistency("model", e))?,
        cache: param(p, "cache", true)?,
        slow_ms: param(p, "slow_ms", 0)?,
    };
    if r.rank == 0 || r.clocks == 0 || r.lr <= 0.0 || r.decay <= 0.0 || r.lambda < 0.0 {
        return Err(AppError::params("mf", "rank, clocks, lr and decay must be positive, lambda not negative"));
    }
    Ok(r)
}

pub(crate) fn tables(p: &serde_json::Value) -> Result<(Vec<TableSpec>, serde_json::Value), AppError> {
    let mut r = params(p)?;
    // resolved here, on the manager, so every worker gets the same absolute path
    let path = std::path::Path::new(&r.data);
    if !path.is_file() {
        return Err(AppError::NoRatings { path: r.data, default: DEFAULT_DATA });
    }
    r.data = path
        .canonicalize()
        .map_err(|source| AppError::Path { app: "mf", path: r.data.clone(), source })?
        .display()
        .to_string();
    let tables = vec![
        TableSpec::dense(USERS.0, "users", KeyRange::new(0, USER_KEYS), r.rank, RuleSpec::Sum)
            .with_consistency(r.model),
        TableSpec::dense(ITEMS.0, "items", KeyRange::new(0, ITEM_KEYS), r.rank, RuleSpec::Sum)
            .with_consistency(r.model),
        TableSpec::dense(METRICS.0, "metrics", KeyRange::new(0, r.clocks + 1), 1, RuleSpec::Sum),
    ];
    let filled = json!({
        "data": r.data, "rank": r.rank, "lambda": r.lambda, "lr": r.lr, "decay": r.decay, "clocks": r.clocks,
        "init": r.init, "seed": r.seed, "model": r.model.to_string(), "cache": r.cache, "slow_ms": r.slow_ms,
    });
    Ok((tables, filled))
}

/// (user, movie, rating)
type Rating = (u32, u32, f32);

/// Reads the ratings and splits them as the datasets note says: (train, test).
pub fn load(path: &str) -> Result<(Vec<Rating>, Vec<Rating>), DataError> {
    let path = std::path::Path::new(path);
    let (reader, [cu, cm, cr]) = crate::data::parquet_columns(path, ["user_id", "movie_id", "rating"])?;
    let mut all = Vec::with_capacity(100_000);
    for row in reader.get_row_iter(None).map_err(parquet_error(path))? {
        let row = row.map_err(parquet_error(path))?;
        let get = |i| row.get_long(i).map_err(parquet_error(path));
        let (u, m, r) = (get(cu)?, get(cm)?, get(cr)?);
        if !(1..USER_KEYS as i64).contains(&u) || !(1..ITEM_KEYS as i64).contains(&m) || !(1..=5).contains(&r) {
            let why = format!("rating ({u}, {m}, {r}) is outside MovieLens 100k's ranges");
            return Err(DataError::BadValue { path: path.into(), why });
        }
        all.push((u as u32, m as u32, r as f32));
    }
    all.sort_by_key(|&(u, m, _)| (u, m));
    let (mut train, mut test) = (Vec::with_capacity(80_000), Vec::with_capacity(20_000));
    for (i, r) in all.into_iter().enumerate() {
        if i % 5 == 4 {
            test.push(r)
        } else {
            train.push(r)
        }
    }
    Ok((train, test))
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Σ (r − μ − p·q)² + λ(‖p‖² + ‖q‖²) over `ratings`.
fn objective(ratings: &[Rating], mu: f32, k: usize, lambda: f32, u: &[f32], v: &[f32]) -> f64 {
    ratings
        .iter()
        .map(|&(a, b, r)| {
            let (p, q) = (&u[a as usize * k..][..k], &v[b as usize * k..][..k]);
            let e = (r - mu - dot(p, q)) as f64;
            e * e + lambda as f64 * (dot(p, p) + dot(q, q)) as f64
        })
        .sum()
}

/// Root mean squared error with predictions clipped to [1, 5].
fn rmse(ratings: &[Rating], mu: f32, k: usize, u: &[f32], v: &[f32]) -> f64 {
    let sse: f64 = ratings
        .iter()
        .map(|&(a, b, r)| {
            let pred = (mu + dot(&u[a as usize * k..][..k], &v[b as usize * k..][..k])).clamp(1.0, 5.0);
            ((r - pred) as f64).powi(2)
        })
        .sum();
    (sse / ratings.len().max(1) as f64).sqrt()
}

/// The seeded start value of row `key` of `table`: the same for any number of workers.
fn init_row(seed: u64, table: TableId, key: u64, scale: f32, out: &mut [f32]) {
    let mut r = SplitMix64::new(mix64(seed ^ (table.0 as u64) << 40 ^ key));
    for x in out {
        *x = ((r.next_f64() - 0.5) * 2.0) as f32 * scale;
    }
}

pub(crate) fn run(ctx: &mut WorkerCtx) -> Result<String, AppError> {
    let p = params(&ctx.view.job.params)?;
    let (rank, workers) = (ctx.rank as u64, ctx.workers() as u64);
    let k = p.rank as usize;
    let (train, test) = load(&p.data).map_err(AppError::Ratings)?;
    let mu = (train.iter().map(|r| r.2 as f64).sum::<f64>() / train.len() as f64) as f32;
    let mut mine: Vec<Rating> = train.iter().copied().filter(|r| r.0 as u64 % workers == rank).collect();
    if !p.cache {
        for t in [USERS, ITEMS] {
            ctx.ps.core_mut().set_cache(t, false)?;
        }
    }

    // start values: my users' rows by me, the items by worker 0
    let mut u = vec![0f32; USER_KEYS as usize * k];
    let mut v = vec![0f32; ITEM_KEYS as usize * k];
    for user in (1..USER_KEYS).filter(|x| x % workers == rank) {
        init_row(p.seed, USERS, user, p.init, &mut u[user as usize * k..][..k]);
    }
    if rank == 0 {
        for item in 1..ITEM_KEYS {
            init_row(p.seed, ITEMS, item, p.init, &mut v[item as usize * k..][..k]);
        }
    }
    let a = ctx.ps.push_range(USERS, 0, &u)?;
    let b = ctx.ps.push_range(ITEMS, 0, &v)?;
    ctx.ps.wait(a)?;
    ctx.ps.wait(b)?;
    ctx.barrier("mf-init")?;

    ctx.emit("progress", json!({"rank": rank, "done": 0, "total": p.clocks, "unit": "clocks"}));
    let started = Instant::now();
    let mut waited = Duration::ZERO;
    let mut times = Vec::with_capacity(p.clocks as usize);
    let (mut u_new, mut v_new) = (Vec::new(), Vec::new());
    let mut rng = SplitMix64::new(mix64(p.seed ^ rank.wrapping_mul(0x9E37_79B9)));
    for c in 0..p.clocks {
        if rank == 0 && p.slow_ms > 0 {
            std::thread::sleep(Duration::from_millis(p.slow_ms));
        }
        let t = Instant::now();
        let a = ctx.ps.pull_range(USERS, 0, USER_KEYS, std::mem::take(&mut u))?;
        let b = ctx.ps.pull_range(ITEMS, 0, ITEM_KEYS, std::mem::take(&mut v))?;
        u = ctx.ps.wait_pull(a)?;
        v = ctx.ps.wait_pull(b)?;
        waited += t.elapsed();
        let obj = objective(&mine, mu, k, p.lambda, &u, &v);
        let m = ctx.ps.push_range(METRICS, c, &[obj as f32])?;

        // one SGD pass over my ratings, in a new order each clock
        for i in (1..mine.len()).rev() {
            mine.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let lr = p.lr / (1.0 + c as f32 / p.decay);
        u_new.clone_from(&u);
        v_new.clone_from(&v);
        for &(a, b, r) in &mine {
            let (pu, qi) = (&mut u_new[a as usize * k..][..k], &mut v_new[b as usize * k..][..k]);
            let err = r - mu - dot(pu, qi);
            for j in 0..k {
                let (x, y) = (pu[j], qi[j]);
                pu[j] += lr * (err * y - p.lambda * x);
                qi[j] += lr * (err * x - p.lambda * y);
            }
        }
        for (n, o) in u_new.iter_mut().zip(&u) {
            *n -= o;
        }
        for (n, o) in v_new.iter_mut().zip(&v) {
            *n -= o;
        }
        let a = ctx.ps.push_range(USERS, 0, &u_new)?;
        let b = ctx.ps.push_range(ITEMS, 0, &v_new)?;
        for ts in [a, b, m] {
            ctx.ps.wait(ts)?;
        }
        let ts = ctx.ps.clock()?;
        ctx.ps.wait(ts)?;
        times.push(started.elapsed().as_secs_f64());
        if (c + 1) % 10 == 0 || c + 1 == p.clocks {
            ctx.emit("progress", json!({"rank": rank, "done": c + 1, "total": p.clocks, "unit": "clocks"}));
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let reads = [USERS, ITEMS].map(|t| ctx.ps.core().cache_stats(t).unwrap_or_default());
    let staleness: Vec<u64> =
        reads[0].staleness.iter().zip(&reads[1].staleness).map(|(a, b)| a + b).collect::<Vec<_>>();
    // (empty when the tables are not cached: sequential, or "cache": false)
    let last = staleness.iter().rposition(|&n| n > 0).map_or(0, |i| i + 1);
    ctx.emit(
        "mf-reads",
        json!({"rank": rank, "model": p.model.to_string(), "hits": reads[0].hits + reads[1].hits,
               "misses": reads[0].misses + reads[1].misses, "staleness": staleness[..last],
               "read_wait_ms": waited.as_secs_f64() * 1e3, "seconds": seconds}),
    );
    ctx.barrier("mf-done")?;
    if rank != 0 {
        return Ok(format!("mf: worker {rank} ran {} clocks in {seconds:.1} s", p.clocks));
    }
    // the final model, as fresh as it gets: no cache, every worker done
    for t in [USERS, ITEMS] {
        let _ = ctx.ps.core_mut().set_cache(t, false);
    }
    ctx.ps.pull_into_range(USERS, 0, USER_KEYS, &mut u)?;
    ctx.ps.pull_into_range(ITEMS, 0, ITEM_KEYS, &mut v)?;
    let mut per_clock = Vec::new();
    ctx.ps.pull_into_range(METRICS, 0, p.clocks, &mut per_clock)?;
    let final_obj = objective(&train, mu, k, p.lambda, &u, &v);
    let (train_rmse, test_rmse) = (rmse(&train, mu, k, &u, &v), rmse(&test, mu, k, &u, &v));
    ctx.emit(
        "mf",
        json!({"model": p.model.to_string(), "workers": workers, "clocks": p.clocks, "objective": final_obj,
               "train_rmse": train_rmse, "test_rmse": test_rmse, "seconds": seconds,
               "objective_per_clock": per_clock, "time_per_clock": times}),
    );
    Ok(format!(
        "mf: {} clocks under {} on {workers} workers in {seconds:.1} s: objective {final_obj:.1}, \
         train RMSE {train_rmse:.4}, test RMSE {test_rmse:.4}",
        p.clocks, p.model
    ))
}
