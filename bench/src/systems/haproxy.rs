//! HAProxy in TCP mode: one hop that reads the ClientHello's SNI (`req.ssl_sni`) and forwards
//! the still-encrypted stream to the internal server. From Debian's package (`make bench`
//! installs it); `HAPROXY` overrides the binary.

use std::path::PathBuf;

use anyhow::Context;

use super::{find_program, free_addr, Env, Kind, System};
use crate::client::SNI;
use crate::procs::Proc;

/// Connections HAProxy accepts; each costs two descriptors, so this fits under a 20,000 limit.
const MAX_CONNECTIONS: u32 = 9_000;

pub fn start(env: &Env) -> anyhow::Result<System> {
    let program = match std::env::var_os("HAPROXY") {
        Some(p) => PathBuf::from(p),
        None => find_program("haproxy", &["/usr/sbin/haproxy".into()]).context(
            "haproxy not found: `make bench` installs it (apt-get install haproxy); or leave it \
             out with --systems",
        )?,
    };
    let addr = free_addr()?;
    let config = format!(
        "global
    maxconn {MAX_CONNECTIONS}

defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s

frontend tls
    bind {addr}
    maxconn {MAX_CONNECTIONS}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
    use_backend internal if {{ req.ssl_sni -i {SNI} }}

backend internal
    server internal-server {server}
",
        server = env.server_addr
    );
    let file = env.work.join("haproxy.cfg");
    std::fs::write(&file, config).with_context(|| format!("writing {}", file.display()))?;
    let proc = Proc::start(
        "haproxy",
        &program,
        ["-db".as_ref(), "-f".as_ref(), file.as_os_str()],
        [("", ""); 0],
        &env.log("haproxy"),
    )?;
    Ok(System::new(Kind::Haproxy, addr, vec![proc]))
}
