//! wskeep: a WebSocket keepalive sidecar.
//!
//! Where things live:
//! - `config`: the TOML + environment configuration and its validation (`wskeep check`)
//! - `server`: listener, TLS termination, HTTP/1.1 serving; `Server::run`
//! - `admission`: the handshake places, with eviction of the oldest, and the reserved descriptor
//! - `proxy_protocol`, `cidr`: the PROXY protocol header before TLS, and `listen.trusted_proxies`
//! - `proxy`: the request handler: `ws` (upgrade, upstream first), `http` (plain reverse proxy),
//!   `headers` (forwarding rules and upgrade validation)
//! - `relay`: the life of one proxied WebSocket: relay, keepalive, endings; `relay::session` for a
//!   resumable one (attach, detach, splice)
//! - `frame`, `legstream`, `keepalive`, `jsonping`: what the relay uses: WebSocket frames, each
//!   leg's transport, both legs' timers and the JSON ping matcher
//! - `shutdown`: drain and close phases, signals; `reload`: the configuration reload (SIGHUP)
//! - `tls`: certificate loading and hot reload
//! - `metrics`, `connections`, `admin`, `telemetry`: what operators see
//! - `vocab`: `Side`, `End`, `UpgradeFailure`, the words every other module shares
//! - `resume`: lossless reconnect: tokens, the session registry, the replay buffer
//! - `tools`: what is built around the sidecar (`client`, `probe`, `bench`, `demo`,
//!   `legacy_upstream`), apart from it

pub mod admin;
pub mod admission;
pub mod cidr;
pub mod config;
pub mod connections;
pub mod endings;
pub mod frame;
pub mod inflate;
pub mod jsonping;
pub mod keepalive;
pub mod legstream;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod relay;
pub mod reload;
pub mod resume;
pub mod server;
pub mod shutdown;
pub mod size;
pub mod telemetry;
pub mod tls;
pub mod tools;
pub mod vocab;

pub use config::Config;
pub use server::Server;
pub use shutdown::Drain;
