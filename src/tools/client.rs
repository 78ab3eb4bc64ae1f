//! A frame-level WebSocket client for `probe`, `demo` and `bench`.
//!
//! tungstenite queues a pong for every ping it reads, which is exactly what a probe that must
//! behave like a browser-less JSON-ping client cannot have; so this client writes its own
//! handshake and frames and leaves every control frame to its caller.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::frame::{self, Head};
pub use crate::frame::{OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL `{0}`: {1}")]
    Url(String, &'static str),
    #[error("connect: {0}")]
    Io(#[from] io::Error),
    /// One sentence that says what went wrong and what to do (`tls_failure`).
    #[error("{0}")]
    Tls(String),
    #[error("handshake refused: HTTP {status} {body:?}")]
    Refused { status: u16, body: String },
    #[error("handshake: {0}")]
    Handshake(String),
    #[error("timed out connecting")]
    Timeout,
}

/// How to reach the server.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// Accept any server certificate (self-signed test and staging endpoints).
    pub insecure: bool,
    /// Trust this PEM bundle instead of the system roots.
    pub ca_file: Option<PathBuf>,
    pub headers: Vec<(String, String)>,
    pub subprotocols: Vec<String>,
    /// Source address to connect from (spreads ephemeral ports over 127.0.0.x).
    pub bind: Option<IpAddr>,
    pub timeout: Option<Duration>,
    /// The largest message the client takes, fragments joined (`DEFAULT_MAX_MESSAGE` if unset).
    pub max_message: Option<usize>,
}

/// The largest message a client takes unless `ClientOptions::max_message` says otherwise.
pub const DEFAULT_MAX_MESSAGE: usize = 64 << 20;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The parts of a `ws://` or `wss://` URL the client needs.
#[derive(Debug, Clone)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    pub path: String,
}

impl Target {
    pub fn parse(url: &str) -> Result<Target, ClientError> {
        let bad = |why| ClientError::Url(url.to_string(), why);
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("the scheme must be ws:// or wss://")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?.trim_matches(['[', ']']).to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/".to_string(), |p| p.to_string());
        Ok(Target { tls, host, port, path })
    }
}

/// An open WebSocket, split so that reading and writing can proceed independently.
pub struct Connection {
    pub reader: IncomingFrames<ReadHalf<Box<dyn Io>>>,
    pub writer: OutgoingFrames<WriteHalf<Box<dyn Io>>>,
    /// The subprotocol the server chose.
    pub protocol: Option<String>,
    /// The extensions the server agreed to (`Sec-WebSocket-Extensions`).
    pub extensions: Option<String>,
}

/// Connects, upgrades, and returns the framed connection.
pub async fn connect(url: &str, options: &ClientOptions) -> Result<Connection, ClientError> {
    let target = Target::parse(url)?;
    let tls = if target.tls { Some(tls_connector(options)?) } else { None };
    connect_target(&target, tls.as_ref(), options).await
}

pub async fn connect_target(
    target: &Target,
    tls: Option<&tokio_rustls::TlsConnector>,
    options: &ClientOptions,
) -> Result<Connection, ClientError> {
    let work = async {
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await?
            .next()
            .ok_or_else(|| ClientError::Url(target.host.clone(), "host does not resolve"))?;
        let tcp = open_tcp(addr, options.bind).await?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match tls {
            Some(connector) => {
                let name = ServerName::try_from(target.host.clone())
                    .map_err(|_| ClientError::Tls(format!("{:?} is not a valid TLS server name", target.host)))?;
                Box::new(connector.connect(name, tcp).await.map_err(|e| tls_failure(&e, target, options))?)
            }
            None => Box::new(tcp),
        };
        handshake(io, target, options).await
    };
    match options.timeout {
        Some(limit) => tokio::time::timeout(limit, work).await.map_err(|_| ClientError::Timeout)?,
        None => work.await,
    }
}

