//! Server-side update rules: how a pushed vector `g` is merged into the stored
//! weights `w` of one key. Chosen per table ([`RuleSpec`]), applied by the shard
//! that owns the key, with per-value optimizer state kept beside the weights.
//!
//! Built in: assign, sum, SGD, Adagrad, FTRL-proximal, and the block proximal
//! step of delayed block proximal gradient (a *settling* rule: it sums a
//! clock's pushes and changes the weights once, when every worker has finished
//! that clock). A user's own rule
//! implements [`UpdateRule`] and is registered by name in a [`RuleRegistry`]
//! before the server starts; the job spec then names it as `RuleSpec::Custom`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::kernels::Kernels;

/// A table's rule as the job spec names it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rule")]
pub enum RuleSpec {
    /// `w = g`.
    Assign,
    /// `w += g` (what a KVStore sums; ps-lite's default server handle).
    Sum,
    /// `w -= lr * g`.
    Sgd {
        /// learning rate (> 0)
        lr: f32,
    },
    /// `n += g²; w -= lr * g / (sqrt(n) + eps)`; n starts at `initial_accumulator`.
    Adagrad {
        /// learning rate (> 0)
        lr: f32,
        /// added to `sqrt(n)` so the step stays finite (>= 0)
        eps: f32,
        /// the first value of every `n` (>= 0)
        initial_accumulator: f32,
    },
    /// FTRL-proximal (McMahan et al., KDD 2013), per coordinate.
    /// The learning rate of a coordinate is `alpha / (beta + sqrt(n))`,
    /// `n` its summed squared gradients.
    Ftrl {
        /// learning-rate scale (> 0)
        alpha: f32,
        /// learning-rate smoothing (>= 0)
        beta: f32,
        /// L1 strength: coordinates with `|z| <= l1` are exactly 0 (>= 0)
        l1: f32,
        /// L2 strength (>= 0)
        l2: f32,
    },
    /// The server step of delayed block proximal gradient (Li et al., OSDI 2014,
    /// Algorithm 3) for `Σ loss + l1‖w‖₁ + (l2/2)‖w‖²`. Values are pairs per key
    /// (dim 2). Workers push `[g, u]`: their part of the loss gradient and of a
    /// diagonal curvature bound. The shard sums a clock's pushes (G, U), and when
    /// every worker has finished that clock sets
    /// `w ← soft(U·w − G, l1) / (U + l2)`, moved at most `max_step` from `w`,
    /// and stores G beside it: a pull reads `[w, G]` (G feeds the KKT filter).
    BlockProx {
        /// L1 strength (>= 0)
        l1: f32,
        /// L2 strength (>= 0)
        l2: f32,
        /// largest change of `w` in one settle (> 0)
        max_step: f32,
    },
    /// A rule registered under `name` in the server's [`RuleRegistry`].
    Custom {
        /// the name it was registered under
        name: String,
        /// handed to the rule's factory as they are (null if absent)
        #[serde(default)]
        params: serde_json::Value,
    },
}

impl RuleSpec {
    /// Checks the built-in rules' parameters (a custom rule's factory checks
    /// its own); the error names the parameter and what it must be.
    pub fn validate(&self) -> Result<(), RuleError> {
        let pos = |param: &'static str, value: f32| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(RuleError::NotPositive { param, value })
            }
        };
        let nonneg = |param: &'static str, value: f32| {
            if value.is_finite() && value >= 0.0 {
                Ok(())
            } else {
                Err(RuleError::Negative { param, value })
            }
        };
        match self {
            RuleSpec::Assign | RuleSpec::Sum | RuleSpec::Custom { .. } => Ok(()),
            RuleSpec::Sgd { lr } => pos("sgd lr", *lr),
            RuleSpec::Adagrad { lr, eps, initial_accumulator } => {
                pos("adagrad lr", *lr)?;
                nonneg("adagrad eps", *eps)?;
                nonneg("adagrad initial_accumulator", *initial_accumulator)
            }
            RuleSpec::BlockProx { l1, l2, max_step } => {
                nonneg("block_prox l1", *l1)?;
                nonneg("block_prox l2", *l2)?;
                pos("block_prox max_step", *max_step)
            }
            RuleSpec::Ftrl { alpha, beta, l1, l2 } => {
                pos("ftrl alpha", *alpha)?;
                nonneg("ftrl beta", *beta)?;
                nonneg("ftrl l1", *l1)?;
                nonneg("ftrl l2", *l2)
            }
        }
    }
}

