//! `eps sd sign|submit|entries|verify`: the operators' and administrators' commands. They read
//! the `directory` section of `EPS_SETTINGS` (type `sd`), and only that section, so that an
//! administrator's settings folder may hold nothing else.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _};
use eps_core::directory::{Entry, Record};
use eps_core::http::{CallError, RpcClient};
use eps_core::sd::protocol::{
    self as p, Appended, Entries, GetEntry, GetRecords, Head, Records, Submit,
};
use eps_core::sd::{Chain, ChainFile, SignedRecord, SigningKey, Trust};
use serde::Deserialize;
use serde_json::{json, Value};

use super::settings::FollowSettings;
use crate::settings::DirectorySettings;
use crate::Failure;

/// Times `eps sd submit` signs again when others appended first.
const SUBMIT_ATTEMPTS: usize = 5;

#[derive(Deserialize)]
struct DirectoryOnly {
    directory: DirectorySettings,
}

/// The `directory.settings` of `EPS_SETTINGS`, which must be of type `sd`.
fn load() -> Result<FollowSettings, Failure> {
    let bad = |e: String| Failure::Usage(format!("eps sd: bad settings: {e}"));
    let s: DirectoryOnly =
        eps_core::settings::load_from_env("EPS_SETTINGS").map_err(|e| bad(e.to_string()))?;
    match s.directory {
        DirectorySettings::Sd(f) => {
            f.validate().map_err(bad)?;
            Ok(*f)
        }
        DirectorySettings::Files { .. } => Err(bad(
            "directory is of type files; the eps sd commands need directory: {type: sd, settings: {url, tls, trust, signing}}".into(),
        )),
    }
}

/// Runs a command body on a small runtime and turns its error into exit code 1.
fn run(
    what: &str,
    body: impl std::future::Future<Output = anyhow::Result<()>>,
) -> Result<(), Failure> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(body)
        .map_err(|e| Failure::Failed(format!("eps sd {what}: {e:#}")))
}

fn client(s: &FollowSettings) -> anyhow::Result<RpcClient> {
    Ok(RpcClient::new(&s.url, s.tls.as_ref(), s.timeout)?)
}

fn signing_key(s: &FollowSettings) -> anyhow::Result<SigningKey> {
    let Some(k) = &s.signing else {
        bail!("directory.settings.signing (certificate, key) is needed to sign records");
    };
    Ok(SigningKey::load(&k.certificate, &k.key)?)
}

/// The records of FILE: `{"records": [...]}`, a JSON array, or one record per line (a chain
/// file).
fn read_records(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(mut o)) if o.contains_key("records") => match o.remove("records") {
            Some(Value::Array(v)) => Ok(v),
            _ => bail!("{}: `records` is not a list", path.display()),
        },
        Ok(Value::Array(v)) => Ok(v),
        _ => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .with_context(|| format!("{} line {}: not a record", path.display(), i + 1))
            })
            .collect(),
    }
}

/// The records of several files, in order, with the file each came from.
fn read_all(files: &[PathBuf]) -> anyhow::Result<Vec<(Value, &Path)>> {
    let mut all = Vec::new();
    for f in files {
        all.extend(read_records(f)?.into_iter().map(|v| (v, f.as_path())));
    }
    Ok(all)
}

/// The records as unsigned ones, to be signed now: a signed record's `created_at` is the time
/// it was signed (the directory server refuses one far from its clock), so the files' own
/// `created_at` is replaced.
fn unsigned(values: Vec<(Value, &Path)>) -> anyhow::Result<Vec<Record>> {
    values
        .into_iter()
        .map(|(v, f)| {
            let r: Record = serde_json::from_value(v)
                .with_context(|| format!("{}: not an unsigned record", f.display()))?;
            Ok(Record {
                created_at: None,
                ..r
            })
        })
        .collect()
}

fn parse<T: serde::de::DeserializeOwned>(
    v: Vec<Value>,
    path: &Path,
    what: &str,
) -> anyhow::Result<Vec<T>> {
    v.into_iter()
        .enumerate()
        .map(|(i, r)| {
            serde_json::from_value(r)
                .with_context(|| format!("{}: record {i} is not {what}", path.display()))
        })
        .collect()
}

async fn call<R: serde::de::DeserializeOwned>(
    c: &RpcClient,
    method: &str,
    params: &impl serde::Serialize,
) -> Result<R, CallError> {
    c.call(method, params).await
}

async fn head(c: &RpcClient) -> anyhow::Result<Head> {
    call(c, p::GET_HEAD, &json!({}))
        .await
        .context("asking the directory server for its head")
}

fn print(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON"));
}

