//! Bounds on what one request may make the coordinator hold: the length of
//! every string and the size of every collection a client, a worker or a
//! peer replica sends, checked in the gRPC services before anything is
//! stored. A refusal quotes at most [`QUOTE`] characters of what it refuses.

use flotilla_proto::v1 as pb;
use tonic::codegen::http::Uri;
use tonic::Status;

/// Characters of a refused value quoted in the error message.
pub const QUOTE: usize = 64;
/// Job ids, worker ids and submission ids (ours are under 40 characters).
pub const MAX_ID: usize = 128;
/// Socket addresses and replica URLs.
pub const MAX_ADDR: usize = 256;
/// Host names a worker reports.
pub const MAX_HOSTNAME: usize = 255;
/// Paths and storage URLs: `base_dir`, a checkpoint's location, a final
/// model's location (Linux's PATH_MAX).
pub const MAX_PATH: usize = 4096;
/// The text of a job file.
pub const MAX_JOB_FILE: usize = 1 << 20;
/// The job files of all the trials of one sweep together (they are kept in
/// one command of the replicated log).
pub const MAX_SWEEP_BYTES: usize = 8 << 20;
/// The name a job file is known by in error messages (`origin`).
pub const MAX_ORIGIN: usize = MAX_PATH;
/// Free text a worker sends: a failure's message, a preemption's source
/// and detail.
pub const MAX_MESSAGE: usize = 4096;
/// Rendezvous keys.
pub const MAX_RENDEZVOUS_KEY: usize = 256;
/// One rendezvous value.
pub const MAX_RENDEZVOUS_VALUE: usize = 64 * 1024;
/// Rendezvous keys one job may publish in one generation (a few per rank
/// for the largest worlds flotilla plans).
pub const MAX_RENDEZVOUS_KEYS: usize = 1024;
/// Bytes of rendezvous keys and values one job may publish in one
/// generation.
pub const MAX_RENDEZVOUS_BYTES: usize = 4 << 20;
/// Metric points the leader keeps per job (one per reported step; later
/// points are not kept).
pub const MAX_METRIC_POINTS: usize = 1_000_000;
/// API tokens a coordinator keeps, revoked ones included.
pub const MAX_TOKENS: usize = 10_000;

/// At most [`QUOTE`] characters of `value`, with `…` and the full length
/// when it was cut.
pub fn quote(value: &str) -> String {
    match value.char_indices().nth(QUOTE) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
    }
}

/// Refuses `value` (the field `field`) when it is longer than `max` bytes.
pub fn check_len(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is at most {max} bytes, got {} starting {}",
            value.len(),
            quote(value)
        )));
    }
    Ok(())
}

/// Refuses an id that is empty-but-required, too long, or holds control
/// characters.
pub fn check_id(field: &str, value: &str) -> Result<(), Status> {
    check_len(field, value, MAX_ID)?;
    if value.chars().any(char::is_control) {
        return Err(Status::invalid_argument(format!("{field} holds control characters: {}", quote(value))));
    }
    Ok(())
}

/// Refuses a storage location (a checkpoint's, a final model's) that is
/// too long or has a `..` segment, which could point outside the job's
/// folder.
pub fn check_location(field: &str, value: &str) -> Result<(), Status> {
    check_len(field, value, MAX_PATH)?;
    if value.split(['/', '\\']).any(|s| s == "..") {
        return Err(Status::invalid_argument(format!("{field} has a `..` segment: {}", quote(value))));
    }
    Ok(())
}

/// `value` cut to at most `max` bytes (at a character boundary): free text
/// that is kept, not refused, because what it reports matters.
pub fn truncate(mut value: String, max: usize) -> String {
    if value.len() > max {
        let mut end = max;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
        value.push('…');
    }
    value
}

/// The bounds of each request, checked before the service acts on it.
pub trait Bounded {
    fn check(&self) -> Result<(), Status>;
}

