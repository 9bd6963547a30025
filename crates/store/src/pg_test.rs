//! A throwaway PostgreSQL server for tests (cargo feature `test-support`; always built for this
//! crate's own tests).
//!
//! ```no_run
//! # async fn example() {
//! use drover_store::pg_test::TempPostgres;
//! // One server per test process, started on first use and stopped when the process exits.
//! let url = TempPostgres::shared().url_for_new_database().await;
//! let store = drover_store::postgres::PostgresStore::connect(&url).await.unwrap();
//! # }
//! ```
//!
//! Where the server comes from:
//!
//! - If `DROVER_TEST_POSTGRES` is set, it is the URL of a server on which the user may create
//!   databases (e.g. `postgres://postgres@127.0.0.1:5432/postgres`); nothing is started, and
//!   every test gets a database of its own there.
//! - Otherwise a private server is started from the PostgreSQL binaries found under
//!   `/usr/lib/postgresql/<version>/bin` (Debian's `postgresql` package): `initdb` runs once per
//!   machine into a cached template directory, each server gets a copy of it in a fresh temp
//!   directory and listens on a free port of 127.0.0.1 (and a Unix socket in that directory),
//!   with `fsync=off`. PostgreSQL refuses to run as root, so when the tests run as root the
//!   server runs as the `postgres` OS user (the directory is handed to it).
//!
//! A private server is stopped and its directory removed when the [`TempPostgres`] is
//! dropped. A watchdog process does the same if the test process dies first (or never drops
//! it, like [`TempPostgres::shared`]), so no server outlives its tests by more than a second.
//! When no PostgreSQL binaries are installed, starting fails with an error that says how to
//! install them: tests never skip silently.

use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use sqlx::{Connection, Executor};

/// The environment variable naming an existing server to use instead of a private one.
pub const ENV_URL: &str = "DROVER_TEST_POSTGRES";

