//! One run: start the systems, run every scenario against each (one progress line per scenario
//! and system), write the report.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::breakdown::Breakdown;
use crate::client::{Client, TERMINATED_SNI};
use crate::report::{num, Report};
use crate::scenarios::{self, Plan, Timed};
use crate::systems::{Env, Kind, System};
use crate::{procs, refusals, rpc, Args, Group};

pub async fn run(args: &Args, work: &Path) -> anyhow::Result<()> {
    let mut plan = if args.quick {
        Plan::quick()
    } else {
        Plan::full()
    };
    if let Some(n) = args.connect_clients {
        plan.connect_clients = n.max(1);
    }
    if let Some(n) = args.rpc_callers {
        plan.rpc_callers = n.max(1);
    }
    let mut kinds = args.systems.clone();
    kinds.sort();
    kinds.dedup();
    let limit = procs::raise_fd_limit()?;
    println!(
        "==> eps-bench{}: {} on loopback; open-file limit {limit}; work folder {}",
        if args.quick { " --quick" } else { "" },
        kinds
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(", "),
        work.display()
    );
    let mut env = Env::start(work).await?;
    env.eps_dialed = args.eps_dialed;
    env.eps_worker_threads = args.eps_worker_threads;
    let client = Client::new(&env.root())?;
    println!("==> internal server on {}", env.server_addr);
    let mut running = Vec::new();
    for kind in kinds {
        let t0 = Instant::now();
        let system = System::start(kind, &env, &client).await?;
        println!(
            "==> {kind:<8} ready on {} in {:.1} s",
            system.addr,
            t0.elapsed().as_secs_f64()
        );
        running.push(system);
    }
    let mut report = Report::new(running.iter().map(|s| s.kind.name().into()).collect());
    report.notes = notes(&plan);
    if running.iter().any(|s| s.kind.is_eps()) {
        report.notes.push(format!(
            "eps: {} form; worker threads per process: {}. eps-embedded: the same, each EPS server inside its proxy's process.",
            if env.eps_dialed {
                "dialed"
            } else {
                "firewalled"
            },
            env.eps_worker_threads
                .map_or("one per core (a proxy), one (an EPS server)".to_string(), |n| n.to_string()),
        ));
    }
    let wants = |g: Group| args.scenarios.contains(&g);
    let rpc_systems = if wants(Group::Rpc) {
        running
            .iter()
            .filter(|s| matches!(s.kind, Kind::Direct | Kind::Eps))
            .count()
    } else {
        0
    };
    let per_system = usize::from(wants(Group::Idle))
        + 2 * usize::from(wants(Group::Connect))
        + 2 * usize::from(wants(Group::Throughput));
    // eps's terminated domain: connect_*, connect1_*, throughput_1 and throughput_8 again.
    let terminated_lines = if running.iter().any(|s| s.kind == Kind::Eps) {
        2 * usize::from(wants(Group::Connect)) + 2 * usize::from(wants(Group::Throughput))
    } else {
        0
    };
    let refusal_cases = if wants(Group::Refusals) && running.iter().any(|s| s.kind == Kind::Eps) {
        6
    } else {
        0
    };
    let mut progress = Progress {
        step: 0,
        total: running.len() * per_system + terminated_lines + rpc_systems + refusal_cases,
    };

    for s in running.iter().filter(|_| wants(Group::Idle)) {
        let r = scenarios::idle_rss(&client, s, plan.idle, env.server_pid).await;
        let line = r.map(|idle| {
            report.push("idle_rss_per_conn", s.kind.name(), idle.kib);
            failures(&mut report, "idle", s, &idle.opened, plan.idle);
            let parts: Vec<String> = idle
                .by_process
                .iter()
                .map(|(name, kib)| format!("{name} {}", num(*kib)))
                .collect();
            if parts.len() > 1 {
                report.notes.push(format!(
                    "idle_rss_per_conn on {} by process (KiB): {}.",
                    s.kind,
                    parts.join(", ")
                ));
            }
            format!(
                "{} KiB per connection ({}; {} held open, opened at {}/s)",
                num(idle.kib),
                parts.join(", "),
                idle.opened.samples_ms.len(),
                num(idle.opened.rate)
            )
        });
        progress.line(&mut report, "idle_rss_per_conn", s.kind, line);
    }
    // Connect: the connections split over the rounds, samples and time added up per system.
    let mut connect: Vec<Timed> = running.iter().map(|_| Timed::default()).collect();
    let mut cpu: Vec<Vec<f64>> = running.iter().map(|s| vec![0.0; s.pids.len()]).collect();
    let mut profiles: Vec<Vec<PathBuf>> = running.iter().map(|_| Vec::new()).collect();
    for round in (0..plan.rounds).filter(|_| wants(Group::Connect)) {
        let n = share(plan.connections, plan.rounds, round);
        let mut rates = Vec::new();
        for (i, s) in running.iter().enumerate() {
            scenarios::warm_up(&client, s.addr, plan.connect_clients).await;
            let profile =
                match &args.profile {
                    Some(dir) if round == 0 && s.kind != Kind::Direct => Some(
                        procs::Profile::start(dir, &format!("{}-", s.kind), &s.pids)?,
                    ),
                    _ => None,
                };
            let before = s.cpu_secs()?;
            let t = scenarios::connect(&client, s.addr, n, plan.connect_clients).await;
            if let Some(p) = profile {
                profiles[i] = p.stop();
                let files: Vec<String> = profiles[i]
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect();
                println!("==> profiles: {}", files.join(", "));
            }
            for ((acc, a), b) in cpu[i].iter_mut().zip(s.cpu_secs()?).zip(before) {
                *acc += a - b;
            }
            rates.push(format!("{} {}", s.kind, num(t.rate)));
            connect[i].merge(t);
        }
        progress.round("connect", round, plan.rounds, "conn/s", &rates);
    }
    for (((s, t), cpu), profiled) in running
        .iter()
        .zip(connect)
        .zip(cpu)
        .zip(profiles)
        .filter(|_| wants(Group::Connect))
    {
        let total = cpu_note(&mut report, s, &cpu, t.samples_ms.len(), "");
        profile_notes(&mut report, s, &cpu, t.samples_ms.len(), &profiled);
        report.push("connect_cpu_us", s.kind.name(), total);
        let (p50, p99) = (t.quantile(0.5), t.quantile(0.99));
        let name = s.kind.name();
        report.push("connect_p50", name, p50);
        report.push("connect_p99", name, p99);
        report.push("conn_rate", name, t.rate);
        failures(&mut report, "connect", s, &t, plan.connections);
        let line = Ok(format!(
            "p50 {} ms, p99 {} ms, {} conn/s",
            num(p50),
            num(p99),
            num(t.rate)
        ));
        report
            .samples
            .insert(("connect".into(), name.into()), t.samples_ms);
        progress.line(&mut report, "connect_*, conn_rate", s.kind, line);
    }
    // One client at a time: the latency each system adds, without queueing for the CPU.
    for s in running.iter().filter(|_| wants(Group::Connect)) {
        scenarios::warm_up(&client, s.addr, 1).await;
        let before = dial_back_wait(s).await;
        let (t, phases) = scenarios::connect_one_by_one(&client, s.addr, plan.connections_1).await;
        let waited = mean_since(before, dial_back_wait(s).await);
        let (p50, p99, name) = (t.quantile(0.5), t.quantile(0.99), s.kind.name());
        phase_note(&mut report, &s.kind.to_string(), &phases, waited);
        report.push("connect1_p50", name, p50);
        report.push("connect1_p99", name, p99);
        failures(&mut report, "connect1", s, &t, plan.connections_1);
        let line = Ok(format!("p50 {} ms, p99 {} ms", num(p50), num(p99)));
        progress.line(&mut report, "connect1_*", s.kind, line);
    }
    // Throughput: each round downloads the full size; the median round counts.
    let downloads = [
        ("throughput_1", 1, plan.download_1),
        ("throughput_8", 8, plan.download_8),
    ];
    for (scenario, conns, bytes) in downloads.into_iter().filter(|_| wants(Group::Throughput)) {
        let mut got: Vec<Vec<f64>> = running.iter().map(|_| Vec::new()).collect();
        let mut cpu: Vec<Vec<f64>> = running.iter().map(|s| vec![0.0; s.pids.len()]).collect();
        let mut moved = vec![0.0; running.len()];
        for round in 0..plan.rounds {
            let mut rates = Vec::new();
            for (i, s) in running.iter().enumerate() {
                let before = s.cpu_secs()?;
                match scenarios::throughput(&client, s.addr, conns, bytes).await {
                    Ok(mib) => {
                        for ((acc, a), b) in cpu[i].iter_mut().zip(s.cpu_secs()?).zip(before) {
                            *acc += a - b;
                        }
                        moved[i] += (conns as u64 * bytes) as f64 / scenarios::MIB;
                        rates.push(format!("{} {}", s.kind, num(mib)));
                        got[i].push(mib);
                    }
                    Err(e) => {
                        rates.push(format!("{} failed", s.kind));
                        report
                            .notes
                            .push(format!("{scenario} on {}: {e:#}", s.kind));
                    }
                }
            }
            progress.round(scenario, round, plan.rounds, "MiB/s", &rates);
        }
        for (((s, values), cpu), mib) in running.iter().zip(got).zip(cpu).zip(moved) {
            if mib > 0.0 && !s.pids.is_empty() {
                let per_mib = |secs: f64| format!("{:.0}", secs * 1e6 / mib);
                let parts: Vec<String> = s
                    .pids
                    .iter()
                    .zip(&cpu)
                    .map(|((name, _), secs)| format!("{name} {}", per_mib(*secs)))
                    .collect();
                report.notes.push(format!(
                    "{scenario} on {}: CPU µs per MiB relayed, by process: {} (sum {}).",
                    s.kind,
                    parts.join(", "),
                    per_mib(cpu.iter().sum())
                ));
            }
            let line = match scenarios::median(&values) {
                Some(mib) => {
                    report.push(scenario, s.kind.name(), mib);
                    Ok(format!("{} MiB/s (median of {})", num(mib), values.len()))
                }
                None => Err(anyhow::anyhow!("every round failed")),
            };
            progress.line(&mut report, scenario, s.kind, line);
        }
    }
    if let Some(eps) = running.iter().find(|s| s.kind == Kind::Eps) {
        let client = Client::with_sni(&env.root(), TERMINATED_SNI)?;
        terminated(&mut report, &mut progress, &plan, eps, &client, wants).await?;
    }
    if rpc_systems > 0 {
        let has_eps = running.iter().any(|s| s.kind == Kind::Eps);
        let bench = rpc::RpcBench::start(&env, has_eps).await?;
        for s in running
            .iter()
            .filter(|s| matches!(s.kind, Kind::Direct | Kind::Eps))
        {
            let (rpc_client, method) = match (&bench.through, s.kind) {
                (Some(through), Kind::Eps) => (through, rpc::REMOTE_METHOD),
                _ => (&bench.direct, rpc::METHOD),
            };
            let t = scenarios::rpc(rpc_client, method, plan.rpc_calls, plan.rpc_callers).await;
            let (p50, p99, name) = (t.quantile(0.5), t.quantile(0.99), s.kind.name());
            report.push("rpc_p50", name, p50);
            report.push("rpc_p99", name, p99);
            report.push("rpc_rate", name, t.rate);
            failures(&mut report, "rpc", s, &t, plan.rpc_calls);
            let line = Ok(format!(
                "p50 {} ms, p99 {} ms, {} calls/s",
                num(p50),
                num(p99),
                num(t.rate)
            ));
            report
                .samples
                .insert(("rpc".into(), name.into()), t.samples_ms);
            progress.line(&mut report, "rpc_*", s.kind, line);
        }
    }
    if refusal_cases > 0 {
        for m in refusals::run(&env, &client, plan.refusals).await? {
            report.push(&format!("refused_{}", m.reason), "eps", m.cpu_us);
            if m.counted != m.refused as u64 {
                report.notes.push(format!(
                    "refused_{}: {} connections closed without a byte, {} counted under that \
                     reason",
                    m.reason, m.refused, m.counted
                ));
            }
            let line = Ok(format!(
                "{} µs of public-proxy CPU per refused connection ({} refused, {} counted)",
                num(m.cpu_us),
                m.refused,
                m.counted
            ));
            progress.line(
                &mut report,
                &format!("refused_{}", m.reason),
                Kind::Eps,
                line,
            );
        }
        report.notes.push(format!(
            "refused_*: {} connections per reason from one loopback address, 32 at a time, each \
             sending a ClientHello (or a PROXY header) and waiting to be closed; CPU time (user + \
             system) of the public proxy per refused connection, eps running with a policy that \
             refuses that reason.",
            plan.refusals
        ));
    }
    drop(running);

    report.write(&args.out, work)?;
    println!("\n{}", report.markdown());
    println!(
        "==> wrote {0}/latest.json, {0}/latest.md and {0}/latest.png",
        args.out.display()
    );
    Ok(())
}