/// Requests whose only strings are ids: each named field is checked.
macro_rules! ids_only {
    ($($t:ty => [$($field:ident),+]);+ $(;)?) => {$(
        impl Bounded for $t {
            fn check(&self) -> Result<(), Status> {
                $(check_id(stringify!($field), &self.$field)?;)+
                Ok(())
            }
        }
    )+};
}

ids_only! {
    pb::GetJobRequest => [job_id];
    pb::GetSweepRequest => [sweep_id];
    pb::CancelJobRequest => [job_id];
    pb::WatchJobRequest => [job_id];
    pb::GetMetricsRequest => [job_id];
    pb::RegisterModelRequest => [job_id];
    pb::HeartbeatRequest => [worker_id];
    pb::AssignmentsRequest => [worker_id];
    pb::PreemptionNotice => [worker_id];
    pb::ProgressReport => [worker_id, job_id];
    pb::MemoryReport => [worker_id, job_id];
    pb::FailureReport => [worker_id, job_id];
}

/// A token's name: 1 to 64 letters, digits, `-`, `_`, `.` or `@`.
pub fn check_token_name(name: &str) -> Result<(), Status> {
    let ok = (1..=64).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if ok {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "a token name is 1 to 64 letters, digits, '-', '_', '.' or '@', got {}",
            quote(name)
        )))
    }
}

impl Bounded for pb::CreateTokenRequest {
    fn check(&self) -> Result<(), Status> {
        check_token_name(&self.name)?;
        check_len("role", &self.role, MAX_ID)
    }
}

impl Bounded for pb::RevokeTokenRequest {
    fn check(&self) -> Result<(), Status> {
        check_id("name", &self.name)
    }
}

impl Bounded for pb::SubmitJobRequest {
    fn check(&self) -> Result<(), Status> {
        check_len("spec_yaml", &self.spec_yaml, MAX_JOB_FILE)?;
        check_len("origin", &self.origin, MAX_ORIGIN)?;
        check_location("base_dir", &self.base_dir)?;
        check_id("submission_id", &self.submission_id)
    }
}

impl Bounded for pb::SubmitSweepRequest {
    fn check(&self) -> Result<(), Status> {
        check_len("sweep_yaml", &self.sweep_yaml, MAX_JOB_FILE)?;
        check_len("sweep_origin", &self.sweep_origin, MAX_ORIGIN)?;
        check_len("job_yaml", &self.job_yaml, MAX_JOB_FILE)?;
        check_len("job_origin", &self.job_origin, MAX_ORIGIN)?;
        check_location("base_dir", &self.base_dir)?;
        check_id("submission_id", &self.submission_id)
    }
}

impl Bounded for pb::RegisterRequest {
    fn check(&self) -> Result<(), Status> {
        check_len("data_addr", &self.data_addr, MAX_ADDR)?;
        check_len("hostname", &self.hostname, MAX_HOSTNAME)?;
        check_len("metrics_addr", &self.metrics_addr, MAX_ADDR)?;
        check_id("worker_id", &self.worker_id)
    }
}

impl Bounded for pb::CheckpointCommit {
    fn check(&self) -> Result<(), Status> {
        check_id("worker_id", &self.worker_id)?;
        check_id("job_id", &self.job_id)?;
        check_location("location", &self.location)
    }
}

impl Bounded for pb::FinishReport {
    fn check(&self) -> Result<(), Status> {
        check_id("worker_id", &self.worker_id)?;
        check_id("job_id", &self.job_id)?;
        check_location("final_model", &self.final_model)
    }
}

impl Bounded for pb::RendezvousPut {
    fn check(&self) -> Result<(), Status> {
        check_id("job_id", &self.job_id)?;
        check_id("worker_id", &self.worker_id)?;
        check_len("key", &self.key, MAX_RENDEZVOUS_KEY)?;
        if self.value.len() > MAX_RENDEZVOUS_VALUE {
            return Err(Status::invalid_argument(format!(
                "rendezvous values are at most {MAX_RENDEZVOUS_VALUE} bytes, got {}",
                self.value.len()
            )));
        }
        Ok(())
    }
}

