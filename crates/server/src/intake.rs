//! Submitted plans: decoded and validated by the server with the same rules the CLI applies,
//! so a client that skips the CLI gets the same errors.
//!
//! A plan arrives as zstd-compressed JSON in `plan_zstd` (what the CLI sends) or as plain JSON
//! in `plan_json`. Compressed plans are decompressed straight into the JSON parser through a
//! counter that stops at [`MAX_PLAN_BYTES`], so a small message that inflates to gigabytes is
//! refused after reading the allowed amount and is never held whole; the parser then holds
//! only the plan itself.

use std::io::{self, BufReader, Read};

use drover_core::limits::{MAX_PLAN_BYTES, MAX_SOURCE_BYTES};
use drover_core::{InputSource, JobPlan};
use drover_proto as pb;
use tonic::Status;

/// Largest message the client API decodes (tonic's default is 4 MiB). Apply it to the
/// `DroverServer` with `max_decoding_message_size`.
///
/// A submit carries the compressed plan and the job-file text: a 100,000-frame array compresses
/// to well under a megabyte and the text is at most [`MAX_SOURCE_BYTES`] (16 MiB), so 64 MiB
/// leaves ample room while still bounding what one request makes the server buffer.
pub const MAX_SUBMIT_MESSAGE: usize = 64 << 20;

/// Largest zstd window accepted, as a power of two: 8 MiB, the most zstd levels 1 to 19 use.
/// The decoder allocates the window a frame declares, so without a bound a message of a few
/// bytes could make it reserve up to 2 GiB.
const MAX_WINDOW_LOG: u32 = 23;

/// Read size between the decompressor and the JSON parser, which reads byte by byte.
const PARSE_BUFFER: usize = 64 << 10;

/// The plan of a submit request, decoded and validated: `plan_zstd` when it is set, else
/// `plan_json`.
pub(crate) fn decode_plan(req: &pb::SubmitRequest) -> Result<JobPlan, Status> {
    decode_within(req, MAX_PLAN_BYTES)
}

/// [`decode_plan`] with the cap on the plan's JSON as a parameter, so that tests can show the
/// cap at work without producing hundreds of megabytes.
fn decode_within(req: &pb::SubmitRequest, max_bytes: usize) -> Result<JobPlan, Status> {
    if req.source.len() > MAX_SOURCE_BYTES {
        return Err(Status::invalid_argument(format!(
            "the job file is {} bytes, more than the limit of {} MiB; use arrays and templates to \
             describe many similar tasks, or split the job",
            req.source.len(),
            MAX_SOURCE_BYTES >> 20
        )));
    }
    let plan = if req.plan_zstd.is_empty() {
        if req.plan_json.len() > max_bytes {
            return Err(too_large(max_bytes));
        }
        serde_json::from_str(&req.plan_json).map_err(not_valid)?
    } else {
        decompress_plan(&req.plan_zstd, max_bytes)?
    };
    plan.validate().map_err(not_valid)?;
    check_uploaded(&plan)?;
    let mut plan = plan;
    // Limits only some nodes can enforce become constraints, so that placement never sends a
    // task where its limit would not hold.
    drover_core::enforce::require(&mut plan);
    Ok(plan)
}

/// Parses zstd-compressed JSON, reading at most `max_bytes` of JSON.
fn decompress_plan(compressed: &[u8], max_bytes: usize) -> Result<JobPlan, Status> {
    let zstd_error = |e: io::Error| {
        Status::invalid_argument(format!(
            "plan_zstd is not zstd data this server reads ({e}); compress the plan's JSON with zstd \
             at level 19 or lower (windows up to {} MiB)",
            (1usize << MAX_WINDOW_LOG) >> 20
        ))
    };
    let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed).map_err(zstd_error)?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(zstd_error)?;
    let mut capped = Capped { inner: decoder, left: max_bytes as u64, over: false };
    let parsed = serde_json::from_reader(BufReader::with_capacity(PARSE_BUFFER, &mut capped));
    match parsed {
        Ok(plan) => Ok(plan),
        Err(_) if capped.over => Err(too_large(max_bytes)),
        Err(e) if e.is_io() => Err(zstd_error(io::Error::from(e))),
        Err(e) => Err(not_valid(e)),
    }
}

