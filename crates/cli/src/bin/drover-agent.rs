//! `drover-agent`: the agent alone, for worker nodes (the flags of `drover agent`).

use std::process::ExitCode;

fn main() -> ExitCode {
    drover::agent_main()
}
