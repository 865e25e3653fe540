//! `proxy`: runs the public or the private eps proxy.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "proxy",
    version,
    about = "eps proxies: TLS passthrough from a public port to a private server that opens no port"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a proxy with the settings in the directories named by PROXY_SETTINGS
    /// (colon-separated; *.yml files deep-merged in lexical order).
    Run {
        /// public: listens for TLS clients and routes them by SNI; private: announces domains
        /// and dials back to relay clients to the internal server.
        role: Role,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    Public,
    Private,
}

fn main() -> ExitCode {
    let Cli {
        command: Command::Run { role },
    } = Cli::parse();
    proxy::run::main(matches!(role, Role::Public))
}