/// A reader that fails once more than `left` bytes were asked of it, remembering why.
struct Capped<R> {
    inner: R,
    left: u64,
    /// Set when the inner reader had more than the cap.
    over: bool,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            // At the cap: one more byte tells a plan of exactly the cap from a larger one.
            let mut probe = [0u8; 1];
            if self.inner.read(&mut probe)? == 0 {
                return Ok(0);
            }
            self.over = true;
            return Err(io::Error::other("the plan is larger than the cap"));
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// Refuses what only the CLI can turn into something an agent runs: local paths it uploads
/// and images it builds. [`JobPlan::validate`] accepts them, because the CLI validates
/// before uploading.
fn check_uploaded(plan: &JobPlan) -> Result<(), Status> {
    for (i, t) in plan.tasks.iter().enumerate() {
        if t.build.is_some() {
            return Err(Status::invalid_argument(format!(
                "job plan is not valid: tasks[{i}].build: the image was not built; submit with the \
                 drover CLI, which builds and uploads it, or give an `image`"
            )));
        }
        for (k, input) in t.inputs.iter().enumerate() {
            if let InputSource::Path(path) = &input.source {
                return Err(Status::invalid_argument(format!(
                    "job plan is not valid: tasks[{i}].inputs[{k}].source: local path `{path}` was not \
                     uploaded; submit with the drover CLI, which uploads it, or upload it and name its blob"
                )));
            }
        }
    }
    Ok(())
}

fn too_large(max_bytes: usize) -> Status {
    Status::invalid_argument(format!(
        "the job plan is larger than {} MiB of JSON, the most the server accepts; split the job",
        max_bytes >> 20
    ))
}

fn not_valid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("job plan is not valid: {e}"))
}

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::io::Write;

    use drover_core::{Command, InputSpec, TaskPlan};
    use tonic::Code;

    use super::*;

    fn plan(tasks: usize) -> JobPlan {
        JobPlan {
            name: "j".into(),
            project: "default".into(),
            priority: 0,
            labels: BTreeMap::new(),
            tasks: (0..tasks)
                .map(|i| TaskPlan {
                    name: format!("t{i}"),
                    steps: vec![Command::Shell("true".into())],
                    depends_on: if i > 0 { vec![format!("t{}", i - 1)] } else { Vec::new() },
                    ..TaskPlan::default()
                })
                .collect(),
        }
    }

    fn json(plan: &JobPlan) -> pb::SubmitRequest {
        pb::SubmitRequest { plan_json: serde_json::to_string(plan).unwrap(), ..Default::default() }
    }

    fn zstd(bytes: &[u8]) -> pb::SubmitRequest {
        pb::SubmitRequest { plan_zstd: zstd::encode_all(bytes, 3).unwrap(), ..Default::default() }
    }

    #[track_caller]
    fn refused(req: &pb::SubmitRequest, max_bytes: usize, message: &str) {
        let status = decode_within(req, max_bytes).unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(message), "{}", status.message());
    }

    #[test]
    fn plain_json_is_accepted() {
        let p = plan(3);
        assert_eq!(decode_plan(&json(&p)).unwrap(), p);
    }

    #[test]
    fn process_limits_become_constraints_on_enforcing_nodes() {
        let mut p = plan(2);
        p.tasks[1].resources.pids = 64;
        let decoded = decode_plan(&json(&p)).unwrap();
        assert!(decoded.tasks[0].constraints.is_empty());
        assert_eq!(decoded.tasks[1].constraints.get("drover.enforces.pids").map(String::as_str), Some("yes"));
    }

    #[test]
    fn compressed_json_is_accepted_and_preferred() {
        let p = plan(20_000);
        let mut req = zstd(&serde_json::to_vec(&p).unwrap());
        // Set both: the compressed plan wins.
        req.plan_json = "not json".into();
        assert_eq!(decode_plan(&req).unwrap(), p);
    }

    #[test]
    fn a_plan_of_exactly_the_cap_is_accepted() {
        let text = serde_json::to_vec(&plan(2)).unwrap();
        assert!(decode_within(&zstd(&text), text.len()).is_ok());
        refused(&zstd(&text), text.len() - 1, "larger than 0 MiB of JSON");
    }

    #[test]
    fn a_bomb_stops_at_the_cap() {
        // 64 MiB of JSON whitespace compresses to a few kilobytes; decoding stops after 1 MiB.
        let mut encoder = zstd::Encoder::new(Vec::new(), 3).unwrap();
        let spaces = vec![b' '; 1 << 20];
        for _ in 0..64 {
            encoder.write_all(&spaces).unwrap();
        }
        let bomb = pb::SubmitRequest { plan_zstd: encoder.finish().unwrap(), ..Default::default() };
        assert!(bomb.plan_zstd.len() < 64 << 10, "{}", bomb.plan_zstd.len());
        refused(&bomb, 1 << 20, "the job plan is larger than 1 MiB of JSON, the most the server accepts");
        let plain = pb::SubmitRequest { plan_json: " ".repeat((1 << 20) + 1), ..Default::default() };
        refused(&plain, 1 << 20, "larger than 1 MiB");
    }

    #[test]
    fn a_frame_asking_for_a_huge_window_is_refused() {
        let mut encoder = zstd::Encoder::new(Vec::new(), 3).unwrap();
        encoder.window_log(27).unwrap();
        encoder.write_all(&serde_json::to_vec(&plan(1)).unwrap()).unwrap();
        let req = pb::SubmitRequest { plan_zstd: encoder.finish().unwrap(), ..Default::default() };
        refused(&req, MAX_PLAN_BYTES, "plan_zstd is not zstd data this server reads");
        let garbage = pb::SubmitRequest { plan_zstd: b"not zstd at all".to_vec(), ..Default::default() };
        refused(&garbage, MAX_PLAN_BYTES, "plan_zstd is not zstd data this server reads");
    }

    #[test]
    fn invalid_json_is_refused() {
        refused(&zstd(b"{\"name\": "), MAX_PLAN_BYTES, "job plan is not valid: EOF while parsing");
        refused(
            &pb::SubmitRequest { plan_json: "{\"nope\": 1}".into(), ..Default::default() },
            MAX_PLAN_BYTES,
            "job plan is not valid: unknown field `nope`",
        );
    }

    #[test]
    fn an_invalid_plan_gets_the_rule_that_failed() {
        let mut p = plan(2);
        p.tasks[1].depends_on = vec!["t1".into()];
        refused(
            &json(&p),
            MAX_PLAN_BYTES,
            "job plan is not valid: tasks[1].depends_on: a task cannot depend on itself",
        );
        let mut p = plan(1);
        p.project = "Team".into();
        refused(
            &zstd(&serde_json::to_vec(&p).unwrap()),
            MAX_PLAN_BYTES,
            "project: project `Team` may only use",
        );
    }

    #[test]
    fn source_over_the_limit_is_refused() {
        let mut req = json(&plan(1));
        req.source = "x".repeat(MAX_SOURCE_BYTES + 1);
        refused(&req, MAX_PLAN_BYTES, "the job file is 16777217 bytes, more than the limit of 16 MiB");
    }

    #[test]
    fn local_paths_and_builds_must_have_been_shipped() {
        let mut p = plan(1);
        p.tasks[0].inputs =
            vec![InputSpec { source: InputSource::Path("data.bin".into()), to: "data.bin".into() }];
        refused(
            &json(&p),
            MAX_PLAN_BYTES,
            "tasks[0].inputs[0].source: local path `data.bin` was not uploaded",
        );
    }
}
