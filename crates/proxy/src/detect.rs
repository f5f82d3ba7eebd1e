//! Protocol detection from a connection's first bytes. Pure: it looks at a
//! buffer and says what the bytes are, or that it needs more.

/// What a connection speaks, judged from what the client sent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// Anything else: forwarded as bytes.
    Opaque,
    /// A TLS ClientHello (record type 22, version 3.x).
    Tls,
}

/// The HTTP/2 connection preface (RFC 9113 section 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The longest prefix [`detect`] may ask for.
pub const MAX_PEEK: usize = 64;

/// `Some(protocol)` once `buf` decides it, `None` while more bytes could
/// change the answer. An empty `buf` at end of stream is the caller's case.
pub fn detect(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    if buf[0] == 0x16 {
        return match buf.get(1) {
            None => None,
            Some(3) => Some(Protocol::Tls),
            Some(_) => Some(Protocol::Opaque),
        };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Protocol::Http2)
        } else {
            None
        };
    }
    // An HTTP/1 request line: a method token, a space, then a target.
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len == buf.len() {
        return if method_len <= 16 {
            None
        } else {
            Some(Protocol::Opaque)
        };
    }
    if buf[method_len] == b' ' && (1..=16).contains(&method_len) {
        Some(Protocol::Http1)
    } else {
        Some(Protocol::Opaque)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_protocol_is_recognised_from_its_first_bytes() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(detect(b"POST /x HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(detect(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(detect(&[0x16, 3, 1, 0, 0xc8]), Some(Protocol::Tls));
        assert_eq!(detect(b"\x00\x00\x00\x10redis"), Some(Protocol::Opaque));
        assert_eq!(detect(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(detect(b"hello world"), Some(Protocol::Opaque));
    }

    #[test]
    fn a_prefix_of_a_protocol_asks_for_more() {
        assert_eq!(detect(b""), None);
        assert_eq!(detect(b"GE"), None);
        assert_eq!(detect(b"PRI * HTTP/2"), None);
        assert_eq!(detect(&[0x16]), None);
        // "PRI " could also be an HTTP/1 method; the preface decides.
        assert_eq!(detect(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
    }

    #[test]
    fn every_prefix_of_a_request_agrees_with_the_whole() {
        for whole in [
            &b"DELETE /a HTTP/1.1\r\n"[..],
            H2_PREFACE,
            b"\x16\x03\x01\x02",
        ] {
            let answer = detect(whole);
            for n in 1..whole.len() {
                if let Some(p) = detect(&whole[..n]) {
                    assert_eq!(Some(p), answer, "{:?}", &whole[..n]);
                }
            }
        }
    }
}
