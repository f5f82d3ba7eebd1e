//! The client config file: where the server is and how to prove who we
//! are (like a kubeconfig). `$SKIFF_CONFIG`, else `~/.skiff/config`.

use std::path::{Path, PathBuf};

use skiff_api::decode::{Cx, Decode};
use skiff_api::yaml::{self, Limits, Node};

/// What a client needs to reach and authenticate to the API.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientConfig {
    /// `https://host:port`.
    pub server: String,
    /// PEM of the cluster CA, which the server's certificate must chain to.
    pub certificate_authority: String,
    /// PEM client certificate and key, for certificate authentication.
    pub client_certificate: Option<String>,
    pub client_key: Option<String>,
    /// A bearer token (the join token), with the node it acts for.
    pub token: Option<String>,
    pub node: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys or tokens.
        f.debug_struct("ClientConfig")
            .field("server", &self.server)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{0}")]
    Invalid(String),
}

impl ClientConfig {
    /// `$SKIFF_CONFIG`, else `~/.skiff/config`.
    pub fn default_path() -> PathBuf {
        if let Some(p) = std::env::var_os("SKIFF_CONFIG") {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from);
        home.join(".skiff").join("config")
    }

    pub fn load(path: &Path) -> Result<ClientConfig, ConfigError> {
        let name = path.display().to_string();
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: name.clone(),
            message: format!("{e}; start `skiff server` (it writes this file) or set SKIFF_CONFIG"),
        })?;
        Self::parse(&name, &src)
    }

    pub fn parse(name: &str, src: &str) -> Result<ClientConfig, ConfigError> {
        let docs = yaml::parse(src, Limits::default()).map_err(|e| ConfigError::Read {
            path: name.to_string(),
            message: format!("{}:{}: {}", e.mark.line, e.mark.col, e.message),
        })?;
        let Some(doc) = docs.first() else {
            return Err(ConfigError::Read {
                path: name.to_string(),
                message: "empty file".into(),
            });
        };
        let mut cx = Cx::new(name);
        let config = ClientConfig::decode(doc, &mut cx);
        let errors = cx.into_errors();
        match (config, errors.is_empty()) {
            (Some(c), true) => Ok(c),
            _ => Err(ConfigError::Invalid(
                errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n"),
            )),
        }
    }

    /// Writes the file readable by its owner only (it holds a private key).
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_private(path, self.to_yaml().as_bytes())
    }

    pub fn to_yaml(&self) -> String {
        let mut out = String::from(
            "# Skiff client configuration: server, CA, and credentials. Keep it private.\n",
        );
        out.push_str(&format!("server: {}\n", self.server));
        block(
            &mut out,
            "certificateAuthority",
            Some(&self.certificate_authority),
        );
        block(
            &mut out,
            "clientCertificate",
            self.client_certificate.as_deref(),
        );
        block(&mut out, "clientKey", self.client_key.as_deref());
        if let Some(t) = &self.token {
            out.push_str(&format!("token: {t}\n"));
        }
        if let Some(n) = &self.node {
            out.push_str(&format!("node: {n}\n"));
        }
        out
    }
}

fn block(out: &mut String, key: &str, pem: Option<&str>) {
    if let Some(pem) = pem {
        out.push_str(&format!("{key}: |\n"));
        for line in pem.trim_end().lines() {
            out.push_str(&format!("  {line}\n"));
        }
    }
}

/// Writes `bytes` to `path` atomically with mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

impl Decode for ClientConfig {
    fn decode(node: &Node, cx: &mut Cx) -> Option<Self> {
        let m = cx.fields(
            node,
            &[
                "server",
                "certificateAuthority",
                "clientCertificate",
                "clientKey",
                "token",
                "node",
            ],
        )?;
        let server: Option<String> = m.req(cx, "server");
        if let Some(s) = &server {
            m.check(cx, "server", s.starts_with("https://"), || {
                format!("server must be an https:// URL, found {s:?}")
            });
        }
        let ca = m.req(cx, "certificateAuthority");
        let client_certificate: Option<String> = m.opt(cx, "clientCertificate");
        let client_key: Option<String> = m.opt(cx, "clientKey");
        m.check(
            cx,
            "clientKey",
            client_certificate.is_some() == client_key.is_some(),
            || "clientCertificate and clientKey go together".to_string(),
        );
        let token: Option<String> = m.opt(cx, "token");
        let node: Option<String> = m.opt(cx, "node");
        m.check(
            cx,
            "token",
            token.is_some() || client_certificate.is_some(),
            || "a credential is needed: clientCertificate and clientKey, or token".to_string(),
        );
        Some(ClientConfig {
            server: server?,
            certificate_authority: ca?,
            client_certificate,
            client_key,
            token,
            node,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/config");
        let c = ClientConfig {
            server: "https://127.0.0.1:7443".into(),
            certificate_authority: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                .into(),
            client_certificate: Some(
                "-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n".into(),
            ),
            client_key: Some(
                "-----BEGIN PRIVATE KEY-----\nCCCC\n-----END PRIVATE KEY-----\n".into(),
            ),
            token: None,
            node: None,
        };
        c.save(&path).unwrap();
        assert_eq!(ClientConfig::load(&path).unwrap(), c);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!format!("{c:?}").contains("CCCC"));
    }

    #[test]
    fn reports_mistakes() {
        let err = ClientConfig::parse("cfg", "server: http://x\ncertificateAuthority: x\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("server must be an https:// URL"), "{err}");
        assert!(err.contains("a credential is needed"), "{err}");
    }
}
