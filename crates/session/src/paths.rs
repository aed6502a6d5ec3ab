//! Which files a proposer may read: repository files only, resolved (`..`, absolute paths and
//! symlinks) before deciding, never git's internals, build output, other sessions' runs or
//! credentials.

use std::path::{Component, Path, PathBuf};

use workbench::ToolError;

const HIDDEN_DIRS: &[&str] = &[".git", "target", "runs"];

fn hidden(rel: &Path) -> Option<String> {
    let first = rel
        .components()
        .next()?
        .as_os_str()
        .to_string_lossy()
        .into_owned();
    if HIDDEN_DIRS.contains(&first.as_str()) {
        return Some(format!("{first}/ is not readable by the agent"));
    }
    let name = rel.file_name()?.to_string_lossy();
    if name.starts_with(".env") || name == "autoresearch.toml" || name.ends_with(".pem") {
        return Some(format!("{name} may hold credentials"));
    }
    None
}

/// The real path of `rel` inside `root`, or why not.
pub fn resolve_readable(root: &Path, rel: &str) -> Result<PathBuf, ToolError> {
    let given = Path::new(rel);
    if given.is_absolute()
        || given
            .components()
            .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(ToolError::Refused(format!(
            "`{rel}`: give a path relative to the repository root, without `..`"
        )));
    }
    if let Some(why) = hidden(given) {
        return Err(ToolError::Refused(format!("`{rel}`: {why}")));
    }
    let root = root
        .canonicalize()
        .map_err(|e| ToolError::Fatal(format!("the repository root: {e}")))?;
    let real = root
        .join(given)
        .canonicalize()
        .map_err(|_| ToolError::NotFound(format!("`{rel}` does not exist")))?;
    // A symlink may lead anywhere: decide on where it leads.
    let inside = real
        .strip_prefix(&root)
        .map_err(|_| ToolError::Refused(format!("`{rel}` leads outside the repository")))?;
    if let Some(why) = hidden(inside) {
        return Err(ToolError::Refused(format!("`{rel}`: {why}")));
    }
    if !real.is_file() {
        return Err(ToolError::NotFound(format!("`{rel}` is not a file")));
    }
    Ok(real)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_are_refused_and_repository_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let outside = dir.path().join("secret.txt");
        std::fs::create_dir_all(root.join("prepare/src")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join("prepare/src/lib.rs"), "pub fn x() {}").unwrap();
        std::fs::write(root.join(".git/config"), "[core]").unwrap();
        std::fs::write(&outside, "secret").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(root.join(".git/config"), root.join("cfg")).unwrap();
        assert!(resolve_readable(&root, "prepare/src/lib.rs").is_ok());
        assert!(resolve_readable(&root, "./prepare/src/lib.rs").is_ok());
        for bad in [
            "../secret.txt",
            "prepare/../../secret.txt",
            outside.to_str().unwrap(),
            "link.txt",
            ".git/config",
            "cfg",
            "runs/other/journal.jsonl",
            ".env",
        ] {
            match resolve_readable(&root, bad) {
                Err(ToolError::Refused(_)) => {}
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(matches!(
            resolve_readable(&root, "nope.rs"),
            Err(ToolError::NotFound(_))
        ));
    }
}
