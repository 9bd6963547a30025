//! Root filesystems for VMs: an initramfs (newc cpio) made of the task's image plus the guest
//! agent archive.
//!
//! The kernel unpacks concatenated cpio archives in order, so an initramfs is the image archive
//! followed by the agent archive (guest agent at `/.drover/init`, the virtio modules, the
//! mount points), which wins where both define a path. Images come from the Docker Engine
//! (`docker create` + `docker export`, converted from tar to cpio in one streaming pass, so
//! ownership, modes, device nodes and hard links survive without root or a scratch directory)
//! or, for tests and hand-made root filesystems, from a host directory named `dir:/path`.

use std::collections::HashMap;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::runtime::RuntimeError;

/// Prefix of image references that name a host directory instead of a Docker image.
pub const DIR_IMAGE_PREFIX: &str = "dir:";

/// What a root filesystem brings besides its files.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct ImageConfig {
    /// `KEY=value` environment of the image (`ENV` in a Dockerfile).
    #[serde(default)]
    pub env: Vec<String>,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;
const S_IFBLK: u32 = 0o060000;
const S_IFIFO: u32 = 0o010000;

/// Writes a newc ("070701") cpio archive, the format the kernel's initramfs unpacker reads.
pub(crate) struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    offset: u64,
}

/// One archive member's metadata.
struct Header<'a> {
    name: &'a str,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    mtime: u32,
    size: u64,
    rdev: (u32, u32),
    ino: u32,
}

impl<W: Write> CpioWriter<W> {
    pub(crate) fn new(out: W) -> Self {
        CpioWriter { out, next_ino: 1, offset: 0 }
    }

    fn ino(&mut self) -> u32 {
        self.next_ino += 1;
        self.next_ino
    }