async fn open_tcp(addr: SocketAddr, bind: Option<IpAddr>) -> io::Result<TcpStream> {
    let Some(ip) = bind else { return TcpStream::connect(addr).await };
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

async fn handshake(mut io: Box<dyn Io>, target: &Target, options: &ClientOptions) -> Result<Connection, ClientError> {
    let key = tokio_tungstenite::tungstenite::handshake::client::generate_key();
    let default_port = if target.tls { 443 } else { 80 };
    let host =
        if target.port == default_port { target.host.clone() } else { format!("{}:{}", target.host, target.port) };
    let mut request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        target.path
    );
    if !options.subprotocols.is_empty() {
        request.push_str(&format!("Sec-WebSocket-Protocol: {}\r\n", options.subprotocols.join(", ")));
    }
    for (name, value) in &options.headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    io.write_all(request.as_bytes()).await?;
    io.flush().await?;

    let mut buf = BytesMut::with_capacity(1024);
    let (status, accept, protocol, extensions, head_len, content_length) = loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(ClientError::Handshake("connection closed during the handshake".into()));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        match response.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let find = |name: &str| {
                    response
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let length = find("content-length").and_then(|v| v.trim().parse::<usize>().ok());
                break (
                    response.code.unwrap_or(0),
                    find("sec-websocket-accept"),
                    find("sec-websocket-protocol"),
                    find("sec-websocket-extensions"),
                    len,
                    length,
                );
            }
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => continue,
            Ok(httparse::Status::Partial) => return Err(ClientError::Handshake("response head too large".into())),
            Err(e) => return Err(ClientError::Handshake(e.to_string())),
        }
    };
    buf.advance(head_len);
    if status != 101 {
        // Read what fits of the body for the message (bounded: a refusal page, not a download).
        let want = content_length.unwrap_or(0).min(64 * 1024);
        while buf.len() < want {
            if io.read_buf(&mut buf).await? == 0 {
                break;
            }
        }
        let body = String::from_utf8_lossy(&buf[..buf.len().min(64 * 1024)]).into_owned();
        return Err(ClientError::Refused { status, body });
    }
    if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err(ClientError::Handshake("wrong Sec-WebSocket-Accept".into()));
    }
    Ok(framed(io, buf, protocol, extensions, options))
}

/// The framed connection over an upgraded stream; `buf` holds bytes read past the handshake.
fn framed(
    io: Box<dyn Io>,
    buf: BytesMut,
    protocol: Option<String>,
    extensions: Option<String>,
    options: &ClientOptions,
) -> Connection {
    let (read, write) = tokio::io::split(io);
    Connection {
        reader: IncomingFrames {
            io: read,
            buf,
            max_message: options.max_message.unwrap_or(DEFAULT_MAX_MESSAGE),
            partial: None,
        },
        writer: OutgoingFrames { io: write, buf: BytesMut::with_capacity(256) },
        protocol,
        extensions,
    }
}

type Http2Sender = hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>;

/// WebSockets over HTTP/2 (RFC 8441, as browsers open them): each TLS connection (ALPN `h2`)
/// carries up to `per_session` WebSocket streams; a new connection is opened when the last is
/// full.
pub struct Http2Sessions {
    target: Target,
    tls: tokio_rustls::TlsConnector,
    options: ClientOptions,
    per_session: usize,
    current: tokio::sync::Mutex<Option<(Http2Sender, usize)>>,
}

impl Http2Sessions {
    pub fn new(url: &str, options: ClientOptions, per_session: usize) -> Result<Http2Sessions, ClientError> {
        let target = Target::parse(url)?;
        if !target.tls {
            return Err(ClientError::Url(url.to_string(), "HTTP/2 needs wss:// (no h2c)"));
        }
        let tls = tls_connector_for(&options, b"h2")?;
        Ok(Http2Sessions { target, tls, options, per_session: per_session.max(1), current: Default::default() })
    }