/// How long a private server may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a private server may take to shut down before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a test server could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum TempPostgresError {
    /// No `initdb`/`postgres` binaries were found.
    #[error(
        "no PostgreSQL server binaries found under /usr/lib/postgresql/*/bin: install them with \
         `apt-get install postgresql`, or set {ENV_URL} to the URL of a server where databases may be created"
    )]
    NotInstalled,
    /// Running as root, but there is no `postgres` OS user to run the server as.
    #[error(
        "running as root and there is no `postgres` user to run the server as: `apt-get install postgresql` creates it"
    )]
    NoPostgresUser,
    /// A file system or process operation failed.
    #[error("cannot {what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A tool or the server failed.
    #[error("{what} failed: {detail}")]
    Failed {
        /// What was being done.
        what: String,
        /// Its output or the reason.
        detail: String,
    },
    /// Creating a database failed.
    #[error("cannot create a test database: {0}")]
    Database(#[from] sqlx::Error),
    /// The operation needs a private server, but `DROVER_TEST_POSTGRES` names an external one.
    #[error("{0} needs a private server; unset {ENV_URL}")]
    External(&'static str),
}

type Result<T> = std::result::Result<T, TempPostgresError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TempPostgresError {
    let what = what.into();
    move |source| TempPostgresError::Io { what, source }
}

/// A PostgreSQL server for tests: an external one (`DROVER_TEST_POSTGRES`) or a private one
/// that this value owns. See the module documentation.
#[derive(Debug)]
pub struct TempPostgres {
    /// URL of the `postgres` database, for creating databases.
    admin_url: String,
    private: Option<Private>,
}

/// A server this process started.
#[derive(Debug)]
struct Private {
    /// `bin` directory of the PostgreSQL installation.
    bin: PathBuf,
    /// The temp directory: `data/`, the Unix socket and `postgres.log`.
    dir: PathBuf,
    port: u16,
    /// Whom to run the server as when running as root.
    run_as: Option<String>,
    running: Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    postgres: Child,
    /// Stops the server and removes `dir` if this process dies; killed when we stop it.
    watchdog: Child,
}

impl TempPostgres {
    /// The server shared by all tests of this process: `DROVER_TEST_POSTGRES` if set, else a
    /// private server started on first use and stopped when the process exits.
    ///
    /// # Panics
    ///
    /// When the server cannot be provided; the message says why and how to fix it (e.g.
    /// `apt-get install postgresql`).
    pub fn shared() -> &'static TempPostgres {
        static SHARED: OnceLock<std::result::Result<TempPostgres, String>> = OnceLock::new();
        match SHARED.get_or_init(|| TempPostgres::from_env_or_start().map_err(|e| e.to_string())) {
            Ok(server) => server,
            Err(error) => panic!("no PostgreSQL for tests: {error}"),
        }
    }

    /// Uses the server named by `DROVER_TEST_POSTGRES`, or starts a private one.
    pub fn from_env_or_start() -> Result<TempPostgres> {
        match std::env::var(ENV_URL) {
            Ok(url) if !url.trim().is_empty() => {
                Ok(TempPostgres { admin_url: url.trim().to_string(), private: None })
            }
            _ => TempPostgres::start(),
        }
    }

    /// Starts a private server, whatever `DROVER_TEST_POSTGRES` says (for tests that stop
    /// and restart it). Blocks until it accepts connections (usually well under a second once
    /// the template exists; the first `initdb` on a machine takes a few seconds).
    pub fn start() -> Result<TempPostgres> {
        let bin = find_bin()?;
        let run_as = if nix::unistd::geteuid().is_root() {
            if nix::unistd::User::from_name("postgres").ok().flatten().is_none() {
                return Err(TempPostgresError::NoPostgresUser);
            }
            Some("postgres".to_string())
        } else {
            None
        };
        let template = template(&bin, run_as.as_deref())?;
        let dir = unique_dir("drover-pg")?;
        let mut server = TempPostgres {
            admin_url: String::new(),
            private: Some(Private { bin, dir: dir.clone(), port: 0, run_as, running: Mutex::new(None) }),
        };
        // From here on, dropping `server` cleans up.
        let private = server.private.as_mut().ok_or(TempPostgresError::External("start"))?;
        let copied = Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(dir.join("data"))
            .output()
            .map_err(io("run cp"))?;
        if !copied.status.success() {
            return Err(failed("copying the template data directory", &copied));
        }
        if let Some(user) = &private.run_as {
            chown_to(&dir, user)?;
        }
        // A free port can be taken by someone else before the server binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            private.port = free_port()?;
            match private.spawn_and_wait_blocking() {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        server.admin_url = format!("postgres://postgres@127.0.0.1:{}/postgres", private.port);
        tracing::info!(port = private.port, dir = %dir.display(), "started a private postgresql");
        Ok(server)
    }

    /// URL of the server's `postgres` database (for administration: creating databases,
    /// terminating sessions).
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Port of a private server; `None` for an external one.
    pub fn port(&self) -> Option<u16> {
        self.private.as_ref().map(|p| p.port)
    }

    /// Process id of a private server's postmaster (from its `postmaster.pid`), so that a
    /// benchmark can count the CPU the database used; `None` for an external server or when
    /// it is not running.
    pub fn postmaster_pid(&self) -> Option<u32> {
        let private = self.private.as_ref()?;
        let pid_file = fs::read_to_string(private.data().join("postmaster.pid")).ok()?;
        pid_file.lines().next()?.trim().parse().ok()
    }

    /// Creates an empty database with a fresh name and returns its URL.
    pub async fn create_database(&self) -> Result<String> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let name = format!(
            "drover_test_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            random as u32
        );
        let mut conn = sqlx::PgConnection::connect(&self.admin_url).await?;
        conn.execute(format!("CREATE DATABASE \"{name}\"").as_str()).await?;
        let _ = conn.close().await;
        let (base, _) = self.admin_url.rsplit_once('/').ok_or_else(|| TempPostgresError::Failed {
            what: "reading the server URL".into(),
            detail: format!("no database in {}", self.admin_url),
        })?;
        // Keep query parameters of the admin URL (e.g. sslmode) for the new database.
        let query = self.admin_url.split_once('?').map(|(_, q)| format!("?{q}")).unwrap_or_default();
        Ok(format!("{base}/{name}{query}"))
    }

    /// Like [`TempPostgres::create_database`], for tests.
    ///
    /// # Panics
    ///
    /// When the database cannot be created.
    pub async fn url_for_new_database(&self) -> String {
        match self.create_database().await {
            Ok(url) => url,
            Err(error) => panic!("{error}"),
        }
    }

    /// Stops a private server (fast shutdown: sessions are terminated), keeping its data
    /// directory and port for [`TempPostgres::resume`]. Does nothing when already stopped.
    pub async fn stop(&self) -> Result<()> {
        let private = self.private.as_ref().ok_or(TempPostgresError::External("stop"))?;
        let running = private.lock_running().take();
        if let Some(mut running) = running {
            signal(&running.postgres, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while running.postgres.try_wait().map_err(io("wait for postgres"))?.is_none() {
                if Instant::now() > deadline {
                    let _ = running.postgres.kill();
                    let _ = running.postgres.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let _ = running.watchdog.kill();
            let _ = running.watchdog.wait();
            tracing::info!(port = private.port, "stopped the private postgresql");
        }
        Ok(())
    }

    /// Starts a stopped private server again, on the same port and data directory, and waits
    /// until it accepts connections.
    pub async fn resume(&self) -> Result<()> {
        let private = self.private.as_ref().ok_or(TempPostgresError::External("resume"))?;
        if private.lock_running().is_some() {
            return Ok(());
        }
        let mut postgres = private.spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match private.check_ready(&mut postgres.postgres) {
                Ok(true) => break,
                Ok(false) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                outcome => {
                    let detail = match outcome {
                        Err(e) => e.to_string(),
                        _ => format!("not ready within {START_TIMEOUT:?}"),
                    };
                    private.kill(&mut postgres);
                    return Err(TempPostgresError::Failed { what: "restarting postgres".into(), detail });
                }
            }
        }
        *private.lock_running() = Some(postgres);
        tracing::info!(port = private.port, "resumed the private postgresql");
        Ok(())
    }

    /// Stops and starts a private server, as if PostgreSQL restarted: every session breaks.
    pub async fn restart(&self) -> Result<()> {
        self.stop().await?;
        self.resume().await
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let Some(private) = &self.private else { return };
        if let Some(mut running) = private.lock_running().take() {
            signal(&running.postgres, nix::sys::signal::Signal::SIGINT);
            let deadline = Instant::now() + STOP_TIMEOUT;
            while let Ok(None) = running.postgres.try_wait() {
                if Instant::now() > deadline {
                    let _ = running.postgres.kill();
                    let _ = running.postgres.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = running.watchdog.kill();
            let _ = running.watchdog.wait();
        }
        let _ = fs::remove_dir_all(&private.dir);
    }
}

impl Private {
    fn lock_running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        // A panic while holding the lock leaves nothing half-done worth refusing.
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts `postgres` and its watchdog; does not wait.
    fn spawn(&self) -> Result<Running> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))
            .map_err(io("open postgres.log"))?;
        let log2 = log.try_clone().map_err(io("open postgres.log"))?;
        let mut command = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(self.bin.join("postgres"));
                c
            }
            None => Command::new(self.bin.join("postgres")),
        };
        command
            .arg("-D")
            .arg(self.data())
            .arg("-k")
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=64MB"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: a Ctrl-C meant for the tests does not hit it first.
            .process_group(0);
        let mut postgres = command.spawn().map_err(io("start postgres"))?;
        // The watchdog polls for this process; once it is gone it stops the server and removes
        // the directory. It runs as this user (root may signal the postgres user's process).
        let watchdog = Command::new("sh")
            .arg("-c")
            .arg(
                "while [ -d /proc/$0 ]; do sleep 1; done; kill -INT $1 2>/dev/null; i=0; \
                 while kill -0 $1 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
                 kill -KILL $1 2>/dev/null; rm -rf \"$2\"",
            )
            .arg(std::process::id().to_string())
            .arg(postgres.id().to_string())
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn();
        match watchdog {
            Ok(watchdog) => Ok(Running { postgres, watchdog }),
            Err(e) => {
                let _ = postgres.kill();
                let _ = postgres.wait();
                Err(TempPostgresError::Io { what: "start the watchdog".into(), source: e })
            }
        }
    }

    /// Whether the server accepts connections: `postmaster.pid` says `ready` (PostgreSQL 10+).
    /// Fails when it exited.
    fn check_ready(&self, postgres: &mut Child) -> Result<bool> {
        if let Some(status) = postgres.try_wait().map_err(io("wait for postgres"))? {
            let log = fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(TempPostgresError::Failed {
                what: "starting postgres".into(),
                detail: format!("it exited with {status}:\n{}", tail.join("\n")),
            });
        }
        let pid_file = fs::read_to_string(self.data().join("postmaster.pid")).unwrap_or_default();
        Ok(pid_file.lines().nth(7).is_some_and(|status| status.trim() == "ready"))
    }

    fn spawn_and_wait_blocking(&self) -> Result<()> {
        let mut running = self.spawn()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.check_ready(&mut running.postgres) {
                Ok(true) => break,
                Ok(false) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                outcome => {
                    self.kill(&mut running);
                    return Err(match outcome {
                        Err(e) => e,
                        _ => TempPostgresError::Failed {
                            what: "starting postgres".into(),
                            detail: format!("not ready within {START_TIMEOUT:?}"),
                        },
                    });
                }
            }
        }
        *self.lock_running() = Some(running);
        Ok(())
    }

    fn kill(&self, running: &mut Running) {
        let _ = running.postgres.kill();
        let _ = running.postgres.wait();
        let _ = running.watchdog.kill();
        let _ = running.watchdog.wait();
        // A half-started server may leave its pid file behind; the next start must not see it.
        let _ = fs::remove_file(self.data().join("postmaster.pid"));
    }
}

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
    }
}

