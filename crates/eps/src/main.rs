//! `eps`: the EPS server and its development tools.
//!
//! # Layout
//! - `settings`: the `EPS_SETTINGS` schema and its defaults.
//! - `server`: wires listeners, directory and broker together (`eps server run`).
//! - `broker`: routes calls between the local client, peers and the local service.
//! - `grpc`: the mutual-TLS gRPC server and the per-peer channels.
//! - `peers`: peer identity checks against the directory.
//! - `certs`: `eps certs`, the development PKI.

mod broker;
mod certs;
mod grpc;
mod peers;
mod server;
mod settings;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "eps",
    version,
    about = "EPS server: carries JSON-RPC calls between operators over mutual-TLS gRPC"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run an EPS server.
    Server {
        #[command(subcommand)]
        command: ServerCommand,
    },
    /// Write the development PKI (root CA, operator and internal-server certificates) and the
    /// directory's certificate records. Existing files are kept unless --force is given.
    Certs(certs::Args),
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Run the server with the settings in the directories named by EPS_SETTINGS
    /// (colon-separated; *.yml files deep-merged in lexical order).
    Run,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Certs(args) => certs::run(args),
        Command::Server {
            command: ServerCommand::Run,
        } => server::main(),
    }
}