    /// Opens a WebSocket stream, on a new connection from `bind` if the current one is full.
    pub async fn open(&self, bind: Option<IpAddr>) -> Result<Connection, ClientError> {
        let work = async {
            let mut sender = {
                let mut current = self.current.lock().await;
                match &mut *current {
                    Some((sender, streams)) if *streams < self.per_session && !sender.is_closed() => {
                        *streams += 1;
                        sender.clone()
                    }
                    _ => {
                        let sender = self.session(bind).await?;
                        *current = Some((sender.clone(), 1));
                        sender
                    }
                }
            };
            let (target, options) = (&self.target, &self.options);
            let uri = format!("https://{}:{}{}", target.host, target.port, target.path);
            let mut request = http::Request::builder()
                .method(http::Method::CONNECT)
                .version(http::Version::HTTP_2)
                .uri(uri)
                .header("sec-websocket-version", "13");
            if !options.subprotocols.is_empty() {
                request = request.header("sec-websocket-protocol", options.subprotocols.join(", "));
            }
            for (name, value) in &options.headers {
                request = request.header(name.as_str(), value.as_str());
            }
            let mut request = request
                .body(http_body_util::Empty::new())
                .map_err(|e| ClientError::Handshake(format!("bad request: {e}")))?;
            request.extensions_mut().insert(hyper::ext::Protocol::from_static("websocket"));
            let failed = |e: hyper::Error| ClientError::Handshake(e.to_string());
            sender.ready().await.map_err(failed)?;
            let response = sender.send_request(request).await.map_err(failed)?;
            if response.status() != http::StatusCode::OK {
                let status = response.status().as_u16();
                let body =
                    http_body_util::BodyExt::collect(http_body_util::Limited::new(response.into_body(), 64 * 1024))
                        .await
                        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                        .unwrap_or_default();
                return Err(ClientError::Refused { status, body });
            }
            let header =
                |name: &str| response.headers().get(name).map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
            let (protocol, extensions) = (header("sec-websocket-protocol"), header("sec-websocket-extensions"));
            let upgraded = hyper::upgrade::on(response).await.map_err(failed)?;
            let io = Box::new(hyper_util::rt::TokioIo::new(upgraded));
            Ok(framed(io, BytesMut::new(), protocol, extensions, options))
        };
        match self.options.timeout {
            Some(limit) => tokio::time::timeout(limit, work).await.map_err(|_| ClientError::Timeout)?,
            None => work.await,
        }
    }

    /// A new TLS connection speaking HTTP/2, once the server's SETTINGS allowed extended CONNECT.
    async fn session(&self, bind: Option<IpAddr>) -> Result<Http2Sender, ClientError> {
        let target = &self.target;
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await?
            .next()
            .ok_or_else(|| ClientError::Url(target.host.clone(), "host does not resolve"))?;
        let tcp = open_tcp(addr, bind).await?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(target.host.clone())
            .map_err(|_| ClientError::Tls(format!("{:?} is not a valid TLS server name", target.host)))?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| tls_failure(&e, target, &self.options))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ClientError::Handshake("the server does not speak HTTP/2 (ALPN h2 not chosen)".into()));
        }
        let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Handshake(e.to_string()))?;
        // The server's SETTINGS come right after the preface: the connection is driven here
        // until they allowed extended CONNECT (bounded), then in a task of its own.
        let mut conn = Box::pin(conn);
        for _ in 0..400 {
            if conn.is_extended_connect_protocol_enabled() {
                tokio::spawn(conn);
                return Ok(sender);
            }
            tokio::select! {
                _ = &mut conn => return Err(ClientError::Handshake("the server closed the HTTP/2 connection".into())),
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        Err(ClientError::Handshake("the server's HTTP/2 SETTINGS do not allow WebSockets (RFC 8441)".into()))
    }
}

/// A TLS connector trusting the system roots, a given bundle, or (insecure) anything.
pub fn tls_connector(options: &ClientOptions) -> Result<tokio_rustls::TlsConnector, ClientError> {
    tls_connector_for(options, b"http/1.1")
}