impl Bounded for pb::RendezvousGet {
    fn check(&self) -> Result<(), Status> {
        check_id("job_id", &self.job_id)?;
        check_id("worker_id", &self.worker_id)?;
        check_len("key", &self.key, MAX_RENDEZVOUS_KEY)
    }
}

/// Checks the bounds of `req`'s message and hands the message back.
pub fn bounded<T: Bounded>(req: tonic::Request<T>) -> Result<T, Status> {
    let msg = req.into_inner();
    msg.check()?;
    Ok(msg)
}

/// Why `addr` is not a replica URL of the form `http://host:port` (or
/// `https://`), with nothing after the port.
pub fn url_problem(addr: &str) -> Option<String> {
    if addr.is_empty() {
        return Some("the address is empty; give http://host:port".into());
    }
    if addr.len() > MAX_ADDR {
        return Some(format!("the address is longer than {MAX_ADDR} bytes: {}", quote(addr)));
    }
    let uri: Uri = match addr.parse() {
        Ok(u) => u,
        Err(e) => return Some(format!("{} is not a URL ({e}); give http://host:port", quote(addr))),
    };
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Some(format!("{} must start with http:// or https://", quote(addr)));
    }
    let Some(authority) = uri.authority() else {
        return Some(format!("{} names no host", quote(addr)));
    };
    if authority.host().is_empty() || authority.port_u16().is_none() {
        return Some(format!("{} must name a host and a port (http://host:port)", quote(addr)));
    }
    if authority.port_u16() == Some(0) {
        return Some(format!("{} names port 0", quote(addr)));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Some(format!("{} has a path; give only http://host:port", quote(addr)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_value_is_quoted_by_a_short_prefix() {
        let long = "x".repeat(1 << 20);
        let err = check_len("job_id", &long, MAX_ID).unwrap_err();
        assert!(err.message().len() < 200, "{}", err.message());
        assert!(err.message().contains("1048576"), "{}", err.message());
        assert_eq!(quote("short"), "\"short\"");
        // A cut never splits a character.
        let wide = "é".repeat(100);
        let quoted = quote(&wide);
        assert!(quoted.starts_with(&format!("\"{}\"…", "é".repeat(QUOTE))), "{quoted}");
    }

    #[test]
    fn locations_with_dot_dot_are_refused_and_free_text_is_cut() {
        assert!(check_location("location", "/runs/j-1/step-10").is_ok());
        assert!(check_location("location", "/runs/j-1/../j-2/step-10").is_err());
        assert!(check_location("location", "s3://b/j-1/..").is_err());
        let cut = truncate("é".repeat(10), 5);
        assert_eq!(cut, "éé…");
        assert_eq!(truncate("short".into(), 5), "short");
    }

    #[test]
    fn a_submission_with_a_huge_base_dir_is_refused_with_a_short_message() {
        let req = pb::SubmitJobRequest { base_dir: "/".repeat(4 << 20), ..Default::default() };
        let err = req.check().unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().starts_with("base_dir is at most"), "{}", err.message());
        assert!(err.message().len() < 200);
    }

    #[test]
    fn ids_with_control_characters_are_refused() {
        assert!(check_id("worker_id", "w-1").is_ok());
        assert!(check_id("worker_id", "w\n1").is_err());
        assert!(check_id("worker_id", &"w".repeat(MAX_ID + 1)).is_err());
    }

    #[test]
    fn replica_urls_name_a_scheme_host_and_port_only() {
        assert_eq!(url_problem("http://127.0.0.1:7070"), None);
        assert_eq!(url_problem("https://coord-2.example:7070/"), None);
        for bad in ["", "127.0.0.1:7070", "http://", "http://host", "ftp://h:1", "http://h:1/x", "http://h:0", "h t"] {
            assert!(url_problem(bad).is_some(), "{bad:?} passed");
        }
        assert!(url_problem(&format!("http://{}:1", "a".repeat(300))).is_some());
    }
}
