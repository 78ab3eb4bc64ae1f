//! The PROXY protocol (HAProxy's `proxy-protocol.txt`, v1 text and v2 binary) on the listener:
//! an L4 balancer in front (HAProxy in TCP mode, nginx's stream module, AWS NLB) writes the
//! client's address before the client's first byte, and that address is the peer everywhere
//! after (logs, `/connections`, `X-Forwarded-For`, `Forwarded`).
//!
//! A header is read only from `listen.trusted_proxies`, and with `listen.proxy_protocol` on, every
//! connection must carry one: anyone else, a malformed or truncated header, or none within the
//! handshake timeout closes the connection, counted under its reason. Nothing past the header is
//! read here (the first bytes of TLS or HTTP stay in the socket), and a v2 header is bounded by
//! `V2_MAX_BODY` before anything is allocated for it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::cidr::{self, Cidr};

/// `listen.proxy_protocol`: which versions of the header the listener expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    V1,
    V2,
    /// Either version, told apart by the first byte.
    Any,
}

impl Mode {
    pub const NAMES: [(&'static str, Mode); 4] =
        [("off", Mode::Off), ("v1", Mode::V1), ("v2", Mode::V2), ("any", Mode::Any)];

    pub fn as_str(self) -> &'static str {
        Self::NAMES.iter().find(|(_, m)| *m == self).map_or("off", |(name, _)| name)
    }

    fn accepts_v1(self) -> bool {
        matches!(self, Mode::V1 | Mode::Any)
    }

    fn accepts_v2(self) -> bool {
        matches!(self, Mode::V2 | Mode::Any)
    }
}

/// Why a connection was closed before TLS or HTTP (`wskeep_proxy_protocol_failures_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The peer is not in `listen.trusted_proxies`.
    Untrusted,
    /// Not a header of an accepted version, cut short, or breaking the format.
    Malformed,
    /// No complete header within `listen.handshake_timeout`.
    Timeout,
}

impl Failure {
    pub const ALL: [Failure; 3] = [Failure::Untrusted, Failure::Malformed, Failure::Timeout];

    pub fn as_str(self) -> &'static str {
        match self {
            Failure::Untrusted => "untrusted",
            Failure::Malformed => "malformed",
            Failure::Timeout => "timeout",
        }
    }
}

/// The v2 signature, the first 12 bytes of every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest v1 header, CRLF included.
const V1_MAX: usize = 107;
/// The largest v2 address-and-TLV part accepted. The format allows 65535; balancers send
/// addresses and a few TLVs (AWS's VPC endpoint, HAProxy's ALPN and SNI), far below this.
pub const V2_MAX_BODY: usize = 2048;

/// The address the connection's client had, where the header names one. `None` for a v2 `LOCAL`
/// or a v1 `UNKNOWN` (the balancer's own connection, such as a health check, or a protocol it
/// cannot describe): the TCP peer stays the peer.
pub type Source = Option<SocketAddr>;

/// The peer of a connection accepted from `tcp_peer`: the client the PROXY header names when
/// the listener expects one, else `tcp_peer`. Reads exactly the header from `tcp`.
pub async fn real_peer(
    tcp: &mut TcpStream,
    tcp_peer: SocketAddr,
    mode: Mode,
    trusted: &[Cidr],
    deadline: Instant,
) -> Result<SocketAddr, Failure> {
    if mode == Mode::Off {
        return Ok(tcp_peer);
    }
    if !cidr::any_contains(trusted, tcp_peer.ip()) {
        return Err(Failure::Untrusted);
    }
    match tokio::time::timeout_at(deadline, read_header(tcp, mode)).await {
        Ok(Ok(source)) => Ok(source.unwrap_or(tcp_peer)),
        Ok(Err(failure)) => Err(failure),
        Err(_) => Err(Failure::Timeout),
    }
}

/// Reads one header of a version `mode` accepts, and nothing after it.
async fn read_header(tcp: &mut TcpStream, mode: Mode) -> Result<Source, Failure> {
    let mut first = [0u8; 1];
    if tcp.peek(&mut first).await.map_err(|_| Failure::Malformed)? == 0 {
        return Err(Failure::Malformed);
    }
    match first[0] {
        b'\r' if mode.accepts_v2() => read_v2(tcp).await,
        b'P' if mode.accepts_v1() => read_v1(tcp).await,
        _ => Err(Failure::Malformed),
    }
}

async fn read_v2(tcp: &mut TcpStream) -> Result<Source, Failure> {
    // Every v2 header is at least 16 bytes: reading them cannot take a byte of what follows.
    let mut head = [0u8; 16];
    tcp.read_exact(&mut head).await.map_err(|_| Failure::Malformed)?;
    let len = v2_body_len(&head)?;
    let mut header = Vec::with_capacity(16 + len);
    header.extend_from_slice(&head);
    header.resize(16 + len, 0);
    tcp.read_exact(&mut header[16..]).await.map_err(|_| Failure::Malformed)?;
    parse_v2(&header)
}