/// As `tls_connector`, offering `alpn`.
fn tls_connector_for(options: &ClientOptions, alpn: &[u8]) -> Result<tokio_rustls::TlsConnector, ClientError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))?;
    let mut config = if options.insecure {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider))).with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        match &options.ca_file {
            Some(path) => {
                use rustls::pki_types::pem::PemObject;
                let bad = |why: String| ClientError::Tls(format!("--cacert {}: {why}", path.display()));
                for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(format!("cannot be read: {e}")))? {
                    let cert = cert.map_err(|e| bad(format!("not a PEM certificate bundle: {e}")))?;
                    roots.add(cert).map_err(|e| bad(format!("holds a certificate that cannot be trusted: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(bad("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
                }
            }
            None => {
                for cert in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(cert);
                }
            }
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A failed TLS handshake as one sentence an operator can act on: what was wrong, and the
/// option or the change that fixes it.
fn tls_failure(e: &io::Error, target: &Target, options: &ClientOptions) -> ClientError {
    let server = format!("{}:{}", target.host, target.port);
    let trusted = match &options.ca_file {
        Some(path) => format!("a CA in {}", path.display()),
        None => "a CA this system trusts".to_string(),
    };
    let Some(error) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        // Not a TLS message at all: the connection ended or was reset mid-handshake.
        return ClientError::Tls(format!(
            "the TLS handshake with {server} failed ({e}): is it a TLS endpoint (a ws:// URL if not)?"
        ));
    };
    use rustls::CertificateError as Cert;
    let message = match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            // BadSignature: a trusted CA has the issuer's name but did not sign it.
            Cert::UnknownIssuer | Cert::BadSignature => format!(
                "the certificate of {server} is not signed by {trusted}: --cacert wants the CA that issued it \
                 (or skip verification with --insecure)"
            ),
            Cert::Other(other) if is_ca_used_as_leaf(other) => format!(
                "{server} presents a CA certificate (basicConstraints CA:TRUE, what `openssl req -x509` makes by \
                 default) as its own, which TLS clients refuse: --cacert wants the CA that signed the server's \
                 certificate, not a CA-flagged leaf, so give the server a leaf certificate (openssl req -x509 \
                 -addext basicConstraints=critical,CA:FALSE -addext subjectAltName={}:{}) or use --insecure",
                if target.host.parse::<IpAddr>().is_ok() { "IP" } else { "DNS" },
                target.host
            ),
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                let names = match cert {
                    Cert::NotValidForNameContext { presented, .. } if !presented.is_empty() => {
                        let names: Vec<&str> = presented.iter().map(|n| presented_name(n)).collect();
                        format!(" (it names {})", names.join(", "))
                    }
                    _ => String::new(),
                };
                format!(
                    "the certificate of {server} is not valid for {:?}{names}: connect with a name it holds in \
                     its subjectAltName, or use --insecure",
                    target.host
                )
            }
            Cert::Expired | Cert::ExpiredContext { .. } => {
                let when = match cert {
                    Cert::ExpiredContext { not_after, .. } => format!(" at {}", unix_time(not_after)),
                    _ => String::new(),
                };
                format!("the certificate of {server} expired{when}: the server must renew it (or use --insecure)")
            }
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                let when = match cert {
                    Cert::NotValidYetContext { not_before, .. } => format!(" before {}", unix_time(not_before)),
                    _ => String::new(),
                };
                format!(
                    "the certificate of {server} is not valid yet{when}: check this machine's clock and the \
                     server's (or use --insecure)"
                )
            }
            other => format!("the certificate of {server} is refused ({other:?}): fix it, or use --insecure"),
        },
        rustls::Error::InvalidMessage(_) => {
            format!("{server} did not answer with TLS: if it serves plain WebSocket, use a ws:// URL instead of wss://")
        }
        rustls::Error::AlertReceived(alert) => format!(
            "{server} refused the TLS handshake (alert {alert:?}): it may require a client certificate or a \
             protocol this client does not offer (TLS 1.2 and 1.3)"
        ),
        rustls::Error::PeerIncompatible(why) => {
            format!("{server} has no TLS version or cipher suite in common with this client (TLS 1.2 and 1.3): {why:?}")
        }
        other => format!("the TLS handshake with {server} failed: {other}"),
    };
    ClientError::Tls(message)
}

