//! `drover`: one executable that is the server, the agent and the client.

use std::process::ExitCode;

fn main() -> ExitCode {
    drover::drover_main()
}
