//! Child processes: started with their output in a log file, killed when dropped, and also when
//! the benchmark is interrupted (Ctrl-C), panics or dies (a parent-death signal).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, Context};

/// Lines of a child's log shown when it fails.
const LOG_TAIL_LINES: usize = 30;

/// Process ids of every child still running, for the Ctrl-C and panic paths.
static RUNNING: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());
/// The temporary folder removed when the benchmark is interrupted.
static WORK: Mutex<Option<PathBuf>> = Mutex::new(None);

/// A running child process, killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program` with `args` and extra `env`, stdout and stderr appended to `log`.
    pub fn start<A, K, V>(
        name: &str,
        program: &Path,
        args: impl IntoIterator<Item = A>,
        env: impl IntoIterator<Item = (K, V)>,
        log: &Path,
    ) -> anyhow::Result<Self>
    where
        A: AsRef<OsStr>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. The signal is
        // sent when the thread that forked exits; children are started from the main thread.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({})", program.display()))?;
        RUNNING.lock().expect("not poisoned").insert(child.id());
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error naming the process and showing its log's tail if it has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => bail!(
                "{} exited ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                self.log_tail()
            ),
            Err(e) => bail!("{}: {e}", self.name),
        }
    }

    /// The last lines of the log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        RUNNING
            .lock()
            .expect("not poisoned")
            .remove(&self.child.id());
    }
}

/// `perf record` attached to some processes (with call graphs), for as long as it lives: stopped
/// with SIGINT so that it writes its file, then reaped.
pub struct Profile {
    recorders: Vec<(Child, PathBuf)>,
}

impl Profile {
    /// Records each of `pids` (name, pid) into `dir/<prefix><name>.data`.
    pub fn start(dir: &Path, prefix: &str, pids: &[(String, u32)]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut recorders = Vec::new();
        for (name, pid) in pids {
            let out = dir.join(format!("{prefix}{name}.data"));
            let child = Command::new("perf")
                .args([
                    "record",
                    "-q",
                    "-F",
                    "1999",
                    "--call-graph",
                    "dwarf,16384",
                    "-p",
                ])
                .arg(pid.to_string())
                .arg("-o")
                .arg(&out)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting perf record (is perf installed?)")?;
            RUNNING.lock().expect("not poisoned").insert(child.id());
            recorders.push((child, out));
        }
        // perf attaches within a few ms; the file's header marks it as attached.
        for (_, out) in &recorders {
            let t0 = std::time::Instant::now();
            while std::fs::metadata(out).map_or(true, |m| m.len() == 0) {
                if t0.elapsed() > std::time::Duration::from_secs(10) {
                    bail!("perf record did not start writing {}", out.display());
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
        Ok(Self { recorders })
    }

    /// Stops recording and returns the files written.
    pub fn stop(mut self) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for (child, out) in self.recorders.drain(..) {
            stop_recorder(child);
            files.push(out);
        }
        files
    }
}

fn stop_recorder(mut child: Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
    let _ = child.wait();
    RUNNING.lock().expect("not poisoned").remove(&child.id());
}

impl Drop for Profile {
    fn drop(&mut self) {
        for (child, _) in self.recorders.drain(..) {
            stop_recorder(child);
        }
    }
}

/// Kills every child still running (for Ctrl-C and panics, where destructors may not run).
pub fn kill_all() {
    let pids = match RUNNING.lock() {
        Ok(p) => p.clone(),
        Err(p) => p.into_inner().clone(),
    };
    for pid in pids {
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) on a child of ours that has not been reaped (Drop removes it first).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Kills the children on a panic (before the default hook prints it) and on Ctrl-C / SIGTERM;
/// the latter also removes the temporary folder `work`.
pub fn install_cleanup(work: &Path) {
    *WORK.lock().expect("not poisoned") = Some(work.to_path_buf());
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_all();
        default(info);
    }));
    tokio::spawn(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            return;
        };
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        kill_all();
        if let Some(dir) = WORK.lock().ok().and_then(|w| w.clone()) {
            let _ = std::fs::remove_dir_all(dir);
        }
        eprintln!("\ninterrupted: every process the benchmark started is stopped");
        std::process::exit(130);
    });
}

/// Raises the soft limit on open files to the hard limit; children inherit it.
pub fn raise_fd_limit() -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

/// Resident memory of `pid` in KiB (VmRSS of /proc/PID/status).
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))
}

/// Open file descriptors of `pid` (entries of /proc/PID/fd); 0 when it cannot be read.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// CPU time (user + system) `pid` has used so far, in seconds (/proc/PID/stat).
pub fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces; utime and
    // stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let rest = text.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
        bail!("unexpected {path}: {text:?}");
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((user + system) as f64 / hz)
}
