//! Relative paths, checked before they reach the kernel.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Component, Path, PathBuf};

use super::BeneathError;

/// A path below a directory: no root, no `..`, `.` components dropped. An empty path names
/// the directory itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RelPath {
    parts: Vec<OsString>,
}

impl RelPath {
    /// Checks `path`; an absolute path or one with `..` anywhere is refused, even when the
    /// `..` would stay inside: the kernel resolves `a/..` through `a`, which may be a link.
    pub fn new(path: impl AsRef<Path>) -> Result<RelPath, BeneathError> {
        let path = path.as_ref();
        let mut parts = Vec::new();
        for component in path.components() {
            match component {
                Component::Normal(part) => parts.push(part.to_owned()),
                Component::CurDir => {}
                Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                    return Err(BeneathError::NotRelative { path: path.display().to_string() });
                }
            }
        }
        Ok(RelPath { parts })
    }

    /// Whether this names the directory itself.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The components, in order.
    pub fn parts(&self) -> &[OsString] {
        &self.parts
    }

    /// The parent and the last component, unless this names the directory itself.
    pub fn split_last(&self) -> Option<(RelPath, &OsStr)> {
        let (last, parent) = self.parts.split_last()?;
        Some((RelPath { parts: parent.to_vec() }, last.as_os_str()))
    }

    /// `self` followed by `more`.
    pub fn join(&self, more: &RelPath) -> RelPath {
        RelPath { parts: self.parts.iter().chain(&more.parts).cloned().collect() }
    }

    /// The path as the kernel takes it: `.` for the directory itself.
    pub fn to_path(&self) -> PathBuf {
        if self.parts.is_empty() { PathBuf::from(".") } else { self.parts.iter().collect() }
    }
}

impl fmt::Display for RelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_path().display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_below_pass() {
        for good in ["a", "a/b", "./a/./b/", "."] {
            assert!(RelPath::new(good).is_ok(), "{good}");
        }
        for bad in ["/etc/passwd", "../x", "a/../b", "a/../../x", ".."] {
            assert!(matches!(RelPath::new(bad), Err(BeneathError::NotRelative { .. })), "{bad}");
        }
        let rel = RelPath::new("./a/./b/").unwrap();
        assert_eq!(rel.to_string(), "a/b");
        let (parent, last) = rel.split_last().unwrap();
        assert_eq!((parent.to_string().as_str(), last), ("a", OsStr::new("b")));
        assert_eq!(RelPath::new(".").unwrap().to_path(), PathBuf::from("."));
        assert_eq!(parent.join(&RelPath::new("c").unwrap()).to_string(), "a/c");
    }
}
