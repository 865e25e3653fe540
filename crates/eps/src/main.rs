//! `eps`: the EPS server and its development tools (the library `eps` holds them).

/// mimalloc instead of glibc's malloc: per-call and per-connection allocations (TLS records,
/// HTTP heads, JSON) are small and short-lived, and glibc spent ~12% of an EPS server's CPU in
/// malloc/free and its consolidation under the RPC benchmark.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use eps::{certs, cli, sd, server, Failure, EXIT_USAGE};
use eps_core::logging::LogArgs;

#[derive(Parser)]
#[command(
    name = "eps",
    version,
    about = "EPS server: carries JSON-RPC calls between operators over mutual-TLS gRPC"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
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
    /// Call OPERATOR.METHOD through the local EPS server (EPS_SETTINGS) and print the result,
    /// e.g. `eps call public-proxy-1.getAnnouncements '{}'`.
    Call {
        /// OPERATOR.METHOD, or `_ping` for the local server itself.
        method: String,
        /// The params as JSON.
        #[arg(default_value = "{}")]
        params: String,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 15.0)]
        timeout: f64,
    },
    /// Check settings.
    Settings {
        #[command(subcommand)]
        command: SettingsCommand,
    },
    /// Inspect the service directory named by EPS_SETTINGS.
    Directory {
        #[command(subcommand)]
        command: DirectoryCommand,
    },
    /// The signed directory: run a directory server, sign and submit records.
    Sd {
        #[command(subcommand)]
        command: SdCommand,
    },
}

#[derive(Subcommand)]
enum SdCommand {
    /// Run a directory server with the settings in the directories named by SD_SETTINGS.
    Run,
    /// Sign the records of FILE... ({"records": [...]}, in the order given) as the next ones
    /// of the chain, with the key in EPS_SETTINGS' directory.settings.signing, and print them.
    Sign {
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
        /// The hash to chain them after (`null` starts a chain); default: the directory
        /// server's head.
        #[arg(long)]
        parent: Option<String>,
    },
    /// Submit the records of FILE... (in the order given) to the directory server; unsigned
    /// ones are signed first, e.g. `eps sd submit settings/dev/directory/*.json`.
    Submit {
        #[arg(required = true)]
        files: Vec<std::path::PathBuf>,
    },
    /// Print the directory server's folded entry of NAME, or every entry.
    Entries { name: Option<String> },
    /// Verify the signed records of FILE (a chain file or {"records": [...]}) with the trust
    /// settings of EPS_SETTINGS, and say how long it took.
    Verify { file: std::path::PathBuf },
}

#[derive(Subcommand)]
enum SettingsCommand {
    /// Validate EPS_SETTINGS and print the merged settings (secrets masked); exit 64 if bad.
    Check,
}

#[derive(Subcommand)]
enum DirectoryCommand {
    /// Print the folded directory entry of OPERATOR, or of every operator.
    Show { operator: Option<String> },
}

#[derive(Subcommand)]
enum ServerCommand {
    /// Run the server with the settings in the directories named by EPS_SETTINGS
    /// (colon-separated; *.yml files deep-merged in lexical order).
    Run,
}

fn main() -> std::process::ExitCode {
    use std::process::ExitCode;
    let cli = Cli::parse();
    cli.log.init();
    let outcome = match cli.command {
        Command::Certs(args) => certs::run(args),
        Command::Call {
            method,
            params,
            timeout,
        } => cli::call(
            method,
            params,
            std::time::Duration::from_secs_f64(timeout.max(0.1)),
        ),
        Command::Settings {
            command: SettingsCommand::Check,
        } => cli::settings_check(),
        Command::Directory {
            command: DirectoryCommand::Show { operator },
        } => cli::directory_show(operator),
        Command::Server {
            command: ServerCommand::Run,
        } => server::main(),
        Command::Sd { command } => match command {
            SdCommand::Run => sd::server::main(),
            SdCommand::Sign { files, parent } => sd::cli::sign(&files, parent),
            SdCommand::Submit { files } => sd::cli::submit(&files),
            SdCommand::Entries { name } => sd::cli::entries(name),
            SdCommand::Verify { file } => sd::cli::verify(&file),
        },
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(why)) => {
            eprintln!("{why}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Failed(why)) => {
            eprintln!("{why}");
            ExitCode::FAILURE
        }
        Err(Failure::Logged) => ExitCode::FAILURE,
    }
}