/// The connect and throughput scenarios on eps's domain whose TLS ends at the private proxy
/// (`*_terminated` rows, next to eps's passthrough ones), one after the other.
async fn terminated(
    report: &mut Report,
    progress: &mut Progress,
    plan: &Plan,
    eps: &System,
    client: &Client,
    wants: impl Fn(Group) -> bool,
) -> anyhow::Result<()> {
    const SUFFIX: &str = "_terminated";
    if wants(Group::Connect) {
        scenarios::warm_up(client, eps.addr, plan.connect_clients).await;
        let before = eps.cpu_secs()?;
        let t = scenarios::connect(client, eps.addr, plan.connections, plan.connect_clients).await;
        let used: Vec<f64> = eps
            .cpu_secs()?
            .iter()
            .zip(before)
            .map(|(a, b)| a - b)
            .collect();
        let total = cpu_note(
            report,
            eps,
            &used,
            t.samples_ms.len(),
            ", TLS ended at the private proxy",
        );
        report.push("connect_cpu_us_terminated", "eps", total);
        let (p50, p99) = (t.quantile(0.5), t.quantile(0.99));
        report.push("connect_p50_terminated", "eps", p50);
        report.push("connect_p99_terminated", "eps", p99);
        report.push("conn_rate_terminated", "eps", t.rate);
        failures(report, "connect_terminated", eps, &t, plan.connections);
        let line = format!(
            "p50 {} ms, p99 {} ms, {} conn/s",
            num(p50),
            num(p99),
            num(t.rate)
        );
        progress.line(report, "connect_*_terminated", Kind::Eps, Ok(line));
        scenarios::warm_up(client, eps.addr, 1).await;
        let before = dial_back_wait(eps).await;
        let (t, phases) = scenarios::connect_one_by_one(client, eps.addr, plan.connections_1).await;
        let waited = mean_since(before, dial_back_wait(eps).await);
        phase_note(
            report,
            "eps, TLS ended at the private proxy",
            &phases,
            waited,
        );
        let (p50, p99) = (t.quantile(0.5), t.quantile(0.99));
        report.push("connect1_p50_terminated", "eps", p50);
        report.push("connect1_p99_terminated", "eps", p99);
        failures(report, "connect1_terminated", eps, &t, plan.connections_1);
        let line = format!("p50 {} ms, p99 {} ms", num(p50), num(p99));
        progress.line(report, "connect1_*_terminated", Kind::Eps, Ok(line));
    }
    let downloads = [
        ("throughput_1", 1, plan.download_1),
        ("throughput_8", 8, plan.download_8),
    ];
    for (scenario, conns, bytes) in downloads.into_iter().filter(|_| wants(Group::Throughput)) {
        let mut got = Vec::new();
        for _ in 0..plan.rounds {
            match scenarios::throughput(client, eps.addr, conns, bytes).await {
                Ok(mib) => got.push(mib),
                Err(e) => report
                    .notes
                    .push(format!("{scenario}{SUFFIX} on eps: {e:#}")),
            }
        }
        let name = format!("{scenario}{SUFFIX}");
        let line = match scenarios::median(&got) {
            Some(mib) => {
                report.push(&name, "eps", mib);
                Ok(format!("{} MiB/s (median of {})", num(mib), got.len()))
            }
            None => Err(anyhow::anyhow!("every round failed")),
        };
        progress.line(report, &name, Kind::Eps, line);
    }
    Ok(())
}

