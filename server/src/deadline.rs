//! The gRPC deadline of a call, read from its `grpc-timeout` header. The
//! server handles deadlines itself (instead of tonic's timeout layer, which
//! answers CANCELLED) so that an expired call gets DEADLINE_EXCEEDED and the
//! task is told to stop.

use std::time::{Duration, Instant};

use tonic::metadata::MetadataMap;

/// The header defined by the gRPC over HTTP/2 protocol.
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// The absolute deadline of a call received at `received`, if the client set one.
pub fn from_metadata(metadata: &MetadataMap, received: Instant) -> Option<Instant> {
    from_headers(metadata.as_ref(), received)
}

/// The same, from the request's HTTP headers.
pub fn from_headers(headers: &http::HeaderMap, received: Instant) -> Option<Instant> {
    let value = headers.get(GRPC_TIMEOUT)?.to_str().ok()?;
    // An unreadable timeout is ignored rather than guessed at.
    parse_timeout(value).map(|t| received.checked_add(t).unwrap_or(received + Duration::from_secs(86_400 * 365)))
}

/// Parses `TimeoutValue TimeoutUnit`: up to 8 digits and one of H M S m u n.
fn parse_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_unit_and_refuses_junk() {
        assert_eq!(parse_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_timeout("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse_timeout("7n"), Some(Duration::from_nanos(7)));
        for junk in ["", "S", "5", "5s", "-5S", "123456789S", "1.5S"] {
            assert_eq!(parse_timeout(junk), None, "{junk:?}");
        }
    }
}
