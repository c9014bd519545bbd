//! natter-rendezvous: the self-hosted server where two natter peers meet.
//!
//! It records each peer's external address as it sees it in `recv_from`,
//! introduces the two peers of a room to each other, and answers STUN Binding
//! requests on the same sockets, with what a peer needs to learn how its NAT
//! behaves ([`listeners`]). [`server`] is the sans-IO state machine;
//! [`driver`] runs it on tokio sockets.

pub mod cookie;
pub mod driver;
pub mod listeners;
pub mod prometheus;
pub mod rate_limit;
pub mod server;
pub mod stats;

pub use server::{Config, Server, Transmit};
pub use stats::{DropReason, Stats};
