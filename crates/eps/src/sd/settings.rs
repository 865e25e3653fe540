//! Settings of the directory server (`SD_SETTINGS`, `eps sd run`) and of a follower of it (an
//! EPS server's `directory: {type: sd, settings: ...}`, which the `eps sd` commands read too).
//! Every default lives here.

use std::path::PathBuf;
use std::time::Duration;

use eps_core::http::{secs, JsonRpcServerSettings};
use eps_core::ops::MetricsSettings;
use eps_core::sd::TrustSettings;
use eps_core::tls::TlsSettings;
use serde::{Deserialize, Serialize};

/// Default cap on records in one `submitRecords`.
pub const DEFAULT_MAX_RECORDS_PER_SUBMIT: usize = 256;
/// Default cap on records in one `getRecords` answer.
pub const DEFAULT_MAX_RECORDS_PER_ANSWER: usize = 1000;
/// Default longest wait of a `getRecords` for a new record.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(20);
/// Default cap on `getRecords` calls waiting at once.
pub const DEFAULT_MAX_WAITERS: usize = 1024;
/// Default tolerance between a submitted record's `created_at` and the server's clock.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(300);
/// Default time `getRecords` calls waiting get to end after SIGTERM.
pub const DEFAULT_SD_SHUTDOWN_GRACE_PERIOD: Duration = Duration::from_secs(5);

/// `eps sd run`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SdSettings {
    /// The JSON-RPC listener (HTTPS recommended, with `verify_client: true`). Submissions are
    /// checked by their signatures, not by the TLS client.
    pub jsonrpc_server: JsonRpcServerSettings,
    /// The chain file: one record per line, appended and flushed before a submission is
    /// acknowledged.
    pub path: PathBuf,
    /// The CA signing certificates chain to, and the administrators.
    pub trust: TrustSettings,
    #[serde(default)]
    pub limits: SdLimits,
    #[serde(default)]
    pub metrics: MetricsSettings,
    /// Seconds waiting `getRecords` calls get to end after SIGTERM (they are answered at once).
    #[serde(default = "default_sd_grace", with = "secs")]
    pub shutdown_grace_period: Duration,
}

fn default_sd_grace() -> Duration {
    DEFAULT_SD_SHUTDOWN_GRACE_PERIOD
}

/// What one client can make the directory server hold or do.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SdLimits {
    /// Records in one submission; each is verified (one ECDSA verification) while writes wait.
    pub max_records_per_submit: usize,
    /// Records in one `getRecords` answer (about 1 KiB each with its certificate).
    pub max_records_per_answer: usize,
    /// Seconds a `getRecords` may wait for a new record; below the listener's
    /// `request_timeout`.
    #[serde(with = "secs")]
    pub max_wait: Duration,
    /// `getRecords` calls waiting at once (each holds a request, and its connection); more get
    /// error 503 and try again later.
    pub max_waiters: usize,
    /// Seconds a submitted record's `created_at` may be from the server's clock. Followers
    /// check certificates at `created_at`, so this is what stops a backdated record signed
    /// with an expired key.
    #[serde(with = "secs")]
    pub max_clock_skew: Duration,
}

impl Default for SdLimits {
    fn default() -> Self {
        Self {
            max_records_per_submit: DEFAULT_MAX_RECORDS_PER_SUBMIT,
            max_records_per_answer: DEFAULT_MAX_RECORDS_PER_ANSWER,
            max_wait: DEFAULT_MAX_WAIT,
            max_waiters: DEFAULT_MAX_WAITERS,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        }
    }
}