/// Why a rule cannot be built: a parameter out of range, a custom rule not
/// registered, or a custom rule's factory refusing its parameters.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// A parameter that must be above zero is not (or is not a number).
    #[error("{param} must be a positive number, got {value}")]
    NotPositive {
        /// the rule and parameter, e.g. "sgd lr"
        param: &'static str,
        /// what the spec gave
        value: f32,
    },
    /// A parameter that must be zero or above is not (or is not a number).
    #[error("{param} must be zero or positive, got {value}")]
    Negative {
        /// the rule and parameter, e.g. "ftrl l1"
        param: &'static str,
        /// what the spec gave
        value: f32,
    },
    /// The spec names a custom rule this server's registry does not hold.
    #[error(
        "no update rule named {name:?} is registered in this server (registered: {registered:?}); \
         register it with RuleRegistry::register before starting the node"
    )]
    Unregistered {
        /// the name the spec gave
        name: String,
        /// the names registered
        registered: Vec<String>,
    },
    /// A custom rule's factory refused the spec's `params`.
    #[error("update rule {name:?}: {source}")]
    Factory {
        /// the rule's registered name
        name: String,
        /// what the factory said
        source: FactoryError,
    },
}

/// What a custom rule's factory returns when it cannot build the rule from
/// its `params` (any error; a `&str` or `String` converts with `.into()`).
pub type FactoryError = Box<dyn std::error::Error + Send + Sync>;

/// One way to merge a pushed vector into stored weights.
pub trait UpdateRule: Send + Sync + std::fmt::Debug {
    /// Floats of optimizer state per stored value (0 for stateless rules).
    fn state_per_value(&self) -> usize;
    /// Initial value of every state float.
    fn initial_state(&self) -> f32 {
        0.0
    }
    /// Merges `g` into `w`. `w.len() == g.len()`, `state.len() == w.len() * state_per_value()`.
    fn apply(&self, w: &mut [f32], state: &mut [f32], g: &[f32], k: &Kernels);
    /// True if this rule is a plain sum, so a shard may use the scatter-add kernel.
    fn is_sum(&self) -> bool {
        false
    }
    /// True if `apply` only gathers a clock's pushes into the state and
    /// [`UpdateRule::settle`] changes the weights. The shard then holds the
    /// table's pushes until every worker has finished their clock (as under
    /// `sequential`), merges them, and settles every key they touched, once.
    fn settles(&self) -> bool {
        false
    }
    /// Turns the gathered state of one key (`w.len() == dim`) into new weights.
    fn settle(&self, _w: &mut [f32], _state: &mut [f32]) {}
}

/// The proximal step of delayed block proximal gradient (see [`RuleSpec::BlockProx`]).
#[derive(Debug)]
struct BlockProx {
    l1: f32,
    l2: f32,
    max_step: f32,
}
impl UpdateRule for BlockProx {
    /// state per value: the sum of this clock's pushes (G beside w, U beside G)
    fn state_per_value(&self) -> usize {
        1
    }
    fn apply(&self, _w: &mut [f32], st: &mut [f32], g: &[f32], _: &Kernels) {
        for (s, g) in st.iter_mut().zip(g) {
            *s += g;
        }
    }
    fn settles(&self) -> bool {
        true
    }
    fn settle(&self, w: &mut [f32], st: &mut [f32]) {
        let [w, last_g] = w else { return };
        let [g, u] = st else { return };
        let (g64, u64_, w64) = (*g as f64, *u as f64, *w as f64);
        let denom = u64_ + self.l2 as f64;
        if denom > 0.0 {
            let z = u64_ * w64 - g64;
            let l1 = self.l1 as f64;
            let shrunk = if z > l1 {
                z - l1
            } else if z < -l1 {
                z + l1
            } else {
                0.0
            };
            let m = self.max_step as f64;
            let next = (shrunk / denom).clamp(w64 - m, w64 + m);
            // a step clamped across zero stops at zero: the L1 kink is where
            // the model most often wants to rest
            let crosses = (w64 > 0.0 && next < 0.0) || (w64 < 0.0 && next > 0.0);
            *w = if self.l1 > 0.0 && crosses { 0.0 } else { next as f32 };
        }
        *last_g = *g;
        *g = 0.0;
        *u = 0.0;
    }
}

#[derive(Debug)]
struct Assign;
impl UpdateRule for Assign {
    fn state_per_value(&self) -> usize {
        0
    }
    fn apply(&self, w: &mut [f32], _: &mut [f32], g: &[f32], _: &Kernels) {
        w.copy_from_slice(g);
    }
}

