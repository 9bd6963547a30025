//! Agents and servers of different protocols refuse each other at registration, naming both
//! releases and protocols, and the agent stops instead of reconnecting forever.

use std::sync::Arc;
use std::time::Duration;

use drover_agent::runtime::process::ProcessRuntime;
use drover_agent::{Agent, AgentConfig, AgentError};
use drover_proto as pb;
use serde_json::Value;

use crate::harness::Cluster;

fn config(c: &Cluster, name: &str, join: Option<String>) -> AgentConfig {
    AgentConfig {
        servers: vec![c.url.clone()],
        name: name.into(),
        labels: Default::default(),
        cores: 1,
        memory: 1 << 30,
        work_dir: c.path(&format!("{name}-work")),
        kill_grace: Duration::from_secs(1),
        join,
        trust: None,
        allow_local_urls: false,
        min_free: 0,
    }
}

fn nodes(c: &Cluster) -> Vec<String> {
    let v: Value = serde_json::from_str(&c.ok(&["nodes", "-o", "json"])).expect("nodes json");
    v.as_array().into_iter().flatten().filter_map(|n| n["name"].as_str().map(str::to_owned)).collect()
}

#[test]
fn an_agent_of_another_protocol_is_refused_by_the_server_and_stops() {
    let c = Cluster::start(0, 1);
    let theirs = pb::PROTOCOL_VERSION + 1;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let ended = rt.block_on(async {
        let agent =
            Agent::new(config(&c, "skewed", Some(c.join_token())), vec![Arc::new(ProcessRuntime::new())])
                .expect("agent")
                .speaking_protocol(theirs);
        agent.enroll().await.expect("enrolled");
        // Bounded: an agent that reconnects forever fails here instead of hanging the suite.
        tokio::time::timeout(Duration::from_secs(60), agent.run(std::future::pending())).await
    });
    let err = ended.expect("the agent kept reconnecting").expect_err("the server took the agent");
    let version = env!("CARGO_PKG_VERSION");
    assert!(matches!(err, AgentError::Incompatible(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "agent {version} speaks protocol {theirs}, server {version} speaks protocol {}: run the same Drover version on both",
            pb::PROTOCOL_VERSION
        )
    );
    assert!(nodes(&c).is_empty(), "a refused agent registered a node");

    // The refusal did not spend the enrollment: the same node, speaking the server's protocol,
    // works with it.
    rt.block_on(async {
        let agent =
            Agent::new(config(&c, "skewed", None), vec![Arc::new(ProcessRuntime::new())]).expect("agent");
        agent.enroll().await.expect("still enrolled");
        let run = tokio::spawn(agent.run(std::future::pending()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while nodes(&c) != vec!["skewed".to_owned()] {
            assert!(tokio::time::Instant::now() < deadline, "the agent never registered");
            if run.is_finished() {
                panic!("the agent stopped: {:?}", run.await);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        run.abort();
    });
}
