//! A job described in a TOML file (`pslab node --job FILE`), so a launcher's
//! command line stays the same for every rank and every job:
//!
//! ```toml
//! app = "check"                 # the workers' program
//! servers = 2                   # ranks 1..=2 are servers under --role auto
//! # servers_per_node = 1        # or: this many on every node (ranks in blocks)
//! shards = 1                    # shard threads per server (default: one per core)
//! copies = 2                    # copies of every shard (chain replication; 1: none)
//! port = 7070                   # the manager's port
//! manager = "10.0.0.1:7070"     # optional: else the allocation's first host (or 127.0.0.1)
//! cpus = [0, 2]                 # optional: pin shard threads here
//! [params]                      # the program's parameters
//! rounds = 8
//! ```
//!
//! What the file sets replaces the flags' defaults; a key it does not know is
//! an error (a misspelt key would otherwise be silently ignored).

use serde::Deserialize;

#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    pub app: Option<String>,
    pub servers: Option<u32>,
    pub servers_per_node: Option<u32>,
    pub workers: Option<u32>,
    /// copies of every shard (chain replication; 1: none)
    pub copies: Option<u32>,
    pub shards: Option<usize>,
    pub port: Option<u16>,
    pub manager: Option<String>,
    pub cpus: Option<Vec<usize>>,
    pub params: Option<toml::Table>,
}

impl JobFile {
    pub fn load(path: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("job file {path}: {e}"))?;
        Self::parse(&text).map_err(|e| format!("job file {path}: {e}"))
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let f: JobFile = toml::from_str(text).map_err(|e| e.to_string())?;
        if f.servers == Some(0) || f.servers_per_node == Some(0) {
            return Err("servers and servers_per_node must be at least 1".into());
        }
        Ok(f)
    }

    /// The program's parameters as the JSON the manager takes.
    pub fn params_json(&self) -> Option<String> {
        self.params.as_ref().map(|t| serde_json::to_string(t).expect("TOML values are JSON values"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_file_round_trips_and_refuses_unknown_keys() {
        let f = JobFile::parse(
            "app = \"check\"\nservers = 2\nshards = 1\nport = 7171\ncpus = [0, 2]\n[params]\nrounds = 8\nkeys = 800\n",
        )
        .unwrap();
        assert_eq!((f.app.as_deref(), f.servers, f.shards, f.port), (Some("check"), Some(2), Some(1), Some(7171)));
        assert_eq!(f.cpus, Some(vec![0, 2]));
        let p: serde_json::Value = serde_json::from_str(&f.params_json().unwrap()).unwrap();
        assert_eq!(p, serde_json::json!({"rounds": 8, "keys": 800}));
        let e = JobFile::parse("app = \"check\"\nserver = 2\n").unwrap_err();
        assert!(e.contains("server"), "{e}");
        assert!(JobFile::parse("servers = 0\n").is_err());
        assert_eq!(JobFile::parse("").unwrap(), JobFile::default());
    }
}