#[derive(Debug)]
struct Sum;
impl UpdateRule for Sum {
    fn state_per_value(&self) -> usize {
        0
    }
    fn apply(&self, w: &mut [f32], _: &mut [f32], g: &[f32], k: &Kernels) {
        (k.add)(w, g);
    }
    fn is_sum(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct Sgd {
    lr: f32,
}
impl UpdateRule for Sgd {
    fn state_per_value(&self) -> usize {
        0
    }
    fn apply(&self, w: &mut [f32], _: &mut [f32], g: &[f32], k: &Kernels) {
        (k.axpy)(w, -self.lr, g);
    }
}

#[derive(Debug)]
struct Adagrad {
    lr: f32,
    eps: f32,
    init: f32,
}
impl UpdateRule for Adagrad {
    fn state_per_value(&self) -> usize {
        1
    }
    fn initial_state(&self) -> f32 {
        self.init
    }
    fn apply(&self, w: &mut [f32], n: &mut [f32], g: &[f32], _: &Kernels) {
        for ((w, n), g) in w.iter_mut().zip(n.iter_mut()).zip(g) {
            *n += g * g;
            *w -= self.lr * g / (n.sqrt() + self.eps);
        }
    }
}

#[derive(Debug)]
struct Ftrl {
    alpha: f32,
    beta: f32,
    l1: f32,
    l2: f32,
}
impl UpdateRule for Ftrl {
    /// state: z, n per value
    fn state_per_value(&self) -> usize {
        2
    }
    fn apply(&self, w: &mut [f32], st: &mut [f32], g: &[f32], _: &Kernels) {
        for ((w, s), g) in w.iter_mut().zip(st.chunks_exact_mut(2)).zip(g) {
            let (z, n) = (s[0], s[1]);
            let n_new = n + g * g;
            let sigma = (n_new.sqrt() - n.sqrt()) / self.alpha;
            let z_new = z + g - sigma * *w;
            s[0] = z_new;
            s[1] = n_new;
            *w = if z_new.abs() <= self.l1 {
                0.0
            } else {
                -(z_new - z_new.signum() * self.l1) / ((self.beta + n_new.sqrt()) / self.alpha + self.l2)
            };
        }
    }
}

type Factory = Arc<dyn Fn(&serde_json::Value) -> Result<Arc<dyn UpdateRule>, FactoryError> + Send + Sync>;

/// Rules a server can build, by name: the built-ins plus any registered.
#[derive(Clone, Default)]
pub struct RuleRegistry {
    custom: BTreeMap<String, Factory>,
}

impl std::fmt::Debug for RuleRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleRegistry").field("custom", &self.custom.keys().collect::<Vec<_>>()).finish()
    }
}

impl RuleRegistry {
    /// Registers a user rule under `name`; `factory` gets the spec's `params`.
    pub fn register(
        &mut self,
        name: &str,
        factory: impl Fn(&serde_json::Value) -> Result<Arc<dyn UpdateRule>, FactoryError> + Send + Sync + 'static,
    ) {
        self.custom.insert(name.to_string(), Arc::new(factory));
    }

