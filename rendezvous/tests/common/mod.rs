//! Helpers shared by the rendezvous's integration tests (`mod common;`).

use natter_wire::{ClientMessage, Register, RoomCode};

/// A first Register for `room`, encoded: no token, no cookie, nonce 1.
pub fn register(room: &str) -> Vec<u8> {
    ClientMessage::Register(Register {
        room: RoomCode::new(room.as_bytes()).unwrap(),
        host_candidates: vec![],
        client_nonce: 1,
        peer_token: None,
        claim: false,
        cookie: None,
        nat: None,
        mapped: None,
        rejoin: None,
    })
    .encode()
    .unwrap()
}