/// `eps sd sign FILE... [--parent HASH]`: signs the records of the files as the next ones of
/// the chain (after the directory server's head, or `parent`; `null` starts a chain) and
/// prints them.
pub fn sign(files: &[PathBuf], parent: Option<String>) -> Result<(), Failure> {
    let s = load()?;
    run("sign", async {
        let records = unsigned(read_all(files)?)?;
        let key = signing_key(&s)?;
        let parent = match parent.as_deref() {
            Some("null") | Some("none") => None,
            Some(h) => Some(h.to_string()),
            None => head(&client(&s)?).await?.head,
        };
        let signed = key.sign(&records, parent.as_deref())?;
        print(&json!({ "records": signed }));
        Ok(())
    })
}

/// `eps sd submit FILE...`: submits the records of the files. Unsigned ones are signed first
/// with the settings' key after the server's head, and signed again if others appended
/// meanwhile.
pub fn submit(files: &[PathBuf]) -> Result<(), Failure> {
    let s = load()?;
    run("submit", async {
        let values = read_all(files)?;
        let c = client(&s)?;
        let signed = values
            .iter()
            .filter(|(v, _)| v.get("signature").is_some())
            .count();
        if signed == values.len() {
            let records = values
                .into_iter()
                .map(|(v, f)| {
                    serde_json::from_value(v)
                        .with_context(|| format!("{}: not a signed record", f.display()))
                })
                .collect::<anyhow::Result<_>>()?;
            let done: Appended = call(&c, p::SUBMIT_RECORDS, &Submit { records }).await?;
            print(&done);
            return Ok(());
        }
        if signed > 0 {
            bail!("some records are signed and some not: sign them all, or none");
        }
        let records = unsigned(values)?;
        let key = signing_key(&s)?;
        for attempt in 1..=SUBMIT_ATTEMPTS {
            let parent = head(&c).await?.head;
            let signed = key.sign(&records, parent.as_deref())?;
            match call::<Appended>(&c, p::SUBMIT_RECORDS, &Submit { records: signed }).await {
                Ok(done) => {
                    print(&done);
                    return Ok(());
                }
                Err(CallError::Rpc(e))
                    if p::refusal_kind(&e) == Some("wrong_parent") && attempt < SUBMIT_ATTEMPTS =>
                {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
        unreachable!("the last attempt returns")
    })
}

/// `eps sd entries [NAME]`: the directory server's folded entry of NAME, or every entry.
pub fn entries(name: Option<String>) -> Result<(), Failure> {
    let s = load()?;
    run("entries", async {
        let c = client(&s)?;
        match name {
            Some(name) => print(&call::<Entry>(&c, p::GET_ENTRY, &GetEntry { name }).await?),
            None => print(
                &call::<Entries>(&c, p::GET_ENTRIES, &json!({}))
                    .await?
                    .entries,
            ),
        }
        Ok(())
    })
}

/// `eps sd verify FILE`: verifies the signed records of FILE (a chain file, or
/// `{"records": [...]}`) with the settings' trust. When they do not start a chain, the records
/// before them are fetched from the directory server and verified too.
pub fn verify(file: &Path) -> Result<(), Failure> {
    let s = load()?;
    run("verify", async {
        let t0 = Instant::now();
        let records: Vec<SignedRecord> = match ChainFile::read(file) {
            Ok(l) if !l.records.is_empty() && l.torn_bytes == 0 => l.records,
            _ => parse(read_records(file)?, file, "a signed record")?,
        };
        let read = t0.elapsed();
        let trust = Trust::from_settings(&s.trust).context("trust")?;
        let mut chain = Chain::new();
        let mut fetched = 0;
        if let Some(parent) = records.first().and_then(|r| r.parent_hash.clone()) {
            let c = client(&s)?;
            while chain.head() != Some(parent.as_str()) {
                let g = GetRecords {
                    after: chain.head().map(str::to_string),
                    limit: None,
                    wait: None,
                };
                let r: Records = call(&c, p::GET_RECORDS, &g).await?;
                if r.records.is_empty() {
                    bail!("the directory server's chain does not hold {parent}, the parent of the first record");
                }
                let upto = r
                    .records
                    .iter()
                    .position(|x| x.hash == parent)
                    .map_or(r.records.len(), |i| i + 1);
                let part: Vec<_> = r.records.into_iter().take(upto).collect();
                fetched += part.len();
                chain
                    .append(part, &trust)
                    .context("the directory server's chain does not verify")?;
            }
        }
        let t1 = Instant::now();
        let n = records.len();
        chain.append(records, &trust)?;
        println!(
            "{n} records verified{}: head {}, {} operators; read in {:.0} ms, verified in {:.0} ms",
            if fetched > 0 {
                format!(" after {fetched} from the directory server")
            } else {
                String::new()
            },
            chain.head().unwrap_or("none"),
            chain.directory().len(),
            read.as_secs_f64() * 1e3,
            t1.elapsed().as_secs_f64() * 1e3,
        );
        Ok(())
    })
}
