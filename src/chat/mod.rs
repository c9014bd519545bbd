//! The chat between two peers, over sessions that come and go.
//!
//! - `conversation` (sans-IO): numbered lines, sent again until the peer
//!   confirms them, shown once;
//! - `store`: the conversation and its history in SQLite.
//!
//! The messages are in [`natter_wire::chat`]; the terminal UI and the line
//! mode that drive these are the `chat` command.

mod conversation;
mod store;

pub use conversation::{ChatEvent, Conversation, OutLine, Resume};
pub use store::{ChatStore, HistoryLine, StoreError, FILE_NAME};
