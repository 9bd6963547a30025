//! Keeps an attempt network's containers off the node itself and off the Drover servers.
//!
//! A container on a bridge network reaches the host through the bridge's gateway address, and
//! with it everything listening on the node (the agent's metering proxies, a local server, a
//! database); routed networks reach the servers too. Each attempt network gets a bridge
//! interface of its own name, and two kinds of rules keyed on that interface: one in `INPUT`
//! dropping whatever the containers send to any of the node's own addresses, and one per server
//! address in `DOCKER-USER` (Docker's hook in `FORWARD`) dropping traffic routed to a server.
//! The rules carry the interface name, so cleanup (after a restart too) finds them by it.

use std::net::IpAddr;

use tokio::process::Command;

/// What the rules are tagged with, so that they read as Drover's in `iptables -S`.
const COMMENT: &str = "drover: attempt network sealed off the node";

/// Adds the rules for the bridge interface `bridge`. Fails when they cannot be set (no
/// `iptables`, not root): the task must then not run.
pub(super) async fn seal(bridge: &str, servers: &[IpAddr]) -> Result<(), String> {
    let mut rules = vec![("INPUT", None)];
    let forward = if chain_exists("DOCKER-USER").await { "DOCKER-USER" } else { "FORWARD" };
    rules
        .extend(servers.iter().filter(|ip| ip.is_ipv4() && !ip.is_loopback()).map(|ip| (forward, Some(*ip))));
    for (chain, destination) in rules {
        let mut args = vec!["-w".to_owned(), "-I".into(), chain.into(), "-i".into(), bridge.into()];
        if let Some(ip) = destination {
            args.extend(["-d".into(), ip.to_string()]);
        }
        args.extend([
            "-m".into(),
            "comment".into(),
            "--comment".into(),
            COMMENT.into(),
            "-j".into(),
            "DROP".into(),
        ]);
        if let Err(e) = iptables(&args).await {
            unseal(bridge).await;
            return Err(format!("cannot keep the task's network off this node: {e}"));
        }
    }
    Ok(())
}

/// Removes every rule of the bridge interface `bridge`.
pub(super) async fn unseal(bridge: &str) {
    for chain in ["INPUT", "DOCKER-USER", "FORWARD"] {
        let Ok(listing) = iptables(&["-w".into(), "-S".into(), chain.into()]).await else {
            continue;
        };
        for rule in listing.lines().filter(|l| l.starts_with("-A ") && names_interface(l, bridge)) {
            let mut args = vec!["-w".to_owned(), "-D".into()];
            args.extend(split_rule(&rule[3..]));
            if let Err(e) = iptables(&args).await {
                tracing::warn!(bridge, rule, error = %e, "cannot remove a network rule");
            }
        }
    }
}

/// Whether the rule line `-A CHAIN ...` matches input interface `bridge` exactly.
fn names_interface(rule: &str, bridge: &str) -> bool {
    let words: Vec<&str> = rule.split_whitespace().collect();
    words.windows(2).any(|w| w[0] == "-i" && w[1] == bridge)
}

/// Splits a rule as `iptables -S` prints it into arguments (the comment is quoted).
fn split_rule(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in rule.chars() {
        match c {
            '"' => quoted = !quoted,
            ' ' if !quoted => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

async fn chain_exists(chain: &str) -> bool {
    iptables(&["-w".into(), "-S".into(), chain.into()]).await.is_ok()
}

async fn iptables(args: &[String]) -> Result<String, String> {
    let out = Command::new("iptables").args(args).output().await.map_err(|e| format!("iptables: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("iptables {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_are_found_by_their_interface_and_read_back_as_arguments() {
        let rule = r#"-A INPUT -i drv0123456789ab -m comment --comment "drover: attempt network sealed off the node" -j DROP"#;
        assert!(names_interface(rule, "drv0123456789ab"));
        assert!(!names_interface(rule, "drv0123456789a"));
        assert_eq!(
            split_rule(&rule[3..]),
            ["INPUT", "-i", "drv0123456789ab", "-m", "comment", "--comment", COMMENT, "-j", "DROP"]
        );
    }
}
