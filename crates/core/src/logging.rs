//! Logging setup shared by the binaries: `RUST_LOG`-style filters (default `info`), text or
//! JSON lines on stderr.

use tracing_subscriber::EnvFilter;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (colored on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The `--log-format` option of every eps binary.
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log line format (the filter comes from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "EPS_LOG_FORMAT")]
    pub log_format: LogFormat,
}

impl LogArgs {
    /// Installs the global subscriber in this format, `info` unless `RUST_LOG` says otherwise.
    pub fn init(&self) {
        init_with("info", self.log_format)
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init_with(default_filter: &str, format: LogFormat) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // A line that cannot be written (stderr a pipe whose reader is gone) is dropped. Reporting
    // the failure would print to stderr again, which panics (`eprintln!`) and with it the task
    // that logged: a proxy would then stop relaying or shutting down because its log went away.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(true)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Installs the global subscriber with text output.
pub fn init(default_filter: &str) {
    init_with(default_filter, LogFormat::Text)
}