/// Reads up to the CRLF: peeks at what has arrived, takes what is header, and waits for more
/// only while no CRLF came (so nothing after the header is consumed).
async fn read_v1(tcp: &mut TcpStream) -> Result<Source, Failure> {
    let mut buf = [0u8; V1_MAX];
    let mut have = 0;
    loop {
        let n = tcp.peek(&mut buf[have..]).await.map_err(|_| Failure::Malformed)?;
        if n == 0 {
            return Err(Failure::Malformed);
        }
        let seen = have + n;
        let prefix = seen.min(6);
        if buf[..prefix] != b"PROXY "[..prefix] {
            return Err(Failure::Malformed);
        }
        // A CR taken in an earlier read may be followed by this read's LF.
        let from = have.saturating_sub(1);
        if let Some(at) = buf[from..seen].windows(2).position(|w| w == b"\r\n") {
            let end = from + at + 2;
            tcp.read_exact(&mut buf[have..end]).await.map_err(|_| Failure::Malformed)?;
            return parse_v1(&buf[..end]);
        }
        if seen == V1_MAX {
            return Err(Failure::Malformed);
        }
        tcp.read_exact(&mut buf[have..seen]).await.map_err(|_| Failure::Malformed)?;
        have = seen;
    }
}

/// The length of the address-and-TLV part from a v2 header's first 16 bytes.
fn v2_body_len(head: &[u8; 16]) -> Result<usize, Failure> {
    if head[..12] != V2_SIGNATURE {
        return Err(Failure::Malformed);
    }
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    if len > V2_MAX_BODY {
        return Err(Failure::Malformed);
    }
    Ok(len)
}

/// Parses a whole v1 line, `PROXY TCP4 src dst sport dport\r\n` (or `PROXY UNKNOWN...\r\n`).
pub fn parse_v1(line: &[u8]) -> Result<Source, Failure> {
    let bad = Failure::Malformed;
    if line.len() > V1_MAX {
        return Err(bad);
    }
    let text = line.strip_suffix(b"\r\n").ok_or(bad)?;
    let text = std::str::from_utf8(text).map_err(|_| bad)?;
    let rest = text.strip_prefix("PROXY ").ok_or(bad)?;
    if rest == "UNKNOWN" || rest.starts_with("UNKNOWN ") {
        // The sender could not describe the connection; the rest of the line is ignored.
        return Ok(None);
    }
    let mut fields = rest.split(' ');
    let (Some(proto), Some(src), Some(dst), Some(sport), Some(dport), None) =
        (fields.next(), fields.next(), fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(bad);
    };
    let ip: IpAddr = match proto {
        "TCP4" => src.parse::<Ipv4Addr>().map_err(|_| bad)?.into(),
        "TCP6" => src.parse::<Ipv6Addr>().map_err(|_| bad)?.into(),
        _ => return Err(bad),
    };
    match proto {
        "TCP4" => dst.parse::<Ipv4Addr>().map(|_| ()).map_err(|_| bad)?,
        _ => dst.parse::<Ipv6Addr>().map(|_| ()).map_err(|_| bad)?,
    }
    let port = v1_port(sport).ok_or(bad)?;
    v1_port(dport).ok_or(bad)?;
    Ok(Some(SocketAddr::new(ip, port)))
}

/// A port as v1 writes it: decimal digits, no sign, no leading zero.
fn v1_port(text: &str) -> Option<u16> {
    let port: u16 = text.parse().ok()?;
    (text.bytes().all(|b| b.is_ascii_digit()) && (port.to_string().len() == text.len())).then_some(port)
}

