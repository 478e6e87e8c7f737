//! The client side of the coordinator's HTTPS API, for the CLI (an operator with an API
//! token) and the host agents (a host certificate): TLS 1.3 to the cluster CA only, one
//! HTTP/1.1 request per connection (hyper over tokio-rustls), JSON bodies.
//!
//! Where the CLI finds its settings, first found wins for each: the flags / environment
//! (`--coordinator` or `FTVM_COORDINATOR`, `FTVM_TOKEN`, `FTVM_CA`), then the config file
//! (`--config` or `FTVM_CONFIG`, else `$XDG_CONFIG_HOME/ftvm/config.toml` or
//! `~/.config/ftvm/config.toml` if it exists). `ftvm coordinator init` writes one for the
//! admin token ([`ClientFile`]).
use super::pki;
use anyhow::{anyhow, bail, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The CLI's config file.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// `ADDR[,ADDR…]` of the coordinator (and its standbys).
    pub coordinator: Option<String>,
    /// The cluster CA certificate (PEM file).
    pub ca: Option<PathBuf>,
    /// An API token (`NAME.SECRET`).
    pub token: Option<String>,
}

impl ClientFile {
    pub fn load(path: &Path) -> Result<ClientFile> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("the config file {}", path.display()))
    }

    /// The file named by `explicit`, else the user's default one if it exists.
    pub fn find(explicit: Option<&Path>) -> Result<(ClientFile, Option<PathBuf>)> {
        if let Some(p) = explicit {
            return Ok((Self::load(p)?, Some(p.to_path_buf())));
        }
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")));
        match base.map(|b| b.join("ftvm/config.toml")) {
            Some(p) if p.exists() => Ok((Self::load(&p)?, Some(p))),
            _ => Ok((ClientFile::default(), None)),
        }
    }
}

pub struct Client {
    addrs: Vec<String>,
    tls: tokio_rustls::TlsConnector,
    bearer: Option<String>,
    rt: tokio::runtime::Runtime,
    pub timeout: Duration,
}

/// The coordinator's certificate was refused (another CA's, or not for its address).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsRefused(pub String);

/// An error the API answered with (not a transport failure).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl Client {
    /// A client of the coordinator(s) `addrs` (comma-separated) trusting `ca_pem` only.
    pub fn new(
        addrs: &str,
        ca_pem: &str,
        bearer: Option<String>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Client> {
        let ca = pki::certs_from_pem(ca_pem)
            .context("the cluster CA certificate")?
            .remove(0);
        let tls = pki::client_tls(&ca, identity)?;
        let addrs: Vec<String> = addrs.split(',').map(|a| a.trim().to_string()).collect();
        for a in &addrs {
            a.parse::<std::net::SocketAddr>()
                .with_context(|| format!("coordinator address {a:?} (want IP:PORT)"))?;
        }
        Ok(Client {
            addrs,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            bearer,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            timeout: Duration::from_secs(60),
        })
    }

    /// The CLI's client: coordinator, CA and token from flags, environment and config file.
    pub fn operator(coordinator: Option<&str>, config: Option<&Path>) -> Result<Client> {
        let (file, path) = ClientFile::find(config)?;
        let from = || {
            match &path {
            Some(p) => format!(" (config file {})", p.display()),
            None => " (no config file: set FTVM_CONFIG, or use the admin.toml `ftvm coordinator init` wrote)".into(),
        }
        };
        let addr = coordinator
            .map(str::to_string)
            .or(file.coordinator.clone())
            .unwrap_or_else(|| super::DEFAULT_COORDINATOR.to_string());
        let token = std::env::var("FTVM_TOKEN")
            .ok()
            .or(file.token.clone())
            .ok_or_else(|| {
                anyhow!(
                    "no API token: set FTVM_TOKEN or put `token = ...` in the config file{}",
                    from()
                )
            })?;
        let ca = std::env::var_os("FTVM_CA")
            .map(PathBuf::from)
            .or(file.ca.clone())
            .ok_or_else(|| {
                anyhow!(
                    "no cluster CA: set FTVM_CA or put `ca = ...` in the config file{}",
                    from()
                )
            })?;
        let ca_pem = std::fs::read_to_string(&ca)
            .with_context(|| format!("reading the cluster CA certificate {}", ca.display()))?;
        Client::new(&addr, &ca_pem, Some(token), None)
    }

    /// `method` `path` with an optional JSON body; the JSON reply, or the API's error.
    pub fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T> {
        let body = match body {
            Some(b) => serde_json::to_vec(b)?,
            None => Vec::new(),
        };
        let (status, bytes) = self.raw(method, path, body)?;
        if (200..300).contains(&status) {
            return serde_json::from_slice(&bytes).context("the coordinator's reply");
        }
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(ApiError { status, message }.into())
    }

    /// One request; tries each coordinator address until one accepts the connection.
    pub fn raw(&self, method: &str, path: &str, body: Vec<u8>) -> Result<(u16, Bytes)> {
        let mut refused = Vec::new();
        for addr in &self.addrs {
            let tcp = self.rt.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::net::TcpStream::connect(addr.as_str()),
                )
                .await
            });
            match tcp {
                Ok(Ok(tcp)) => {
                    let fut = self.exchange(tcp, addr, method, path, body);
                    return self
                        .rt
                        .block_on(async { tokio::time::timeout(self.timeout, fut).await })
                        .map_err(|_| {
                            anyhow!(
                                "the coordinator at {addr} did not answer within {} s",
                                self.timeout.as_secs()
                            )
                        })?;
                }
                Ok(Err(e)) => refused.push(format!("{addr}: {e}")),
                Err(_) => refused.push(format!("{addr}: no answer within 2 s")),
            }
        }
        bail!(
            "no coordinator answers ({}); is `ftvm coordinator` running?",
            refused.join("; ")
        )
    }

    async fn exchange(
        &self,
        tcp: tokio::net::TcpStream,
        addr: &str,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes)> {
        let ip: std::net::SocketAddr = addr.parse()?;
        let name = ServerName::IpAddress(ip.ip().into());
        let tls = self.tls.connect(name, tcp).await.map_err(|e| {
            // A certificate the cluster CA did not sign (or not for this address) is a
            // verdict, not a hiccup: typed, so that callers need not retry it.
            if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
                anyhow::Error::new(TlsRefused(format!(
                    "TLS with the coordinator at {addr}: {e} (is it a coordinator of this \
                     cluster's CA, and is {} one of its --tls-name addresses?)",
                    ip.ip()
                )))
            } else {
                anyhow!("TLS with the coordinator at {addr}: {e}")
            }
        })?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(b) = &self.bearer {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {b}"));
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::from(body)))?)
            .await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        Ok((status, bytes))
    }
}
