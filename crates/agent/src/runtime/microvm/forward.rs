//! The host side of a VM's network forwards (see [`drover_guest::net`]): per task, the egress
//! proxy behind the proxy forward and the task's host ports behind the host-port slots, each
//! served on its Unix socket in the VM directory. A forward nobody serves leads nowhere.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use drover_core::NetworkPolicy;
use drover_guest::net;
use tokio::net::{TcpStream, UnixListener};
use tokio::task::JoinHandle;

use super::proxy::{self, AllowList};
use crate::runtime::{HostPort, RuntimeError, TaskSpec};

/// Whether a task needs the VM's network device, or why the microvm runtime cannot give it
/// what it asks for.
pub(crate) fn needs_network(task: &TaskSpec) -> Result<bool, RuntimeError> {
    let refuse = |reason: String| RuntimeError::Start {
        command: "microvm".into(),
        source: std::io::Error::new(std::io::ErrorKind::Unsupported, reason),
    };
    if task.host_ports.len() > net::HOST_PORT_SLOTS {
        return Err(refuse(format!(
            "a microvm reaches at most {} host ports, the task asks for {}",
            net::HOST_PORT_SLOTS,
            task.host_ports.len()
        )));
    }
    match &task.network {
        NetworkPolicy::None => Ok(!task.host_ports.is_empty()),
        NetworkPolicy::Egress { .. } => Ok(true),
        NetworkPolicy::Bridge | NetworkPolicy::Full => Err(refuse(
            "the microvm runtime offers `network: none` or `network: { egress: [...] }` only".into(),
        )),
    }
}

/// The forwards a task is served; dropping them stops serving and removes the sockets.
#[derive(Default)]
pub(crate) struct Forwards {
    tasks: Vec<JoinHandle<()>>,
    sockets: Vec<PathBuf>,
}

impl Drop for Forwards {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for socket in &self.sockets {
            let _ = std::fs::remove_file(socket);
        }
    }
}

impl Forwards {
    /// Serves the task's forwards in VM directory `dir`; returns them with the environment
    /// that tells steps where to find them.
    pub(crate) fn start(
        dir: &Path,
        task: &TaskSpec,
    ) -> Result<(Forwards, Vec<(String, String)>), RuntimeError> {
        let mut forwards = Forwards::default();
        let mut env = Vec::new();
        if let NetworkPolicy::Egress { allow } = &task.network {
            let listener = forwards.bind(&dir.join(net::EGRESS_SOCKET))?;
            let allow = Arc::new(AllowList::new(allow));
            forwards.tasks.push(tokio::spawn(proxy::serve(listener, allow, task.attempt_id)));
            let url = format!("http://{}", net::egress_proxy());
            for key in ["HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"] {
                env.push((key.to_owned(), url.clone()));
            }
            // Host ports are reached directly, not through the proxy.
            for key in ["NO_PROXY", "no_proxy"] {
                env.push((key.to_owned(), net::FORWARD_ADDR.to_string()));
            }
        }
        for (slot, port) in task.host_ports.iter().enumerate() {
            let listener = forwards.bind(&dir.join(net::host_port_socket(slot)))?;
            forwards.tasks.push(tokio::spawn(serve_host_port(listener, port.clone(), task.attempt_id)));
            env.push((port.env_var(), net::host_port(slot).to_string()));
        }
        Ok((forwards, env))
    }

    fn bind(&mut self, socket: &Path) -> Result<UnixListener, RuntimeError> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(|source| RuntimeError::Io {
            context: format!("listen on {}", socket.display()),
            source,
        })?;
        // QEMU's relays connect as the uid QEMU runs as, which owns the VM's directory.
        if let Some(dir) = socket.parent()
            && let Ok(meta) = std::fs::metadata(dir)
        {
            use std::os::unix::fs::MetadataExt;
            if meta.uid() != nix::unistd::geteuid().as_raw() {
                let _ = std::os::unix::fs::chown(socket, Some(meta.uid()), Some(meta.gid()));
            }
        }
        self.sockets.push(socket.to_path_buf());
        Ok(listener)
    }
}

async fn serve_host_port(listener: UnixListener, port: HostPort, attempt_id: i64) {
    loop {
        let Ok((mut guest, _)) = listener.accept().await else {
            return;
        };
        let port = port.clone();
        tokio::spawn(async move {
            let result = async {
                let mut host = TcpStream::connect(port.addr).await?;
                let _ = host.set_nodelay(true);
                tokio::io::copy_bidirectional(&mut guest, &mut host).await
            };
            if let Err(error) = result.await {
                tracing::debug!(attempt_id, name = %port.name, addr = %port.addr, %error, "host port connection ended");
            }
        });
    }
}