/// `localhost` from webpki's `DnsName("localhost")`, `127.0.0.1` from `IpAddress(127.0.0.1)`.
fn presented_name(name: &str) -> &str {
    match (name.find('('), name.rfind(')')) {
        (Some(open), Some(close)) if open < close => name[open + 1..close].trim_matches('"'),
        _ => name,
    }
}

/// Whether webpki refused the certificate for being a CA's (`CaUsedAsEndEntity`).
fn is_ca_used_as_leaf(other: &rustls::OtherError) -> bool {
    matches!(other.0.downcast_ref::<webpki::Error>(), Some(webpki::Error::CaUsedAsEndEntity))
}

fn unix_time(t: &UnixTime) -> String {
    crate::telemetry::rfc3339(i64::try_from(t.as_secs()).unwrap_or(i64::MAX))
}

/// `--insecure`: the certificate is not checked, only the handshake signatures.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// One frame as it came off the wire (unmasked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    pub opcode: u8,
    pub payload: Bytes,
}

/// A whole message or a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    Text(Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong(Bytes),
    /// The close code (none: the frame carried no code) and reason.
    Close(Option<u16>, String),
}

pub struct IncomingFrames<R> {
    io: R,
    buf: BytesMut,
    max_message: usize,
    /// A fragmented message in progress (control frames may arrive between its fragments).
    partial: Option<(u8, BytesMut)>,
}

impl<R: AsyncRead + Unpin> IncomingFrames<R> {
    /// The next frame; `None` when the connection ended (EOF) between frames.
    pub async fn read_frame(&mut self) -> io::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(Some(frame));
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            if self.io.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection ended mid-frame"))
                };
            }
        }
    }

    fn parse(&mut self) -> io::Result<Option<Frame>> {
        let Some((head, at)) = Head::parse(&self.buf) else { return Ok(None) };
        if head.len > self.max_message as u64 {
            return Err(self.too_big());
        }
        let total = at + head.len as usize;
        if self.buf.len() < total {
            self.buf.reserve(total - self.buf.len());
            return Ok(None);
        }
        self.buf.advance(at);
        let mut payload = self.buf.split_to(head.len as usize);
        if let Some(mask) = head.mask {
            frame::apply_mask(&mut payload, mask);
        }
        Ok(Some(Frame { fin: head.fin, opcode: head.opcode, payload: payload.freeze() }))
    }

    fn too_big(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message over {} bytes, more than the client takes", self.max_message),
        )
    }

    /// The next message (fragments joined) or control frame; `None` at EOF.
    pub async fn read_message(&mut self) -> io::Result<Option<Incoming>> {
        loop {
            let Some(frame) = self.read_frame().await? else { return Ok(None) };
            let partial = &mut self.partial;
            let complete = match frame.opcode {
                OP_PING => return Ok(Some(Incoming::Ping(frame.payload))),
                OP_PONG => return Ok(Some(Incoming::Pong(frame.payload))),
                OP_CLOSE => {
                    let p = &frame.payload;
                    let code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                    let reason = String::from_utf8_lossy(p.get(2..).unwrap_or_default()).into_owned();
                    return Ok(Some(Incoming::Close(code, reason)));
                }
                OP_TEXT | OP_BINARY if partial.is_none() => {
                    if frame.fin {
                        Some((frame.opcode, frame.payload))
                    } else {
                        *partial = Some((frame.opcode, BytesMut::from(&frame.payload[..])));
                        None
                    }
                }
                OP_CONTINUATION if partial.is_some() => {
                    let (opcode, mut data) = partial.take().expect("checked above");
                    // The fragments joined are held whole: bounded like a single frame.
                    if data.len() + frame.payload.len() > self.max_message {
                        return Err(self.too_big());
                    }
                    data.extend_from_slice(&frame.payload);
                    if frame.fin {
                        Some((opcode, data.freeze()))
                    } else {
                        *partial = Some((opcode, data));
                        None
                    }
                }
                _ => return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected frame sequence")),
            };
            if let Some((opcode, data)) = complete {
                return Ok(Some(if opcode == OP_TEXT { Incoming::Text(data) } else { Incoming::Binary(data) }));
            }
        }
    }
}

pub struct OutgoingFrames<W> {
    io: W,
    buf: BytesMut,
}

