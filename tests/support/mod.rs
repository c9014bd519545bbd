//! Shared helpers for integration tests.
//!
//! Include from a test crate with `mod support;`. Not every test uses every
//! helper, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod binaries;
pub mod nat_world;
pub mod netns;
pub mod pipe_peer;
pub mod transfer_peer;
