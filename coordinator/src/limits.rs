//! Bounds on what one request may make the coordinator hold, checked in
//! the gRPC services before anything is stored. A refusal quotes at most
//! [`QUOTE`] characters of what it refuses.

use tonic::codegen::http::Uri;

/// Characters of a refused value quoted in the error message.
pub const QUOTE: usize = 64;
/// Socket addresses and replica URLs.
pub const MAX_ADDR: usize = 256;

/// At most [`QUOTE`] characters of `value`, with `…` and the full length
/// when it was cut.
pub fn quote(value: &str) -> String {
    match value.char_indices().nth(QUOTE) {
        None => format!("{value:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &value[..end], value.len()),
    }
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
    fn replica_urls_name_a_scheme_host_and_port_only() {
        assert_eq!(url_problem("http://127.0.0.1:7070"), None);
        assert_eq!(url_problem("https://coord-2.example:7070/"), None);
        for bad in ["", "127.0.0.1:7070", "http://", "http://host", "ftp://h:1", "http://h:1/x", "http://h:0", "h t"] {
            assert!(url_problem(bad).is_some(), "{bad:?} passed");
        }
        assert!(url_problem(&format!("http://{}:1", "a".repeat(300))).is_some());
    }

    #[test]
    fn a_long_value_is_quoted_by_a_short_prefix() {
        let long = "x".repeat(1 << 20);
        let quoted = quote(&long);
        assert!(quoted.len() < 100 && quoted.contains("1048576"), "{quoted}");
        assert_eq!(quote("short"), "\"short\"");
    }
}
