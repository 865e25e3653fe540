//! The operator's commands beside the server: `eps call`, `eps settings check`,
//! `eps directory show`. Each reads the same `EPS_SETTINGS` as the server.

use std::time::Duration;

use eps_core::directory::Directory;
use eps_core::http::{CallError, RpcClient};
use serde_json::value::RawValue;

use crate::settings::{DirectorySettings, Settings};
use crate::Failure;

/// Loads and validates `EPS_SETTINGS`, or says what is wrong.
pub fn load() -> Result<Settings, Failure> {
    let s: Settings = eps_core::settings::load_from_env("EPS_SETTINGS")
        .map_err(|e| Failure::Usage(format!("eps: bad settings: {e}")))?;
    s.validate()
        .map_err(|e| Failure::Usage(format!("eps: bad settings: {e}")))?;
    Ok(s)
}

/// `eps settings check`: validates and prints the merged settings, secrets masked.
pub fn settings_check() -> Result<(), Failure> {
    let s = load()?;
    // What `eps server run` needs beyond what an embedded server needs.
    s.delivery()
        .map_err(|e| Failure::Usage(format!("eps: bad settings: {e}")))?;
    load_directory(&s).map_err(|e| Failure::Usage(format!("eps: bad directory: {e:#}")))?;
    print!(
        "{}",
        serde_yaml_ng::to_string(&s).expect("settings serialize")
    );
    Ok(())
}

/// The directory as the server would start with it: the record files, or the verified local
/// copy of a directory server's chain.
pub(crate) fn load_directory(s: &Settings) -> anyhow::Result<Directory> {
    match &s.directory {
        DirectorySettings::Files { path } => Ok(Directory::load_dir(path)?),
        DirectorySettings::Sd(f) => Ok(crate::sd::follow::read_copy(f)?.directory().clone()),
    }
}

/// `eps directory show [OPERATOR]`: prints the folded entry of one operator, or all.
pub fn directory_show(operator: Option<String>) -> Result<(), Failure> {
    let s = load()?;
    let dir =
        load_directory(&s).map_err(|e| Failure::Usage(format!("eps: bad directory: {e:#}")))?;
    let out = match operator {
        Some(name) => match dir.entry(&name) {
            Some(e) => serde_json::to_value(e).expect("json"),
            None => {
                let at = match &s.directory {
                    DirectorySettings::Files { path } => path,
                    DirectorySettings::Sd(f) => &f.path,
                };
                return Err(Failure::Failed(format!(
                    "eps: {name:?} is not in the directory at {}",
                    at.display()
                )));
            }
        },
        None => {
            let mut all: Vec<_> = dir.entries().collect();
            all.sort_by(|a, b| a.name.cmp(&b.name));
            serde_json::to_value(all).expect("json")
        }
    };
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
    Ok(())
}

/// `eps call OPERATOR.METHOD PARAMS`: one call through the local EPS server, as its local
/// client would make it (with the server's own certificate).
pub fn call(method: String, params: String, timeout: Duration) -> Result<(), Failure> {
    let s = load()?;
    let params = RawValue::from_string(params)
        .map_err(|e| Failure::Usage(format!("eps call: PARAMS is not JSON: {e}")))?;
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
    let client = RpcClient::new(&url, server.tls.as_ref(), timeout)
        .map_err(|e| Failure::Usage(format!("eps call: {e}")))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(client.call_raw(&method, &params)) {
        Ok(result) => {
            let v: serde_json::Value = serde_json::from_str(result.get()).expect("result is JSON");
            println!("{}", serde_json::to_string_pretty(&v).expect("json"));
            Ok(())
        }
        Err(CallError::Rpc(e)) => Err(Failure::Failed(format!(
            "eps call: error {}: {}",
            e.code, e.message
        ))),
        Err(e) => Err(Failure::Failed(format!("eps call: {e}"))),
    }
}
