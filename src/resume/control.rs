//! wskeep's own messages on a resumable session's client leg: text messages that start with
//! the reserved prefix `\0wskeep:`, then a verb and its fields.

/// The 8 bytes every control message starts with.
pub const PREFIX: &[u8] = b"\0wskeep:";

/// Whether a text message whose first frame carries `payload` claims the prefix. A first frame
/// shorter than the prefix that is not the whole message claims it if it could grow into it.
pub fn claims_prefix(payload: &[u8], whole_message: bool) -> bool {
    if payload.len() >= PREFIX.len() || whole_message {
        payload.starts_with(PREFIX)
    } else {
        !payload.is_empty() && PREFIX.starts_with(payload)
    }
}

/// `\0wskeep:session <token> <received>`
pub fn session(token: &str, received: u64) -> Vec<u8> {
    format!("\0wskeep:session {token} {received}").into_bytes()
}

/// `\0wskeep:ack <received>`
pub fn ack(received: u64) -> Vec<u8> {
    format!("\0wskeep:ack {received}").into_bytes()
}

/// A control message from the client: only `ack <n>` exists; `None` for anything else.
pub fn parse_client(message: &[u8]) -> Option<u64> {
    let rest = message.strip_prefix(PREFIX)?;
    let n = std::str::from_utf8(rest).ok()?.strip_prefix("ack ")?;
    // Digits only: `u64::from_str` would also take a leading `+`.
    if n.is_empty() || n.len() > 20 || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_acks_and_nothing_else() {
        assert_eq!(parse_client(&ack(42)), Some(42));
        assert_eq!(parse_client(b"\0wskeep:ack 0"), Some(0));
        for bad in [
            &b"\0wskeep:ack"[..],
            b"\0wskeep:ack ",
            b"\0wskeep:ack +1",
            b"\0wskeep:ack 1 2",
            b"\0wskeep:nack 1",
            b"ack 1",
            b"\0wskeep:ack 99999999999999999999999",
            b"\0wskeep:ack \xff",
        ] {
            assert_eq!(parse_client(bad), None, "{bad:?}");
        }
        assert!(session("a.b", 3).starts_with(PREFIX));
    }

    #[test]
    fn a_short_first_fragment_claims_the_prefix_if_it_could_grow_into_it() {
        assert!(claims_prefix(b"\0wskeep:x", true));
        assert!(claims_prefix(b"\0ws", false));
        assert!(!claims_prefix(b"\0ws", true));
        assert!(!claims_prefix(b"", false));
        assert!(!claims_prefix(b"{\"type\":1}", false));
    }
}
