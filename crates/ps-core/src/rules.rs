//! Server-side update rules: how a pushed vector `g` is merged into the stored
//! weights `w` of one key. Chosen per table ([`RuleSpec`]), applied by the shard
//! that owns the key, with per-value optimizer state kept beside the weights.
//!
//! Built in: assign, sum, SGD, Adagrad, FTRL-proximal. A user's own rule
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
    Sgd { lr: f32 },
    /// `n += g²; w -= lr * g / (sqrt(n) + eps)`; n starts at `initial_accumulator`.
    Adagrad { lr: f32, eps: f32, initial_accumulator: f32 },
    /// FTRL-proximal (McMahan et al., KDD 2013), per coordinate.
    Ftrl { alpha: f32, beta: f32, l1: f32, l2: f32 },
    /// A rule registered under `name` in the server's [`RuleRegistry`].
    Custom {
        name: String,
        #[serde(default)]
        params: serde_json::Value,
    },
}

impl RuleSpec {
    pub fn validate(&self) -> Result<(), String> {
        let pos = |what: &str, v: f32| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{what} must be a positive number, got {v}"))
            }
        };
        let nonneg = |what: &str, v: f32| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{what} must be zero or positive, got {v}"))
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
            RuleSpec::Ftrl { alpha, beta, l1, l2 } => {
                pos("ftrl alpha", *alpha)?;
                nonneg("ftrl beta", *beta)?;
                nonneg("ftrl l1", *l1)?;
                nonneg("ftrl l2", *l2)
            }
        }
    }
}

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

type Factory = Arc<dyn Fn(&serde_json::Value) -> Result<Arc<dyn UpdateRule>, String> + Send + Sync>;

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
        factory: impl Fn(&serde_json::Value) -> Result<Arc<dyn UpdateRule>, String> + Send + Sync + 'static,
    ) {
        self.custom.insert(name.to_string(), Arc::new(factory));
    }

    pub fn build(&self, spec: &RuleSpec) -> Result<Arc<dyn UpdateRule>, String> {
        spec.validate()?;
        Ok(match spec {
            RuleSpec::Assign => Arc::new(Assign),
            RuleSpec::Sum => Arc::new(Sum),
            RuleSpec::Sgd { lr } => Arc::new(Sgd { lr: *lr }),
            RuleSpec::Adagrad { lr, eps, initial_accumulator } => {
                Arc::new(Adagrad { lr: *lr, eps: *eps, init: *initial_accumulator })
            }
            RuleSpec::Ftrl { alpha, beta, l1, l2 } => Arc::new(Ftrl { alpha: *alpha, beta: *beta, l1: *l1, l2: *l2 }),
            RuleSpec::Custom { name, params } => {
                let f = self.custom.get(name).ok_or_else(|| {
                    format!(
                        "no update rule named {name:?} is registered in this server (registered: {:?}); register it with RuleRegistry::register before starting the node",
                        self.custom.keys().collect::<Vec<_>>()
                    )
                })?;
                f(params)?
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
        let e = RuleRegistry::default().build(&spec).unwrap_err();
        assert!(e.contains("register it"), "{e}");
        assert!(RuleRegistry::default().build(&RuleSpec::Sgd { lr: -1.0 }).is_err());
    }
}
