//! The binaries under test as child processes: found next to the test executable, logging to a
//! file, killed when the test ends however it ends.

use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How often a waiting test looks at a child's log or status.
const POLL: Duration = Duration::from_millis(10);
/// Lines of a child's log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// The workspace binary `name` (`eps`, `proxy`, `internal-server`) of the profile the tests were
/// built with: `target/<profile>/<name>`, the folder above the test executable's `deps/`.
/// `EPS_TESTS_BIN_DIR` overrides the folder.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = match std::env::var_os("EPS_TESTS_BIN_DIR") {
        Some(d) => PathBuf::from(d),
        None => {
            let exe = std::env::current_exe().expect("the test executable's path");
            // target/<profile>/deps/<test>-<hash>
            exe.parent()
                .and_then(Path::parent)
                .unwrap_or_else(|| panic!("{} has no grandparent folder", exe.display()))
                .to_path_buf()
        }
    };
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        let release = if dir.ends_with("release") {
            " --release"
        } else {
            ""
        };
        panic!(
            "binary `{name}` not found at {}: the end-to-end tests run the real binaries; build \
             them first with `cargo build --workspace{release}` (or set EPS_TESTS_BIN_DIR)",
            path.display()
        );
    }
    path
}

/// A running binary. Its stdout and stderr go to one log file; it is killed (SIGKILL) when
/// dropped, and its log tail is printed if the test is failing.
pub struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    log_path: PathBuf,
    child: Child,
    /// Log length when the current run started: [`wait_for_log`](Self::wait_for_log) looks after it.
    run_start: u64,
}

impl Proc {
    /// Starts `program` with `args` and `env` added to the test's environment. `RUST_LOG` is
    /// `info` (or `EPS_TESTS_RUST_LOG`) unless `env` sets it. The log file is appended to.
    pub fn start<A, K, V>(
        name: &str,
        program: &Path,
        args: impl IntoIterator<Item = A>,
        env: impl IntoIterator<Item = (K, V)>,
        log_path: impl Into<PathBuf>,
    ) -> Self
    where
        A: AsRef<OsStr>,
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let log_level = std::env::var_os("EPS_TESTS_RUST_LOG").unwrap_or_else(|| "info".into());
        let mut full_env = vec![(OsString::from("RUST_LOG"), log_level)];
        full_env.extend(
            env.into_iter()
                .map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())),
        );
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let log_path = log_path.into();
        let (child, run_start) = spawn(name, program, &args, &full_env, &log_path);
        Self {
            name: name.to_string(),
            program: program.to_path_buf(),
            args,
            env: full_env,
            log_path,
            child,
            run_start,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if self.is_running() {
            let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
            // SAFETY: plain kill(2) on our own child, which is not reaped yet (try_wait said so).
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        self.wait_exit(grace).await
    }

    /// Sends SIGHUP (re-read settings and TLS files).
    pub fn hangup(&mut self) {
        assert!(self.is_running(), "{} is not running", self.name);
        let pid = libc::pid_t::try_from(self.pid()).expect("pid fits pid_t");
        // SAFETY: plain kill(2) on our own child, which is not reaped yet (is_running said so).
        unsafe { libc::kill(pid, libc::SIGHUP) };
    }

    /// Kills the process if it still runs and starts it again with the same program, arguments
    /// and environment, appending to the same log.
    pub fn restart(&mut self) {
        self.kill();
        let (child, run_start) = spawn(
            &self.name,
            &self.program,
            &self.args,
            &self.env,
            &self.log_path,
        );
        self.child = child;
        self.run_start = run_start;
    }

    /// The exit status once the process has exited, or `None` if it still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Everything the process (all its runs) wrote so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log_path, 0)
    }

    /// What the current run wrote so far.
    pub fn run_log(&self) -> String {
        read_lossy(&self.log_path, self.run_start)
    }

    /// Waits until the current run's log contains `needle`. Panics with the log when the time is
    /// up or the process exits first.
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.run_log().contains(needle) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                // The last words may have landed after the check above.
                if self.run_log().contains(needle) {
                    return;
                }
                panic!(
                    "{} exited ({status}) before logging {needle:?}; its log:\n{}",
                    self.name,
                    self.run_log()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not log {needle:?} within {timeout:?}; its log:\n{}",
                    self.name,
                    self.run_log()
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            eprintln!(
                "----- last {} lines of {} ({}) -----\n{}\n----- end of {} -----",
                tail.len(),
                self.name,
                self.log_path.display(),
                tail.join("\n"),
                self.name
            );
        }
    }
}

fn spawn(
    name: &str,
    program: &Path,
    args: &[OsString],
    env: &[(OsString, OsString)],
    log_path: &Path,
) -> (Child, u64) {
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .unwrap_or_else(|e| panic!("opening log {}: {e}", log_path.display()));
    writeln!(
        log,
        "===== {name}: starting {} {} =====",
        program.display(),
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    )
    .expect("writing the log");
    let run_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let stderr: File = log.try_clone().expect("cloning the log handle");
    let child = Command::new(program)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", program.display()));
    (child, run_start)
}

fn read_lossy(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}