/// Numbered progress lines, one per scenario and system.
struct Progress {
    step: usize,
    total: usize,
}

impl Progress {
    /// One line per round of a scenario run in rounds (only when there are several).
    fn round(&self, what: &str, round: usize, rounds: usize, unit: &str, results: &[String]) {
        if rounds > 1 {
            println!(
                "        {what} round {}/{rounds} ({unit}): {}",
                round + 1,
                results.join(", ")
            );
        }
    }

    fn line(&mut self, report: &mut Report, what: &str, kind: Kind, r: anyhow::Result<String>) {
        self.step += 1;
        let text = match r {
            Ok(t) => t,
            Err(e) => {
                report.notes.push(format!("{what} on {kind} failed: {e:#}"));
                format!("FAILED: {e:#}")
            }
        };
        println!(
            "[{:>2}/{}] {what:<20} {:<8} {text}",
            self.step,
            self.total,
            kind.name()
        );
    }
}

/// Notes the CPU time (`used`, seconds by process) the system spent per connection, by process,
/// and returns its sum in µs per connection. `what` qualifies the run in the note.
fn cpu_note(report: &mut Report, s: &System, used: &[f64], n: usize, what: &str) -> f64 {
    let per_conn = |secs: f64| secs * 1e6 / n.max(1) as f64;
    let parts: Vec<String> = s
        .pids
        .iter()
        .zip(used)
        .map(|((name, _), secs)| format!("{name} {:.0}", per_conn(*secs)))
        .collect();
    report.notes.push(format!(
        "connect on {}{what}: CPU µs per connection by process (after the warm-up): {}.",
        s.kind,
        parts.join(", ")
    ));
    per_conn(used.iter().sum())
}

