//! Checkouts beside the user's tree: a temporary one of one commit, for replays, and a
//! worker's own, for a session that runs several experiments at once. The user's tree is never
//! touched. Each is removed (directory, worktree metadata, and any branch) when dropped.

use std::path::{Path, PathBuf};

use git2::{Oid, Repository, WorktreeAddOptions, WorktreePruneOptions};

use crate::{LedgerError, io_err};

pub struct Worktree {
    root: PathBuf,
    name: String,
    path: PathBuf,
    _parent: tempfile_dir::Dir,
}

mod tempfile_dir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Worktree {
    pub fn add(root: &Path, hash: &str) -> Result<Worktree, LedgerError> {
        let repo = Repository::open(root)?;
        let commit = repo.find_commit(Oid::from_str(hash)?)?;
        let short = &hash[..12.min(hash.len())];
        let name = format!("autoresearch-replay-{short}-{}", std::process::id());
        let parent = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
        let parent = tempfile_dir::Dir(parent);
        let path = parent.0.join("checkout");
        let branch = repo.branch(&name, &commit, true)?;
        let mut opts = WorktreeAddOptions::new();
        opts.reference(Some(branch.get()));
        repo.worktree(&name, &path, Some(&opts))?;
        Ok(Worktree {
            root: root.to_path_buf(),
            name,
            path,
            _parent: parent,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Worktree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
        if let Ok(repo) = Repository::open(&self.root) {
            if let Ok(wt) = repo.find_worktree(&self.name) {
                let _ = wt.prune(Some(
                    WorktreePruneOptions::new().valid(true).working_tree(true),
                ));
            }
            if let Ok(mut b) = repo.find_branch(&self.name, git2::BranchType::Local) {
                let _ = b.delete();
            }
        }
    }
}

/// A worker's checkout: a git worktree with a detached HEAD at `runs/TAG/workers/NAME`, moved
/// from commit to commit as the worker goes (only the train file differs between a session's
/// commits). One left by a killed harness is replaced.
pub struct Checkout {
    root: PathBuf,
    name: String,
    path: PathBuf,
}

impl Checkout {
    pub fn add(root: &Path, path: &Path, name: &str, at: Oid) -> Result<Checkout, LedgerError> {
        let repo = Repository::open(root)?;
        remove_worktree(&repo, name, path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("creating {}", parent.display())))?;
        }
        let commit = repo.find_commit(at)?;
        // libgit2 checks a worktree out on a branch: a temporary one, dropped once HEAD is
        // detached, so the user's branch list stays as it was.
        let branch_name = format!("{name}-checkout");
        let branch = repo.branch(&branch_name, &commit, true)?;
        let mut opts = WorktreeAddOptions::new();
        opts.reference(Some(branch.get()));
        let added = repo.worktree(name, path, Some(&opts)).and_then(|_| {
            let wt = Repository::open(path)?;
            wt.set_head_detached(at)
        });
        if let Ok(mut b) = repo.find_branch(&branch_name, git2::BranchType::Local) {
            let _ = b.delete();
        }
        added?;
        Ok(Checkout {
            root: root.to_path_buf(),
            name: name.to_string(),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves the checkout to commit `at`, dropping any edit.
    pub fn reset(&self, at: Oid) -> Result<(), LedgerError> {
        let repo = Repository::open(&self.path)?;
        let commit = repo.find_commit(at)?;
        repo.checkout_tree(
            commit.as_object(),
            Some(git2::build::CheckoutBuilder::new().force()),
        )?;
        repo.set_head_detached(at)?;
        Ok(())
    }
}

impl Drop for Checkout {
    fn drop(&mut self) {
        if let Ok(repo) = Repository::open(&self.root) {
            remove_worktree(&repo, &self.name, &self.path);
        }
    }
}

/// Removes worktree `name` and its directory, if there.
fn remove_worktree(repo: &Repository, name: &str, path: &Path) {
    let _ = std::fs::remove_dir_all(path);
    if let Ok(wt) = repo.find_worktree(name) {
        let _ = wt.prune(Some(
            WorktreePruneOptions::new().valid(true).working_tree(true),
        ));
    }
}
