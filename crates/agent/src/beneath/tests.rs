use std::io::{Read, Write};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;

use super::*;

/// A workspace `ws` beside an `outside` directory holding `secret.txt`, with links from the
/// workspace out: `out-dir` (absolute, to the directory), `out-file` (absolute, to the file),
/// `up` (relative, `../outside`).
struct Scene {
    _tmp: tempfile::TempDir,
    ws: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn scene() -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let ws = tmp.path().join("ws");
    let outside = tmp.path().join("outside");
    std::fs::create_dir_all(ws.join("sub")).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "precious").unwrap();
    std::fs::write(ws.join("sub/data.txt"), "inside").unwrap();
    symlink(&outside, ws.join("out-dir")).unwrap();
    symlink(outside.join("secret.txt"), ws.join("out-file")).unwrap();
    symlink("../outside", ws.join("up")).unwrap();
    symlink("sub/data.txt", ws.join("in-link")).unwrap();
    Scene { _tmp: tmp, ws, outside }
}

fn rel(path: &str) -> RelPath {
    RelPath::new(path).unwrap()
}

fn outside_untouched(s: &Scene) {
    let names: Vec<_> = std::fs::read_dir(&s.outside).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec!["secret.txt"], "something was written outside");
    assert_eq!(std::fs::read_to_string(s.outside.join("secret.txt")).unwrap(), "precious");
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Runs `check` with `openat2` and again with the fallback walk.
fn both(check: impl Fn()) {
    check();
    resolve::with_walk(check);
}

#[test]
fn writes_through_a_link_are_refused() {
    both(|| {
        let s = scene();
        let root = Dir::open(&s.ws).unwrap();
        for path in ["out-dir/x", "up/x", "out-dir/new/deeper/x", "in-link/x"] {
            let err = root.create_file(&rel(path), 0o644).unwrap_err();
            assert!(matches!(err, BeneathError::Link { .. } | BeneathError::NotDir { .. }), "{path}: {err}");
        }
        for path in ["out-file", "up", "in-link"] {
            let err = root.create_file(&rel(path), 0o644).unwrap_err();
            assert!(matches!(err, BeneathError::Link { .. }), "{path}: {err}");
            let err = root.open_for_write(&rel(path), 0o644).unwrap_err();
            assert!(matches!(err, BeneathError::Link { .. }), "{path}: {err}");
        }
        assert!(matches!(root.create_dir_all(&rel("out-dir/d"), None), Err(BeneathError::Link { .. })));
        let err = root.symlink(&rel("up/l"), Path::new("/etc")).unwrap_err();
        assert!(matches!(err, BeneathError::Link { .. }), "{err}");
        outside_untouched(&s);
        // The link itself was not replaced either.
        assert!(std::fs::symlink_metadata(s.ws.join("out-file")).unwrap().file_type().is_symlink());
    });
}

#[test]
fn dotdot_and_absolute_paths_are_refused() {
    for path in ["../outside/x", "/etc/passwd", "sub/../../outside/x"] {
        assert!(matches!(RelPath::new(path), Err(BeneathError::NotRelative { .. })), "{path}");
    }
}

#[test]
fn created_files_and_directories_lose_special_bits() {
    both(|| {
        let s = scene();
        let root = Dir::open(&s.ws).unwrap();
        let mut file = root.create_file(&rel("new/dir/f"), 0o6777).unwrap();
        file.write_all(b"hello").unwrap();
        drop(file);
        assert_eq!(mode(&s.ws.join("new/dir/f")), 0o755);
        assert_eq!(std::fs::read_to_string(s.ws.join("new/dir/f")).unwrap(), "hello");
        root.create_file(&rel("plain"), 0o4644).unwrap();
        assert_eq!(mode(&s.ws.join("plain")), 0o644);
        root.create_dir_all(&rel("d"), Some(0o3777)).unwrap();
        assert_eq!(mode(&s.ws.join("d")), 0o755);
        root.create_dir_all(&rel("locked"), Some(0o000)).unwrap();
        assert_eq!(mode(&s.ws.join("locked")), 0o700);
        // An existing setuid file that is written again loses the bit.
        std::fs::write(s.ws.join("suid"), "x").unwrap();
        std::fs::set_permissions(s.ws.join("suid"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        root.open_for_write(&rel("suid"), 0o4755).unwrap();
        assert_eq!(mode(&s.ws.join("suid")), 0o755);
    });
}

#[test]
fn truncation_and_offsets() {
    both(|| {
        let s = scene();
        let root = Dir::open(&s.ws).unwrap();
        root.create_file(&rel("sub/data.txt"), 0o644).unwrap().write_all(b"new").unwrap();
        assert_eq!(std::fs::read_to_string(s.ws.join("sub/data.txt")).unwrap(), "new");
        root.open_for_write(&rel("sub/data.txt"), 0o644).unwrap().write_all(b"N").unwrap();
        assert_eq!(std::fs::read_to_string(s.ws.join("sub/data.txt")).unwrap(), "New");
    });
}

#[test]
fn hard_links_and_fifos_are_not_written() {
    both(|| {
        let s = scene();
        let root = Dir::open(&s.ws).unwrap();
        std::fs::hard_link(s.outside.join("secret.txt"), s.ws.join("hard")).unwrap();
        let err = root.create_file(&rel("hard"), 0o644).unwrap_err();
        assert!(matches!(err, BeneathError::NotFile { .. }), "{err}");
        std::fs::remove_file(s.ws.join("hard")).unwrap();
        nix::unistd::mkfifo(&s.ws.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        // No reader: the open fails at once instead of waiting.
        assert!(root.create_file(&rel("fifo"), 0o644).is_err());
        assert!(matches!(root.open_file(&rel("fifo")), Err(BeneathError::NotFile { .. })));
        outside_untouched(&s);
    });
}

#[test]
fn reads_follow_links_only_while_inside() {
    both(|| {
        let s = scene();
        let root = Dir::open(&s.ws).unwrap();
        let mut text = String::new();
        root.open_file(&rel("in-link")).unwrap().read_to_string(&mut text).unwrap();
        assert_eq!(text, "inside");
        for path in ["out-file", "up/secret.txt", "out-dir/secret.txt"] {
            let err = root.open_file(&rel(path)).unwrap_err();
            assert!(matches!(err, BeneathError::Escapes { .. }), "{path}: {err}");
        }
        assert!(matches!(root.open_file(&rel("sub")), Err(BeneathError::NotFile { .. })));
        assert!(matches!(root.open_file(&rel("missing")), Err(BeneathError::NotFound { .. })));
    });
}

#[test]
fn links_are_replaced_and_trees_removed_without_following_links() {
    both(|| {
        let s = scene();
        let root = Dir::open(&s.ws).unwrap();
        root.symlink(&rel("sub/l"), Path::new("/etc")).unwrap();
        root.symlink(&rel("sub/l"), Path::new("data.txt")).unwrap();
        assert_eq!(std::fs::read_link(s.ws.join("sub/l")).unwrap(), Path::new("data.txt"));
        std::fs::create_dir_all(s.ws.join("tree/a/b")).unwrap();
        std::fs::write(s.ws.join("tree/a/b/f"), "x").unwrap();
        symlink(&s.outside, s.ws.join("tree/a/escape")).unwrap();
        root.remove(&rel("tree")).unwrap();
        assert!(!s.ws.join("tree").exists());
        root.remove(&rel("out-dir")).unwrap();
        root.remove(&rel("missing/deeper")).unwrap();
        assert!(!s.ws.join("out-dir").exists());
        outside_untouched(&s);
    });
}
