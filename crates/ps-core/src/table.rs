//! Table specs: what every server and worker agrees a table is (its id, name,
//! values per key, dense or sparse key range, update rule, consistency model
//! and filters), and the checks of a spec a user wrote. Apart from keys.rs so
//! that keys, clocks and filters do not import each other through it. Must
//! never hold a table's values: stores do.

use serde::{Deserialize, Serialize};

use crate::error::SpecError;
use crate::keys::{KeyRange, Layout, TableId};
use crate::rules::RuleSpec;

/// One table of the job: what every server and worker agrees on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TableSpec {
    /// Its identity on the wire; unique in the job.
    pub id: TableId,
    /// Its name, for people (messages, logs).
    pub name: String,
    /// Values per key (>= 1).
    pub dim: u32,
    /// Dense or sparse, and the key range.
    pub layout: Layout,
    /// The server-side update rule that merges pushes into this table.
    pub rule: RuleSpec,
    /// What a read waits for (worker clocks; `clock::Consistency`). Default:
    /// eventual, no waiting.
    #[serde(default)]
    pub consistency: crate::clock::Consistency,
    /// What the table's pushes and pulls go through (`filter`), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<crate::filter::FilterSpec>,
}

impl TableSpec {
    /// A dense table over `keys`: eventual consistency, no filters.
    pub fn dense(id: u32, name: &str, keys: KeyRange, dim: u32, rule: RuleSpec) -> Self {
        Self {
            id: TableId(id),
            name: name.into(),
            dim,
            layout: Layout::Dense { keys },
            rule,
            consistency: Default::default(),
            filters: Vec::new(),
        }
    }

    /// A sparse table over `keys`: eventual consistency, no filters.
    pub fn sparse(id: u32, name: &str, keys: KeyRange, dim: u32, rule: RuleSpec) -> Self {
        Self {
            id: TableId(id),
            name: name.into(),
            dim,
            layout: Layout::Sparse { keys },
            rule,
            consistency: Default::default(),
            filters: Vec::new(),
        }
    }

    /// The same table with `filters` on its traffic.
    pub fn with_filters(mut self, filters: Vec<crate::filter::FilterSpec>) -> Self {
        self.filters = filters;
        self
    }

    /// The same table under another consistency model.
    pub fn with_consistency(mut self, c: crate::clock::Consistency) -> Self {
        self.consistency = c;
        self
    }

    /// The table's key range.
    pub fn keys(&self) -> KeyRange {
        self.layout.keys()
    }

    /// Whether the layout is dense.
    pub fn is_dense(&self) -> bool {
        matches!(self.layout, Layout::Dense { .. })
    }

    /// A problem with the spec itself, said so a user can fix the job file.
    pub fn validate(&self) -> Result<(), SpecError> {
        let name = || self.name.clone();
        let id = self.id;
        if self.dim == 0 {
            return Err(SpecError::ZeroDim { name: name(), id });
        }
        let keys = self.keys();
        if keys.is_empty() {
            return Err(SpecError::EmptyKeys { name: name(), id, begin: keys.begin, end: keys.end });
        }
        if let Layout::Dense { keys } = self.layout {
            let floats = (keys.len() as u128) * self.dim as u128;
            if floats > crate::limits::DENSE_TABLE_FLOATS_MAX as u128 {
                return Err(SpecError::DenseTooLarge {
                    name: name(),
                    id,
                    keys: keys.len(),
                    dim: self.dim,
                    floats,
                    max: crate::limits::DENSE_TABLE_FLOATS_MAX,
                });
            }
        }
        self.rule.validate().map_err(|source| SpecError::Rule { name: name(), id, source })?;
        for f in &self.filters {
            f.validate().map_err(|source| SpecError::Filter { name: name(), id, source })?;
        }
        if let crate::rules::RuleSpec::BlockProx { .. } = self.rule {
            if self.dim != 2 || !self.is_dense() || self.consistency.staleness().is_none() {
                return Err(SpecError::BlockProxTable { name: name(), id });
            }
        }
        Ok(())
    }
}
