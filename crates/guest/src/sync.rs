//! The guest copy of the task workspace. The host uploads the workspace before the first step;
//! after each step the guest sends back what changed (by size, mtime and mode against what it
//! last saw), so the host workspace reflects the step's work when `wait` returns.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use drover_guest::protocol::{GUEST_WORKSPACE, GuestMessage, HostMessage, MAX_CHUNK, is_safe_relative_path};

use crate::{Outbox, log};

#[derive(Debug, Clone, PartialEq)]
enum Known {
    Dir { mode: u32 },
    File { mode: u32, size: u64, mtime_ns: i128 },
    Symlink { target: String },
}

/// The guest workspace and the state the host last saw of it.
pub(crate) struct Workspace {
    root: PathBuf,
    known: HashMap<String, Known>,
}

impl Workspace {
    pub(crate) fn new() -> Self {
        Workspace { root: PathBuf::from(GUEST_WORKSPACE), known: HashMap::new() }
    }

    /// Applies an upload message from the host.
    pub(crate) fn apply(&mut self, message: &HostMessage) -> std::io::Result<()> {
        let path = match message {
            HostMessage::MakeDir { path, .. }
            | HostMessage::PutFile { path, .. }
            | HostMessage::Symlink { path, .. } => path,
            _ => return Ok(()),
        };
        if !is_safe_relative_path(path) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("unsafe path {path:?}"),
            ));
        }
        let full = self.root.join(path);
        match message {
            HostMessage::MakeDir { mode, .. } => {
                std::fs::create_dir_all(&full)?;
                std::fs::set_permissions(&full, std::fs::Permissions::from_mode(*mode))?;
            }
            HostMessage::PutFile { mode, offset, data, .. } => {
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(*offset == 0)
                    .mode(*mode)
                    .open(&full)?;
                file.seek(SeekFrom::Start(*offset))?;
                file.write_all(data)?;
                file.set_permissions(std::fs::Permissions::from_mode(*mode))?;
            }
            HostMessage::Symlink { target, .. } => {
                let _ = std::fs::remove_file(&full);
                std::os::unix::fs::symlink(target, &full)?;
            }
            _ => {}
        }
        if let Some(known) = describe(&full) {
            self.known.insert(path.clone(), known);
        }
        Ok(())
    }

    /// Sends every change since the last upload or sync to the host.
    pub(crate) fn send_changes(&mut self, outbox: &Outbox) {
        let mut current = BTreeMap::new();
        walk(&self.root, "", &mut current);
        let mut removed: Vec<&String> = self
            .known
            .iter()
            .filter(|(path, old)| match current.get(*path) {
                None => true,
                Some(new) => std::mem::discriminant(new) != std::mem::discriminant(*old),
            })
            .map(|(path, _)| path)
            .collect();
        // Children before parents, so the host never removes a directory it is told about later.
        removed.sort_by(|a, b| b.cmp(a));
        for path in removed {
            outbox.broadcast(&GuestMessage::Removed { path: path.clone() });
        }
        for (path, entry) in &current {
            if self.known.get(path) == Some(entry) {
                continue;
            }
            match entry {
                Known::Dir { mode } => {
                    outbox.broadcast(&GuestMessage::DirChanged { path: path.clone(), mode: *mode })
                }
                Known::Symlink { target } => outbox
                    .broadcast(&GuestMessage::SymlinkChanged { path: path.clone(), target: target.clone() }),
                Known::File { mode, .. } => {
                    if let Err(error) = send_file(&self.root.join(path), path, *mode, outbox) {
                        log!("cannot send back {path}: {error}");
                    }
                }
            }
        }
        self.known = current.into_iter().collect();
    }
}

fn send_file(full: &Path, path: &str, mode: u32, outbox: &Outbox) -> std::io::Result<()> {
    let mut file = std::fs::File::open(full)?;
    let mut offset = 0u64;
    let mut buffer = vec![0u8; MAX_CHUNK];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 && offset > 0 {
            return Ok(());
        }
        outbox.broadcast(&GuestMessage::FileChanged {
            path: path.to_owned(),
            mode,
            offset,
            data: buffer[..n].to_vec(),
        });
        if n == 0 {
            return Ok(());
        }
        offset += n as u64;
    }
}

fn describe(path: &Path) -> Option<Known> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).ok()?;
        Some(Known::Symlink { target: target.to_string_lossy().into_owned() })
    } else if meta.is_dir() {
        Some(Known::Dir { mode })
    } else if meta.is_file() {
        let mtime_ns = i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec());
        Some(Known::File { mode, size: meta.len(), mtime_ns })
    } else {
        // Sockets, fifos and devices are not copied back.
        None
    }
}

fn walk(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Known>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut names: Vec<_> = entries.flatten().map(|e| e.file_name()).collect();
    names.sort();
    for name in names {
        let Some(name) = name.to_str() else {
            continue;
        };
        let rel = if prefix.is_empty() { name.to_owned() } else { format!("{prefix}/{name}") };
        let full = dir.join(name);
        let Some(known) = describe(&full) else {
            continue;
        };
        let is_dir = matches!(known, Known::Dir { .. });
        out.insert(rel.clone(), known);
        if is_dir {
            walk(&full, &rel, out);
        }
    }
}