fn failed(what: &str, output: &std::process::Output) -> TempPostgresError {
    TempPostgresError::Failed {
        what: what.to_string(),
        detail: format!(
            "{}\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// The newest installed `bin` directory holding `initdb` and `postgres`.
fn find_bin() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/usr/lib/postgresql") {
        for entry in entries.flatten() {
            let bin = entry.path().join("bin");
            let version = entry.file_name().to_string_lossy().split('.').next().and_then(|v| v.parse().ok());
            if let Some(version) = version
                && bin.join("initdb").is_file()
                && bin.join("postgres").is_file()
            {
                found.push((version, bin));
            }
        }
    }
    found.sort();
    found.pop().map(|(_, bin)| bin).ok_or(TempPostgresError::NotInstalled)
}

/// A new empty directory under the system temp directory.
fn unique_dir(prefix: &str) -> Result<PathBuf> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
    let dir = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}-{:08x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        random as u32
    ));
    fs::create_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
    Ok(dir)
}

fn chown_to(path: &Path, user: &str) -> Result<()> {
    let output = Command::new("chown").arg(format!("{user}:")).arg(path).output().map_err(io("run chown"))?;
    if output.status.success() { Ok(()) } else { Err(failed("chown", &output)) }
}

fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io("find a free port"))?;
    Ok(listener.local_addr().map_err(io("find a free port"))?.port())
}

