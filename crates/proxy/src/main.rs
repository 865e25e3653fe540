//! `proxy`: runs the public or the private eps proxy.

/// mimalloc instead of glibc's malloc, as in `eps`: per-connection allocations (TLS records,
/// HTTP heads, JSON, relay buffers) are small and short-lived, a load glibc's malloc serves
/// slowly (it took ~12% of an EPS server's CPU in the RPC benchmark).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use eps_core::logging::LogArgs;
use proxy::run::RunError;

#[derive(Parser)]
#[command(
    name = "proxy",
    version,
    about = "eps proxies: TLS passthrough from a public port to a private server that opens no port"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
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
    /// Check settings.
    Settings {
        #[command(subcommand)]
        command: SettingsCommand,
    },
}

#[derive(Subcommand)]
enum SettingsCommand {
    /// Validate PROXY_SETTINGS for ROLE and print the merged settings (secrets masked);
    /// exit 64 if bad.
    Check { role: Role },
}

#[derive(Clone, Copy, ValueEnum)]
enum Role {
    Public,
    Private,
}

impl From<Role> for proxy::settings::Role {
    fn from(r: Role) -> Self {
        match r {
            Role::Public => Self::Public,
            Role::Private => Self::Private,
        }
    }
}

/// Exit code for bad settings, before any port is bound (EX_USAGE).
const EXIT_BAD_SETTINGS: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    let outcome = match cli.command {
        Command::Run { role } => proxy::run::main(role.into()),
        Command::Settings {
            command: SettingsCommand::Check { role },
        } => proxy::run::check(role.into()).map(|yaml| print!("{yaml}")),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(RunError::BadSettings(e)) => {
            eprintln!("proxy: bad settings: {e}");
            ExitCode::from(EXIT_BAD_SETTINGS)
        }
        Err(e) => {
            tracing::error!("proxy failed: {e}");
            ExitCode::FAILURE
        }
    }
}
