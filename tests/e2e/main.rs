//! End-to-end tests: real `drover` servers and agents on loopback, driven through the CLI.

mod harness;

mod bad_files;
mod failures;
mod jobs;
mod output;
mod stopping;