    fn header(&mut self, h: &Header<'_>) -> std::io::Result<()> {
        let name = h.name.trim_start_matches("./").trim_start_matches('/');
        let size = u32::try_from(h.size).map_err(|_| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{name}: larger than 4 GiB"))
        })?;
        let text = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            h.ino,
            h.mode,
            h.uid,
            h.gid,
            h.nlink,
            h.mtime,
            size,
            0,
            0,
            h.rdev.0,
            h.rdev.1,
            name.len() + 1,
            0
        );
        self.write(text.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> std::io::Result<()> {
        let padding = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..padding])
    }

    /// Adds a directory.
    pub(crate) fn dir(&mut self, name: &str, mode: u32) -> std::io::Result<()> {
        let ino = self.ino();
        let header = Header {
            name,
            mode: S_IFDIR | (mode & 0o7777),
            uid: 0,
            gid: 0,
            nlink: 2,
            mtime: 0,
            size: 0,
            rdev: (0, 0),
            ino,
        };
        self.header(&header)
    }

    /// Adds a regular file with the given contents.
    pub(crate) fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> std::io::Result<()> {
        self.file_from(name, mode, (0, 0), 0, data.len() as u64, &mut &data[..]).map(|_| ())
    }

    /// Adds a regular file of `size` bytes read from `data`; returns its inode number, which
    /// later hard links refer to.
    fn file_from(
        &mut self,
        name: &str,
        mode: u32,
        owner: (u32, u32),
        mtime: u32,
        size: u64,
        data: &mut dyn Read,
    ) -> std::io::Result<u32> {
        let ino = self.ino();
        // nlink 2 makes the kernel remember the inode, so later hard links to it work.
        let header = Header {
            name,
            mode: S_IFREG | (mode & 0o7777),
            uid: owner.0,
            gid: owner.1,
            nlink: 2,
            mtime,
            size,
            rdev: (0, 0),
            ino,
        };
        self.header(&header)?;
        let copied = std::io::copy(&mut data.take(size), &mut self.out)?;
        self.offset += copied;
        if copied != size {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{name}: short read"),
            ));
        }
        self.pad()?;
        Ok(ino)
    }

    fn hard_link(&mut self, name: &str, mode: u32, owner: (u32, u32), ino: u32) -> std::io::Result<()> {
        let header = Header {
            name,
            mode: S_IFREG | (mode & 0o7777),
            uid: owner.0,
            gid: owner.1,
            nlink: 2,
            mtime: 0,
            size: 0,
            rdev: (0, 0),
            ino,
        };
        self.header(&header)
    }

    /// Adds a symbolic link.
    pub(crate) fn symlink(&mut self, name: &str, target: &str) -> std::io::Result<()> {
        let ino = self.ino();
        let header = Header {
            name,
            mode: S_IFLNK | 0o777,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            size: target.len() as u64,
            rdev: (0, 0),
            ino,
        };
        self.header(&header)?;
        self.write(target.as_bytes())?;
        self.pad()
    }

    /// Adds a device node or fifo; `kind` is the `S_IF*` type bits.
    fn node(&mut self, name: &str, kind: u32, mode: u32, rdev: (u32, u32)) -> std::io::Result<()> {
        let ino = self.ino();
        let header = Header {
            name,
            mode: kind | (mode & 0o7777),
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            size: 0,
            rdev,
            ino,
        };
        self.header(&header)
    }

    /// Writes the trailer and returns the underlying writer.
    pub(crate) fn finish(mut self) -> std::io::Result<W> {
        let ino = 0;
        let trailer = Header {
            name: "TRAILER!!!",
            mode: 0,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            size: 0,
            rdev: (0, 0),
            ino,
        };
        self.header(&trailer)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Converts a tar stream (as `docker export` writes it) into a cpio archive.
pub(crate) fn tar_to_cpio<R: Read, W: Write>(tar: R, cpio: &mut CpioWriter<W>) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(tar);
    let mut inodes: HashMap<String, u32> = HashMap::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.to_string_lossy().trim_start_matches("./").trim_end_matches('/').to_owned();
        if path.is_empty() || path == "." {
            continue;
        }
        let header = entry.header();
        let mode = header.mode().unwrap_or(0o644);
        // Unset numeric fields (some tar writers leave them blank) mean root and epoch.
        let owner = (header.uid().unwrap_or(0) as u32, header.gid().unwrap_or(0) as u32);
        let mtime = header.mtime().unwrap_or(0) as u32;
        let kind = header.entry_type();
        let size = header.size()?;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let ino = cpio.file_from(&path, mode, owner, mtime, size, &mut entry)?;
                inodes.insert(path, ino);
            }
            tar::EntryType::Directory => cpio.dir(&path, mode)?,
            tar::EntryType::Symlink => {
                let target = entry.link_name()?.map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                cpio.symlink(&path, &target)?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name()?.map(|t| t.to_string_lossy().into_owned()).unwrap_or_default();
                match inodes.get(target.trim_start_matches("./").trim_start_matches('/')) {
                    Some(&ino) => cpio.hard_link(&path, mode, owner, ino)?,
                    None => tracing::debug!(path, target, "hard link to an unknown file skipped"),
                }
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                let major = header.device_major()?.unwrap_or(0);
                let minor = header.device_minor()?.unwrap_or(0);
                let kind = if kind == tar::EntryType::Char { S_IFCHR } else { S_IFBLK };
                cpio.node(&path, kind, mode, (major, minor))?;
            }
            tar::EntryType::Fifo => cpio.node(&path, S_IFIFO, mode, (0, 0))?,
            _ => {}
        }
    }
    Ok(())
}

/// Adds a host directory tree to a cpio archive, owned by root.
pub(crate) fn dir_to_cpio<W: Write>(root: &Path, cpio: &mut CpioWriter<W>) -> std::io::Result<()> {
    fn walk<W: Write>(dir: &Path, prefix: &str, cpio: &mut CpioWriter<W>) -> std::io::Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let meta = std::fs::symlink_metadata(entry.path())?;
            let mode = meta.permissions().mode();
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(entry.path())?;
                cpio.symlink(&rel, &target.to_string_lossy())?;
            } else if meta.is_dir() {
                cpio.dir(&rel, mode)?;
                walk(&entry.path(), &rel, cpio)?;
            } else if meta.is_file() {
                let mut file = std::fs::File::open(entry.path())?;
                cpio.file_from(&rel, mode, (0, 0), meta.mtime() as u32, meta.len(), &mut file)?;
            }
        }
        Ok(())
    }
    walk(root, "", cpio)
}

