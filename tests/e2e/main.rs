//! End-to-end tests: real `drover` servers and agents on loopback, driven through the CLI.

mod harness;

mod artifacts;
mod bad_files;
mod docker;
mod failures;
mod jobs;
mod microvm;
mod output;
mod replicas;
mod stopping;
