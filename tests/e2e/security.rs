//! The locked control plane as users meet it through the CLI: keys and roles, projects, join
//! tokens and revoked nodes, TLS with the server-made CA, private credential files, the config
//! file's layers, and the README's first command with authorization on.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Cluster, drover_bin, task};

const T: Duration = Duration::from_secs(60);

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Creates a key and returns it.
fn key(c: &Cluster, project: &str, role: &str, more: &[&str]) -> String {
    let mut args = vec!["keys", "create", "--project", project, "--role", role, "-o", "json"];
    args.extend_from_slice(more);
    let v: Value = serde_json::from_str(&c.ok(&args)).unwrap();
    v["key"].as_str().unwrap().to_string()
}

#[test]
fn keys_carry_roles_and_a_project_sees_only_its_own_jobs() {
    let c = Cluster::start(1, 2);
    c.ok(&["projects", "create", "fx"]);
    let submitter = key(&c, "fx", "submitter", &[]);
    let viewer = key(&c, "fx", "viewer", &[]);
    let outsider = key(&c, "default", "admin", &[]);

    let file = c.job_file(
        "fx.yaml",
        "version: 1\nname: shot\nproject: fx\ntasks:\n  - name: t\n    command: \"sleep 30\"\n",
    );
    let file = file.display().to_string();
    let out = c.drover_as(Some(&viewer), &["submit", "-o", "json", &file]);
    assert!(!out.status.success() && stderr(&out).contains("needs the submitter role"), "{}", stderr(&out));
    let out = c.drover_as(Some(&submitter), &["submit", "-o", "json", &file]);
    assert!(out.status.success(), "{}", stderr(&out));
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let job = job["id"].as_i64().unwrap().to_string();

    // The viewer reads it but cannot cancel it; another project's key sees no such job.
    let out = c.drover_as(Some(&viewer), &["status", "-o", "json", &job]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = c.drover_as(Some(&viewer), &["cancel", &job]);
    assert!(stderr(&out).contains("needs the submitter role"), "{}", stderr(&out));
    let out = c.drover_as(Some(&outsider), &["status", &job]);
    assert!(stderr(&out).contains(&format!("job {job} not found")), "{}", stderr(&out));
    let out = c.drover_as(Some(&outsider), &["ps", "--all", "-o", "json"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    let out = c.drover_as(None, &["ps"]);
    assert!(stderr(&out).contains("needs a credential"), "{}", stderr(&out));

    // A project admin manages its project's keys, not the cluster.
    let admin = key(&c, "fx", "admin", &[]);
    let out = c.drover_as(Some(&admin), &["keys", "ls", "-o", "json"]);
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(keys.as_array().unwrap().iter().all(|k| k["project"] == "fx"), "{keys}");
    let out = c.drover_as(Some(&admin), &["projects", "create", "other"]);
    assert!(stderr(&out).contains("needs an operator key"), "{}", stderr(&out));
    let out = c.drover_as(Some(&admin), &["nodes", "token", "create"]);
    assert!(stderr(&out).contains("needs an operator key"), "{}", stderr(&out));

    // Revoked and expired keys stop working at once.
    let viewer_id = viewer.split('_').nth(1).unwrap();
    c.ok(&["keys", "revoke", viewer_id]);
    let out = c.drover_as(Some(&viewer), &["status", &job]);
    assert!(stderr(&out).contains("was revoked"), "{}", stderr(&out));
    let brief = key(&c, "fx", "viewer", &["--expires", "1s"]);
    std::thread::sleep(Duration::from_millis(1100));
    let out = c.drover_as(Some(&brief), &["status", &job]);
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    c.ok(&["cancel", &job]);
}

#[test]
fn login_keeps_a_private_credentials_file_and_the_key_files_are_private() {
    let c = Cluster::start(1, 1);
    assert_eq!(mode(&c.path("server-data/operator.key")), 0o600);
    assert_eq!(mode(&c.path("agent-0-work/.node-credential.json")), 0o600);
    let viewer = key(&c, "default", "viewer", &[]);
    let creds = c.path("login-credentials");
    let out = Command::new(drover_bin())
        .args(["login", "--server", &c.addr])
        .env("DROVER_CREDENTIALS", &creds)
        .env_remove("DROVER_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(format!("{viewer}\n").as_bytes())?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("viewer of project default"));
    assert_eq!(mode(&creds), 0o600);
    // Later commands find the server and the key in the file.
    let out = Command::new(drover_bin())
        .args(["ps", "-o", "json"])
        .env("DROVER_CREDENTIALS", &creds)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // A wrong key is not stored.
    let out = Command::new(drover_bin())
        .args(["login", "--server", &c.addr, "--key", &format!("drv_{}_{}", "0".repeat(16), "1".repeat(64))])
        .env("DROVER_CREDENTIALS", c.path("other-credentials"))
        .output()
        .unwrap();
    assert!(!out.status.success() && stderr(&out).contains("not valid"), "{}", stderr(&out));
    assert!(!c.path("other-credentials").exists());
}

#[test]
fn a_used_or_expired_join_token_enrolls_nothing_and_a_revoked_node_stops() {
    let c = Cluster::start(1, 1);
    let token = c.join_token();
    // The token enrolls one agent; a second agent with the same token is refused and exits.
    let mut first = Command::new(drover_bin())
        .args([
            "agent",
            "--server",
            &c.addr,
            "--name",
            "first",
            "--cores",
            "1",
            "--join",
            &token,
            "--work-dir",
        ])
        .arg(c.path("first-work"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    c.wait_for_nodes(2);
    let second = Command::new(drover_bin())
        .args([
            "agent",
            "--server",
            &c.addr,
            "--name",
            "late",
            "--cores",
            "1",
            "--join",
            &token,
            "--work-dir",
        ])
        .arg(c.path("late-work"))
        .output()
        .unwrap();
    assert!(!second.status.success());
    assert!(stderr(&second).contains("used already"), "{}", stderr(&second));
    let expired: Value =
        serde_json::from_str(&c.ok(&["nodes", "token", "create", "--expires", "1s", "-o", "json"])).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let out = Command::new(drover_bin())
        .args(["agent", "--server", &c.addr, "--name", "later", "--cores", "1", "--work-dir"])
        .arg(c.path("later-work"))
        .args(["--join", expired["token"].as_str().unwrap()])
        .output()
        .unwrap();
    assert!(stderr(&out).contains("expired"), "{}", stderr(&out));
    let nodes = c.ok(&["nodes", "-o", "json"]);
    assert!(!nodes.contains("\"late\"") && !nodes.contains("\"later\""), "{nodes}");

    // A task runs on agent-1 (the only one with the label), which is then revoked: its agent
    // exits, and the task is handed to a new agent.
    let job = c.submit(
        "version: 1\nname: revoke\ntasks:\n  - name: t\n    retries: { count: 1, on: [lost] }\n    constraints: { pool: b }\n    command: \"sleep 30\"\n",
    );
    let mut labelled = Command::new(drover_bin());
    labelled
        .args(["agent", "--server", &c.addr, "--name", "pool-b", "--labels", "pool=b", "--cores", "1"])
        .args(["--kill-grace", "1s", "--join", &c.join_token(), "--work-dir"])
        .arg(c.path("pool-b-work"))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut doomed = labelled.spawn().unwrap();
    c.wait_until(job, T, "the task to run on pool-b", |v| task(v, "t")["state"] == "running");
    let out = c.ok(&["nodes", "revoke", "pool-b"]);
    assert!(out.contains("1 running task(s) handed on"), "{out}");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = doomed.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < T, "the revoked agent kept running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "a revoked agent exits with an error");
    let v = c.wait_until(job, T, "the task to be queued again", |v| task(v, "t")["state"] == "queued");
    assert_eq!(task(&v, "t")["attempts"], 1);
    let nodes = c.ok(&["nodes", "-o", "json"]);
    let nodes: Value = serde_json::from_str(&nodes).unwrap();
    let pool_b = nodes.as_array().unwrap().iter().find(|n| n["name"] == "pool-b").unwrap();
    assert_eq!(pool_b["state"], "down");
    c.ok(&["cancel", &job.to_string()]);
    let _ = first.kill();
    let _ = first.wait();
}

/// A server with `--tls on` and a client that trusts it (or not).
#[test]
fn tls_clients_verify_the_server_made_ca_and_agents_pin_it_from_their_token() {
    let c = Cluster::start_with(0, 1, &["--tls", "on"], &[]);
    let ca = c.path("server-data/tls/ca.pem");
    assert!(ca.exists());
    assert_eq!(mode(&c.path("server-data/tls/ca.key")), 0o600);
    let https = format!("https://{}", c.addr);
    let run = |args: &[&str], ca_arg: Option<&str>| {
        let mut cmd = c.command(args);
        cmd.env("DROVER_SERVER", &https);
        match ca_arg {
            Some(ca) => cmd.env("DROVER_CA", ca),
            None => cmd.env_remove("DROVER_CA"),
        };
        cmd.output().unwrap()
    };
    let ok = run(&["nodes"], Some(&ca.display().to_string()));
    assert!(ok.status.success(), "{}", stderr(&ok));

    // Another CA (a second server's) is refused, and so is a wrong fingerprint.
    let other = Cluster::start_with(0, 1, &["--tls", "on"], &[]);
    let wrong = run(&["nodes"], Some(&other.path("server-data/tls/ca.pem").display().to_string()));
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("CA"), "{}", stderr(&wrong));
    let fp = format!("sha256:{}", "ab".repeat(32));
    let pinned_wrong = run(&["nodes"], Some(&fp));
    assert!(!pinned_wrong.status.success(), "{}", stderr(&pinned_wrong));
    // Plain text to a TLS server goes nowhere.
    let mut plain = c.command(&["nodes"]);
    plain.env("DROVER_SERVER", format!("http://{}", c.addr));
    assert!(!plain.output().unwrap().status.success());

    // An agent trusts the server through the fingerprint its join token carries, then through
    // the CA it was given at enrollment.
    let token = {
        let out = run(&["nodes", "token", "create", "-o", "json"], Some(&ca.display().to_string()));
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["token"].as_str().unwrap().split('_').count(), 4, "the token carries the fingerprint");
        v["token"].as_str().unwrap().to_string()
    };
    let mut agent = Command::new(drover_bin())
        .args([
            "agent",
            "--server",
            &https,
            "--name",
            "tls-agent",
            "--cores",
            "1",
            "--join",
            &token,
            "--work-dir",
        ])
        .arg(c.path("tls-agent-work"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let out = run(&["nodes", "-o", "json"], Some(&ca.display().to_string()));
        if String::from_utf8_lossy(&out.stdout).contains("\"ready\"") {
            break;
        }
        assert!(start.elapsed() < T, "the agent never registered over TLS");
        std::thread::sleep(Duration::from_millis(100));
    }
    let enrolled = std::fs::read_to_string(c.path("tls-agent-work/.node-credential.json")).unwrap();
    assert!(enrolled.contains("BEGIN CERTIFICATE"), "the agent keeps the CA it enrolled with");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn the_config_file_is_layered_under_environment_and_flags_and_bad_keys_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("drover.toml");
    std::fs::write(&file, "version = 1\n[server]\nlease = \"20s\"\nheartbeat = \"1s\"\nmax_upload = \"1GiB\"\n[agent]\ncores = 3\njoin = \"drj_secret\"\n").unwrap();
    let print = |env: &[(&str, &str)], args: &[&str]| {
        let out = Command::new(drover_bin())
            .args(["config", "print", "--config"])
            .arg(&file)
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
        v
    };
    let v = print(&[], &[]);
    assert_eq!(v["server"]["lease"].as_str(), Some("20s"), "the file over the default");
    assert_eq!(v["server"]["max_upload"].as_str(), Some("1GiB"));
    assert_eq!(v["agent"]["cores"].as_integer(), Some(3));
    assert_eq!(v["agent"]["join"].as_str(), Some("<elided>"), "secrets are elided");
    let v = print(&[("DROVER_LEASE", "30s")], &[]);
    assert_eq!(v["server"]["lease"].as_str(), Some("30s"), "the environment over the file");
    let v = print(&[("DROVER_LEASE", "30s")], &["--lease", "40s", "--cores", "5"]);
    assert_eq!(v["server"]["lease"].as_str(), Some("40s"), "a flag over the environment");
    assert_eq!(v["agent"]["cores"].as_integer(), Some(5));

    std::fs::write(&file, "[server]\nlease = \"soon\"\n").unwrap();
    let out = Command::new(drover_bin()).args(["server", "--config"]).arg(&file).output().unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("`server.lease`") && stderr(&out).contains("soon"), "{}", stderr(&out));
    std::fs::write(&file, "[agent]\ncorez = 3\n").unwrap();
    let out = Command::new(drover_bin()).args(["config", "print", "--config"]).arg(&file).output().unwrap();
    assert!(stderr(&out).contains("corez"), "{}", stderr(&out));
    // Authorization and plain text cannot be turned off off loopback.
    let out = Command::new(drover_bin())
        .args(["server", "--listen", "0.0.0.0:0", "--no-auth", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(stderr(&out).contains("`server.no_auth`"), "{}", stderr(&out));
    let out = Command::new(drover_bin())
        .args(["server", "--listen", "0.0.0.0:0", "--tls", "off", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(stderr(&out).contains("`server.tls`"), "{}", stderr(&out));
}

/// The README's first command, with a free port instead of 7370, twice in the same directory:
/// the second run finds its data, its operator key and its agent's credential.
#[test]
fn readme_up_submit_runs_the_example_with_authorization_on() {
    let dir = tempfile::tempdir().unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello.yaml");
    for run in 1..=2 {
        let out = Command::new(drover_bin())
            .args(["up", "--listen", "127.0.0.1:0", "--submit"])
            .arg(&example)
            .current_dir(dir.path())
            .env("DROVER_CREDENTIALS", dir.path().join("credentials"))
            .env_remove("DROVER_KEY")
            .env_remove("DROVER_SERVER")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), stderr(&out));
        assert!(out.status.success(), "run {run}: {text}");
        assert!(
            text.contains(&format!("job {run} `hello`")) && text.contains("succeeded"),
            "run {run}: {text}"
        );
    }
    assert_eq!(mode(&dir.path().join(".drover/operator.key")), 0o600);
    assert_eq!(mode(&dir.path().join("credentials")), 0o600);
}

/// Secrets are sealed in the database with the server's key file, made on first start (0600).
#[test]
fn secrets_are_sealed_in_the_database() {
    let c = Cluster::start(0, 1);
    c.set_secret("DB_PASSWORD", "correct-horse-battery");
    assert_eq!(mode(&c.path("server-data/secrets.key")), 0o600);
    let needle = b"correct-horse-battery";
    for file in ["drover.db", "drover.db-wal"] {
        let bytes = std::fs::read(c.path(&format!("server-data/{file}"))).unwrap_or_default();
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "the secret is readable in {file}");
    }
    assert_eq!(c.ok(&["secrets", "ls"]).trim(), "DB_PASSWORD");
}
