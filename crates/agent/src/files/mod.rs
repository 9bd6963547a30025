//! Moving files in and out of a task's workspace. The agent does this, never the sandbox:
//! inputs are placed before the task starts (blobs from the server, http(s) URLs), outputs
//! matching the task's globs are uploaded after it ends, and files are read live for
//! downloads while it runs.
//!
//! Nothing outside the workspace is ever written or read: every path goes through
//! [`crate::beneath`], so a link that an earlier input (a directory archive) or the task left
//! in the workspace cannot redirect a write or a read out of it. Inputs stream to disk under
//! a size cap and a stall timeout ([`InputPolicy`], set per node); URL inputs cannot reach the node's own
//! loopback or link-local addresses unless the agent allows it.

mod error;
mod inputs;
mod live;
mod outputs;
mod transfer;
mod untar;
mod url;

use std::sync::Arc;
use std::time::Duration;

use crate::link::{Link, LinkError};

pub use error::{InputError, InputFailure, LiveReadError, OutputError};
pub use inputs::place_inputs;
pub use live::{open_inside, read_window};
pub use outputs::{collect_outputs, upload_outputs, within_limit};
pub use transfer::TransferError;
pub use untar::ArchiveError;
pub use url::{ForbiddenAddress, UrlError};

/// Most bytes one input may bring: a blob, a download, or what a directory input unpacks to.
pub const MAX_INPUT_BYTES: u64 = 10 << 30;
/// Most entries a directory input may hold.
pub const MAX_INPUT_ENTRIES: u64 = 1_000_000;
/// Longest wait for the next piece of an input before it fails.
pub const INPUT_STALL: Duration = Duration::from_secs(60);
/// Longest wait for a URL input's server to accept the connection.
pub const URL_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest a URL input's download may take in all.
pub const URL_TIMEOUT: Duration = Duration::from_secs(3600);

/// How inputs are fetched: where URL inputs may point and the limits every input meets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputPolicy {
    /// Whether URL inputs may reach this node's loopback, link-local and unspecified
    /// addresses.
    pub allow_local_urls: bool,
    /// Most bytes one input may bring (a blob or a download is refused sooner when it
    /// announces more), and most bytes a directory input may unpack to.
    pub max_bytes: u64,
    /// Most entries a directory input may hold.
    pub max_entries: u64,
    /// Longest wait for the next piece of an input.
    pub stall: Duration,
    /// Longest wait for a URL input's server to accept the connection.
    pub connect_timeout: Duration,
    /// Longest a URL input's download may take in all.
    pub url_timeout: Duration,
}

impl Default for InputPolicy {
    /// The limits above, with local URLs refused.
    fn default() -> Self {
        InputPolicy {
            allow_local_urls: false,
            max_bytes: MAX_INPUT_BYTES,
            max_entries: MAX_INPUT_ENTRIES,
            stall: INPUT_STALL,
            connect_timeout: URL_CONNECT_TIMEOUT,
            url_timeout: URL_TIMEOUT,
        }
    }
}

/// How the agent reaches a server for file transfers.
#[derive(Clone)]
pub struct ServerLink {
    link: Arc<Link>,
}

impl std::fmt::Debug for ServerLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerLink").field("servers", &self.link.servers()).finish()
    }
}

impl ServerLink {
    /// File transfers through `link`.
    pub fn new(link: Arc<Link>) -> ServerLink {
        ServerLink { link }
    }

    /// A client of the first server that answers, carrying the node's credential.
    pub async fn client(&self) -> Result<crate::link::Client, LinkError> {
        self.link.client().await
    }
}
