//! A temporary checkout of one commit beside the repository, for replays: the user's tree is
//! never touched. Removed (directory, worktree metadata, and its branch) when dropped.

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
