//! rathole: a server with a control channel and a bind address for the service, and a client
//! that dials the control channel and forwards each visitor's stream to the internal server. Its
//! default transport (plain TCP, no TLS or noise). Installed by `make bench` into
//! `bench/.peers`; `RATHOLE` overrides the binary.

use std::path::PathBuf;

use anyhow::Context;

use super::direct::RUST_LOG;
use super::{find_program, free_addr, Env, Kind, System};
use crate::procs::Proc;

/// Shared secret of the one service (a benchmark on loopback; nothing to protect).
const TOKEN: &str = "eps-bench";

pub fn start(env: &Env) -> anyhow::Result<System> {
    let peers = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".peers/bin/rathole");
    let program = match std::env::var_os("RATHOLE") {
        Some(p) => PathBuf::from(p),
        None => find_program("rathole", &[peers]).context(
            "rathole not found: `make bench` installs it into bench/.peers; or leave it out \
             with --systems",
        )?,
    };
    let addr = free_addr()?;
    let control = free_addr()?;
    let server = format!(
        "[server]\nbind_addr = \"{control}\"\n\n\
         [server.services.bench]\ntoken = \"{TOKEN}\"\nbind_addr = \"{addr}\"\n"
    );
    let client = format!(
        "[client]\nremote_addr = \"{control}\"\n\n\
         [client.services.bench]\ntoken = \"{TOKEN}\"\nlocal_addr = \"{}\"\n",
        env.server_addr
    );
    let mut procs = Vec::new();
    for (role, flag, text) in [("server", "-s", server), ("client", "-c", client)] {
        let file = env.work.join(format!("rathole-{role}.toml"));
        std::fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
        let name = format!("rathole-{role}");
        procs.push(Proc::start(
            &name,
            &program,
            [flag.as_ref(), file.as_os_str()],
            [("RUST_LOG", RUST_LOG)],
            &env.log(&name),
        )?);
    }
    Ok(System::new(Kind::Rathole, addr, procs))
}