    /// The rule `spec` names, its parameters checked; an unregistered custom
    /// name is an error listing what is registered.
    pub fn build(&self, spec: &RuleSpec) -> Result<Arc<dyn UpdateRule>, RuleError> {
        spec.validate()?;
        Ok(match spec {
            RuleSpec::Assign => Arc::new(Assign),
            RuleSpec::Sum => Arc::new(Sum),
            RuleSpec::Sgd { lr } => Arc::new(Sgd { lr: *lr }),
            RuleSpec::Adagrad { lr, eps, initial_accumulator } => {
                Arc::new(Adagrad { lr: *lr, eps: *eps, init: *initial_accumulator })
            }
            RuleSpec::BlockProx { l1, l2, max_step } => Arc::new(BlockProx { l1: *l1, l2: *l2, max_step: *max_step }),
            RuleSpec::Ftrl { alpha, beta, l1, l2 } => Arc::new(Ftrl { alpha: *alpha, beta: *beta, l1: *l1, l2: *l2 }),
            RuleSpec::Custom { name, params } => {
                let f = self.custom.get(name).ok_or_else(|| RuleError::Unregistered {
                    name: name.clone(),
                    registered: self.custom.keys().cloned().collect(),
                })?;
                f(params).map_err(|source| RuleError::Factory { name: name.clone(), source })?
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(spec: RuleSpec, w: &mut [f32], g: &[f32], times: usize) -> Vec<f32> {
        let rule = RuleRegistry::default().build(&spec).unwrap();
        let mut st = vec![rule.initial_state(); w.len() * rule.state_per_value()];
        for _ in 0..times {
            rule.apply(w, &mut st, g, Kernels::best());
        }
        st
    }

    #[test]
    fn block_prox_gathers_then_takes_one_proximal_step() {
        let spec = RuleSpec::BlockProx { l1: 1.0, l2: 0.0, max_step: 10.0 };
        let rule = RuleRegistry::default().build(&spec).unwrap();
        assert!(rule.settles());
        let (mut w, mut st) = (vec![0.0, 0.0], vec![0.0; 2]);
        // two workers: G = -3 + -1 = -4, U = 1 + 1 = 2; w = soft(0 + 4, 1) / 2 = 1.5
        rule.apply(&mut w, &mut st, &[-3.0, 1.0], Kernels::best());
        rule.apply(&mut w, &mut st, &[-1.0, 1.0], Kernels::best());
        assert_eq!(w, [0.0, 0.0], "apply only gathers");
        rule.settle(&mut w, &mut st);
        assert_eq!(w, [1.5, -4.0]);
        assert_eq!(st, [0.0, 0.0]);
        // |U w - G| = |3 - 2.5| <= l1: the weight goes to zero
        rule.apply(&mut w, &mut st, &[2.5, 2.0], Kernels::best());
        rule.settle(&mut w, &mut st);
        assert_eq!(w, [0.0, 2.5]);
        // L2 only: w = (U w - G) / (U + l2)
        let rule = RuleRegistry::default().build(&RuleSpec::BlockProx { l1: 0.0, l2: 1.0, max_step: 0.5 }).unwrap();
        let (mut w, mut st) = (vec![1.0, 0.0], vec![-1.0, 3.0]);
        rule.settle(&mut w, &mut st);
        assert_eq!(w[0], 1.0 + 0.0, "(3 + 1) / 4 = 1: no move");
        let (mut w, mut st) = (vec![1.0, 0.0], vec![-9.0, 3.0]);
        rule.settle(&mut w, &mut st);
        assert_eq!(w[0], 1.5, "(3 + 9) / 4 = 3, clamped to a step of 0.5");
    }

    #[test]
    fn assign_sum_sgd() {
        let mut w = vec![1.0, 2.0];
        run(RuleSpec::Assign, &mut w, &[5.0, 6.0], 1);
        assert_eq!(w, [5.0, 6.0]);
        run(RuleSpec::Sum, &mut w, &[1.0, -1.0], 3);
        assert_eq!(w, [8.0, 3.0]);
        run(RuleSpec::Sgd { lr: 0.5 }, &mut w, &[2.0, 4.0], 2);
        assert_eq!(w, [6.0, -1.0]);
    }

    #[test]
    fn adagrad_matches_the_formula() {
        let mut w = vec![0.0f32];
        let st = run(RuleSpec::Adagrad { lr: 0.1, eps: 1e-8, initial_accumulator: 0.0 }, &mut w, &[2.0], 2);
        // step 1: n=4, w=-0.1*2/2=-0.1; step 2: n=8, w=-0.1-0.2/sqrt(8)
        assert!((w[0] - (-0.1 - 0.2 / 8f32.sqrt())).abs() < 1e-6, "{w:?}");
        assert_eq!(st, [8.0]);
    }

    #[test]
    fn ftrl_keeps_small_gradients_at_zero_and_moves_large_ones() {
        let spec = RuleSpec::Ftrl { alpha: 0.1, beta: 1.0, l1: 1.0, l2: 0.0 };
        let mut w = vec![0.0f32, 0.0];
        run(spec, &mut w, &[0.5, 3.0], 1);
        assert_eq!(w[0], 0.0, "|z| <= l1 stays exactly zero");
        // z = 3, n = 9: w = -(3 - 1) / ((1 + 3) / 0.1) = -0.05
        assert!((w[1] + 0.05).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn custom_rules_by_name_and_a_clear_error_otherwise() {
        #[derive(Debug)]
        struct Max;
        impl UpdateRule for Max {
            fn state_per_value(&self) -> usize {
                0
            }
            fn apply(&self, w: &mut [f32], _: &mut [f32], g: &[f32], _: &Kernels) {
                for (w, g) in w.iter_mut().zip(g) {
                    *w = w.max(*g);
                }
            }
        }
        let mut reg = RuleRegistry::default();
        reg.register("max", |_| Ok(Arc::new(Max)));
        let spec = RuleSpec::Custom { name: "max".into(), params: serde_json::Value::Null };
        let r = reg.build(&spec).unwrap();
        let mut w = vec![1.0, 5.0];
        r.apply(&mut w, &mut [], &[3.0, 2.0], Kernels::best());
        assert_eq!(w, [3.0, 5.0]);
        let e = RuleRegistry::default().build(&spec).unwrap_err().to_string();
        assert!(e.contains("register it"), "{e}");
        assert!(RuleRegistry::default().build(&RuleSpec::Sgd { lr: -1.0 }).is_err());
    }
}
