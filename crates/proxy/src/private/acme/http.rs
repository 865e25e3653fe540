//! The HTTPS client the ACME protocol runs over: hyper with rustls (ring), trusting the CA
//! file of `private.acme.ca_certificate` or, without one, the system's roots.

use std::path::Path;

use bytes::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::BodyWrapper;

use super::AcmeError;

/// What `instant_acme::Account` sends its requests with (it implements `HttpClient`).
pub type Client =
    hyper_util::client::legacy::Client<HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

pub fn client(ca_certificate: Option<&Path>) -> Result<Client, AcmeError> {
    let provider = eps_core::tls::provider();
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match ca_certificate {
        Some(ca) => {
            let roots = eps_core::tls::root_store(ca)?;
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| AcmeError::Trust(eps_core::tls::TlsError::Config(e.to_string())))?
                .with_root_certificates(roots)
                .with_no_client_auth();
            builder.with_tls_config(config)
        }
        None => builder
            .with_provider_and_native_roots(provider)
            .map_err(|e| AcmeError::Order(format!("the system's CA roots: {e}")))?,
    };
    let connector = builder.https_only().enable_http1().enable_http2().build();
    Ok(hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector))
}