/// Notes what each profiled process of `s` spent its CPU per connection on (`--profile`):
/// `used` is its CPU in seconds over `n` connections, `files` its recordings, in `s.pids` order.
fn profile_notes(report: &mut Report, s: &System, used: &[f64], n: usize, files: &[PathBuf]) {
    for (((name, _), secs), file) in s.pids.iter().zip(used).zip(files) {
        let us = secs * 1e6 / n.max(1) as f64;
        match Breakdown::of(file) {
            Ok(b) if b.samples > 0 => {
                // The work is told apart by eps's own function names; the others get the leaf.
                let work = if s.kind.is_eps() {
                    format!(" By work: {}.", Breakdown::line(&b.work, b.samples, us))
                } else {
                    String::new()
                };
                report.notes.push(format!(
                    "connect on {}, {name}: its CPU µs per connection split by the shares of its profile (first round, {} samples).{work} By what the innermost frames did: {}.",
                    s.kind,
                    b.samples,
                    Breakdown::line(&b.doing, b.samples, us)
                ));
            }
            Ok(_) => {}
            Err(e) => report
                .notes
                .push(format!("profile {}: {e:#}", file.display())),
        }
    }
}

/// eps's public-proxy `dial_back_seconds` so far (sum, count), if the system has it.
async fn dial_back_wait(s: &System) -> Option<(f64, f64)> {
    s.histogram("dial_back_seconds").await.ok()
}

