//! Why files could not be moved in or out of a workspace.

use crate::beneath::BeneathError;
use crate::link::LinkError;

use super::{ArchiveError, TransferError, UrlError};

/// Why the inputs of a task could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// The workspace itself could not be made.
    #[error("cannot create the workspace: {0}")]
    Workspace(BeneathError),
    /// One input failed; the ones after it were not tried.
    #[error("input `{to}`: {reason}")]
    Input {
        /// Where the input was to go.
        to: String,
        /// Why it could not.
        reason: InputFailure,
    },
}

/// Why one input could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum InputFailure {
    /// Its destination is not inside the workspace, or a link is in the way.
    #[error(transparent)]
    Path(#[from] BeneathError),
    /// No server could be reached to fetch it.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The server refused or failed to send the blob.
    #[error("the server cannot send blob {digest}: {message}")]
    Blob {
        /// The blob.
        digest: String,
        /// The server's reason.
        message: String,
    },
    /// The bytes stopped coming, or were too many.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A directory input's archive cannot be unpacked.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// A URL input cannot be fetched.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// Writing the file failed.
    #[error("cannot write: {0}")]
    Write(std::io::Error),
    /// An artifact input that no earlier task kept.
    #[error("task `{task}` kept no output `{path}`")]
    NoArtifact {
        /// The producing task.
        task: String,
        /// The output it should have kept.
        path: String,
    },
    /// A local path input the client did not upload (and rewrite to a blob).
    #[error("local path {path} was not uploaded by the client")]
    NotUploaded {
        /// The local path.
        path: String,
    },
}

/// Why a file of a running task cannot be read live.
#[derive(Debug, thiserror::Error)]
pub enum LiveReadError {
    /// The attempt has no workspace (yet).
    #[error("the task's workspace does not exist (yet)")]
    NoWorkspace,
    /// The path is refused or missing.
    #[error(transparent)]
    Path(#[from] BeneathError),
}

/// Why outputs could not be kept.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The workspace cannot be opened.
    #[error("cannot open the workspace: {0}")]
    Workspace(BeneathError),
    /// An output cannot be opened (it changed since it was found).
    #[error("cannot read output: {0}")]
    Open(BeneathError),
    /// An output cannot be read.
    #[error("cannot read output `{path}`: {source}")]
    Read {
        /// The output.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// No server could be reached.
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The server refused the upload.
    #[error("cannot upload output `{path}`: {message}")]
    Upload {
        /// The output.
        path: String,
        /// The status the server (or the transport) answered with.
        code: tonic::Code,
        /// The server's reason.
        message: String,
    },
}

impl OutputError {
    /// Whether trying again later may help: no server answered, or the one that did could
    /// not take the upload at the moment (its database or its blob store was away, it was
    /// shutting down). A refusal of the upload itself (too large, not allowed) stands.
    pub fn is_transient(&self) -> bool {
        match self {
            OutputError::Link(e) => e.is_transient(),
            OutputError::Upload { code, .. } => matches!(
                code,
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Internal
                    | tonic::Code::Aborted
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            ),
            OutputError::Workspace(_) | OutputError::Open(_) | OutputError::Read { .. } => false,
        }
    }
}
