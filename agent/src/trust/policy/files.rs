//! Which files a policy comes from: reading them (bounded), and the
//! stamps that tell a reload they changed.

use std::path::{Path, PathBuf};

use super::PolicyError;

/// Largest policy or inventory file read (1 MiB).
pub(super) const MAX_FILE: u64 = 1 << 20;

/// Which files a policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFiles {
    /// A `.cedar` file, or a directory whose `*.cedar` files are read in
    /// name order.
    pub policies: PathBuf,
    /// The inventory (JSON).
    pub inventory: PathBuf,
}

impl PolicyFiles {
    /// Every file the policy depends on (for change detection).
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut v = policy_paths(&self.policies).unwrap_or_else(|_| vec![self.policies.clone()]);
        v.push(self.inventory.clone());
        v
    }

    /// Size and modification time of every file, to notice edits.
    pub fn stamp(&self) -> Vec<(PathBuf, Option<FileStamp>)> {
        self.paths()
            .into_iter()
            .map(|p| {
                let s = FileStamp::of(&p);
                (p, s)
            })
            .collect()
    }
}

/// What tells a file changed: its size and modification time. The size
/// matters: a file truncated and rewritten within one clock tick keeps its
/// time, and a reload that read it half-written must see it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
}

impl FileStamp {
    /// The stamp of `p`, `None` when it does not exist.
    pub fn of(p: &Path) -> Option<Self> {
        let m = std::fs::metadata(p).ok()?;
        Some(FileStamp {
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

pub(super) fn policy_paths(p: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let io = |source| PolicyError::Io {
        path: p.to_owned(),
        source,
    };
    if p.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cedar"))
            .collect();
        v.sort();
        Ok(v)
    } else {
        Ok(vec![p.to_owned()])
    }
}

pub(super) fn read_bounded(path: &Path) -> Result<String, PolicyError> {
    let io = |source| PolicyError::Io {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(io)?;
    if meta.len() > MAX_FILE {
        return Err(PolicyError::TooLarge {
            path: path.to_owned(),
            len: meta.len(),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}

/// Paths as a lab or a test writes them: `dir/policies/` and
/// `dir/inventory.json`.
pub fn files_in(dir: &Path) -> PolicyFiles {
    PolicyFiles {
        policies: dir.join("policies"),
        inventory: dir.join("inventory.json"),
    }
}
