//! Checkpoint files: where they go, writing a shard's whole or not at all, and
//! memory-mapping one back at start (`PS_RESUME`). What the bytes hold is
//! ps-core's (`ps_core::checkpoint`); this file only names, writes and maps
//! files, and never decides when a checkpoint is due (the shard core does).

use std::io::Write;
use std::path::{Path, PathBuf};

use ps_core::shard::ShardCore;

use crate::error::CheckpointError;

/// Where checkpoints go: `PS_CHECKPOINT_DIR` (default `pslab-checkpoints`), one
/// directory per checkpoint (`ckpt-LABEL`), one file per shard. On several
/// machines it must be a shared file system for `--resume` to find them all.
pub fn checkpoint_dir() -> PathBuf {
    std::env::var_os("PS_CHECKPOINT_DIR").map_or_else(|| "pslab-checkpoints".into(), Into::into)
}

/// The file of shard `shard` of server `server` in checkpoint directory `dir`.
pub fn checkpoint_file(dir: &Path, server: u32, shard: u32) -> PathBuf {
    dir.join(format!("server{server}-shard{shard}.ckpt"))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// Writes a shard's checkpoint whole or not at all (a temporary file, synced, renamed).
pub fn write_checkpoint(core: &ShardCore, label: u64) -> Result<(), CheckpointError> {
    let dir = checkpoint_dir().join(format!("ckpt-{label}"));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let o = core.owner();
    let path = checkpoint_file(&dir, o.server, o.shard);
    let tmp = path.with_extension("tmp");
    let bytes = core.snapshot(label);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&bytes).and_then(|_| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    tracing::info!(
        "server {} shard {}: checkpoint {label}: {} bytes in {}",
        o.server,
        o.shard,
        bytes.len(),
        path.display()
    );
    Ok(())
}

/// Restores a shard from `PS_RESUME` (a checkpoint directory), if set.
#[allow(unsafe_code)]
pub fn resume(core: &mut ShardCore) -> Result<(), CheckpointError> {
    let Some(dir) = std::env::var_os("PS_RESUME") else { return Ok(()) };
    let o = core.owner();
    let path = checkpoint_file(Path::new(&dir), o.server, o.shard);
    let f = std::fs::File::open(&path).map_err(|source| CheckpointError::Missing { path: path.clone(), source })?;
    // SAFETY: read-only and private; checkpoint files are written whole under
    // another name and renamed, never changed in place.
    let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| CheckpointError::Io {
        path: path.clone(),
        source: std::io::Error::new(e.kind(), format!("mmap: {e}")),
    })?;
    let label = core.restore(&map).map_err(|e| CheckpointError::Mismatch { path: path.clone(), why: e.to_string() })?;
    tracing::info!("server {} shard {}: resumed from checkpoint {label} ({})", o.server, o.shard, path.display());
    Ok(())
}

/// The label (for `lr`: the sweeps done) of the checkpoint in `dir`, from its first shard file.
pub fn checkpoint_label(dir: &Path) -> Result<u64, CheckpointError> {
    let path = checkpoint_file(dir, 0, 0);
    let label = |why: String| CheckpointError::Label { path: path.clone(), why };
    let mut head = vec![0u8; 64 << 10];
    let mut f = std::fs::File::open(&path).map_err(|e| label(e.to_string()))?;
    let n = std::io::Read::read(&mut f, &mut head).map_err(|e| label(e.to_string()))?;
    ps_core::checkpoint::header(&head[..n]).map(|h| h.label).map_err(|e| label(e.to_string()))
}
