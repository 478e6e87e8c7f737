//! A side's certificate and key, created on first use and kept on disk.
use crate::Error;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A self-signed certificate and its private key.
#[derive(Debug)]
pub struct Identity {
    pub name: String,
    pub cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            name: self.name.clone(),
            cert: self.cert.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Paths of `name`'s certificate and key in `dir`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt.der")),
        dir.join(format!("{name}.key.der")),
    )
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::Keys(what, e)
}

impl Identity {
    /// Loads `name`'s identity from `dir`, creating (and storing, key at mode 0600) a new
    /// self-signed one if there is none.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Self, Error> {
        let (crt, key) = paths(dir, name);
        if crt.exists() && key.exists() {
            let cert = fs::read(&crt).map_err(io(format!("reading {}", crt.display())))?;
            let k = fs::read(&key).map_err(io(format!("reading {}", key.display())))?;
            return Ok(Identity {
                name: name.into(),
                cert: cert.into(),
                key: PrivatePkcs8KeyDer::from(k),
            });
        }
        fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let ck = rcgen::generate_simple_self_signed(vec![format!("ftvm-{name}")])
            .map_err(Error::CertGen)?;
        let cert_der = ck.cert.der().to_vec();
        let key_der = ck.signing_key.serialize_der();
        // Key first, created 0600 and never readable by others, then the certificate.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&key)
            .map_err(io(format!("creating {}", key.display())))?;
        f.write_all(&key_der)
            .map_err(io(format!("writing {}", key.display())))?;
        fs::write(&crt, &cert_der).map_err(io(format!("writing {}", crt.display())))?;
        Ok(Identity {
            name: name.into(),
            cert: cert_der.into(),
            key: PrivatePkcs8KeyDer::from(key_der),
        })
    }

    /// The private key, for TLS configuration.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }
}

/// Reads the certificate `name` published in `dir` (the peer's, to pin).
pub fn load_cert(dir: &Path, name: &str) -> Result<CertificateDer<'static>, Error> {
    let (crt, _) = paths(dir, name);
    let c = fs::read(&crt).map_err(io(format!("reading peer certificate {}", crt.display())))?;
    Ok(c.into())
}
