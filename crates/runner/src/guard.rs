//! Guards the repository against the experiment: every tracked file except the train file is
//! read before the run and compared after it; anything changed or deleted is restored byte for
//! byte.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{RunnerError, TRAIN_FILE, io_err};

pub struct Snapshot {
    root: PathBuf,
    files: Vec<(String, Vec<u8>)>,
}

impl Snapshot {
    pub fn take(repo: &Path) -> Result<Self, RunnerError> {
        let out = Command::new("git")
            .args(["ls-files", "-z"])
            .current_dir(repo)
            .output()
            .map_err(io_err("running `git ls-files`"))?;
        if !out.status.success() {
            return Err(RunnerError::Other(format!(
                "{} is not a git checkout: the runner guards tracked files ({})",
                repo.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let mut files = Vec::new();
        for name in out.stdout.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            if name == TRAIN_FILE {
                continue;
            }
            // A tracked file already missing from the work tree stays missing.
            if let Ok(bytes) = std::fs::read(repo.join(&name)) {
                files.push((name, bytes));
            }
        }
        Ok(Snapshot {
            root: repo.to_path_buf(),
            files,
        })
    }

    /// Restores every guarded file that differs from the snapshot; returns their names.
    pub fn restore_changes(&self) -> Result<Vec<String>, RunnerError> {
        let mut restored = Vec::new();
        for (name, bytes) in &self.files {
            let path = self.root.join(name);
            if std::fs::read(&path).ok().as_ref() != Some(bytes) {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io_err(format!("restoring {name}")))?;
                }
                std::fs::write(&path, bytes).map_err(io_err(format!("restoring {name}")))?;
                restored.push(name.clone());
            }
        }
        Ok(restored)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}