/// The agent archive: the guest agent as `/.drover/init`, the modules it loads, the mount
/// points and `/dev/console` (PID 1's stdio before devtmpfs is mounted).
pub(crate) fn agent_archive(guest_agent: &Path, modules: &[PathBuf]) -> std::io::Result<Vec<u8>> {
    let mut cpio = CpioWriter::new(Vec::new());
    for dir in ["proc", "sys", "dev", "tmp", "run", "workspace", ".drover", ".drover/modules"] {
        cpio.dir(dir, if dir == "tmp" { 0o1777 } else { 0o755 })?;
    }
    cpio.node("dev/console", S_IFCHR, 0o600, (5, 1))?;
    cpio.file(".drover/init", 0o755, &std::fs::read(guest_agent)?)?;
    for (index, module) in modules.iter().enumerate() {
        let name = module.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        cpio.file(&format!(".drover/modules/{index:02}-{name}"), 0o644, &std::fs::read(module)?)?;
    }
    cpio.finish()
}

/// Whether an ELF file is statically linked (has no `PT_INTERP` program header), which the
/// guest agent must be: it runs in images with any libc or none.
pub(crate) fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    let bytes = std::fs::read(path)?;
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not a 64-bit ELF file");
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return Err(invalid());
    }
    let u16_at = |at: usize| bytes.get(at..at + 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u64_at = |at: usize| bytes.get(at..at + 8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38)) else {
        return Err(invalid());
    };
    const PT_INTERP: u32 = 3;
    for index in 0..phnum {
        let at = phoff as usize + index * phentsize;
        let kind = bytes.get(at..at + 4).and_then(|b| b.try_into().ok()).map(u32::from_le_bytes);
        match kind {
            Some(PT_INTERP) => return Ok(false),
            Some(_) => {}
            None => return Err(invalid()),
        }
    }
    Ok(true)
}

/// Short content hash used in cache file names.
pub(crate) fn short_hash(bytes: &[u8]) -> String {
    hex::encode(&Sha256::digest(bytes)[..12])
}

/// Builds the initramfs for `image` at `dest` (image archive, then `agent`), returning the
/// image's configuration. Docker images are cached in `cache_dir` by image id and agent hash;
/// `dir:` images are rebuilt every time, since a directory has no version.
pub(crate) async fn initramfs(
    image: &str,
    agent: &[u8],
    agent_hash: &str,
    cache_dir: &Path,
    scratch: &Path,
) -> Result<(PathBuf, ImageConfig), RuntimeError> {
    if let Some(dir) = image.strip_prefix(DIR_IMAGE_PREFIX) {
        let (dir, agent, dest) = (PathBuf::from(dir), agent.to_vec(), scratch.join("initramfs.cpio"));
        let out = dest.clone();
        blocking(format!("build initramfs from {}", dir.display()), move || {
            let config = read_dir_image_config(&dir);
            write_atomically(&out, |file| {
                let mut cpio = CpioWriter::new(file);
                dir_to_cpio(&dir, &mut cpio)?;
                cpio.finish()?.write_all(&agent)
            })?;
            Ok(config)
        })
        .await
        .map(|config| (dest, config))
    } else {
        docker_initramfs(image, agent, agent_hash, cache_dir).await
    }
}

/// A `dir:` image may carry its environment in `/.drover-image.json` (`{"env": [...]}`).
fn read_dir_image_config(dir: &Path) -> ImageConfig {
    std::fs::read(dir.join(".drover-image.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

async fn docker_initramfs(
    image: &str,
    agent: &[u8],
    agent_hash: &str,
    cache_dir: &Path,
) -> Result<(PathBuf, ImageConfig), RuntimeError> {
    let inspect = docker(&["image", "inspect", "--format", "{{.Id}} {{json .Config.Env}}", image]).await?;
    let (id, env) = inspect.trim().split_once(' ').unwrap_or((inspect.trim(), "null"));
    let config = ImageConfig {
        env: serde_json::from_str::<Option<Vec<String>>>(env).ok().flatten().unwrap_or_default(),
    };
    let digest = id.trim_start_matches("sha256:");
    if digest.is_empty() || !digest.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Err(RuntimeError::Io {
            context: format!("inspect image {image}"),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unexpected image id {id:?}"),
            ),
        });
    }
    let dest = cache_dir.join("initramfs").join(format!("{digest}-{agent_hash}.cpio"));
    if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
        return Ok((dest, config));
    }
    let container = docker(&["create", "--network", "none", image, "/.drover/init"]).await?;
    let container = container.trim().to_owned();
    tracing::info!(image, digest, container = %container, "exporting image for microvm root filesystem");
    let (out, agent, name) = (dest.clone(), agent.to_vec(), container.clone());
    let built = blocking(format!("export image {image}"), move || {
        let mut child = std::process::Command::new("docker")
            .args(["export", &name])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let written = write_atomically(&out, |file| {
            let mut cpio = CpioWriter::new(file);
            tar_to_cpio(std::io::BufReader::new(stdout), &mut cpio)?;
            cpio.finish()?.write_all(&agent)
        });
        let status = child.wait()?;
        written?;
        if !status.success() {
            let _ = std::fs::remove_file(&out);
            return Err(std::io::Error::other(format!("docker export exited with {status}")));
        }
        Ok(())
    })
    .await;
    if let Err(error) = docker(&["rm", "-f", &container]).await {
        tracing::warn!(container = %container, %error, "cannot remove export container");
    }
    built.map(|()| (dest, config))
}

