//! The benchmark's sections; each returns its rows, with failures recorded in the rows rather
//! than aborting the whole benchmark.

pub mod footprint;
pub mod latency;
pub mod logs;
pub mod microvm;
pub mod placement;
pub mod replicas;
pub mod scale;
pub mod store;
pub mod throughput;

use crate::report::Measure;

/// Turns the outcome of a set of runs into a measure.
pub fn measure(context: &str, result: anyhow::Result<Vec<f64>>) -> Measure {
    match result {
        Ok(v) => Measure::Runs(v),
        Err(e) => {
            eprintln!("drover-bench: {context} failed: {e:#}");
            Measure::failed(context, &e)
        }
    }
}

/// `slurm-wlm 22.05.8` or similar, for naming the peer.
pub fn slurm_version(slurm: &crate::slurm::Slurm) -> String {
    slurm
        .run("sbatch", &["--version"])
        .map(|v| v.trim().replace("slurm ", "Slurm "))
        .unwrap_or_else(|_| "Slurm".into())
}
