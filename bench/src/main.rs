//! `eps-bench`: eps side by side with a direct connection, HAProxy and rathole, on loopback, in
//! one run. `make bench` installs the peers, builds everything in release and runs this; see
//! bench/README.md for what is measured and how to read the results.
//!
//! # Layout
//! - [`systems`]: starting and stopping each system; the shared internal server and certificates.
//! - [`client`]: the TLS client (tokio + rustls) every scenario uses.
//! - [`scenarios`]: the measurements; [`rpc`]: the JSON-RPC setup for the `rpc_*` ones.
//! - [`report`]: `latest.json` and `latest.md`; [`targets`]: the targets; [`plot`]: the PNG.
//! - [`run`]: one run, start to report; [`procs`]: child processes, killed however it ends.
//! - [`refusals`]: the CPU a refused client costs the public proxy, by reason.
//! - [`breakdown`]: what a `--profile` recording says each process spent its CPU on.

mod breakdown;
mod client;
mod plot;
mod procs;
mod refusals;
mod report;
mod rpc;
mod run;
mod scenarios;
mod systems;
mod targets;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

use systems::Kind;

#[derive(Parser)]
#[command(
    name = "eps-bench",
    about = "eps side by side with direct, HAProxy and rathole"
)]
pub struct Args {
    /// A reduced run (under a minute): smaller downloads, fewer connections and calls.
    #[arg(long)]
    pub quick: bool,
    /// Systems to compare, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,haproxy,rathole,eps,eps-embedded"
    )]
    pub systems: Vec<Kind>,
    /// Scenario groups to run, comma-separated: idle (idle_rss_per_conn), connect (connect_*,
    /// conn_rate), throughput (throughput_1, throughput_8), rpc (rpc_*), refusals (refused_*:
    /// eps only, not run by default). A partial run suits profiling one path; its report has
    /// only those rows.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,connect,throughput,rpc"
    )]
    pub scenarios: Vec<Group>,
    /// Folder that receives latest.json, latest.md and latest.png.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Clients opening connections in parallel in the connect scenario (default 25); 1 shows
    /// the latency each system adds without queueing for the CPU.
    #[arg(long)]
    pub connect_clients: Option<usize>,
    /// Callers in parallel in the RPC scenario (default 64); 1 shows the latency of one call.
    #[arg(long)]
    pub rpc_callers: Option<usize>,
    /// Run eps in its dialed form (the private EPS server and the RPC benchmark's callee open a
    /// gRPC port that their peer dials) instead of the firewalled form (they open none and hold
    /// reverse streams to their peer), to compare the two.
    #[arg(long)]
    pub eps_dialed: bool,
    /// `worker_threads` of each eps process, the RPC scenario's EPS servers included (default:
    /// each process's own: one per CPU core for a proxy, as every system here, one for an EPS
    /// server).
    #[arg(long, value_name = "N")]
    pub eps_worker_threads: Option<std::num::NonZeroUsize>,
    /// Record a profile with call graphs (`perf record`) of each process of every system but
    /// direct during the connect scenario's first round, into DIR/<system>-<process>.data, and
    /// note what each spent its CPU per connection on (by work for eps, by system call or library
    /// for all); read one further with `perf report -i FILE`. Sampling costs the profiled
    /// processes CPU: compare CPU figures from runs without it.
    #[arg(long, value_name = "DIR")]
    pub profile: Option<PathBuf>,
}

/// A group of scenarios that run together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    Idle,
    Connect,
    Throughput,
    Rpc,
    Refusals,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let started = Instant::now();
    let work = match tempfile::Builder::new().prefix("eps-bench-").tempdir() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("eps-bench: creating a temporary folder: {e}");
            return ExitCode::FAILURE;
        }
    };
    procs::install_cleanup(work.path());
    match run::run(&args, work.path()).await {
        Ok(()) => {
            println!("==> done in {:.0} s", started.elapsed().as_secs_f64());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("eps-bench: {e:#}");
            eprintln!("settings and logs kept in {}", work.keep().display());
            ExitCode::FAILURE
        }
    }
}
