//! End-to-end tests: real `drover` servers and agents on loopback, driven through the CLI.

mod harness;

mod ahead;
mod ai_agent;
mod artifacts;
mod bad_files;
mod docker;
mod escapes;
mod failures;
mod full_disk;
mod jobs;
mod large_jobs;
mod limits;
mod live;
mod logs_kept;
mod many_tasks;
mod masking;
mod microvm;
mod node_binary;
mod oidc;
mod output;
mod partitions;
mod protocol;
mod proxy;
mod replicas;
mod retention;
mod s3;
mod sandbox;
mod security;
mod setup_deadlines;
mod stopping;
mod tenants;