/// The data directory made by `initdb`, cached per PostgreSQL version and OS user under the
/// temp directory so that each server only copies it. Made in a scratch directory and renamed
/// into place, so concurrent test processes never see half of one.
fn template(bin: &Path, run_as: Option<&str>) -> Result<PathBuf> {
    let version = bin.parent().and_then(|p| p.file_name()).map(|v| v.to_string_lossy().into_owned());
    let user = run_as.map(str::to_string).unwrap_or_else(|| nix::unistd::geteuid().to_string());
    let cached = std::env::temp_dir()
        .join(format!("drover-pg-template-{}-{user}", version.as_deref().unwrap_or("unknown")));
    if cached.join("PG_VERSION").is_file() {
        return Ok(cached);
    }
    let scratch = unique_dir("drover-pg-initdb")?;
    let data = scratch.join("data");
    let result = (|| {
        let mut command = match run_as {
            Some(user) => {
                chown_to(&scratch, user)?;
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(bin.join("initdb"));
                c
            }
            None => Command::new(bin.join("initdb")),
        };
        let output = command
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
            .current_dir(&scratch)
            .output()
            .map_err(io("run initdb"))?;
        if !output.status.success() {
            return Err(failed("initdb", &output));
        }
        match fs::rename(&data, &cached) {
            Ok(()) => Ok(()),
            // Another process made it first: use theirs.
            Err(_) if cached.join("PG_VERSION").is_file() => Ok(()),
            Err(e) => Err(TempPostgresError::Io { what: format!("create {}", cached.display()), source: e }),
        }
    })();
    let _ = fs::remove_dir_all(&scratch);
    result.map(|()| cached)
}