impl<W: AsyncWrite + Unpin> OutgoingFrames<W> {
    /// Appends a masked frame to the write buffer; `flush` sends it.
    pub fn queue(&mut self, opcode: u8, fin: bool, payload: &[u8]) {
        // The probe talks to production endpoints through intermediaries: masking keys come
        // from a CSPRNG, as RFC 6455 §5.3 asks, so that no one can predict them.
        frame::write_frame(&mut self.buf, fin, opcode, payload, Some(rand::random()));
    }

    /// Appends raw bytes (hostile-input tests write malformed frames with this).
    pub fn queue_raw(&mut self, bytes: &[u8]) {
        self.buf.put_slice(bytes);
    }

    pub fn queue_close(&mut self, code: Option<u16>, reason: &str) {
        self.queue(OP_CLOSE, true, &frame::close_payload(code, reason));
    }

    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    pub async fn flush(&mut self) -> io::Result<()> {
        self.io.write_all_buf(&mut self.buf).await?;
        self.io.flush().await
    }

    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> io::Result<()> {
        self.queue(opcode, true, payload);
        self.flush().await
    }

    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.io.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_through_the_codec() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut writer = OutgoingFrames { io: a, buf: BytesMut::new() };
        let mut reader = IncomingFrames { io: b, buf: BytesMut::new(), max_message: 1 << 20, partial: None };
        writer.queue(OP_TEXT, false, b"hel");
        writer.queue(OP_PING, true, b"p");
        writer.queue(OP_CONTINUATION, true, b"lo");
        writer.queue(OP_BINARY, true, &vec![7u8; 70_000]);
        writer.queue_close(Some(4000), "bye");
        writer.flush().await.unwrap();
        drop(writer);
        assert_eq!(reader.read_message().await.unwrap(), Some(Incoming::Ping(Bytes::from_static(b"p"))));
        assert_eq!(reader.read_message().await.unwrap(), Some(Incoming::Text(Bytes::from_static(b"hello"))));
        assert_eq!(reader.read_message().await.unwrap(), Some(Incoming::Binary(Bytes::from(vec![7u8; 70_000]))));
        assert_eq!(reader.read_message().await.unwrap(), Some(Incoming::Close(Some(4000), "bye".into())));
        assert_eq!(reader.read_message().await.unwrap(), None);
    }

    #[tokio::test]
    async fn reassembly_is_bounded() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let mut writer = OutgoingFrames { io: a, buf: BytesMut::new() };
        let mut reader = IncomingFrames { io: b, buf: BytesMut::new(), max_message: 1000, partial: None };
        // 1000 bytes in three fragments pass; 1001 do not, though no frame is over the limit.
        writer.queue(OP_BINARY, false, &[1; 400]);
        writer.queue(OP_CONTINUATION, false, &[1; 400]);
        writer.queue(OP_CONTINUATION, true, &[1; 200]);
        writer.queue(OP_TEXT, false, &[b'a'; 400]);
        writer.queue(OP_CONTINUATION, false, &[b'a'; 400]);
        writer.queue(OP_CONTINUATION, true, &[b'a'; 201]);
        writer.flush().await.unwrap();
        assert_eq!(reader.read_message().await.unwrap(), Some(Incoming::Binary(Bytes::from(vec![1u8; 1000]))));
        let err = reader.read_message().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("over 1000 bytes"), "{err}");
    }

    #[test]
    fn presented_names_lose_their_debug_wrapping() {
        assert_eq!(presented_name("DnsName(\"localhost\")"), "localhost");
        assert_eq!(presented_name("IpAddress(127.0.0.1)"), "127.0.0.1");
        assert_eq!(presented_name("DirectoryName"), "DirectoryName");
    }

    #[test]
    fn parses_urls() {
        let t = Target::parse("wss://example.com/a?b=c").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port, t.path.as_str()), ("example.com", 443, "/a?b=c"));
        assert_eq!(Target::parse("ws://127.0.0.1:9000").unwrap().path, "/");
        assert!(Target::parse("http://x").is_err());
    }
}