/// The mean in ms of a histogram's observations between two reads (sum, count).
fn mean_since(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    let ((s0, n0), (s1, n1)) = (before?, after?);
    (n1 > n0).then(|| (s1 - s0) * 1e3 / (n1 - n0))
}

/// Notes the median of each phase of a system's `connect1` exchanges, and for eps the mean
/// time its public proxy waited for the dial-back (`waited`, ms).
fn phase_note(report: &mut Report, on: &str, p: &scenarios::PhaseMedians, waited: Option<f64>) {
    let waited = waited.map_or(String::new(), |ms| {
        format!(
            " Inside the handshake, the public proxy waited {} ms on average from the ClientHello to the private proxy's data connection (dial_back_seconds).",
            num(ms)
        )
    });
    report.notes.push(format!(
        "connect1 on {on}: median ms of TCP connect {}, TLS handshake {}, request {}.{waited}",
        num(p.tcp),
        num(p.handshake),
        num(p.request)
    ));
}

/// Round `round` of `rounds`' share of `total`.
fn share(total: usize, rounds: usize, round: usize) -> usize {
    total / rounds + usize::from(round < total % rounds)
}

/// Notes a scenario's failed operations, if any.
fn failures(report: &mut Report, what: &str, s: &System, t: &Timed, of: usize) {
    if t.errors > 0 {
        report.notes.push(format!(
            "{what} on {}: {} of {of} failed (first: {})",
            s.kind,
            t.errors,
            t.first_error.as_deref().unwrap_or("?")
        ));
    }
}

/// What every reader of the results needs to know about this run's sizes.
fn notes(plan: &Plan) -> Vec<String> {
    let mib = |b: u64| b >> 20;
    let rounds = match plan.rounds {
        1 => String::new(),
        n => format!(" in {n} rounds, the systems taking turns in each"),
    };
    vec![
        format!(
            "throughput_1: one connection downloads {} MiB; throughput_8: 8 connections download \
             {} MiB each; total MiB/s from the first request to the last byte, the median of {} \
             round(s).",
            mib(plan.download_1),
            mib(plan.download_8),
            plan.rounds
        ),
        format!(
            "connect_*, conn_rate: {} new TCP+TLS connections (full handshakes) with one small \
             request each, {} clients in parallel{rounds}.",
            plan.connections, plan.connect_clients
        ),
        format!(
            "connect1_*: {} connections opened one after the other by a single client (after \
             50 unmeasured): the latency a system adds when nothing queues for the CPU.",
            plan.connections_1
        ),
        format!(
            "idle_rss_per_conn: {} idle connections; RSS of the system's own processes before \
             vs after, per connection (direct: the internal server).",
            plan.idle
        ),
        format!(
            "rpc_*: {} JSON-RPC calls by {} callers on one keep-alive client; eps = through two \
             EPS servers, direct = straight to the service.",
            plan.rpc_calls, plan.rpc_callers
        ),
    ]
}
