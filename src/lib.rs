//! wskeep: a WebSocket keepalive sidecar.
//!
//! Where things live:
//! - `config`: the TOML + environment configuration and its validation (`wskeep check`)
//! - `server`: listener, admission, TLS termination, HTTP/1.1 serving; `Server::run`
//! - `proxy`: the request handler: `ws` (upgrade, upstream first), `http` (plain reverse proxy),
//!   `headers` (forwarding rules and upgrade validation)
//! - `relay`: the life of one proxied WebSocket: relay, keepalive, endings
//! - `frame`, `legstream`, `keepalive`, `jsonping`: what the relay uses: WebSocket frames, each
//!   leg's transport, both legs' timers and the JSON ping matcher
//! - `shutdown`: drain and close phases, signals
//! - `tls`: certificate loading and hot reload
//! - `metrics`, `connections`, `admin`, `telemetry`: what operators see
//! - `client`, `probe`, `legacy`, `demo`, `bench`: the tools around the sidecar

pub mod admin;
pub mod bench;
pub mod client;
pub mod config;
pub mod connections;
pub mod demo;
pub mod frame;
pub mod jsonping;
pub mod keepalive;
pub mod legacy;
pub mod legstream;
pub mod metrics;
pub mod probe;
pub mod proxy;
pub mod relay;
pub mod server;
pub mod shutdown;
pub mod size;
pub mod telemetry;
pub mod tls;

pub use config::Config;
pub use server::Server;
pub use shutdown::Drain;