/// Parses a whole v2 header: signature, version 2, command, family, addresses, then TLVs, each
/// length checked against what is left.
pub fn parse_v2(header: &[u8]) -> Result<Source, Failure> {
    let bad = Failure::Malformed;
    let head: &[u8; 16] = header.get(..16).and_then(|h| h.try_into().ok()).ok_or(bad)?;
    let len = v2_body_len(head)?;
    let body = header.get(16..).filter(|b| b.len() == len).ok_or(bad)?;
    let (version, command) = (head[12] >> 4, head[12] & 0x0f);
    if version != 2 {
        return Err(bad);
    }
    let (family, transport) = (head[13] >> 4, head[13] & 0x0f);
    let addresses_len = match family {
        0 => 0,   // AF_UNSPEC
        1 => 12,  // AF_INET: two addresses, two ports
        2 => 36,  // AF_INET6
        3 => 216, // AF_UNIX: two 108-byte paths
        _ => return Err(bad),
    };
    if transport > 2 {
        return Err(bad);
    }
    let (addresses, tlvs) = body.split_at_checked(addresses_len).ok_or(bad)?;
    check_tlvs(tlvs)?;
    match command {
        // LOCAL: the balancer's own connection; the addresses (if any) are ignored.
        0 => Ok(None),
        1 => Ok(match (family, transport) {
            (1, 1) => {
                let ip = Ipv4Addr::from(<[u8; 4]>::try_from(&addresses[..4]).map_err(|_| bad)?);
                Some(SocketAddr::new(ip.into(), u16::from_be_bytes([addresses[8], addresses[9]])))
            }
            (2, 1) => {
                let ip = Ipv6Addr::from(<[u8; 16]>::try_from(&addresses[..16]).map_err(|_| bad)?);
                Some(SocketAddr::new(ip.into(), u16::from_be_bytes([addresses[32], addresses[33]])))
            }
            // UNSPEC, UDP or a Unix socket: nothing a TCP peer address can hold.
            _ => None,
        }),
        _ => Err(bad),
    }
}

/// Walks the type-length-value list: every entry's 3-byte head and value must fit.
fn check_tlvs(mut rest: &[u8]) -> Result<(), Failure> {
    while !rest.is_empty() {
        let [_kind, hi, lo, tail @ ..] = rest else { return Err(Failure::Malformed) };
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        rest = tail.get(len..).ok_or(Failure::Malformed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    #[test]
    fn v1_lines() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 8443\r\n"),
            Ok(Some("192.0.2.7:56324".parse().unwrap()))
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 ::1 65535 8443\r\n"),
            Ok(Some("[2001:db8::7]:65535".parse().unwrap()))
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(None));
        assert_eq!(parse_v1(b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"), Ok(None));
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 8443\n"[..],
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 8443 9\r\n",
            b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n",
            b"PROXY TCP6 192.0.2.7 ::1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 +1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 01 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 2\r\n",
            b"PROXY TCP4  192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert_eq!(parse_v1(bad), Err(Failure::Malformed), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn v2_headers() {
        let inet = [192, 0, 2, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x20, 0xfb];
        assert_eq!(parse_v2(&v2(1, 0x11, &inet)), Ok(Some("192.0.2.7:56324".parse().unwrap())));
        let mut inet6 = [0u8; 36];
        inet6[..16].copy_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        inet6[32..34].copy_from_slice(&443u16.to_be_bytes());
        assert_eq!(parse_v2(&v2(1, 0x21, &inet6)), Ok(Some("[2001:db8::7]:443".parse().unwrap())));
        // LOCAL (a health check) keeps the TCP peer, whatever addresses it carries.
        assert_eq!(parse_v2(&v2(0, 0x11, &inet)), Ok(None));
        assert_eq!(parse_v2(&v2(0, 0x00, &[])), Ok(None));
        // TLVs after the addresses: ALPN "h2" and an empty NOOP.
        let mut with_tlvs = inet.to_vec();
        with_tlvs.extend_from_slice(&[0x01, 0, 2, b'h', b'2', 0x04, 0, 0]);
        assert_eq!(parse_v2(&v2(1, 0x11, &with_tlvs)), Ok(Some("192.0.2.7:56324".parse().unwrap())));
    }

    #[test]
    fn v2_breakage_is_malformed() {
        let inet = [192, 0, 2, 7, 10, 0, 0, 1, 0xdc, 0x04, 0x20, 0xfb];
        let mut wrong_version = v2(1, 0x11, &inet);
        wrong_version[12] = 0x11;
        let mut bad_signature = v2(1, 0x11, &inet);
        bad_signature[3] = b'X';
        let mut truncated_tlv = inet.to_vec();
        truncated_tlv.extend_from_slice(&[0x01, 0, 9, b'h']);
        let mut half_tlv_head = inet.to_vec();
        half_tlv_head.extend_from_slice(&[0x01, 0]);
        let mut long_length = v2(1, 0x11, &inet);
        long_length[15] += 1;
        for (what, header) in [
            ("version 1 in a v2 header", wrong_version),
            ("signature", bad_signature),
            ("command 2", v2(2, 0x11, &inet)),
            ("family 4", v2(1, 0x41, &inet)),
            ("addresses shorter than the family's", v2(1, 0x21, &inet)),
            ("TLV longer than what is left", v2(1, 0x11, &truncated_tlv)),
            ("TLV head cut", v2(1, 0x11, &half_tlv_head)),
            ("length past the end", long_length),
            ("body over the bound", v2(1, 0x11, &vec![0; V2_MAX_BODY + 1])),
            ("shorter than 16 bytes", V2_SIGNATURE.to_vec()),
        ] {
            assert_eq!(parse_v2(&header), Err(Failure::Malformed), "{what}");
        }
    }
}
