//! The operator's commands beside the server: `eps call`, `eps settings check`,
//! `eps directory show`. Each reads the same `EPS_SETTINGS` as the server.

use std::process::ExitCode;
use std::time::Duration;

use eps_core::directory::Directory;
use eps_core::http::{CallError, RpcClient};
use serde_json::value::RawValue;

use crate::settings::{DirectorySettings, Settings};

/// Exit code for bad settings or arguments, before any port is bound.
pub const EXIT_BAD_SETTINGS: u8 = 64;

/// Loads and validates `EPS_SETTINGS`, or says what is wrong and gives the exit code.
pub fn load() -> Result<Settings, ExitCode> {
    let s: Settings = eps_core::settings::load_from_env("EPS_SETTINGS").map_err(|e| {
        eprintln!("eps: bad settings: {e}");
        ExitCode::from(EXIT_BAD_SETTINGS)
    })?;
    s.validate().map_err(|e| {
        eprintln!("eps: bad settings: {e}");
        ExitCode::from(EXIT_BAD_SETTINGS)
    })?;
    Ok(s)
}

/// `eps settings check`: validates and prints the merged settings, secrets masked.
pub fn settings_check() -> ExitCode {
    let s = match load() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = load_directory(&s) {
        eprintln!("eps: bad directory: {e:#}");
        return ExitCode::from(EXIT_BAD_SETTINGS);
    }
    print!(
        "{}",
        serde_yaml_ng::to_string(&s).expect("settings serialize")
    );
    ExitCode::SUCCESS
}

/// The directory as the server would start with it: the record files, or the verified local
/// copy of a directory server's chain.
fn load_directory(s: &Settings) -> anyhow::Result<Directory> {
    match &s.directory {
        DirectorySettings::Files { path } => Ok(Directory::load_dir(path)?),
        DirectorySettings::Sd(f) => Ok(crate::sd::follow::read_copy(f)?.directory().clone()),
    }
}

/// `eps directory show [OPERATOR]`: prints the folded entry of one operator, or all.
pub fn directory_show(operator: Option<String>) -> ExitCode {
    let s = match load() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let dir = match load_directory(&s) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("eps: bad directory: {e:#}");
            return ExitCode::from(EXIT_BAD_SETTINGS);
        }
    };
    let out = match operator {
        Some(name) => match dir.entry(&name) {
            Some(e) => serde_json::to_value(e).expect("json"),
            None => {
                let at = match &s.directory {
                    DirectorySettings::Files { path } => path,
                    DirectorySettings::Sd(f) => &f.path,
                };
                eprintln!("eps: {name:?} is not in the directory at {}", at.display());
                return ExitCode::FAILURE;
            }
        },
        None => {
            let mut all: Vec<_> = dir.entries().collect();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            serde_json::to_value(all).expect("json")
        }
    };
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    ExitCode::SUCCESS
}

/// `eps call OPERATOR.METHOD PARAMS`: one call through the local EPS server, as its local
/// client would make it (with the server's own certificate).
pub fn call(method: String, params: String, timeout: Duration) -> ExitCode {
    let s = match load() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let params = match RawValue::from_string(params) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("eps call: PARAMS is not JSON: {e}");
            return ExitCode::from(EXIT_BAD_SETTINGS);
        }
    };
    let server = &s.jsonrpc_server;
    let host = if server.bind_address.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        server.bind_address.ip().to_string()
    };
    let url = match &server.tls {
        Some(_) => format!("https://{host}:{}/jsonrpc", server.bind_address.port()),
        None => format!("http://{host}:{}/jsonrpc", server.bind_address.port()),
    };
    let client = match RpcClient::new(&url, server.tls.as_ref(), timeout) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("eps call: {e}");
            return ExitCode::from(EXIT_BAD_SETTINGS);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(client.call_raw(&method, &params)) {
        Ok(result) => {
            let v: serde_json::Value = serde_json::from_str(result.get()).expect("result is JSON");
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            ExitCode::SUCCESS
        }
        Err(CallError::Rpc(e)) => {
            eprintln!("eps call: error {}: {}", e.code, e.message);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("eps call: {e}");
            ExitCode::FAILURE
        }
    }
}
