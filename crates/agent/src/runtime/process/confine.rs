//! Confinement of a process task when the agent runs as root: an unprivileged identity of its
//! own, and a mount namespace in which the agent's state, other workspaces and configured paths
//! (the server's data under `drover up`) are hidden, and only the task's workspace and a
//! private `/tmp` are writable.
//!
//! Everything the step's child needs is built beforehand ([`Confinement::prepare`], in the
//! agent; the step's supervisor receives it); the child then only makes raw system calls
//! ([`Confinement::apply`]), because it shares its supervisor's memory until it execs.
//!
//! Inside the namespace, a small read-only tmpfs covers each hidden directory. The workspace
//! lives beneath the agent's work dir, so the directories down to it are recreated inside that
//! tmpfs and the real workspace is bind-mounted there through a descriptor opened before the
//! cover went on (its old path is no longer reachable by then).

use std::ffi::{CStr, CString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// How process tasks are confined; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// Uids handed out one per running task (gid equal to the uid, no supplementary groups).
    pub uids: std::ops::Range<u32>,
    /// Accounts a job's `user:` may name on this node (`--run-as`); the project must allow
    /// them too.
    pub run_as: Vec<String>,
    /// The agent's work dir: hidden, but for the task's own workspace.
    pub state_dir: PathBuf,
    /// More directories hidden from tasks (the server's data dir when it shares the host).
    pub hide: Vec<PathBuf>,
}

impl Isolation {
    /// The default range of task uids: far above the accounts of people and services.
    pub const DEFAULT_UIDS: std::ops::Range<u32> = 1_000_000..1_065_536;
}

/// Who a task runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// Finds the account a job's `user:` names (`name`, `uid` or `uid:gid`), if `allowed` lets it.
pub(crate) fn named_identity(user: &str, allowed: &[String]) -> Result<Identity, String> {
    if !allowed.iter().any(|a| drover_core::tenancy::pattern_matches(a, user)) {
        return Err(format!(
            "this node does not run tasks as `{user}` (its agent allows {}; see --run-as)",
            if allowed.is_empty() { "no named account".to_owned() } else { allowed.join(", ") }
        ));
    }
    let (name, group) = match user.split_once(':') {
        Some((n, g)) => (n, Some(g)),
        None => (user, None),
    };
    let account = match name.parse::<u32>() {
        Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)).ok().flatten(),
        Err(_) => nix::unistd::User::from_name(name).ok().flatten(),
    };
    let uid = match (name.parse::<u32>(), &account) {
        (Ok(uid), _) => uid,
        (Err(_), Some(a)) => a.uid.as_raw(),
        (Err(_), None) => return Err(format!("no account `{name}` on this node")),
    };
    let gid = match group {
        Some(g) => g.parse::<u32>().map_err(|_| format!("group `{g}` is not a number"))?,
        None => account.map_or(uid, |a| a.gid.as_raw()),
    };
    if uid == 0 {
        return Err("process tasks never run as root".into());
    }
    Ok(Identity { uid, gid })
}

/// What the child does before exec, built by the agent and sent to the step's supervisor,
/// which keeps it until its child applies it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Confinement {
    identity: Identity,
    mounts: Option<Mounts>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Mounts {
    /// Directories covered by an empty read-only tmpfs; the first holds the workspace.
    hide: Vec<CString>,
    /// Every directory from the root down to the workspace, created where a cover or the
    /// private `/tmp` took them away (elsewhere they exist already).
    path_to_workspace: Vec<CString>,
    workspace: CString,
    /// The attempt's private temporary directory, bound onto each of `tmp_targets`.
    tmp: CString,
    tmp_targets: Vec<CString>,
}

fn cstring(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{} contains NUL", path.display())))
}