/// Runs a `docker` CLI command and returns its stdout.
/// The id (`sha256:...`) of a Docker image, which is how tasks of shipped images name it;
/// `dir:` images and images Docker does not know stay as they are.
pub(crate) async fn canonical_name(image: &str) -> String {
    if image.starts_with(DIR_IMAGE_PREFIX) || image.starts_with("sha256:") {
        return image.to_owned();
    }
    match docker(&["image", "inspect", "--format", "{{.Id}}", image]).await {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        Ok(_) | Err(_) => image.to_owned(),
    }
}

async fn docker(args: &[&str]) -> Result<String, RuntimeError> {
    let context = format!("docker {}", args.first().copied().unwrap_or_default());
    let output = tokio::process::Command::new("docker")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|source| RuntimeError::Unavailable {
            runtime: "microvm",
            reason: format!("cannot run the docker CLI to export images: {source}"),
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(RuntimeError::Io { context, source: std::io::Error::other(stderr) });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Writes a file through a temporary name and renames it into place, so concurrent builders
/// and readers never see a partial archive.
fn write_atomically(
    dest: &Path,
    fill: impl FnOnce(BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let dir = dest.parent().ok_or_else(|| std::io::Error::other("destination has no parent"))?;
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        rand::random::<u64>()
    ));
    let result = std::fs::File::create(&tmp).and_then(|file| fill(BufWriter::new(file)));
    match result.and_then(|()| std::fs::rename(&tmp, dest)) {
        Ok(()) => Ok(()),
        Err(error) => {
            let _ = std::fs::remove_file(&tmp);
            Err(error)
        }
    }
}

async fn blocking<T: Send + 'static>(
    context: String,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, RuntimeError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(RuntimeError::Io { context, source }),
        Err(join) => Err(RuntimeError::Io { context, source: std::io::Error::other(join) }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_members_are_aligned_and_terminated() {
        let mut cpio = CpioWriter::new(Vec::new());
        cpio.dir("bin", 0o755).expect("dir");
        cpio.file("bin/a", 0o755, b"hello").expect("file");
        cpio.symlink("bin/b", "a").expect("symlink");
        let bytes = cpio.finish().expect("finish");
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("bin/a\0"));
        assert!(text.contains("hello"));
        assert!(text.contains("TRAILER!!!\0"));
    }

    #[test]
    fn tar_hard_links_become_cpio_links() {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(3);
        header.set_mode(0o755);
        header.set_cksum();
        builder.append_data(&mut header, "bin/busybox", &b"elf"[..]).expect("file");
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Link);
        link.set_size(0);
        link.set_mode(0o755);
        link.set_cksum();
        builder.append_link(&mut link, "bin/sh", "bin/busybox").expect("link");
        let tar = builder.into_inner().expect("tar");
        let mut cpio = CpioWriter::new(Vec::new());
        tar_to_cpio(&tar[..], &mut cpio).expect("convert");
        let bytes = cpio.finish().expect("finish");
        // Both members carry the same inode number (first field after the magic).
        let text = String::from_utf8_lossy(&bytes);
        let inode_of = |name: &str| {
            let at = text.find(&format!("{name}\0")).expect("member");
            let header_start = text[..at].rfind("070701").expect("header");
            text[header_start + 6..header_start + 14].to_owned()
        };
        assert_eq!(inode_of("bin/busybox"), inode_of("bin/sh"));
    }

    #[test]
    fn detects_static_binaries() {
        assert!(!is_static_elf(Path::new("/bin/ls")).expect("elf"));
        if Path::new("/bin/busybox").exists() {
            assert!(is_static_elf(Path::new("/bin/busybox")).expect("elf"));
        }
        assert!(is_static_elf(Path::new("/etc/hostname")).is_err());
    }
}
