//! What an agent and a server agree on before they exchange work: the protocol they speak,
//! and how much one message may carry.

/// The agent session protocol this build speaks. Agents and servers of different protocols
/// refuse each other at registration, so any change to the session messages, or to the JSON
/// of the task plan an assignment carries, bumps it.
///
/// 1: one assignment and one report per message, plan fields copied beside the plan, failure
/// classes as words. 2: batched assignments and reports, the plan alone, failure classes as
/// an enum. 3: output as runs of lines (`OutputChunk`), which a server of protocol 2 would
/// drop unread.
pub const PROTOCOL_VERSION: u32 = 3;

/// Most assignments in one `Assignments` message. A server splits a larger placement round;
/// an agent refuses every attempt of a message beyond it.
pub const MAX_ASSIGNS_PER_MESSAGE: usize = 512;

/// Most reports in one `Reports` message. An agent sends what waits in batches of at most
/// this many; a server ends a session that sends more.
pub const MAX_REPORTS_PER_MESSAGE: usize = 256;

/// Most output chunks in one `AttemptOutput` report; an agent sends a few, a server refuses
/// the report past it.
pub const MAX_OUTPUT_CHUNKS: usize = 4096;

/// Longest output line (or piece of a longer line) an agent ships; a server refuses a chunk
/// with a longer one.
pub const MAX_OUTPUT_LINE: usize = 64 * 1024;

/// The protocol a peer speaks, from the `protocol` field it sent: peers of protocol 1 predate
/// the field, which then reads as 0.
pub fn protocol_of(field: u32) -> u32 {
    if field == 0 { 1 } else { field }
}

/// Longest release string quoted from a peer; anything longer is cut.
const MAX_VERSION_CHARS: usize = 64;

/// An agent and a server that speak different protocols.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "agent {} speaks protocol {agent_protocol}, server {} speaks protocol {server_protocol}: run the same Drover version on both",
    shown(.agent_version),
    shown(.server_version)
)]
pub struct ProtocolMismatch {
    /// The agent's release, as it said it.
    pub agent_version: String,
    /// The agent's protocol.
    pub agent_protocol: u32,
    /// The server's release, as it said it.
    pub server_version: String,
    /// The server's protocol.
    pub server_protocol: u32,
}

impl ProtocolMismatch {
    /// The mismatch between a peer of `agent_protocol` (as [`protocol_of`] reads it) and this
    /// build as the server, if they differ.
    pub fn check_agent(agent_version: &str, agent_protocol: u32) -> Result<(), ProtocolMismatch> {
        Self::check(agent_version, protocol_of(agent_protocol), env!("CARGO_PKG_VERSION"), PROTOCOL_VERSION)
    }

    /// The mismatch between this build as the agent and a server of `server_protocol`, if
    /// they differ.
    pub fn check_server(server_version: &str, server_protocol: u32) -> Result<(), ProtocolMismatch> {
        Self::check(env!("CARGO_PKG_VERSION"), PROTOCOL_VERSION, server_version, protocol_of(server_protocol))
    }

    fn check(
        agent_version: &str,
        agent_protocol: u32,
        server_version: &str,
        server_protocol: u32,
    ) -> Result<(), ProtocolMismatch> {
        if agent_protocol == server_protocol {
            return Ok(());
        }
        Err(ProtocolMismatch {
            agent_version: agent_version.to_owned(),
            agent_protocol,
            server_version: server_version.to_owned(),
            server_protocol,
        })
    }
}

/// A peer's release as a message quotes it: printable, bounded, and named when missing (peers
/// of protocol 1 servers did not say theirs).
fn shown(version: &str) -> String {
    let clean: String = version.chars().filter(|c| !c.is_control()).take(MAX_VERSION_CHARS).collect();
    if clean.trim().is_empty() { "(version unknown)".to_owned() } else { clean }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mismatch_names_both_releases_and_protocols() {
        assert_eq!(ProtocolMismatch::check_agent("0.1.0", PROTOCOL_VERSION), Ok(()));
        let err = ProtocolMismatch::check("0.0.9", 1, "0.1.0", 2).unwrap_err();
        assert_eq!(
            err.to_string(),
            "agent 0.0.9 speaks protocol 1, server 0.1.0 speaks protocol 2: run the same Drover version on both"
        );
    }

    #[test]
    fn a_peer_without_the_field_speaks_protocol_1_and_odd_versions_are_tamed() {
        assert_eq!(protocol_of(0), 1);
        assert_eq!(protocol_of(7), 7);
        let err = ProtocolMismatch::check_server("", 0).unwrap_err();
        assert_eq!(err.server_protocol, 1);
        assert!(err.to_string().contains("server (version unknown) speaks protocol 1"), "{err}");
        let long = format!("1.0\n{}", "x".repeat(500));
        let shown = ProtocolMismatch::check(&long, 3, "0.1.0", 2).unwrap_err().to_string();
        assert!(!shown.contains('\n') && shown.len() < 200, "{shown}");
    }
}