impl Confinement {
    /// Builds the confinement of a step running as `identity` in `workspace`, with `tmp` as its
    /// `/tmp`; without `namespace`, only the identity changes.
    pub fn prepare(
        identity: Identity,
        workspace: &Path,
        tmp: &Path,
        isolation: &Isolation,
        namespace: bool,
    ) -> io::Result<Confinement> {
        if !namespace {
            return Ok(Confinement { identity, mounts: None });
        }
        // The cover holding the workspace first; paths beneath another hidden path are covered
        // with it; paths that do not exist hide nothing.
        let mut hidden: Vec<PathBuf> = std::iter::once(isolation.state_dir.clone())
            .chain(isolation.hide.iter().cloned())
            .filter(|p| p.is_dir())
            .collect();
        hidden.sort();
        hidden.dedup();
        let hidden: Vec<PathBuf> = hidden
            .iter()
            .filter(|p| !hidden.iter().any(|other| other != *p && p.starts_with(other)))
            .cloned()
            .collect();
        let Some(holder) = hidden.iter().find(|h| workspace.starts_with(h)).cloned() else {
            return Err(io::Error::other(format!(
                "workspace {} is not inside the agent's work dir {}",
                workspace.display(),
                isolation.state_dir.display()
            )));
        };
        let mut hide = vec![cstring(&holder)?];
        for h in hidden.iter().filter(|h| **h != holder) {
            hide.push(cstring(h)?);
        }
        let mut path_to_workspace: Vec<CString> =
            workspace.ancestors().filter(|a| a.parent().is_some()).map(cstring).collect::<io::Result<_>>()?;
        path_to_workspace.reverse();
        let tmp_targets = ["/tmp", "/var/tmp"]
            .into_iter()
            .map(Path::new)
            .filter(|p| p.is_dir())
            .map(cstring)
            .collect::<io::Result<_>>()?;
        Ok(Confinement {
            identity,
            mounts: Some(Mounts {
                hide,
                path_to_workspace,
                workspace: cstring(workspace)?,
                tmp: cstring(tmp)?,
                tmp_targets,
            }),
        })
    }

    /// Applies the confinement in the forked child, before exec. Async-signal-safe: raw system
    /// calls on data built before the fork.
    pub fn apply(&self) -> io::Result<()> {
        if let Some(m) = &self.mounts {
            m.apply()?;
        }
        let Identity { uid, gid } = self.identity;
        // SAFETY: plain system calls with integer arguments; a null list with length 0 for
        // setgroups.
        unsafe {
            check(libc::setgroups(0, std::ptr::null()))?;
            check(libc::setresgid(gid, gid, gid))?;
            check(libc::setresuid(uid, uid, uid))?;
            // No setuid binary can give the task back what it just lost.
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
        }
        Ok(())
    }
}

impl Mounts {
    fn apply(&self) -> io::Result<()> {
        const COVER: &CStr = c"mode=0755,size=64k";
        // SAFETY: every pointer is a NUL-terminated string built before the fork (or a static
        // one) that outlives the calls, or null where the call allows it.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWNS))?;
            // Nothing mounted here may propagate back to the host.
            check(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ))?;
            // Opened in the new namespace (a bind needs a source mount of the caller's own
            // namespace) and before the covers hide their paths.
            let open = |path: &CString| {
                libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            };
            let workspace_fd = open(&self.workspace);
            let tmp_fd = open(&self.tmp);
            if workspace_fd < 0 || tmp_fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let (mut workspace_buf, mut tmp_buf) = ([0u8; FD_PATH_LEN], [0u8; FD_PATH_LEN]);
            let workspace_source = fd_path(workspace_fd, &mut workspace_buf);
            let tmp_source = fd_path(tmp_fd, &mut tmp_buf);
            let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            // The private /tmp first: a work dir beneath /tmp then simply vanishes with it.
            for target in &self.tmp_targets {
                check(libc::mount(
                    tmp_source,
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ))?;
            }
            let mut holder_covered = false;
            for (i, dir) in self.hide.iter().enumerate() {
                if libc::access(dir.as_ptr(), libc::F_OK) != 0 {
                    // Already out of sight (it was beneath /tmp).
                    continue;
                }
                // The holder gets the path to the workspace first, then goes read-only.
                let ro = if i == 0 { 0 } else { libc::MS_RDONLY };
                check(libc::mount(
                    c"tmpfs".as_ptr(),
                    dir.as_ptr(),
                    c"tmpfs".as_ptr(),
                    flags | ro,
                    COVER.as_ptr().cast(),
                ))?;
                holder_covered |= i == 0;
            }
            for dir in &self.path_to_workspace {
                if libc::mkdir(dir.as_ptr(), 0o755) != 0 && *libc::__errno_location() != libc::EEXIST {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::mount(
                workspace_source,
                self.workspace.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ))?;
            if holder_covered && let Some(holder) = self.hide.first() {
                check(libc::mount(
                    std::ptr::null(),
                    holder.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REMOUNT | libc::MS_RDONLY | flags,
                    COVER.as_ptr().cast(),
                ))?;
            }
            // Shared memory is private too; a host without /dev/shm simply has none.
            let _ = libc::mount(
                c"tmpfs".as_ptr(),
                c"/dev/shm".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=1777,size=64m".as_ptr().cast(),
            );
            // The working directory was set on the covered path; enter the bound one.
            check(libc::chdir(self.workspace.as_ptr()))?;
        }
        Ok(())
    }
}

