//! `drover-agent`, the agent alone: the harness runs every other test's agents with it; these
//! check what a user meets before it connects.

use std::process::Command;

use crate::harness::{agent_bin, drover_bin};

#[test]
fn drover_agent_teaches_its_flags_and_is_the_same_release_as_drover() {
    let help = Command::new(agent_bin()).arg("--help").output().unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in ["--server", "--join", "--cores", "--work-dir", "--config", "--no-docker", "Start here"] {
        assert!(text.contains(flag), "`drover-agent --help` lacks {flag}:\n{text}");
    }
    let version = |bin: &str| {
        String::from_utf8_lossy(&Command::new(bin).arg("--version").output().unwrap().stdout).into_owned()
    };
    let ours = version(agent_bin());
    assert_eq!(ours.replace("drover-agent", "drover"), version(drover_bin()), "{ours}");
}

#[test]
fn drover_agent_without_a_server_says_how_to_name_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(agent_bin())
        .current_dir(dir.path())
        .env_remove("DROVER_CONFIG")
        .env_remove("DROVER_SERVER")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the agent needs a server: pass --server URL"), "{err}");
    // An unknown flag is refused by name, as `drover agent` refuses it.
    let out = Command::new(agent_bin()).arg("--no-such-flag").output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}
