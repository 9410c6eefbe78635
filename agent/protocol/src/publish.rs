//! Published ports (`kiln run -p`): how a host stream on the agent's vsock
//! port [`PUBLISH_PORT`](crate::PUBLISH_PORT) names the guest TCP port it
//! is for.
//!
//! After the VMM's `CONNECT`/`OK` handshake the host sends one line,
//! `TCP <port>\n`, at most [`MAX_HEADER`] bytes. The agent connects to
//! `127.0.0.1:<port>` in the guest and answers [`ACCEPTED`]; from then on
//! the stream carries that TCP connection's bytes. Anything else (a bad
//! line, a port the host did not publish, a guest port nobody listens on)
//! ends in the agent closing the stream without a reply, so the host can
//! tell a refusal from a connection its guest server closed at once.

use std::io::Read;

/// Longest header line, newline included (`TCP 65535\n` is 10 bytes).
pub const MAX_HEADER: usize = 16;
/// The agent's answer once the guest port accepted the connection.
pub const ACCEPTED: &[u8] = b"OK\n";

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("stream closed before the header ended")]
    Closed,
    #[error("header longer than {MAX_HEADER} bytes")]
    TooLong,
    #[error("malformed header {0:?} (expected `TCP <port>`)")]
    Malformed(String),
    #[error("cannot read the header")]
    Read(#[source] std::io::Error),
}

/// The header for guest TCP port `port`.
pub fn header(port: u16) -> String {
    format!("TCP {port}\n")
}

/// The guest TCP port a header line (without its newline) names.
pub fn parse_header(line: &[u8]) -> Result<u16, HeaderError> {
    let malformed = || HeaderError::Malformed(String::from_utf8_lossy(line).into_owned());
    let digits = line.strip_prefix(b"TCP ").ok_or_else(malformed)?;
    // Digits only: `parse` would take a sign, and no port needs a leading zero.
    if digits.is_empty() || digits[0] == b'0' || !digits.iter().all(u8::is_ascii_digit) {
        return Err(malformed());
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse::<u16>().ok())
        .ok_or_else(malformed)
}

/// Reads one header from `r`, byte by byte (whatever follows the newline
/// is the connection's data and stays unread), and returns its port.
pub fn read_header(r: &mut impl Read) -> Result<u16, HeaderError> {
    let mut line = Vec::with_capacity(MAX_HEADER);
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) => return Err(HeaderError::Closed),
            Ok(_) if byte[0] == b'\n' => return parse_header(&line),
            // The newline counts toward the limit.
            Ok(_) if line.len() + 1 < MAX_HEADER => line.push(byte[0]),
            Ok(_) => return Err(HeaderError::TooLong),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(HeaderError::Read(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for port in [1, 22, 8000, 65535] {
            let h = header(port);
            assert!(h.len() <= MAX_HEADER, "{h:?}");
            let mut r = h.as_bytes();
            assert_eq!(read_header(&mut r).unwrap(), port);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn data_after_the_header_stays_unread() {
        let mut r = &b"TCP 8000\nGET / HTTP/1.0\r\n"[..];
        assert_eq!(read_header(&mut r).unwrap(), 8000);
        assert_eq!(r, b"GET / HTTP/1.0\r\n");
    }

    #[test]
    fn bad_headers_are_refused() {
        for bad in [
            &b"TCP 0"[..],
            b"TCP 65536",
            b"TCP 99999999999999",
            b"TCP 080",
            b"TCP +80",
            b"TCP -1",
            b"TCP ",
            b"TCP",
            b"tcp 80",
            b"UDP 53",
            b"TCP 80 ",
            b" TCP 80",
            b"TCP  80",
            b"TCP 80\r",
            b"TCP \xff",
            b"",
        ] {
            assert!(
                matches!(parse_header(bad), Err(HeaderError::Malformed(_))),
                "{bad:?}"
            );
            let mut line = bad.to_vec();
            line.push(b'\n');
            assert!(read_header(&mut &line[..]).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn reading_is_bounded_and_needs_a_newline() {
        let long = vec![b'1'; 1 << 20];
        let mut r = &long[..];
        assert!(matches!(read_header(&mut r), Err(HeaderError::TooLong)));
        // It stopped at the limit rather than reading everything.
        assert_eq!(r.len(), long.len() - MAX_HEADER);
        assert!(matches!(
            read_header(&mut &b"TCP 80"[..]),
            Err(HeaderError::Closed)
        ));
        // Exactly at the limit (with its newline) is still read.
        let mut at_limit = b"TCP 1".to_vec();
        at_limit.extend(std::iter::repeat_n(b' ', MAX_HEADER - at_limit.len() - 1));
        at_limit.push(b'\n');
        assert_eq!(at_limit.len(), MAX_HEADER);
        assert!(matches!(
            read_header(&mut &at_limit[..]),
            Err(HeaderError::Malformed(_))
        ));
    }

    #[test]
    fn messages_are_one_line() {
        let e = parse_header(b"TCP 1\n2").unwrap_err();
        assert_eq!(
            e.to_string(),
            "malformed header \"TCP 1\\n2\" (expected `TCP <port>`)"
        );
    }
}