/// Room for `/proc/self/fd/` and the digits of any descriptor, and the NUL.
const FD_PATH_LEN: usize = 32;

/// Writes `/proc/self/fd/<fd>` NUL-terminated into `buf` without allocating; returns it as a C
/// string pointer.
fn fd_path(fd: libc::c_int, buf: &mut [u8; FD_PATH_LEN]) -> *const libc::c_char {
    const PREFIX: &[u8] = b"/proc/self/fd/";
    buf[..PREFIX.len()].copy_from_slice(PREFIX);
    let len = super::supervisor::write_int(&mut buf[PREFIX.len()..], i64::from(fd.max(0)));
    buf[PREFIX.len() + len] = 0;
    buf.as_ptr().cast()
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result == -1 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Whether this process may make mount namespaces (root with `CAP_SYS_ADMIN`, and no seccomp
/// profile refusing `unshare`), tried in a forked child so the agent's own namespace is untouched.
pub(crate) fn namespaces_work() -> bool {
    // SAFETY: the child only calls unshare and _exit, both async-signal-safe; the parent reaps it.
    unsafe {
        match libc::fork() {
            -1 => false,
            0 => {
                let ok = libc::unshare(libc::CLONE_NEWNS) == 0;
                libc::_exit(if ok { 0 } else { 1 });
            }
            pid => {
                let mut status = 0;
                while libc::waitpid(pid, &mut status, 0) == -1 {
                    if *libc::__errno_location() != libc::EINTR {
                        return false;
                    }
                }
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
            }
        }
    }
}

/// Gives `path` and everything beneath it (links themselves, not their targets) to `identity`.
pub(crate) fn give_tree(path: &Path, identity: Identity) -> io::Result<()> {
    for entry in walkdir::WalkDir::new(path).follow_links(false) {
        let entry = entry.map_err(io::Error::other)?;
        std::os::unix::fs::lchown(entry.path(), Some(identity.uid), Some(identity.gid))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_paths_are_written_without_allocating() {
        let mut buf = [0u8; FD_PATH_LEN];
        let p = fd_path(1234, &mut buf);
        // SAFETY: fd_path wrote a NUL-terminated string into buf, which outlives this use.
        assert_eq!(unsafe { CStr::from_ptr(p) }, c"/proc/self/fd/1234");
        let p = fd_path(0, &mut buf);
        // SAFETY: as above.
        assert_eq!(unsafe { CStr::from_ptr(p) }, c"/proc/self/fd/0");
    }

    #[test]
    fn named_accounts_need_the_nodes_leave_and_are_never_root() {
        let err = named_identity("daemon", &[]).unwrap_err();
        assert!(err.contains("--run-as"), "{err}");
        assert_eq!(named_identity("4242:77", &["42*".into()]), Ok(Identity { uid: 4242, gid: 77 }));
        assert!(named_identity("0", &["*".into()]).unwrap_err().contains("never run as root"));
        assert!(named_identity("root", &["*".into()]).is_err());
        assert!(named_identity("no-such-account-here", &["*".into()]).unwrap_err().contains("no account"));
    }
}
