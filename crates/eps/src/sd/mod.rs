//! The signed service directory (`eps_core::sd`) in processes: the directory server
//! (`eps sd run`), an EPS server following it, and the operators' commands.
//!
//! # Layout
//! - `settings`: `SD_SETTINGS` of the directory server, and the `directory: {type: sd}`
//!   settings of a follower (which the commands read too).
//! - `service`: the JSON-RPC methods of the directory server.
//! - `server`: wiring of `eps sd run`.
//! - `follow`: an EPS server following a directory server: fetch, verify, store, swap.
//! - `cli`: `eps sd sign|submit|entries|verify`.

pub mod cli;
pub mod follow;
pub mod server;
pub mod service;
pub mod settings;
