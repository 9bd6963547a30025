//! Service containers: started on the attempt's network before the first step, reachable by
//! their name, and gated on their health check.

use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, EndpointSettings, HostConfig, NetworkingConfig};
use bollard::query_parameters::{CreateContainerOptionsBuilder, LogsOptionsBuilder};
use drover_core::{HealthCheck, ServiceSpec};
use futures::StreamExt;

use super::config::{self, LABEL_SERVICE, Role};
use super::{api_error, start_error};
use crate::runtime::{RuntimeError, TaskSpec};

/// How many log lines of a failed service go into the error.
const LOG_TAIL: &str = "30";

/// Creates and starts every service of `task` on `network`, then waits until all are healthy.
pub(super) async fn start_all(docker: &Docker, task: &TaskSpec, network: &str) -> Result<(), RuntimeError> {
    let mut names = Vec::new();
    for service in &task.services {
        names.push(start_one(docker, task, service, network).await?);
    }
    let gates = task.services.iter().zip(&names).map(|(service, name)| gate(docker, task, service, name));
    futures::future::try_join_all(gates).await?;
    Ok(())
}

async fn start_one(
    docker: &Docker,
    task: &TaskSpec,
    service: &ServiceSpec,
    network: &str,
) -> Result<String, RuntimeError> {
    let name = config::service_container_name(task.attempt_id, &service.name);
    let mut labels = config::labels(task, Role::Service);
    labels.insert(LABEL_SERVICE.into(), service.name.clone());
    // The same confinement as the steps: no capabilities, no privilege gain, the task's limits,
    // an unprivileged user unless the service names one, and only the attempt's network.
    let host_config = HostConfig {
        network_mode: Some(network.to_owned()),
        tmpfs: Some(service.tmpfs.iter().map(|path| (path.clone(), String::new())).collect()),
        ..config::confined(task)
    };
    let body = ContainerCreateBody {
        image: Some(service.image.clone()),
        user: Some(service.user.clone().unwrap_or_else(|| config::DEFAULT_USER.to_owned())),
        cmd: service.command.as_ref().map(drover_core::Command::to_argv),
        env: Some(service.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
        labels: Some(labels),
        host_config: Some(host_config),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(
                [(
                    network.to_owned(),
                    EndpointSettings { aliases: Some(vec![service.name.clone()]), ..Default::default() },
                )]
                .into(),
            ),
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default().name(&name).build();
    docker
        .create_container(Some(options), body)
        .await
        .map_err(|e| start_error(&format!("service {}", service.name), e.to_string()))?;
    docker
        .start_container(&name, None)
        .await
        .map_err(|e| start_error(&format!("service {}", service.name), e.to_string()))?;
    tracing::info!(attempt_id = task.attempt_id, container = %name, service = %service.name, "service started");
    Ok(name)
}

/// Waits until the service counts as healthy: its health check exited 0 once, or, without a
/// health check, it is running. Fails when the container exits or the check failed
/// `retries` times (at least once), with the tail of the service's logs in the error.
async fn gate(
    docker: &Docker,
    task: &TaskSpec,
    service: &ServiceSpec,
    name: &str,
) -> Result<(), RuntimeError> {
    let began = Instant::now();
    let mut failures = 0u32;
    loop {
        let inspect = docker
            .inspect_container(name, None)
            .await
            .map_err(|e| api_error(format!("inspect service container {name}"), e))?;
        let state = inspect.state.unwrap_or_default();
        if !state.running.unwrap_or(false) {
            let why = format!("service {} exited with code {}", service.name, state.exit_code.unwrap_or(-1));
            return Err(failure(docker, service, name, why).await);
        }
        let Some(check) = &service.healthcheck else {
            return Ok(());
        };
        match probe(docker, name, check).await {
            Ok(()) => {
                tracing::info!(
                    attempt_id = task.attempt_id,
                    container = %name,
                    service = %service.name,
                    after_ms = began.elapsed().as_millis() as u64,
                    "service healthy"
                );
                return Ok(());
            }
            Err(why) => {
                failures += 1;
                tracing::debug!(attempt_id = task.attempt_id, container = %name, failures, %why, "probe failed");
                if failures >= check.retries.max(1) {
                    let why = format!(
                        "service {} did not become healthy: {failures} health checks failed, the last with: {why}",
                        service.name
                    );
                    return Err(failure(docker, service, name, why).await);
                }
            }
        }
        tokio::time::sleep(check.interval).await;
    }
}

/// Runs the health check once inside the service; `Err` says why it failed.
async fn probe(docker: &Docker, name: &str, check: &HealthCheck) -> Result<(), String> {
    let argv = check.command.to_argv();
    let exec = docker
        .create_exec(
            name,
            CreateExecOptions {
                cmd: Some(argv),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| e.to_string())?;
    let run = async {
        let mut output = String::new();
        if let StartExecResults::Attached { output: mut stream, .. } =
            docker.start_exec(&exec.id, None).await.map_err(|e| e.to_string())?
        {
            while let Some(Ok(frame)) = stream.next().await {
                if output.len() < 1024 {
                    output.push_str(&String::from_utf8_lossy(frame.as_ref()));
                }
            }
        }
        // The stream ends when the process does; its exit code may take a moment to show.
        for _ in 0..50 {
            let info = docker.inspect_exec(&exec.id).await.map_err(|e| e.to_string())?;
            if info.running != Some(true)
                && let Some(code) = info.exit_code
            {
                return if code == 0 { Ok(()) } else { Err(format!("exit code {code}: {}", output.trim())) };
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err("the check's exit code never showed".to_owned())
    };
    match tokio::time::timeout(check.timeout, run).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}", humantime::format_duration(check.timeout))),
    }
}

/// The error for a failed service, with the tail of its logs.
async fn failure(docker: &Docker, service: &ServiceSpec, name: &str, why: String) -> RuntimeError {
    let options = LogsOptionsBuilder::default().stdout(true).stderr(true).tail(LOG_TAIL).build();
    let mut logs = docker.logs(name, Some(options));
    let mut tail = String::new();
    while let Some(Ok(frame)) = logs.next().await {
        let bytes = match &frame {
            LogOutput::StdOut { message }
            | LogOutput::StdErr { message }
            | LogOutput::Console { message } => message,
            LogOutput::StdIn { .. } => continue,
        };
        tail.push_str(&String::from_utf8_lossy(bytes));
    }
    let tail = if tail.trim().is_empty() { "(no output)".to_owned() } else { tail.trim_end().to_owned() };
    start_error(&format!("service {}", service.name), format!("{why}; last log lines:\n{tail}"))
}
