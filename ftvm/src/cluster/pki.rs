//! The cluster's certificates: a CA that `ftvm coordinator init` creates (rcgen), the
//! coordinator's serving certificate (issued by the CA at every start, for the addresses it
//! listens on), and host certificates issued from a host's signing request when it joins.
//!
//! - The coordinator serves HTTPS only, and asks every client for a certificate of the CA
//!   without requiring one: host agents present theirs (mutual TLS), operators come with an
//!   API token instead. A host certificate names its host (`CN=ftvm-host:NAME`, client
//!   authentication only); the coordinator also checks it against the fingerprint it recorded
//!   when the host joined, so `ftvm host forget` revokes it.
//! - An agent trusts only its cluster's CA: a coordinator of another cluster fails the
//!   handshake.
//!
//! Files in the PKI directory: `ca.pem` (public), `ca.key` (mode 0600: whoever reads it can
//! mint hosts, so in production keep it off the datastore the hosts share).
use anyhow::{bail, Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The prefix of a host certificate's common name.
const HOST_CN: &str = "ftvm-host:";

pub fn ca_pem_path(pki: &Path) -> PathBuf {
    pki.join("ca.pem")
}

fn ca_key_path(pki: &Path) -> PathBuf {
    pki.join("ca.key")
}

/// Writes `bytes` to `path`, readable by its owner only when `secret`.
pub fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// Creates a new cluster CA in `pki` (refuses to replace one).
pub fn init_ca(pki: &Path) -> Result<()> {
    if ca_pem_path(pki).exists() || ca_key_path(pki).exists() {
        bail!(
            "{} already holds a cluster CA; this cluster is initialized",
            pki.display()
        );
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(pki)
            .with_context(|| format!("creating {}", pki.display()))?;
    }
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        format!("ftvm cluster CA {}", &coordinator::auth::new_secret()[..8]),
    );
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let cert = p.self_signed(&key)?;
    write_file(&ca_key_path(pki), key.serialize_pem().as_bytes(), true)?;
    write_file(&ca_pem_path(pki), cert.pem().as_bytes(), false)?;
    Ok(())
}

/// PEM text to DER certificates.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    use rustls::pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("reading PEM certificates")?;
    if certs.is_empty() {
        bail!("no certificate in the PEM text");
    }
    Ok(certs)
}

/// A PEM private key (PKCS#8, as rcgen writes them).
pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>> {
    let kp = KeyPair::from_pem(pem).context("reading a PEM private key")?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        kp.serialize_der(),
    )))
}

/// The SHA-256 of a certificate's DER, hex: how an operator pins the CA (`--ca-sha256`).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    coordinator::auth::sha256_hex(cert)
}

/// The cluster CA with its key: what the coordinator signs with.
pub struct Ca {
    pub pem: String,
    pub der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    pub fn load(pki: &Path) -> Result<Ca> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).with_context(|| {
                format!(
                    "reading {} (is the cluster initialized? `ftvm coordinator init --dir DIR`)",
                    p.display()
                )
            })
        };
        let pem = read(ca_pem_path(pki))?;
        let key = KeyPair::from_pem(&read(ca_key_path(pki))?).context("the CA key")?;
        let der = certs_from_pem(&pem)?.remove(0);
        let issuer = Issuer::from_ca_cert_pem(&pem, key).context("the CA certificate")?;
        Ok(Ca { pem, der, issuer })
    }

    /// A serving certificate for `names` (IP addresses or DNS names): (chain, key).
    pub fn server_cert(
        &self,
        names: &[String],
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "ftvm coordinator");
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((
            vec![cert.der().clone(), self.der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        ))
    }

    /// Signs a host's certificate signing request: whatever the request asks for, the
    /// certificate names `host` and allows client authentication only.
    pub fn sign_host(&self, csr_pem: &str, host: &str) -> Result<String> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("the certificate signing request: {e}"))?;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{HOST_CN}{host}"));
        p.distinguished_name = dn;
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        Ok(p.signed_by(&csr.public_key, &self.issuer)?.pem())
    }
}

/// A new key for host `host` and its certificate signing request: (key PEM, CSR PEM).
pub fn host_request(host: &str) -> Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{HOST_CN}{host}"));
    p.distinguished_name = dn;
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The host a (CA-verified) client certificate names, if it is a host certificate.
pub fn host_of(cert: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(cert).ok()?;
    let cn = c.subject().iter_common_name().next()?.as_str().ok()?;
    cn.strip_prefix(HOST_CN).map(str::to_string)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &CertificateDer<'static>) -> Result<Arc<rustls::RootCertStore>> {
    let mut r = rustls::RootCertStore::empty();
    r.add(ca.clone()).context("the cluster CA certificate")?;
    Ok(Arc::new(r))
}

/// TLS for the coordinator's API: TLS 1.3, HTTP/1.1, client certificates of the CA asked
/// for and verified, but optional (operators authenticate with tokens).
pub fn server_tls(
    ca: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig> {
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(ca)?, provider())
            .allow_unauthenticated()
            .build()?;
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

/// TLS for a client of the API: only the cluster CA is trusted; `identity` is a host's
/// certificate and key.
pub fn client_tls(
    ca: &CertificateDer<'static>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
) -> Result<rustls::ClientConfig> {
    let b = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?);
    let mut c = match identity {
        Some((chain, key)) => b.with_client_auth_cert(chain, key)?,
        None => b.with_no_client_auth(),
    };
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_certificate_names_its_host_whatever_the_request_asked() {
        let dir = std::env::temp_dir().join(format!("ftvm-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init_ca(&dir).unwrap();
        assert!(
            init_ca(&dir).is_err(),
            "a second init must not replace the CA"
        );
        let ca = Ca::load(&dir).unwrap();
        let (_key, csr) = host_request("mallory").unwrap();
        let cert = ca.sign_host(&csr, "h1").unwrap();
        let der = certs_from_pem(&cert).unwrap().remove(0);
        assert_eq!(host_of(&der).as_deref(), Some("h1"));
        assert!(ca.sign_host("not a csr", "h1").is_err());
        let (chain, _) = ca.server_cert(&["127.0.0.1".into()]).unwrap();
        assert_eq!(host_of(&chain[0]), None, "a server certificate is no host");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