impl SdSettings {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        let l = &self.limits;
        if l.max_records_per_submit == 0 || l.max_records_per_answer == 0 {
            return Err(
                "limits.max_records_per_submit and max_records_per_answer must be above 0".into(),
            );
        }
        let request = self.jsonrpc_server.limits.request_timeout;
        if l.max_wait >= request {
            return Err(format!(
                "limits.max_wait ({} s) must be below jsonrpc_server.limits.request_timeout ({} s)",
                l.max_wait.as_secs_f64(),
                request.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// Default seconds a follower asks the directory server to wait for a new record.
pub const DEFAULT_FOLLOW_WAIT: Duration = Duration::from_secs(15);
/// Default deadline of one call to the directory server, beyond the wait.
pub const DEFAULT_SD_TIMEOUT: Duration = Duration::from_secs(5);
/// Default longest pause between attempts to reach a directory server that is down.
pub const DEFAULT_FOLLOW_MAX_BACKOFF: Duration = Duration::from_secs(2);

/// An EPS server's `directory: {type: sd, settings: ...}`: the directory server it follows,
/// and its own verified copy of the chain. The `eps sd` commands read it too.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FollowSettings {
    /// The directory server, e.g. `https://sd.example.net:5570/jsonrpc`.
    pub url: String,
    /// TLS towards the directory server: the CA to trust and this side's certificate.
    #[serde(default)]
    pub tls: Option<TlsSettings>,
    /// This server's verified copy of the chain: it starts and routes from it when the
    /// directory server is down.
    pub path: PathBuf,
    /// The CA signing certificates chain to, and the administrators: this server's own root of
    /// trust, whatever the directory server says.
    pub trust: TrustSettings,
    /// Seconds one `getRecords` waits at the directory server for a new record; a new record
    /// arrives as soon as it is appended.
    #[serde(default = "default_follow_wait", with = "secs")]
    pub wait: Duration,
    /// Seconds one call to the directory server may take beyond `wait` (also the start-up
    /// catch-up's deadline, after which the server starts from its copy).
    #[serde(default = "default_sd_timeout", with = "secs")]
    pub timeout: Duration,
    /// Longest pause in seconds between attempts to reach a directory server that is down.
    #[serde(default = "default_follow_backoff", with = "secs")]
    pub max_reconnect_backoff: Duration,
    /// The signing certificate and key `eps sd sign` and `eps sd submit` sign with.
    #[serde(default)]
    pub signing: Option<SigningSettings>,
}

/// A signing certificate (PEM) and its PKCS#8 key (PEM). The key is never printed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SigningSettings {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

fn default_follow_wait() -> Duration {
    DEFAULT_FOLLOW_WAIT
}

fn default_sd_timeout() -> Duration {
    DEFAULT_SD_TIMEOUT
}

fn default_follow_backoff() -> Duration {
    DEFAULT_FOLLOW_MAX_BACKOFF
}

impl FollowSettings {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), String> {
        if self.url.starts_with("https") && self.tls.is_none() {
            return Err("directory.settings.tls is required for an https url".into());
        }
        if self.timeout.is_zero() {
            return Err("directory.settings.timeout must be above 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::DirectorySettings;

    #[test]
    fn an_sd_directory_reads_with_its_defaults_and_checks() {
        let d: DirectorySettings = serde_yaml_ng::from_str(
            "type: sd\nsettings:\n  url: http://127.0.0.1:1/jsonrpc\n  path: /x\n  trust:\n    ca_certificate: /ca\n    administrators: [ab]\n",
        )
        .unwrap();
        let DirectorySettings::Sd(f) = d else {
            panic!("an sd directory")
        };
        assert_eq!(
            (f.wait, f.timeout),
            (DEFAULT_FOLLOW_WAIT, DEFAULT_SD_TIMEOUT)
        );
        assert!(f.validate().is_ok());
        let https = FollowSettings {
            url: "https://sd/jsonrpc".into(),
            ..*f
        };
        assert!(https.validate().unwrap_err().contains("tls"));
        let unknown = serde_yaml_ng::from_str::<DirectorySettings>(
            "type: sd\nsettings:\n  url: u\n  path: /x\n  trust: {ca_certificate: /ca, administrators: []}\n  pth: typo\n",
        );
        assert!(unknown.unwrap_err().to_string().contains("pth"));
    }

    #[test]
    fn the_longest_wait_stays_below_the_request_deadline() {
        let mut s: SdSettings = serde_yaml_ng::from_str(
            "jsonrpc_server: {bind_address: 127.0.0.1:0}\npath: /c\ntrust: {ca_certificate: /ca, administrators: []}\n",
        )
        .unwrap();
        assert!(s.validate().is_ok());
        s.limits.max_wait = s.jsonrpc_server.limits.request_timeout;
        assert!(s.validate().unwrap_err().contains("max_wait"));
    }
}
